"""/v1/batches in OpenAI's Batch API shapes. Thin: parse, call, render."""

from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.exceptions import ValidationError
from rest_framework.response import Response
from rest_framework.views import APIView

from controlplane.api import unix_time

from . import batches, selectors
from .models import Batch


def batch_status(batch: Batch) -> str:
    """Our job status in OpenAI's batch vocabulary."""
    if batch.status == "running":
        return "cancelling" if batch.stop_request == "cancel" else "in_progress"
    return {
        "queued": "validating",
        "succeeded": "completed",
        "failed": "failed",
        "cancelled": "cancelled",
    }.get(batch.status, batch.status)


class BatchOutput(serializers.Serializer):
    def to_representation(self, batch: Batch) -> dict:
        status = batch_status(batch)
        errors = None
        if batch.status == "failed":
            errors = {"object": "list",
                      "data": [{"code": "batch_failed", "message": batch.error, "param": None,
                                "line": None}]}  # fmt: skip
        return {
            "id": batch.id,
            "object": "batch",
            "endpoint": batch.endpoint,
            "errors": errors,
            "input_file_id": batch.input_file_id,
            "completion_window": batch.completion_window,
            "status": status,
            "output_file_id": batch.output_file_id,
            "error_file_id": batch.error_file_id,
            "created_at": unix_time(batch.created_at),
            "in_progress_at": unix_time(batch.started_at),
            "expires_at": unix_time(batch.created_at) + 24 * 3600,
            "finalizing_at": None,
            "completed_at": unix_time(batch.finished_at) if status == "completed" else None,
            "failed_at": unix_time(batch.finished_at) if status == "failed" else None,
            "expired_at": None,
            "cancelling_at": None,
            "cancelled_at": unix_time(batch.finished_at) if status == "cancelled" else None,
            "request_counts": {
                "total": batch.total,
                "completed": batch.completed,
                "failed": batch.failed,
            },
            "metadata": batch.metadata,
        }


class BatchCreateInput(serializers.Serializer):
    input_file_id = serializers.CharField()
    endpoint = serializers.CharField()
    completion_window = serializers.CharField(default="24h")
    metadata = serializers.DictField(required=False, allow_null=True)


class BatchListView(APIView):
    @extend_schema(request=BatchCreateInput, responses=BatchOutput)
    def post(self, request):
        payload = BatchCreateInput(data=request.data)
        payload.is_valid(raise_exception=True)
        batch = batches.batch_create(tenant=request.user.tenant, **payload.validated_data)
        request._request.audit_object = ("batch", batch.id)
        return Response(BatchOutput(batch).data)

    @extend_schema(operation_id="v1_batches_list", responses=BatchOutput(many=True))
    def get(self, request):
        items = selectors.batches_list(tenant=request.user.tenant)
        data = [BatchOutput(b).data for b in items[:100]]
        return Response({"object": "list", "data": data, "has_more": items.count() > 100,
                         "first_id": data[0]["id"] if data else None,
                         "last_id": data[-1]["id"] if data else None})  # fmt: skip


class BatchDetailView(APIView):
    @extend_schema(responses=BatchOutput)
    def get(self, request, batch_id: str):
        return Response(
            BatchOutput(selectors.batch_get(tenant=request.user.tenant, batch_id=batch_id)).data
        )


class BatchCancelView(APIView):
    @extend_schema(request=None, responses=BatchOutput)
    def post(self, request, batch_id: str):
        try:
            batch = batches.batch_cancel(tenant=request.user.tenant, batch_id=batch_id)
        except batches.NotRunnable as exc:
            raise ValidationError({"batch": str(exc)}) from exc
        request._request.audit_object = ("batch", batch.id)
        return Response(BatchOutput(batch).data)
