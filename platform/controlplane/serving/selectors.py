"""Reads for serving: batches, tenant-scoped."""

from django.http import Http404

from .models import Batch


def batch_get(*, tenant, batch_id: str) -> Batch:
    batch = Batch.objects.filter(tenant=tenant, pk=batch_id).first()
    if batch is None:
        raise Http404(f"No such batch: {batch_id}")
    return batch


def batches_list(*, tenant):
    return Batch.objects.filter(tenant=tenant)
