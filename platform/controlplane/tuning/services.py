"""Writes for fine-tuning: create, cancel/pause/resume, the worker's run, adapters.

The worker side (`fine_tuning_job_run`) decrypts the training file in memory, calls
finetune's SFT library with callbacks that turn metrics into events, checkpoints into
vault blobs and the job row's stop request into "cancel" or "pause", and stores the
resulting adapter encrypted. Nothing in clear ever reaches the disk.
"""

import hashlib
import io
import json
import logging
import tarfile
from typing import Any

from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction

from controlplane.files.models import File
from controlplane.files.selectors import file_get
from controlplane.jobs import services as jobs
from controlplane.jobs.models import LeasedJob
from controlplane.tenancy.services import QuotaExceeded, usage_record
from controlplane.vault import selectors as vault_selectors
from controlplane.vault import services as vault_services

from . import selectors
from .models import Adapter, FineTuningCheckpoint, FineTuningEvent, FineTuningJob

log = logging.getLogger(__name__)

BASE_LEARNING_RATE = 2e-4
#: hyperparameter -> (type, default, minimum, maximum); None bounds are open
HYPERPARAMETERS: dict[str, tuple[type, Any, float | None, float | None]] = {
    "n_epochs": (int, 1, 1, 100),
    "batch_size": (int, 4, 1, 256),
    "learning_rate_multiplier": (float, 1.0, 1e-4, 100.0),
    "lora_r": (int, 8, 1, 256),
    "lora_alpha": (int, 16, 1, 1024),
    "max_steps": (int, None, 1, 1_000_000),
    "warmup_steps": (int, 0, 0, 100_000),
    "grad_accum": (int, 1, 1, 256),
    "max_seq_len": (int, 512, 16, 32768),
    "checkpoint_every": (int, 10, 0, 1_000_000),
    "val_fraction": (float, 0.0, 0.0, 0.5),
}


#: GRPO (method "reinforcement"): LoRA, steps, and the group sampling
RL_HYPERPARAMETERS: dict[str, tuple[type, Any, float | None, float | None]] = {
    "learning_rate_multiplier": (float, 1.0, 1e-4, 1000.0),
    "lora_r": (int, 8, 1, 256),
    "lora_alpha": (int, 16, 1, 1024),
    "max_steps": (int, 10, 1, 100_000),
    "prompts_per_step": (int, 4, 1, 256),
    "group_size": (int, 8, 2, 64),
    "max_completion_length": (int, 128, 1, 4096),
    "temperature": (float, 1.0, 0.1, 2.0),
    "beta": (float, 0.0, 0.0, 10.0),
    "checkpoint_every": (int, 10, 0, 1_000_000),
}
GRPO_BASE_LEARNING_RATE = 1e-5


class IdempotencyConflict(Exception):
    """The Idempotency-Key was used before with a different request (HTTP 409)."""


class NotRunnable(Exception):
    """The job cannot do that in its current state (HTTP 400)."""


def _hyperparameters(given: dict | None, method: str = "supervised") -> dict:
    """Defaults filled in and every value checked; ValidationError names the parameter."""
    given = dict(given or {})
    known = HYPERPARAMETERS if method == "supervised" else RL_HYPERPARAMETERS
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ValidationError({f"hyperparameters.{unknown[0]}": "unknown hyperparameter"})
    resolved = {}
    for name, (kind, default, low, high) in known.items():
        value = given.get(name, default)
        if value == "auto":
            value = default
        if value is None:
            resolved[name] = None
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValidationError({f"hyperparameters.{name}": f"must be a number, not {value!r}"})
        if kind is int and float(value) != int(value):
            raise ValidationError({f"hyperparameters.{name}": f"must be an integer, not {value}"})
        value = kind(value)
        if (low is not None and value < low) or (high is not None and value > high):
            raise ValidationError({f"hyperparameters.{name}": f"must be in [{low}, {high}]"})
        resolved[name] = value
    return resolved


