"""ASGI entry point: uvicorn (embedded) or gunicorn with uvicorn workers (production)."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "controlplane.settings")
application = get_asgi_application()
