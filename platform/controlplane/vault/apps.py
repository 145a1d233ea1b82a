from django.apps import AppConfig


class VaultConfig(AppConfig):
    name = "controlplane.vault"
    label = "vault"
