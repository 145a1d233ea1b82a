from django.apps import AppConfig


class RlsConfig(AppConfig):
    name = "controlplane.rls"
    label = "rls"
    verbose_name = "Row-level security"

    def ready(self):
        from django.core.signals import request_finished, request_started
        from django.db.backends.signals import connection_created

        from . import context

        connection_created.connect(context.on_connection_created, dispatch_uid="rls-system")
        # Both ends: a kept connection (CONN_MAX_AGE) never carries one request's tenant
        # into the next, even when the previous request died before its end was signalled.
        request_started.connect(context.on_request_boundary, dispatch_uid="rls-start")
        request_finished.connect(context.on_request_boundary, dispatch_uid="rls-finish")
