"""/v1/fine_tuning/jobs and /v1/models in OpenAI's shapes. Thin: parse, call, render."""

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import serializers
from rest_framework.exceptions import ValidationError
from rest_framework.response import Response
from rest_framework.views import APIView

from controlplane.api import unix_time
from controlplane.api_errors import error_body
from controlplane.tenancy.models import Role

from . import selectors, services
from .models import FineTuningCheckpoint, FineTuningEvent, FineTuningJob


class JobOutput(serializers.Serializer):
    """OpenAI's fine_tuning.job object."""

    def to_representation(self, job: FineTuningJob) -> dict:
        error = None
        if job.status == "failed":
            error = {"code": "training_failed", "message": job.error or "failed", "param": None}
        return {
            "object": "fine_tuning.job",
            "id": job.id,
            "model": job.model,
            "created_at": unix_time(job.created_at),
            "finished_at": unix_time(job.finished_at),
            "fine_tuned_model": job.fine_tuned_model,
            "organization_id": job.tenant.slug,
            "result_files": [],
            "status": job.status,
            "training_file": job.training_file_id,
            "validation_file": job.validation_file_id,
            "hyperparameters": job.hyperparameters,
            "trained_tokens": job.trained_tokens,
            "error": error,
            "user_provided_suffix": job.suffix or None,
            "seed": job.seed,
            "estimated_finish": None,
            "integrations": [],
            "metadata": job.metadata,
            "method": {"type": job.method, job.method: {"hyperparameters": job.hyperparameters}},
        }


class JobCreateInput(serializers.Serializer):
    model = serializers.CharField()
    training_file = serializers.CharField()
    validation_file = serializers.CharField(required=False, allow_null=True)
    hyperparameters = serializers.DictField(required=False, allow_null=True)
    method = serializers.DictField(required=False, allow_null=True)
    suffix = serializers.CharField(required=False, allow_null=True, allow_blank=True)
    seed = serializers.IntegerField(required=False, allow_null=True)
    metadata = serializers.DictField(required=False, allow_null=True)


def _method(data: dict) -> tuple[str, dict | None, str]:
    """(method type, hyperparameters, grader) from OpenAI's `method` or the legacy field."""
    method = data.get("method") or {}
    kind = method.get("type", FineTuningJob.Method.SUPERVISED)
    if not isinstance(kind, str):
        raise ValidationError({"method.type": "must be a string"})
    section = method.get(kind) or {}
    if not isinstance(section, dict):
        raise ValidationError({f"method.{kind}": "must be an object"})
    hyperparameters = section.get("hyperparameters") or data.get("hyperparameters")
    grader = section.get("grader") or ""
    if isinstance(grader, dict):
        grader = grader.get("name", "")
    return kind, hyperparameters, grader


def _page(request, items, id_of, *, default_limit=20):
    """OpenAI cursor pagination: `after` (an id) and `limit`."""
    try:
        limit = int(request.query_params.get("limit", default_limit))
    except ValueError as exc:
        raise ValidationError({"limit": "must be an integer"}) from exc
    if not 1 <= limit <= 100:
        raise ValidationError({"limit": "must be between 1 and 100"})
    items = list(items)
    after = request.query_params.get("after")
    if after:
        ids = [id_of(i) for i in items]
        items = items[ids.index(after) + 1 :] if after in ids else []
    return items[:limit], len(items) > limit


class JobListView(APIView):
    @extend_schema(request=JobCreateInput, responses=JobOutput)
    def post(self, request):
        payload = JobCreateInput(data=request.data)
        payload.is_valid(raise_exception=True)
        data = payload.validated_data
        kind, hyperparameters, grader = _method(data)
        try:
            job, _created = services.fine_tuning_job_create(
                tenant=request.user.tenant,
                model=data["model"],
                training_file=data["training_file"],
                validation_file=data.get("validation_file"),
                method=kind,
                hyperparameters=hyperparameters,
                grader=grader,
                suffix=data.get("suffix") or None,
                seed=data.get("seed"),
                metadata=data.get("metadata"),
                idempotency_key=request.headers.get("Idempotency-Key") or None,
            )
        except services.IdempotencyConflict as exc:
            response = Response(
                error_body(str(exc), "invalid_request_error", code="idempotency_key_reused"),
                status=409,
            )
            response["x-should-retry"] = "false"
            return response
        request._request.audit_object = ("fine_tuning.job", job.id)
        return Response(JobOutput(job).data)

    @extend_schema(
        operation_id="v1_fine_tuning_jobs_list",
        parameters=[OpenApiParameter("after", str), OpenApiParameter("limit", int)],
        responses=JobOutput(many=True),
    )
    def get(self, request):
        jobs = selectors.fine_tuning_jobs_list(tenant=request.user.tenant).select_related("tenant")
        page, has_more = _page(request, jobs, lambda j: j.id)
        return Response(
            {"object": "list", "data": [JobOutput(j).data for j in page], "has_more": has_more}
        )


