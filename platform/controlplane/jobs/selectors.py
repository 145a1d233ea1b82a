"""Reads for jobs."""

from .models import DiagnosticJob


def diagnostic_job_get(*, job_id: int) -> DiagnosticJob:
    """A diagnostic job by id (platform-level, not tenant data)."""
    return DiagnosticJob.objects.get(pk=job_id)
