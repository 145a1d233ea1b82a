from django.apps import AppConfig


class FederationConfig(AppConfig):
    name = "controlplane.federation"
    label = "federation"
