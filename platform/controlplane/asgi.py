"""ASGI entry point: uvicorn (embedded) or gunicorn with uvicorn workers (production).

Database connections are not kept between requests here. Django runs each ASGI request's
synchronous code (ORM calls included) in a thread of its own, and a connection belongs to
its thread: with persistent connections (CONN_MAX_AGE > 0) every finished request left
its connection open behind a thread that no longer exists, until PostgreSQL refused new
clients ("too many clients already", found by bench/load.py). With CONN_MAX_AGE 0 Django
closes each request's connection when the request ends. Workers (Celery) keep theirs.
"""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "controlplane.settings")
os.environ["DATABASE_CONN_MAX_AGE"] = "0"  # whatever the environment says: see above
application = get_asgi_application()
