"""The tenant console: thin views over the apps' services and tenant-scoped selectors.

Every view is wrapped by `access.console_view` (login, membership, role, audit). Another
tenant's id is answered 404 by the selectors, never looked up directly here.
"""

import csv
import json
import logging
import uuid

from asgiref.sync import sync_to_async
from django.contrib import messages
from django.core.exceptions import PermissionDenied, ValidationError
from django.http import Http404, HttpResponse, JsonResponse, StreamingHttpResponse
from django.shortcuts import redirect
from django.template.response import TemplateResponse
from django.urls import reverse
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from controlplane.audit import selectors as audit_selectors
from controlplane.files import selectors as file_selectors
from controlplane.files import services as file_services
from controlplane.files.models import File
from controlplane.jobs.models import LeasedJob
from controlplane.serving import services as serving_services
from controlplane.serving.chat import ChatRequestError, parse_chat_request
from controlplane.tenancy import selectors as tenancy_selectors
from controlplane.tenancy import services as tenancy_services
from controlplane.tenancy.models import Role
from controlplane.tenancy.services import QuotaExceeded, RateLimited
from controlplane.tuning import selectors as tuning_selectors
from controlplane.tuning import services as tuning_services
from controlplane.tuning.models import FineTuningEvent
from controlplane.tuning.views import models_visible

from . import access, forms

log = logging.getLogger(__name__)
ACTIVE = (LeasedJob.Status.QUEUED, LeasedJob.Status.RUNNING, LeasedJob.Status.PAUSED)
AUDIT_PAGE = 200


def _render(request, template: str, context: dict | None = None, status: int = 200):
    principal = request.principal
    base = {
        "principal": principal,
        "tenant": principal.tenant,
        "my_memberships": getattr(request, "console_memberships", []),
        "can_write": principal.can(Role.MEMBER),
        "can_admin": principal.can(Role.ADMIN),
    }
    return TemplateResponse(
        request, f"console/{template}", {**base, **(context or {})}, status=status
    )


def _errors(exc: ValidationError) -> list[str]:
    if hasattr(exc, "message_dict"):
        return [f"{field}: {'; '.join(msgs)}" for field, msgs in exc.message_dict.items()]
    return list(exc.messages)


# ---- tenant switcher ----------------------------------------------------------------------


@require_POST
def tenant_switch(request):
    if not request.user.is_authenticated:
        raise PermissionDenied
    try:
        tenant_id = int(request.POST.get("tenant", ""))
    except ValueError as exc:
        raise Http404("No such tenant") from exc
    if access.tenant_switch(request, tenant_id=tenant_id) is None:
        raise PermissionDenied
    return redirect("console:dashboard")


# ---- dashboard ----------------------------------------------------------------------------


@require_GET
@access.console_view()
def dashboard(request):
    tenant = request.principal.tenant
    jobs = tuning_selectors.fine_tuning_jobs_list(tenant=tenant)
    active = jobs.filter(status__in=ACTIVE)
    return _render(
        request,
        "dashboard.html",
        {
            "usage": {
                **tenancy_selectors.usage_totals(tenant=tenant),
                "storage_used": file_selectors.files_total_bytes(tenant=tenant),
                "storage_quota": tenant.storage_bytes,
            },
            "active_jobs": active[:20],
            "active_count": tuning_selectors.fine_tuning_jobs_active_count(tenant=tenant),
            "adapters": tuning_selectors.adapters_list(tenant=tenant)[:20],
        },
    )


# ---- files --------------------------------------------------------------------------------


@require_http_methods(["GET", "POST"])
@access.console_view()
def files(request):
    tenant = request.principal.tenant
    form = forms.FileUploadForm()
    if request.method == "POST":
        form = forms.FileUploadForm(request.POST, request.FILES)
        if form.is_valid():
            upload = form.cleaned_data["file"]
            try:
                file = file_services.file_create(
                    tenant=tenant,
                    filename=upload.name,
                    purpose=form.cleaned_data["purpose"],
                    chunks=upload.chunks(),
                    size=upload.size,
                )
            except ValidationError as exc:
                for message in _errors(exc):
                    form.add_error(None, message)
            except (file_services.FileTooLarge, QuotaExceeded) as exc:
                form.add_error("file", str(exc))
            else:
                request.audit_object = ("file", file.id)
                if file.status == File.Status.ERROR:
                    messages.warning(request, f"{file.filename} was stored but failed validation.")
                else:
                    messages.success(request, f"{file.filename} uploaded and validated.")
                location = reverse("console:file", kwargs={"file_id": file.id})
                if request.headers.get("X-Requested-With") == "XMLHttpRequest":
                    # The progress bar's script navigates itself; a redirect would be
                    # followed inside the XHR and use up the message above.
                    return JsonResponse({"location": location}, status=201)
                return redirect(location)
        status = 400
    else:
        status = 200
    return _render(
        request,
        "files.html",
        {"form": form, "files": file_selectors.files_list(tenant=tenant)},
        status=status,
    )


