"""Console pages for federations: list, create, invite, accept or decline, schedule,
members and their nodes, and the rounds with per-round metrics and cumulative epsilon.

Thin over controlplane.federation's services and selectors, with the API's roles:
steering a consortium (create, invite, accept, decline, schedule) is an admin's call;
starting a round needs a member of the owning tenant.
"""

from datetime import timedelta

from django import forms
from django.contrib import messages
from django.core.exceptions import PermissionDenied, ValidationError
from django.http import JsonResponse
from django.shortcuts import redirect
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from controlplane.federation import selectors as fed_selectors
from controlplane.federation import services as fed_services
from controlplane.federation.models import Federation
from controlplane.files import selectors as file_selectors
from controlplane.files.models import File
from controlplane.jobs.models import LeasedJob
from controlplane.tenancy.models import Role
from controlplane.tuning.selectors import base_models

from . import access
from .views import _errors, _render

#: a member's node counts as online when it was seen this recently
NODE_ONLINE_WITHIN = timedelta(minutes=2)
AGGREGATIONS = ("fedavg", "fedprox", "fedadam", "ffa", "svd")


def _usable_files(tenant):
    files = file_selectors.files_list(tenant=tenant, purpose=File.Purpose.FINE_TUNE)
    return [(f.id, f"{f.filename} ({f.id})") for f in files.filter(status=File.Status.PROCESSED)]


