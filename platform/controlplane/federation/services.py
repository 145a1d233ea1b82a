"""Writes for federations: create, invite, accept (consent), schedule, rounds.

A round is a job on the `train` queue. Its worker calls `federated.run_federation` for
one round with the accepted members; a hosted member's data is read by
`controlplane.federation.provider` inside that member's Flower client process, which
decrypts the member's file in memory. The server side never sees a training example.
"""

import json
import logging
from dataclasses import fields as dataclass_fields

from django.core.exceptions import PermissionDenied, ValidationError
from django.db import transaction
from django.db.models import Max, Q
from django.utils import timezone
from django_celery_beat.models import CrontabSchedule, PeriodicTask

from controlplane.files.models import File
from controlplane.files.selectors import file_get
from controlplane.jobs import services as jobs
from controlplane.jobs.models import LeasedJob
from controlplane.tenancy.models import Tenant
from controlplane.tenancy.services import usage_record
from controlplane.tuning import selectors as tuning_selectors
from controlplane.tuning.services import adapter_pack
from controlplane.vault import services as vault_services

from . import selectors
from .models import FederatedRound, Federation, GlobalAdapter, Participant

log = logging.getLogger(__name__)
S = Participant.Status
#: FederationConfig fields a federation's owner may set (the rest are the platform's)
SETTABLE = (
    "aggregation", "robust", "norm_bound", "trim_fraction", "proximal_mu",
    "server_learning_rate", "lora_r", "lora_alpha", "targets", "learning_rate",
    "local_steps", "batch_size", "max_seq_len", "seed", "eval_generations",
    "eval_max_new_tokens", "min_available", "min_train", "round_timeout_s",
    "straggler_timeout_s", "secure_aggregation", "dp",
)  # fmt: skip


class Conflict(Exception):
    """The request clashes with the federation's state (HTTP 409/400)."""


def _federation_config(federation: Federation, model_path: str = ""):
    from federated.config import FederationConfig

    return FederationConfig(model_path=model_path, num_rounds=1, **federation.settings)


def _check_settings(settings: dict) -> dict:
    from federated.config import FederationConfig

    unknown = sorted(set(settings) - set(SETTABLE))
    if unknown:
        raise ValidationError({f"settings.{unknown[0]}": "unknown or not settable"})
    names = {f.name for f in dataclass_fields(FederationConfig)}
    assert set(SETTABLE) <= names, "SETTABLE drifted from FederationConfig"
    try:
        FederationConfig(model_path="", **settings).validate()
    except (TypeError, ValueError) as exc:
        raise ValidationError({"settings": str(exc)}) from exc
    return json.loads(json.dumps(settings))


def _check_cron(schedule: str) -> list[str]:
    parts = schedule.split()
    if len(parts) != 5:
        raise ValidationError(
            {"schedule": "a cron line has 5 fields: minute hour day month weekday"}
        )
    try:
        from celery.schedules import crontab

        crontab(*parts[:2], day_of_month=parts[2], month_of_year=parts[3], day_of_week=parts[4])
    except (ValueError, TypeError) as exc:
        raise ValidationError({"schedule": f"invalid cron line: {exc}"}) from exc
    return parts


def _sync_schedule(federation: Federation) -> None:
    """One beat entry per federation, in the database (django-celery-beat)."""
    name = f"federation-round:{federation.id}"
    if not federation.schedule or federation.status != Federation.Status.ACTIVE:
        PeriodicTask.objects.filter(name=name).delete()
        return
    minute, hour, dom, month, dow = _check_cron(federation.schedule)
    crontab, _ = CrontabSchedule.objects.get_or_create(
        minute=minute, hour=hour, day_of_month=dom, month_of_year=month, day_of_week=dow,
        timezone="UTC",
    )  # fmt: skip
    PeriodicTask.objects.update_or_create(
        name=name,
        defaults={
            "task": "federation.start_scheduled_round",
            "crontab": crontab,
            "args": json.dumps([federation.id]),
            "queue": "default",
            "enabled": True,
        },
    )