@require_GET
@access.console_view()
def file_detail(request, file_id: str):
    file = file_selectors.file_get(tenant=request.principal.tenant, file_id=file_id)
    report = file.validation or {}
    errors = report.get("errors") or []
    return _render(
        request,
        "file_detail.html",
        {
            "file": file,
            "report": report,
            "errors": errors,
            "n_errors": report.get("n_errors", len(errors)),
        },
    )


@require_GET
@access.console_view()
def file_content(request, file_id: str):
    """The file's decrypted content as a download (GET /v1/files/{id}/content)."""
    tenant = request.principal.tenant
    file = file_selectors.file_get(tenant=tenant, file_id=file_id)
    response = StreamingHttpResponse(
        file_selectors.file_content(tenant=tenant, file_id=file.id),
        content_type="application/octet-stream",
    )
    name = "".join(c if c.isalnum() or c in "._-" else "_" for c in file.filename) or file.id
    response["Content-Disposition"] = f'attachment; filename="{name}"'
    response["Cache-Control"] = "no-store"  # decrypted data must not sit in any cache
    return response


@require_POST
@access.console_view()
def file_delete(request, file_id: str):
    try:
        file_services.file_delete(tenant=request.principal.tenant, file_id=file_id)
    except file_services.FileInUse as exc:  # a job's record keeps its file
        messages.error(request, f"Could not delete {file_id}: {exc}")
        return redirect("console:file", file_id=file_id)
    messages.success(request, f"Deleted {file_id}; its content was crypto-shredded.")
    return redirect("console:files")


# ---- fine-tuning jobs ---------------------------------------------------------------------


@require_GET
@access.console_view()
def jobs(request):
    tenant = request.principal.tenant
    return _render(
        request, "jobs.html", {"jobs": tuning_selectors.fine_tuning_jobs_list(tenant=tenant)}
    )


@require_http_methods(["GET", "POST"])
@access.console_view(read_role=Role.MEMBER)
def job_create(request):
    tenant = request.principal.tenant
    usable = file_selectors.files_list(tenant=tenant, purpose=File.Purpose.FINE_TUNE).filter(
        status=File.Status.PROCESSED
    )
    form = forms.JobCreateForm(request.POST or None, files_qs=usable)
    status = 200
    if request.method == "POST":
        status = 400
        if form.is_valid():
            data = form.cleaned_data
            try:
                job, _created = tuning_services.fine_tuning_job_create(
                    tenant=tenant,
                    model=data["model"],
                    training_file=data["training_file"],
                    validation_file=data.get("validation_file") or None,
                    method=data["method"],
                    hyperparameters=form.hyperparameters(),
                    suffix=data.get("suffix") or None,
                    seed=data.get("seed"),
                )
            except ValidationError as exc:
                for message in _errors(exc):
                    form.add_error(None, message)
            except QuotaExceeded as exc:
                form.add_error(None, str(exc))
                status = 403
            else:
                request.audit_object = ("fine_tuning.job", job.id)
                messages.success(request, f"Created {job.id}.")
                return redirect("console:job", job_id=job.id)
    return _render(request, "job_create.html", {"form": form}, status=status)


@require_GET
@access.console_view()
def job_detail(request, job_id: str):
    tenant = request.principal.tenant
    job = tuning_selectors.fine_tuning_job_get(tenant=tenant, job_id=job_id)
    return _render(
        request,
        "job_detail.html",
        {
            "job": job,
            "events": job.events.all()[:50],
            "checkpoints": tuning_selectors.fine_tuning_checkpoints_list(
                tenant=tenant, job_id=job_id
            ),
            "terminal": job.status in LeasedJob.TERMINAL,
            "progress_url": reverse("console:job-progress", kwargs={"job_id": job.id}),
        },
    )


