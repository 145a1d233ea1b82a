"""Enclave's control plane (Django). Lives in platform/, which is a folder on the path."""

from .celery import app as celery_app

__all__ = ["celery_app"]