def _check_training_file(*, tenant, file_id: str | None):
    if file_id is None:
        return None
    try:
        file = file_get(tenant=tenant, file_id=file_id)
    except Exception as exc:
        raise ValidationError({"training_file": f"no such file: {file_id}"}) from exc
    if file.purpose != File.Purpose.FINE_TUNE or file.status != File.Status.PROCESSED:
        raise ValidationError({"training_file": f"{file_id} is not a validated fine-tune file"})
    return file


def federation_create(
    *, owner: Tenant, name: str, base_model: str, settings: dict | None = None,
    schedule: str = "", min_participants: int = 2, training_file: str | None = None,
    actor: str = "",
) -> Federation:  # fmt: skip
    """Create a federation; the owner is its first member (accepted, with its file)."""
    if tuning_selectors.base_model_get(name=base_model) is None:
        raise ValidationError({"base_model": f"unknown base model {base_model!r}"})
    if min_participants < 1:
        raise ValidationError({"min_participants": "must be at least 1"})
    settings = _check_settings(settings or {})
    if schedule:
        _check_cron(schedule)
    file = _check_training_file(tenant=owner, file_id=training_file)
    with transaction.atomic():
        federation = Federation.objects.create(
            owner=owner, name=name, base_model=base_model, settings=settings,
            schedule=schedule, min_participants=min_participants,
        )  # fmt: skip
        Participant.objects.create(
            federation=federation, tenant=owner, status=S.ACCEPTED, accepted_at=timezone.now(),
            accepted_by=actor, consent={"settings": settings, "base_model": base_model},
            training_file=file,
        )  # fmt: skip
        _sync_schedule(federation)
    return federation


def _owned(*, tenant: Tenant, federation_id: str) -> Federation:
    federation = selectors.federation_get(tenant=tenant, federation_id=federation_id)
    if federation.owner_id != tenant.pk:
        raise PermissionDenied("Only the federation's owner can do this.")
    return federation


def federation_update(
    *, tenant: Tenant, federation_id: str, schedule: str | None = None, status: str | None = None
) -> Federation:
    federation = _owned(tenant=tenant, federation_id=federation_id)
    if schedule is not None:
        if schedule:
            _check_cron(schedule)
        federation.schedule = schedule
    if status is not None:
        if status not in Federation.Status.values:
            raise ValidationError({"status": f"{status!r} is not active or paused"})
        federation.status = status
    with transaction.atomic():
        federation.save(update_fields=["schedule", "status"])
        _sync_schedule(federation)
    return federation


def federation_invite(*, tenant: Tenant, federation_id: str, invitee_slug: str) -> Participant:
    federation = _owned(tenant=tenant, federation_id=federation_id)
    invitee = Tenant.objects.filter(slug=invitee_slug).first()
    if invitee is None:
        raise ValidationError({"tenant": f"no tenant with slug {invitee_slug!r}"})
    seat, created = Participant.objects.get_or_create(federation=federation, tenant=invitee)
    if not created:
        if seat.status == S.ACCEPTED:
            raise Conflict(f"{invitee_slug} is already a member")
        seat.status = S.INVITED
        seat.save(update_fields=["status"])
    return seat


def participant_accept(
    *, tenant: Tenant, federation_id: str, training_file: str | None = None,
    node_name: str = "", actor: str = "",
) -> Participant:  # fmt: skip
    """Record the tenant's consent, with the settings it consented to, and its data source."""
    federation = selectors.federation_get(tenant=tenant, federation_id=federation_id)
    seat = selectors.participant_get(tenant=tenant, federation=federation)
    if seat is None or seat.status not in (S.INVITED, S.ACCEPTED):
        raise Conflict("there is no invitation to accept")
    if not training_file and not node_name:
        raise ValidationError(
            {"training_file": "give a training_file (hosted) or a node_name (on premises)"}
        )
    seat.training_file = _check_training_file(tenant=tenant, file_id=training_file)
    seat.node_name = node_name
    seat.status = S.ACCEPTED
    seat.accepted_at = timezone.now()
    seat.accepted_by = actor
    seat.consent = {"settings": federation.settings, "base_model": federation.base_model}
    seat.save()
    return seat


