"""Console pages for the Batch API: queue a JSONL of chat requests, follow it, cancel it,
and download its output and error files. Thin over controlplane.serving's batches."""

from django import forms
from django.contrib import messages
from django.core.exceptions import ValidationError
from django.shortcuts import redirect
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from controlplane.files import selectors as file_selectors
from controlplane.files.models import File
from controlplane.jobs.models import LeasedJob
from controlplane.serving import batches as batch_services
from controlplane.serving import selectors as serving_selectors
from controlplane.serving.batch_views import batch_status

from . import access
from .views import _errors, _render


class BatchCreateForm(forms.Form):
    input_file = forms.ChoiceField(
        label="Input file (batch JSONL)",
        help_text="One /v1/chat/completions request per line, each with its custom_id.",
    )
    endpoint = forms.ChoiceField(
        label="Endpoint", choices=[(e, e) for e in batch_services.ENDPOINTS]
    )
    completion_window = forms.ChoiceField(label="Completion window", choices=[("24h", "24h")])

    def __init__(self, *args, tenant, **kwargs):
        super().__init__(*args, **kwargs)
        usable = file_selectors.files_list(tenant=tenant, purpose=File.Purpose.BATCH).filter(
            status=File.Status.PROCESSED
        )
        self.fields["input_file"].choices = [(f.id, f"{f.filename} ({f.id})") for f in usable]


def _row(batch) -> dict:
    return {"batch": batch, "status": batch_status(batch)}


@require_http_methods(["GET", "POST"])
@access.console_view()
def batches(request):
    tenant = request.principal.tenant
    form = BatchCreateForm(request.POST or None, tenant=tenant)
    status = 200
    if request.method == "POST":
        status = 400
        if form.is_valid():
            data = form.cleaned_data
            try:
                batch = batch_services.batch_create(
                    tenant=tenant,
                    input_file_id=data["input_file"],
                    endpoint=data["endpoint"],
                    completion_window=data["completion_window"],
                )
            except ValidationError as exc:
                for message in _errors(exc):
                    form.add_error(None, message)
            else:
                request.audit_object = ("batch", batch.id)
                messages.success(request, f"Queued {batch.id}.")
                return redirect("console:batch", batch_id=batch.id)
    rows = [_row(b) for b in serving_selectors.batches_list(tenant=tenant)[:200]]
    return _render(request, "batches.html", {"form": form, "rows": rows}, status=status)


@require_GET
@access.console_view()
def batch_detail(request, batch_id: str):
    batch = serving_selectors.batch_get(tenant=request.principal.tenant, batch_id=batch_id)
    return _render(
        request,
        "batch_detail.html",
        {**_row(batch), "terminal": batch.status in LeasedJob.TERMINAL},
    )


@require_POST
@access.console_view()
def batch_cancel(request, batch_id: str):
    request.audit_object = ("batch", batch_id)
    try:
        batch = batch_services.batch_cancel(tenant=request.principal.tenant, batch_id=batch_id)
    except batch_services.NotRunnable as exc:
        messages.error(request, f"Cannot cancel: {exc}")
    else:
        messages.success(request, f"Cancel requested; the batch is {batch_status(batch)}.")
    return redirect("console:batch", batch_id=batch_id)
