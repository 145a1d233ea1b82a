"""Reads for files, always through the tenant: another tenant's id is simply not found."""

from collections.abc import Iterator

from django.db.models import QuerySet, Sum
from django.http import Http404

from controlplane.vault import selectors as vault_selectors

from .models import File


def file_get(*, tenant, file_id: str) -> File:
    file = File.objects.filter(tenant=tenant, pk=file_id).first()
    if file is None:
        raise Http404(f"No such File object: {file_id}")
    return file


def files_list(*, tenant, purpose: str | None = None) -> QuerySet[File]:
    files = File.objects.filter(tenant=tenant)
    return files.filter(purpose=purpose) if purpose else files


def files_total_bytes(*, tenant) -> int:
    return File.objects.filter(tenant=tenant).aggregate(total=Sum("bytes"))["total"] or 0


def file_content(*, tenant, file_id: str) -> Iterator[bytes]:
    """The decrypted content, chunk by chunk."""
    file = file_get(tenant=tenant, file_id=file_id)
    return vault_selectors.blob_open(tenant=tenant, blob_id=file.blob_id)