def participant_decline(*, tenant: Tenant, federation_id: str) -> Participant:
    federation = selectors.federation_get(tenant=tenant, federation_id=federation_id)
    seat = selectors.participant_get(tenant=tenant, federation=federation)
    if seat is None or federation.owner_id == tenant.pk:
        raise Conflict("the owner cannot leave its own federation")
    seat.status = S.DECLINED if seat.status == S.INVITED else S.LEFT
    seat.save(update_fields=["status"])
    return seat


def _accountant(federation: Federation):
    """The federation's privacy accountant, or None without DP. Each round is its own
    Flower run, so the federation (not the run) accumulates epsilon across rounds."""
    dp = federation.settings.get("dp")
    if not dp:
        return None
    from federated.privacy import DPConfig, PrivacyAccountant

    return PrivacyAccountant(DPConfig(**dp))


def round_start(*, federation: Federation) -> FederatedRound:
    """Queue the federation's next round. Conflict when one is queued or running, or
    when fewer members than the minimum have accepted."""
    members = selectors.participants_accepted(federation=federation)
    hosted = [p for p in members if p.training_file_id]
    if len(hosted) < federation.min_participants:
        raise Conflict(
            f"{len(hosted)} member(s) with data have accepted; the federation needs "
            f"{federation.min_participants}"
        )
    with transaction.atomic():
        Federation.objects.select_for_update().filter(pk=federation.pk).first()
        busy = federation.rounds.filter(
            status__in=[LeasedJob.Status.QUEUED, LeasedJob.Status.RUNNING]
        )
        if busy.exists():
            raise Conflict(f"round {busy.first().number} is still {busy.first().status}")
        last = federation.rounds.aggregate(n=Max("number"))["n"] or 0
        done = federation.rounds.filter(status=LeasedJob.Status.SUCCEEDED).count()
        accountant = _accountant(federation)
        if accountant is not None and accountant.would_exceed(done):
            raise Conflict(
                f"privacy budget: epsilon after round {done + 1} would be "
                f"{accountant.epsilon_after(done + 1):.2f}, over the budget of "
                f"{accountant.config.max_epsilon}"
            )
        number = last + 1
        fed_round = FederatedRound.objects.create(federation=federation, number=number)
        jobs.job_enqueue(job=fed_round)
    return fed_round


def round_start_scheduled(*, federation_id: str) -> FederatedRound | None:
    """Beat's entry point: start a round unless the federation is paused or busy."""
    federation = Federation.objects.filter(pk=federation_id).first()
    if federation is None or federation.status != Federation.Status.ACTIVE:
        return None
    try:
        return round_start(federation=federation)
    except Conflict as exc:
        log.info("federation %s: scheduled round skipped: %s", federation_id, exc)
        return None


def participants_seen(*, federation: Federation, names, at=None) -> int:
    """Record that the nodes of the members named `names` replied (at `at`, default now).

    A name is what a member's ClientApp puts in its replies: the tenant slug for a hosted
    member (round_run names them so), the node name for an on-premises one. Names that are
    not an accepted member of this federation are ignored. Returns the rows updated.
    """
    names = sorted({str(n) for n in names if n})
    if not names:
        return 0
    seats = selectors.participants_accepted(federation=federation).filter(
        Q(tenant__slug__in=names) | Q(node_name__in=names)
    )
    return Participant.objects.filter(pk__in=seats.values("pk")).update(
        last_seen_at=at or timezone.now()
    )


# ---- the worker side ---------------------------------------------------------------------