class FederationCreateForm(forms.Form):
    name = forms.CharField(label="Name", max_length=200)
    base_model = forms.ChoiceField(label="Base model")
    training_file = forms.ChoiceField(label="Our training file", required=False)
    min_participants = forms.IntegerField(label="Minimum members", min_value=1, initial=2)
    schedule = forms.CharField(
        label="Schedule (cron)",
        required=False,
        help_text="minute hour day month weekday, e.g. 0 2 * * *; empty: rounds start by hand",
    )
    aggregation = forms.ChoiceField(
        label="Aggregation", choices=[(a, a) for a in AGGREGATIONS], initial="fedavg"
    )
    local_steps = forms.IntegerField(label="Local steps per round", min_value=1, initial=5)
    lora_r = forms.IntegerField(label="LoRA rank", min_value=1, max_value=256, initial=8)
    # Optional: empty keeps the platform's default (federated.config.FederationConfig).
    lora_alpha = forms.IntegerField(label="LoRA alpha", min_value=1, max_value=1024, required=False)
    learning_rate = forms.FloatField(label="Learning rate", min_value=0, required=False)
    batch_size = forms.IntegerField(label="Batch size", min_value=1, max_value=256, required=False)
    max_seq_len = forms.IntegerField(
        label="Max sequence length", min_value=16, max_value=32768, required=False
    )
    eval_generations = forms.IntegerField(
        label="Scored answers per member and round", min_value=0, required=False,
        help_text="Greedy answers graded by the domain suite; 0: loss only.",
    )  # fmt: skip
    round_timeout_s = forms.FloatField(
        label="Round timeout (seconds)", min_value=1, required=False,
        help_text="A member that has not replied by then is left out of the round.",
    )  # fmt: skip
    straggler_timeout_s = forms.FloatField(
        label="Straggler grace (seconds)", min_value=0, required=False,
        help_text="Once enough members have replied, wait this long for the rest; "
        "empty: until the round timeout.",
    )  # fmt: skip
    secure_aggregation = forms.BooleanField(label="Secure aggregation", required=False)
    dp_noise_multiplier = forms.FloatField(
        label="DP noise multiplier", required=False, min_value=0,
        help_text="Empty: no differential privacy.",
    )  # fmt: skip
    dp_clip_norm = forms.FloatField(label="DP clip norm", required=False, min_value=0)
    dp_max_epsilon = forms.FloatField(label="DP budget (ε)", required=False, min_value=0)

    def __init__(self, *args, tenant, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["base_model"].choices = [(m.name, m.name) for m in base_models()]
        self.fields["training_file"].choices = [("", "None (on premises)")] + _usable_files(tenant)

    def clean(self):
        data = super().clean()
        if data.get("dp_noise_multiplier") is not None and data.get("dp_clip_norm") is None:
            self.add_error("dp_clip_norm", "Differential privacy needs a clip norm.")
        return data

    OPTIONAL = (
        "lora_alpha", "learning_rate", "batch_size", "max_seq_len", "eval_generations",
        "round_timeout_s", "straggler_timeout_s",
    )  # fmt: skip

    def settings(self) -> dict:
        data = self.cleaned_data
        settings = {
            "aggregation": data["aggregation"],
            "local_steps": data["local_steps"],
            "lora_r": data["lora_r"],
        }
        for name in self.OPTIONAL:
            if data.get(name) is not None:
                settings[name] = data[name]
        if data.get("secure_aggregation"):
            settings["secure_aggregation"] = True
        if data.get("dp_noise_multiplier") is not None:
            dp = {"noise_multiplier": data["dp_noise_multiplier"]}
            if data.get("dp_clip_norm") is not None:
                dp["clip_norm"] = data["dp_clip_norm"]
            if data.get("dp_max_epsilon") is not None:
                dp["max_epsilon"] = data["dp_max_epsilon"]
            settings["dp"] = dp
        return settings


class InviteForm(forms.Form):
    tenant = forms.CharField(label="Tenant to invite (slug)", max_length=64)


class AcceptForm(forms.Form):
    training_file = forms.ChoiceField(label="Our training file (hosted)", required=False)
    node_name = forms.CharField(label="Or our node's name (on premises)", required=False)

    def __init__(self, *args, tenant, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["training_file"].choices = [("", "None")] + _usable_files(tenant)


class ScheduleForm(forms.Form):
    schedule = forms.CharField(label="Schedule (cron)", required=False)
    status = forms.ChoiceField(label="Scheduled rounds", choices=Federation.Status.choices)


def _form_errors(form, exc: ValidationError) -> None:
    for message in _errors(exc):
        form.add_error(None, message)


@require_http_methods(["GET", "POST"])
@access.console_view(write_role=Role.ADMIN)
def federations(request):
    tenant = request.principal.tenant
    form = FederationCreateForm(request.POST or None, tenant=tenant)
    status = 200
    if request.method == "POST":
        status = 400
        if form.is_valid():
            data = form.cleaned_data
            try:
                federation = fed_services.federation_create(
                    owner=tenant,
                    name=data["name"],
                    base_model=data["base_model"],
                    settings=form.settings(),
                    schedule=data["schedule"].strip(),
                    min_participants=data["min_participants"],
                    training_file=data["training_file"] or None,
                    actor=request.principal.actor,
                )
            except ValidationError as exc:
                _form_errors(form, exc)
            else:
                request.audit_object = ("federation", federation.id)
                messages.success(request, f"Created federation {federation.name}.")
                return redirect("console:federation", federation_id=federation.id)
    visible = fed_selectors.federations_visible(tenant=tenant).select_related("owner")
    seats = fed_selectors.seats_of(tenant=tenant, federations=visible)
    rows = [{"federation": f, "seat": seats.get(f.id)} for f in visible]
    return _render(request, "federations.html", {"form": form, "rows": rows}, status=status)


def _members(federation) -> list[dict]:
    """Each member with its node's status: online when its node replied to a round (train
    or evaluate) within NODE_ONLINE_WITHIN. The SuperLink runs only while a round runs,
    so between rounds the last reply is all there is to go on."""
    now = timezone.now()
    rows = []
    for p in federation.participants.select_related("tenant").order_by("invited_at"):
        if p.last_seen_at is not None and now - p.last_seen_at <= NODE_ONLINE_WITHIN:
            node = "online"
        elif p.training_file_id or p.node_name:
            node = "offline"
        else:
            node = "—"
        rows.append({"p": p, "node": node, "owner": p.tenant_id == federation.owner_id})
    return rows


@require_GET
@access.console_view()
def federation_detail(request, federation_id: str):
    tenant = request.principal.tenant
    federation = fed_selectors.federation_get(tenant=tenant, federation_id=federation_id)
    seat = fed_selectors.participant_get(tenant=tenant, federation=federation)
    is_owner = federation.owner_id == tenant.pk
    dp = federation.settings.get("dp") or {}
    return _render(
        request,
        "federation_detail.html",
        {
            "federation": federation,
            "seat": seat,
            "is_owner": is_owner,
            "members": _members(federation),
            "rounds": federation.rounds.all()[:100],
            "dp": dp,
            "invite_form": InviteForm(),
            "accept_form": AcceptForm(tenant=tenant),
            "schedule_form": ScheduleForm(
                initial={"schedule": federation.schedule, "status": federation.status}
            ),
            "rounds_url": reverse("console:federation-rounds", args=[federation.id]),
        },
    )


@require_GET
@access.console_view()
def federation_rounds(request, federation_id: str):
    """What the rounds chart polls: each round's metrics and epsilon, oldest first."""
    tenant = request.principal.tenant
    federation = fed_selectors.federation_get(tenant=tenant, federation_id=federation_id)
    rounds = fed_selectors.rounds_list(tenant=tenant, federation_id=federation_id)
    data = []
    for r in sorted(rounds, key=lambda r: r.number):
        m = r.metrics or {}
        data.append(
            {
                "id": r.id, "number": r.number, "status": r.status, "partial": r.partial,
                "members": r.members, "train_loss": m.get("train_loss"),
                "val_loss": m.get("val_loss"), "accuracy": m.get("accuracy"),
                "epsilon": r.epsilon if r.epsilon is not None else m.get("epsilon"),
            }
        )  # fmt: skip
    busy = any(r["status"] in (LeasedJob.Status.QUEUED, LeasedJob.Status.RUNNING) for r in data)
    return JsonResponse(
        {"rounds": data, "epsilon_spent": federation.epsilon_spent, "busy": busy},
        headers={"Cache-Control": "no-store"},
    )


def _done(federation_id: str):
    return redirect("console:federation", federation_id=federation_id)


def _federation_action(request, federation_id: str, action) -> object:
    """Run `action()`; a Conflict or ValidationError becomes a message, not an error page."""
    request.audit_object = ("federation", federation_id)
    try:
        result = action()
    except (fed_services.Conflict, ValidationError) as exc:
        text = "; ".join(_errors(exc)) if isinstance(exc, ValidationError) else str(exc)
        messages.error(request, text)
        return None
    return result


@require_POST
@access.console_view(write_role=Role.ADMIN)
def federation_invite(request, federation_id: str):
    form = InviteForm(request.POST)
    if not form.is_valid():
        messages.error(request, "Name the tenant to invite by its slug.")
        return _done(federation_id)
    seat = _federation_action(
        request,
        federation_id,
        lambda: fed_services.federation_invite(
            tenant=request.principal.tenant,
            federation_id=federation_id,
            invitee_slug=form.cleaned_data["tenant"].strip(),
        ),
    )
    if seat is not None:
        messages.success(request, f"Invited {seat.tenant.slug}.")
    return _done(federation_id)


@require_POST
@access.console_view(write_role=Role.ADMIN)
def federation_accept(request, federation_id: str):
    tenant = request.principal.tenant
    form = AcceptForm(request.POST, tenant=tenant)
    if not form.is_valid():
        messages.error(request, "Choose one of your validated fine-tune files.")
        return _done(federation_id)
    seat = _federation_action(
        request,
        federation_id,
        lambda: fed_services.participant_accept(
            tenant=tenant,
            federation_id=federation_id,
            training_file=form.cleaned_data["training_file"] or None,
            node_name=form.cleaned_data["node_name"].strip(),
            actor=request.principal.actor,
        ),
    )
    if seat is not None:
        messages.success(request, "Accepted: your consent to these settings is recorded.")
    return _done(federation_id)


@require_POST
@access.console_view(write_role=Role.ADMIN)
def federation_decline(request, federation_id: str):
    seat = _federation_action(
        request,
        federation_id,
        lambda: fed_services.participant_decline(
            tenant=request.principal.tenant, federation_id=federation_id
        ),
    )
    if seat is not None:
        messages.success(request, f"You have {seat.status} this federation.")
        return redirect("console:federations")
    return _done(federation_id)


@require_POST
@access.console_view(write_role=Role.ADMIN)
def federation_schedule(request, federation_id: str):
    form = ScheduleForm(request.POST)
    if not form.is_valid():
        messages.error(request, "Give a cron line (or nothing) and active or paused.")
        return _done(federation_id)
    federation = _federation_action(
        request,
        federation_id,
        lambda: fed_services.federation_update(
            tenant=request.principal.tenant,
            federation_id=federation_id,
            schedule=form.cleaned_data["schedule"].strip(),
            status=form.cleaned_data["status"],
        ),
    )
    if federation is not None:
        messages.success(request, "Schedule saved.")
    return _done(federation_id)


@require_POST
@access.console_view()
def federation_round_start(request, federation_id: str):
    tenant = request.principal.tenant
    federation = fed_selectors.federation_get(tenant=tenant, federation_id=federation_id)
    if federation.owner_id != tenant.pk:
        raise PermissionDenied("Only the federation's owner can start a round.")
    fed_round = _federation_action(
        request, federation_id, lambda: fed_services.round_start(federation=federation)
    )
    if fed_round is not None:
        request.audit_object = ("federation.round", fed_round.id)
        messages.success(request, f"Round {fed_round.number} queued.")
    return _done(federation_id)
