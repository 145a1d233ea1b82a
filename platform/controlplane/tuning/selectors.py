"""Reads for fine-tuning: base models, jobs, events, checkpoints, adapters; tenant-scoped."""

from dataclasses import dataclass
from pathlib import Path

from django.conf import settings
from django.db.models import QuerySet
from django.http import Http404

from controlplane.jobs.models import LeasedJob

from .models import Adapter, FineTuningCheckpoint, FineTuningEvent, FineTuningJob


@dataclass(frozen=True)
class BaseModel:
    """A base model the platform ships or an operator installed under the models dir."""

    name: str
    path: Path
    created: int


def base_models() -> list[BaseModel]:
    """Every directory under ENCLAVE_MODELS_DIR holding a config.json and weights."""
    root = Path(settings.ENCLAVE_MODELS_DIR)
    found = []
    for config in sorted(root.glob("*/config.json")):
        directory = config.parent
        if any(directory.glob("*.safetensors")):
            found.append(BaseModel(directory.name, directory, int(config.stat().st_mtime)))
    return found


def base_model_get(*, name: str) -> BaseModel | None:
    return next((m for m in base_models() if m.name == name), None)


def fine_tuning_job_get(*, tenant, job_id: str) -> FineTuningJob:
    job = FineTuningJob.objects.filter(tenant=tenant, pk=job_id).first()
    if job is None:
        raise Http404(f"No such fine-tuning job: {job_id}")
    return job


def fine_tuning_jobs_list(*, tenant) -> QuerySet[FineTuningJob]:
    return FineTuningJob.objects.filter(tenant=tenant)


def fine_tuning_jobs_active_count(*, tenant) -> int:
    return FineTuningJob.objects.filter(
        tenant=tenant, status__in=[LeasedJob.Status.QUEUED, LeasedJob.Status.RUNNING]
    ).count()


def fine_tuning_events_list(*, tenant, job_id: str) -> QuerySet[FineTuningEvent]:
    return fine_tuning_job_get(tenant=tenant, job_id=job_id).events.all()


def fine_tuning_checkpoints_list(*, tenant, job_id: str) -> QuerySet[FineTuningCheckpoint]:
    return fine_tuning_job_get(tenant=tenant, job_id=job_id).checkpoints.all()


def adapters_list(*, tenant) -> QuerySet[Adapter]:
    return Adapter.objects.filter(tenant=tenant)


def adapter_get(*, tenant, model_id: str) -> Adapter:
    adapter = Adapter.objects.filter(tenant=tenant, pk=model_id).first()
    if adapter is None:
        raise Http404(f"The model '{model_id}' does not exist")
    return adapter
