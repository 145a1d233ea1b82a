from django.apps import AppConfig


class ServingConfig(AppConfig):
    name = "controlplane.serving"
    label = "serving"

    def ready(self) -> None:
        from .engines import EngineHost

        self.engine_host = EngineHost()