def _point(event: FineTuningEvent) -> dict:
    data = event.data or {}
    return {
        "id": event.pk,
        "step": data.get("step"),
        "loss": data.get("loss"),
        "token_accuracy": data.get("token_accuracy"),
        "val_loss": data.get("val_loss"),
    }


@require_GET
@access.console_view()
def job_progress(request, job_id: str):
    """What the live chart polls: status, metric points after `after` (an event id),
    the latest events and the checkpoints."""
    tenant = request.principal.tenant
    job = tuning_selectors.fine_tuning_job_get(tenant=tenant, job_id=job_id)
    events = tuning_selectors.fine_tuning_events_list(tenant=tenant, job_id=job_id)
    try:
        after = int(request.GET.get("after", "0"))
    except ValueError:
        after = 0
    points = events.filter(type="metrics", pk__gt=after).order_by("pk")[:5000]
    return JsonResponse(
        {
            "id": job.id,
            "status": job.status,
            "terminal": job.status in LeasedJob.TERMINAL,
            "fine_tuned_model": job.fine_tuned_model,
            "trained_tokens": job.trained_tokens,
            "error": job.error or None,
            "points": [_point(e) for e in points],
            "events": [
                {
                    "id": e.pk,
                    "created_at": e.created_at.isoformat(),
                    "level": e.level,
                    "message": e.message,
                }
                for e in events[:50]
            ],  # fmt: skip
            "checkpoints": [
                {"id": c.id, "step": c.step, "metrics": c.metrics}
                for c in tuning_selectors.fine_tuning_checkpoints_list(tenant=tenant, job_id=job_id)
            ],
        },
        headers={"Cache-Control": "no-store"},
    )


JOB_ACTIONS = {
    "cancel": tuning_services.fine_tuning_job_cancel,
    "pause": tuning_services.fine_tuning_job_pause,
    "resume": tuning_services.fine_tuning_job_resume,
}


@require_POST
@access.console_view()
def job_action(request, job_id: str, action: str):
    service = JOB_ACTIONS.get(action)
    if service is None:
        raise Http404(f"No such action: {action}")
    request.audit_object = ("fine_tuning.job", job_id)
    try:
        job = service(tenant=request.principal.tenant, job_id=job_id)
    except tuning_services.NotRunnable as exc:
        messages.error(request, f"Cannot {action}: {exc}")
    else:
        messages.success(request, f"{action.title()} requested; the job is {job.status}.")
    return redirect("console:job", job_id=job_id)


# ---- models -------------------------------------------------------------------------------


@require_GET
@access.console_view()
def models(request):
    tenant = request.principal.tenant
    return _render(
        request,
        "models.html",
        {
            "base_models": tuning_selectors.base_models(),
            "adapters": tuning_selectors.adapters_list(tenant=tenant),
            "federated": [m for m in models_visible(tenant) if m["id"].startswith("fed:")],
        },
    )


@require_POST
@access.console_view()
def model_delete(request):
    model_id = request.POST.get("model", "")
    request.audit_object = ("model", model_id)
    if tuning_selectors.base_model_get(name=model_id) is not None:
        raise PermissionDenied("Base models cannot be deleted from the console.")
    tuning_services.adapter_delete(tenant=request.principal.tenant, model_id=model_id)
    messages.success(request, f"Deleted {model_id}.")
    return redirect("console:models")


# ---- playground ---------------------------------------------------------------------------


@require_GET
@access.console_view()
def playground(request):
    # Base models, the tenant's adapters and its federations' global models, as /v1/models.
    names = [m["id"] for m in models_visible(request.principal.tenant)]
    return _render(
        request,
        "playground.html",
        {
            "model_names": names,
            "selected": request.GET.get("model", names[0] if names else ""),
            "stream_url": reverse("console:playground-stream"),
        },
    )


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def _playground_principal(request):
    """The session's principal for the async stream view (same rules as console_view)."""
    if not request.user.is_authenticated:
        return None, JsonResponse({"error": "Log in first."}, status=401)
    principal = access.principal_for(request)
    if principal is None:
        return None, JsonResponse({"error": "You are in no tenant."}, status=403)
    request.principal = principal
    if not principal.can(Role.MEMBER):
        return principal, JsonResponse({"error": "Auditors cannot run models."}, status=403)
    return principal, None