def _fingerprint(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _event(job: FineTuningJob, message: str, *, level="info", type_="message", data=None):
    return FineTuningEvent.objects.create(
        job=job, level=level, type=type_, message=message, data=data
    )


def fine_tuning_job_create(
    *,
    tenant,
    model: str,
    training_file: str,
    validation_file: str | None = None,
    method: str = FineTuningJob.Method.SUPERVISED,
    hyperparameters: dict | None = None,
    grader: str = "",
    suffix: str | None = None,
    seed: int | None = None,
    metadata: dict | None = None,
    idempotency_key: str | None = None,
) -> tuple[FineTuningJob, bool]:
    """Create and queue a job; returns (job, created).

    With an idempotency key, a repeat of the same request returns the first job
    (created=False) and a different request with the same key raises
    IdempotencyConflict. ValidationError names the bad field; QuotaExceeded when the
    tenant already runs its maximum of concurrent jobs.
    """
    payload = {
        "model": model, "training_file": training_file, "validation_file": validation_file,
        "method": method, "hyperparameters": hyperparameters, "grader": grader,
        "suffix": suffix, "seed": seed, "metadata": metadata,
    }  # fmt: skip
    fingerprint = _fingerprint(payload)
    if idempotency_key:
        earlier = FineTuningJob.objects.filter(tenant=tenant, idempotency_key=idempotency_key)
        earlier = earlier.first()
        if earlier is not None:
            if earlier.request_fingerprint != fingerprint:
                raise IdempotencyConflict(
                    f"Idempotency-Key {idempotency_key!r} was used for a different request"
                )
            return earlier, False

    if selectors.base_model_get(name=model) is None:
        names = ", ".join(m.name for m in selectors.base_models()) or "none installed"
        raise ValidationError({"model": f"unknown base model {model!r} (available: {names})"})
    if method not in FineTuningJob.Method.values:
        raise ValidationError({"method": f"{method!r} is not supervised or reinforcement"})
    if method == FineTuningJob.Method.REINFORCEMENT:
        from finetune.domains import SUITES

        if grader not in SUITES:
            raise ValidationError(
                {"method.reinforcement.grader": f"{grader!r} is not a grader; use one of the "
                 f"domain suites: {', '.join(sorted(SUITES))}"}
            )  # fmt: skip
    files = {"training_file": training_file, "validation_file": validation_file}
    resolved_files = {}
    for field, file_id in files.items():
        if file_id is None:
            continue
        try:
            file = file_get(tenant=tenant, file_id=file_id)
        except Exception as exc:  # Http404: the same answer as a missing file
            raise ValidationError({field: f"no such file: {file_id}"}) from exc
        if file.purpose != File.Purpose.FINE_TUNE:
            raise ValidationError({field: f"{file_id} has purpose {file.purpose!r}, not fine-tune"})
        if file.status != File.Status.PROCESSED:
            raise ValidationError(
                {field: f"{file_id} failed validation: {file.status_details or file.status}"}
            )
        resolved_files[field] = file
    if suffix is not None and (len(suffix) > 40 or not suffix.replace("-", "").isalnum()):
        raise ValidationError({"suffix": "up to 40 letters, digits and dashes"})
    resolved = _hyperparameters(hyperparameters, method=method)
    if selectors.fine_tuning_jobs_active_count(tenant=tenant) >= tenant.max_concurrent_jobs:
        raise QuotaExceeded(
            f"tenant {tenant.slug} already runs {tenant.max_concurrent_jobs} fine-tuning jobs"
        )
    try:
        with transaction.atomic():
            job = FineTuningJob.objects.create(
                tenant=tenant,
                model=model,
                training_file=resolved_files["training_file"],
                validation_file=resolved_files.get("validation_file"),
                method=method,
                hyperparameters=resolved,
                grader=grader,
                suffix=suffix or "",
                seed=seed if seed is not None else 0,
                metadata=metadata,
                idempotency_key=idempotency_key or None,
                request_fingerprint=fingerprint,
            )
            _event(job, f"Created fine-tuning job: {job.id}")
            jobs.job_enqueue(job=job)
    except IntegrityError:  # the same key raced in from another request
        return fine_tuning_job_create(tenant=tenant, idempotency_key=idempotency_key, **payload)
    return job, True


def fine_tuning_job_cancel(*, tenant, job_id: str) -> FineTuningJob:
    job = selectors.fine_tuning_job_get(tenant=tenant, job_id=job_id)
    try:
        job = jobs.job_request_stop(job=job, what=LeasedJob.StopRequest.CANCEL)
    except ValueError as exc:
        raise NotRunnable(str(exc)) from exc
    _event(job, "Cancellation requested" if job.status == "running" else "Job cancelled")
    return job


def fine_tuning_job_pause(*, tenant, job_id: str) -> FineTuningJob:
    job = selectors.fine_tuning_job_get(tenant=tenant, job_id=job_id)
    try:
        job = jobs.job_request_stop(job=job, what=LeasedJob.StopRequest.PAUSE)
    except ValueError as exc:
        raise NotRunnable(str(exc)) from exc
    _event(job, "Pause requested" if job.status == "running" else "Job paused")
    return job


def fine_tuning_job_resume(*, tenant, job_id: str) -> FineTuningJob:
    job = selectors.fine_tuning_job_get(tenant=tenant, job_id=job_id)
    try:
        job = jobs.job_resume(job=job)
    except ValueError as exc:
        raise NotRunnable(str(exc)) from exc
    _event(job, "Job resumed")
    return job


# ---- adapters ----------------------------------------------------------------------------


def adapter_pack(files: dict[str, bytes]) -> bytes:
    """PEFT adapter files (name -> bytes) as one in-memory tar, for one vault blob."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def adapter_unpack(packed: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(packed), mode="r") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def adapter_create(*, job: FineTuningJob, files: dict[str, bytes]) -> Adapter:
    model_id = f"ft:{job.model}:{job.tenant.slug}:{job.suffix}:{job.id}"
    blob = vault_services.blob_put(tenant=job.tenant, kind="adapter", source=[adapter_pack(files)])
    return Adapter.objects.create(
        id=model_id, tenant=job.tenant, base_model=job.model, job=job, blob=blob
    )


def adapter_delete(*, tenant, model_id: str) -> str:
    adapter = selectors.adapter_get(tenant=tenant, model_id=model_id)
    with transaction.atomic():
        if adapter.blob_id:
            vault_services.blob_destroy(tenant=tenant, blob_id=adapter.blob_id)
        adapter.delete()
    return model_id


def adapter_files(*, adapter: Adapter) -> dict[str, bytes]:
    """The decrypted PEFT files of an adapter, in memory."""
    packed = vault_selectors.blob_read_bytes(tenant=adapter.tenant, blob_id=adapter.blob_id)
    return adapter_unpack(packed)


# ---- the worker side ---------------------------------------------------------------------


def _examples(*, tenant, file: File) -> list[dict]:
    from finetune.data import iter_examples

    data = vault_selectors.blob_read_bytes(tenant=tenant, blob_id=file.blob_id)
    return [{"messages": ex.messages} for ex in iter_examples(io.BytesIO(data))]


class _JobCallbacks:
    """SFTCallbacks for a job: events, encrypted checkpoints, lease renewal, stop requests."""

    def __init__(self, job: FineTuningJob):
        self.job = job
        self.stop = ""
        self.last_metrics: dict = {}

    def on_metrics(self, metrics: dict) -> None:
        self.last_metrics = metrics
        text = ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in metrics.items()
            if k in ("loss", "token_accuracy", "val_loss", "lr")
        )
        _event(self.job, f"Step {metrics.get('step')}: {text}", type_="metrics", data=metrics)
        self.stop = jobs.job_renew_lease(job=self.job)

    def on_checkpoint(self, step: int, state: bytes) -> None:
        blob = vault_services.blob_put(tenant=self.job.tenant, kind="checkpoint", source=[state])
        FineTuningCheckpoint.objects.create(
            job=self.job, step=step, metrics=self.last_metrics, blob=blob
        )
        self.stop = jobs.job_renew_lease(job=self.job, resume_blob=blob)
        _event(self.job, f"Checkpoint saved at step {step}")

    def should_stop(self) -> str | None:
        self.stop = jobs.job_renew_lease(job=self.job)
        return self.stop or None


def _tasks(*, tenant, file: File, suite: str) -> list[dict]:
    """The verifiable tasks of a reinforcement file: each row carries `task`, a
    `finetune.domains.TaskItem.to_dict()` of the grader's suite."""
    from finetune.domains import SUITES

    data = vault_selectors.blob_read_bytes(tenant=tenant, blob_id=file.blob_id)
    families = set(SUITES[suite].families)
    tasks = []
    for number, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        task = json.loads(line).get("task")
        if not isinstance(task, dict) or task.get("family") not in families:
            raise ValueError(
                f"line {number}: a reinforcement row needs a 'task' of the {suite} suite "
                f"(families: {', '.join(sorted(families))})"
            )
        tasks.append(task)
    return tasks


def _grpo_config(job: FineTuningJob, model_path: str):
    from finetune.grpo import GRPOConfig

    hp = job.hyperparameters
    return GRPOConfig(
        model_path=model_path,
        lora_r=hp["lora_r"],
        lora_alpha=hp["lora_alpha"],
        learning_rate=GRPO_BASE_LEARNING_RATE * hp["learning_rate_multiplier"],
        max_steps=hp["max_steps"],
        prompts_per_step=hp["prompts_per_step"],
        group_size=hp["group_size"],
        max_completion_length=hp["max_completion_length"],
        temperature=hp["temperature"],
        beta=hp["beta"],
        seed=job.seed,
        checkpoint_every=hp["checkpoint_every"],
        log_every=1,
    )


def _sft_config(job: FineTuningJob, model_path: str):
    from finetune.sft import SFTConfig

    hp = job.hyperparameters
    return SFTConfig(
        model_path=model_path,
        lora_r=hp["lora_r"],
        lora_alpha=hp["lora_alpha"],
        learning_rate=BASE_LEARNING_RATE * hp["learning_rate_multiplier"],
        warmup_steps=hp["warmup_steps"],
        max_steps=hp["max_steps"],
        epochs=hp["n_epochs"],
        batch_size=hp["batch_size"],
        grad_accum=hp["grad_accum"],
        max_seq_len=hp["max_seq_len"],
        seed=job.seed,
        val_fraction=hp["val_fraction"],
        checkpoint_every=hp["checkpoint_every"],
        log_every=1,
    )


def fine_tuning_job_run(*, job_id: str) -> bool:
    """The `train` worker's side of a job: train, store the adapter, close the row."""

    def work(job: FineTuningJob) -> dict:
        from finetune.sft import train_sft

        base = selectors.base_model_get(name=job.model)
        if base is None:
            raise RuntimeError(f"base model {job.model!r} is no longer installed")
        resume = None
        if job.resume_blob_id:
            resume = vault_selectors.blob_read_bytes(tenant=job.tenant, blob_id=job.resume_blob_id)
            _event(job, "Resuming from the last checkpoint")
        else:
            _event(job, "Fine-tuning job started")
        train = val = None
        if job.method == FineTuningJob.Method.SUPERVISED:
            train = _examples(tenant=job.tenant, file=job.training_file)
        if job.validation_file_id and job.method == FineTuningJob.Method.SUPERVISED:
            val = _examples(tenant=job.tenant, file=job.validation_file)
        callbacks = _JobCallbacks(job)
        try:
            if job.method == FineTuningJob.Method.REINFORCEMENT:
                from finetune.grpo import train_grpo

                result = train_grpo(
                    _grpo_config(job, str(base.path)),
                    tasks=_tasks(tenant=job.tenant, file=job.training_file, suite=job.grader),
                    callbacks=callbacks,
                    resume_state=resume,
                )
            else:
                result = train_sft(
                    _sft_config(job, str(base.path)),
                    train_examples=train,
                    val_examples=val,
                    callbacks=callbacks,
                    resume_state=resume,
                )
        except jobs.LeaseLost:
            raise
        except Exception as exc:
            _event(job, f"Fine-tuning failed: {type(exc).__name__}: {exc}", level="error")
            raise
        if result.status == "cancelled":
            _event(job, "Job cancelled")
            return {"status": LeasedJob.Status.CANCELLED}
        if result.status == "paused":
            blob = vault_services.blob_put(
                tenant=job.tenant, kind="checkpoint", source=[result.state]
            )
            _event(job, f"Job paused at step {result.steps}")
            return {"status": LeasedJob.Status.PAUSED, "resume_blob": blob}
        adapter = adapter_create(job=job, files=result.adapter_files)
        trained = getattr(result, "trained_tokens", 0) or int(
            result.metrics.get("completion_length", 0) * result.steps
        )
        usage_record(tenant=job.tenant, training_tokens=trained)
        _event(job, f"New fine-tuned model created: {adapter.id}")
        _event(job, "The job has successfully completed")
        return {"fine_tuned_model": adapter.id, "trained_tokens": trained}

    return jobs.job_run(model=FineTuningJob, job_id=job_id, work=work)