class _RoundCallbacks:
    def __init__(self, fed_round: FederatedRound, base_model: str):
        self.round = fed_round
        self.base_model = base_model
        self.failures: list[str] = []
        self.stop = ""

    def on_round_end(self, round: int, metrics: dict, adapter_files: dict[str, bytes]) -> None:
        federation = self.round.federation
        blob = vault_services.blob_put(
            tenant=federation.owner, kind="federated-adapter", source=[adapter_pack(adapter_files)]
        )
        model_id = f"fed:{self.base_model}:{federation.id}:r{self.round.number}"
        GlobalAdapter.objects.update_or_create(
            id=model_id, defaults={"federation": federation, "round": self.round, "blob": blob}
        )
        # member name -> its metrics, for every member whose node replied (train or evaluate)
        per_member = metrics.get("members") or {}
        members = sorted(per_member)
        participants_seen(federation=federation, names=members)
        for tenant in Tenant.objects.filter(slug__in=members):
            trained = int(per_member[tenant.slug].get("trained_tokens") or 0)
            if trained:
                usage_record(tenant=tenant, training_tokens=trained)
        self.stop = jobs.job_renew_lease(
            job=self.round, metrics=metrics, epsilon=metrics.get("epsilon"),
            partial=bool(metrics.get("partial")), global_model=model_id,
            members=members,
        )  # fmt: skip

    def on_round_failed(self, round: int, reason: str) -> None:
        self.failures.append(reason)
        self.stop = jobs.job_renew_lease(job=self.round)

    def should_stop(self) -> bool:
        self.stop = jobs.job_renew_lease(job=self.round)
        return bool(self.stop)


def round_run(*, round_id: str) -> bool:
    """The `train` worker's side of a round."""

    def work(fed_round: FederatedRound) -> dict:
        from federated.config import ParticipantSpec
        from federated.runtime import run_federation

        federation = fed_round.federation
        base = tuning_selectors.base_model_get(name=federation.base_model)
        if base is None:
            raise RuntimeError(f"base model {federation.base_model!r} is not installed")
        participants = [
            ParticipantSpec(
                name=p.tenant.slug,
                data_provider="controlplane.federation.provider:hosted_examples",
                provider_options={"tenant_id": p.tenant_id, "file_id": p.training_file_id},
            )
            for p in selectors.participants_accepted(federation=federation)
            if p.training_file_id
        ]
        config = _federation_config(federation, str(base.path))
        previous = federation.adapters.exclude(round=fed_round).order_by("-round__number").first()
        # The federation's privacy spent so far: each round is its own run.
        config.dp_rounds_done = federation.rounds.filter(status=LeasedJob.Status.SUCCEEDED).count()
        if previous is not None:  # continue from the last round's global adapter
            config.initial_adapter = _adapter_dir_for_worker(previous)
        callbacks = _RoundCallbacks(fed_round, federation.base_model)
        from django.conf import settings

        result = run_federation(
            config,
            participants=participants,
            callbacks=callbacks,
            runtime=settings.ENCLAVE_FEDERATION_RUNTIME,
        )
        if result.status == "completed" and result.rounds:
            accountant = _accountant(federation)
            if accountant is not None:
                done = federation.rounds.filter(status=LeasedJob.Status.SUCCEEDED).count() + 1
                Federation.objects.filter(pk=federation.pk).update(
                    epsilon_spent=accountant.epsilon_after(done)
                )
            return {}
        if result.status == "stopped":
            return {"status": LeasedJob.Status.CANCELLED}
        reason = result.reason or "; ".join(callbacks.failures) or result.status
        return {"status": LeasedJob.Status.FAILED, "error": f"{result.status}: {reason}"}

    return jobs.job_run(model=FederatedRound, job_id=round_id, work=work)


def _adapter_dir_for_worker(adapter: GlobalAdapter) -> str:
    """The previous global adapter, decrypted into a private in-memory directory."""
    from controlplane.serving.engines import engine_host
    from controlplane.tuning.services import adapter_unpack
    from controlplane.vault.selectors import blob_read_bytes

    def files():
        owner = adapter.federation.owner
        return adapter_unpack(blob_read_bytes(tenant=owner, blob_id=adapter.blob_id))

    return str(engine_host().adapter_dir(adapter.id, files))