async def _audited(request, response):
    await sync_to_async(access.audit_console_request)(request, response)
    return response


@require_POST
async def playground_stream(request):
    """Chat for the playground, authenticated by the session (CSRF-checked), streamed as
    server-sent events: `{"delta": text}` pieces, then `{"finish_reason", "usage"}`.

    The same parsing, admission, model resolution and metering as /v1/chat/completions.
    """
    principal, refusal = await sync_to_async(_playground_principal)(request)
    if refusal is not None:
        return await _audited(request, refusal) if principal else refusal
    request.audit_object = ("chat.completion", "")
    try:
        body = json.loads(request.body)
        req = parse_chat_request({**body, "stream": True})
    except (json.JSONDecodeError, UnicodeDecodeError):
        return await _audited(request, JsonResponse({"error": "Not JSON."}, status=400))
    except ChatRequestError as exc:
        return await _audited(request, JsonResponse({"error": str(exc)}, status=exc.status))
    tenant = principal.tenant
    try:
        await sync_to_async(serving_services.chat_admission)(
            tenant=tenant, max_tokens=req.max_tokens
        )
        resolved = await sync_to_async(serving_services.chat_model_resolve)(
            tenant=tenant, model=req.model
        )
    except RateLimited as exc:
        return await _audited(request, JsonResponse({"error": str(exc)}, status=429))
    except Http404:
        return await _audited(
            request, JsonResponse({"error": f"No model {req.model!r}."}, status=404)
        )

    from inference.engine import Request
    from inference.sampling import SamplingParams

    engine_request = Request(
        messages=req.messages,
        sampling=SamplingParams(
            temperature=req.temperature,
            top_p=req.top_p,
            seed=req.seed,
            max_tokens=req.max_tokens,
            stop=req.stop,
        ),  # fmt: skip
        adapter=str(resolved.adapter_dir) if resolved.adapter_dir else None,
        request_id=f"chatcmpl-{uuid.uuid4().hex}",
    )
    try:
        deltas = resolved.engine.astream(engine_request)
        first = await anext(deltas)
    except ValueError as exc:
        return await _audited(request, JsonResponse({"error": str(exc)}, status=400))
    request.audit_object = ("chat.completion", engine_request.request_id)
    await sync_to_async(access.audit_console_request)(request, HttpResponse(status=200))

    async def events():
        usage = None
        try:
            delta = first
            while True:
                if delta.text:
                    yield _sse({"delta": delta.text})
                if delta.finish_reason is not None:
                    usage = delta.usage
                    break
                delta = await anext(deltas)
            if usage is not None:
                await sync_to_async(serving_services.chat_usage_record)(
                    tenant=tenant,
                    prompt_tokens=usage.prompt_tokens,
                    completion_tokens=usage.completion_tokens,
                )
            yield _sse(
                {
                    "finish_reason": "stop"
                    if delta.finish_reason == "cancelled"
                    else delta.finish_reason,
                    "usage": usage
                    and {
                        "prompt_tokens": usage.prompt_tokens,
                        "completion_tokens": usage.completion_tokens,
                        "total_tokens": usage.total_tokens,
                    },
                }
            )
        except Exception as exc:  # after the 200: say so in the stream
            log.exception("playground stream %s failed", engine_request.request_id)
            yield _sse({"error": f"The server had an error while streaming: {exc}"})
        finally:
            await deltas.aclose()

    response = StreamingHttpResponse(events(), content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"
    return response


# ---- API keys -----------------------------------------------------------------------------


@require_http_methods(["GET", "POST"])
@access.console_view(write_role=Role.ADMIN)
def api_keys(request):
    tenant = request.principal.tenant
    form = forms.ApiKeyCreateForm()
    created = None
    status = 200
    if request.method == "POST":
        form = forms.ApiKeyCreateForm(request.POST)
        status = 400
        if form.is_valid():
            key, raw = tenancy_services.api_key_create(
                tenant=tenant,
                role=form.cleaned_data["role"],
                name=form.cleaned_data["name"],
                expires_at=form.cleaned_data["expires_at"],
            )
            request.audit_object = ("api_key", key.prefix)
            created = {"key": key, "raw": raw}
            form = forms.ApiKeyCreateForm()
            status = 201
    response = _render(
        request,
        "api_keys.html",
        {"form": form, "created": created, "keys": tenancy_selectors.api_keys_list(tenant=tenant)},
        status=status,
    )
    response["Cache-Control"] = "no-store"  # the raw key must not sit in any cache
    return response


@require_POST
@access.console_view(write_role=Role.ADMIN)
def api_key_revoke(request, key_id: int):
    key = tenancy_selectors.access_api_key_by_id(tenant=request.principal.tenant, key_id=key_id)
    request.audit_object = ("api_key", key.prefix)
    tenancy_services.api_key_revoke(key=key)
    messages.success(request, f"Revoked {key.prefix}.")
    return redirect("console:api-keys")


# ---- members ------------------------------------------------------------------------------


def _members_page(request, form, status: int = 200, refusal: str = ""):
    tenant = request.principal.tenant
    return _render(
        request,
        "members.html",
        {
            "form": form,
            "refusal": refusal,
            "tenant_members": tenancy_selectors.memberships_list(tenant=tenant),
        },
        status=status,
    )


@require_http_methods(["GET", "POST"])
@access.console_view(write_role=Role.ADMIN)
def members(request):
    form = forms.MembershipForm(request.POST or None)
    if request.method == "GET":
        return _members_page(request, form)
    if not form.is_valid():
        return _members_page(request, form, status=400)
    username = form.user.get_username()
    request.audit_object = ("membership", username)
    try:
        membership = tenancy_services.membership_set(
            tenant=request.principal.tenant, user=form.user, role=form.cleaned_data["role"]
        )
    except ValidationError as exc:  # demoting the last admin
        return _members_page(request, form, status=409, refusal="; ".join(_errors(exc)))
    messages.success(request, f"{username} is now {membership.role}.")
    return redirect("console:members")


@require_POST
@access.console_view(write_role=Role.ADMIN)
def member_remove(request, membership_id: int):
    """Remove a person from the tenant (the page asks to confirm first). Another tenant's
    membership is 404; the last admin is refused with 409 and stays."""
    tenant = request.principal.tenant
    membership = tenancy_selectors.access_membership_by_id(
        tenant=tenant, membership_id=membership_id
    )
    username = membership.user.get_username()
    request.audit_object = ("membership", username)
    try:
        tenancy_services.membership_remove(
            tenant=tenant, membership_id=membership_id, by_role=request.principal.role
        )
    except ValidationError as exc:
        refusal = "; ".join(_errors(exc))
        return _members_page(request, forms.MembershipForm(), status=409, refusal=refusal)
    messages.success(request, f"Removed {username} from {tenant.name}.")
    return redirect("console:members")


# ---- audit log ----------------------------------------------------------------------------


def _audit_events(request):
    form = forms.AuditFilterForm(request.GET or None)
    filters = form.cleaned_data if form.is_valid() else {}
    events = audit_selectors.audit_events_filtered(
        tenant=request.principal.tenant, **{k: v for k, v in filters.items() if v}
    )
    return form, events


@require_GET
@access.console_view()
def audit(request):
    form, events = _audit_events(request)
    query = request.GET.urlencode()
    return _render(
        request,
        "audit.html",
        {
            "form": form,
            "events": events[:AUDIT_PAGE],
            "limit": AUDIT_PAGE,
            "csv_url": reverse("console:audit-csv") + (f"?{query}" if query else ""),
        },
    )


class _Echo:
    def write(self, value):
        return value


def _cell(value) -> str:
    """A CSV cell a spreadsheet will not run as a formula (OWASP's CSV injection advice)."""
    text = "" if value is None else str(value)
    return f"'{text}" if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


@require_GET
@access.console_view()
def audit_csv(request):
    _form, events = _audit_events(request)
    writer = csv.writer(_Echo())
    header = ["created_at", "actor", "action", "object_type", "object_id", "status_code",
              "request_id"]  # fmt: skip

    def rows():
        yield writer.writerow(header)
        for e in events.iterator(chunk_size=1000):
            yield writer.writerow(
                [_cell(v) for v in (e.created_at.isoformat(), e.actor, e.action, e.object_type,
                                    e.object_id, e.status_code, e.request_id)]
            )  # fmt: skip

    response = StreamingHttpResponse(rows(), content_type="text/csv; charset=utf-8")
    name = f"audit-{request.principal.tenant.slug}.csv"
    response["Content-Disposition"] = f'attachment; filename="{name}"'
    return response