class JobDetailView(APIView):
    @extend_schema(responses=JobOutput)
    def get(self, request, job_id: str):
        job = selectors.fine_tuning_job_get(tenant=request.user.tenant, job_id=job_id)
        return Response(JobOutput(job).data)


class _JobActionView(APIView):
    action_service = None

    @extend_schema(request=None, responses=JobOutput)
    def post(self, request, job_id: str):
        try:
            job = type(self).action_service(tenant=request.user.tenant, job_id=job_id)
        except services.NotRunnable as exc:
            raise ValidationError({"job": str(exc)}) from exc
        request._request.audit_object = ("fine_tuning.job", job.id)
        return Response(JobOutput(job).data)


class JobCancelView(_JobActionView):
    action_service = staticmethod(services.fine_tuning_job_cancel)


class JobPauseView(_JobActionView):
    action_service = staticmethod(services.fine_tuning_job_pause)


class JobResumeView(_JobActionView):
    action_service = staticmethod(services.fine_tuning_job_resume)


def _event_json(event: FineTuningEvent) -> dict:
    return {
        "object": "fine_tuning.job.event",
        "id": f"ftevent-{event.pk}",
        "created_at": unix_time(event.created_at),
        "level": event.level,
        "message": event.message,
        "data": event.data,
        "type": event.type,
    }


class JobEventsView(APIView):
    @extend_schema(
        parameters=[OpenApiParameter("after", str), OpenApiParameter("limit", int)],
        responses=OpenApiTypes.OBJECT,
    )
    def get(self, request, job_id: str):
        events = selectors.fine_tuning_events_list(tenant=request.user.tenant, job_id=job_id)
        page, has_more = _page(request, events, lambda e: f"ftevent-{e.pk}")
        return Response(
            {"object": "list", "data": [_event_json(e) for e in page], "has_more": has_more}
        )


def _checkpoint_json(ckpt: FineTuningCheckpoint) -> dict:
    job = ckpt.job
    return {
        "object": "fine_tuning.job.checkpoint",
        "id": ckpt.id,
        "created_at": unix_time(ckpt.created_at),
        "fine_tuned_model_checkpoint": f"ft:{job.model}:{job.tenant.slug}:{job.suffix}:"
        f"{job.id}:ckpt-step-{ckpt.step}",
        "fine_tuning_job_id": job.id,
        "metrics": ckpt.metrics,
        "step_number": ckpt.step,
    }


class JobCheckpointsView(APIView):
    @extend_schema(
        parameters=[OpenApiParameter("after", str), OpenApiParameter("limit", int)],
        responses=OpenApiTypes.OBJECT,
    )
    def get(self, request, job_id: str):
        ckpts = selectors.fine_tuning_checkpoints_list(tenant=request.user.tenant, job_id=job_id)
        page, has_more = _page(request, ckpts.select_related("job__tenant"), lambda c: c.id)
        data = [_checkpoint_json(c) for c in page]
        return Response(
            {
                "object": "list",
                "data": data,
                "has_more": has_more,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None,
            }
        )


# ---- /v1/models --------------------------------------------------------------------------


def _model_json(model_id: str, created: int, owned_by: str) -> dict:
    return {"id": model_id, "object": "model", "created": created, "owned_by": owned_by}


def models_visible(tenant) -> list[dict]:
    """Base models, then the tenant's own adapters."""
    models = [_model_json(m.name, m.created, "enclave") for m in selectors.base_models()]
    models += [
        _model_json(a.id, unix_time(a.created_at), tenant.slug)
        for a in selectors.adapters_list(tenant=tenant)
    ]
    from controlplane.federation.selectors import global_adapters_for

    models += [
        _model_json(a.id, unix_time(a.created_at), a.federation.owner.slug)
        for a in global_adapters_for(tenant=tenant).select_related("federation__owner")
    ]
    return models


class ModelListView(APIView):
    @extend_schema(operation_id="v1_models_list", responses=OpenApiTypes.OBJECT)
    def get(self, request):
        return Response({"object": "list", "data": models_visible(request.user.tenant)})


class ModelDetailView(APIView):
    write_role = Role.MEMBER

    @extend_schema(responses=OpenApiTypes.OBJECT)
    def get(self, request, model_id: str):
        for model in models_visible(request.user.tenant):
            if model["id"] == model_id:
                return Response(model)
        selectors.adapter_get(tenant=request.user.tenant, model_id=model_id)  # raises 404
        raise AssertionError("unreachable")

    @extend_schema(responses={200: OpenApiTypes.OBJECT})  # 200 with a body, not 204
    def delete(self, request, model_id: str):
        if selectors.base_model_get(name=model_id) is not None or model_id.startswith("fed:"):
            return Response(
                error_body(
                    "Base models and federations' global models cannot be deleted here.",
                    "permission_error",
                    code="insufficient_permissions",
                ),
                status=403,
            )
        services.adapter_delete(tenant=request.user.tenant, model_id=model_id)
        request._request.audit_object = ("model", model_id)
        return Response({"id": model_id, "object": "model", "deleted": True})
