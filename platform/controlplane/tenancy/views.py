"""/v1/usage (our extension): the tenant's metered usage per day, and its quotas."""

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework.exceptions import ValidationError
from rest_framework.response import Response
from rest_framework.views import APIView

from . import selectors


class UsageView(APIView):
    @extend_schema(parameters=[OpenApiParameter("days", int)], responses=OpenApiTypes.OBJECT)
    def get(self, request):
        try:
            days = int(request.query_params.get("days", 30))
        except ValueError as exc:
            raise ValidationError({"days": "must be an integer"}) from exc
        if not 1 <= days <= 366:
            raise ValidationError({"days": "must be between 1 and 366"})
        tenant = request.user.tenant
        rows = selectors.usage_for_tenant(tenant=tenant, days=days)
        fields = ("requests", "prompt_tokens", "completion_tokens", "training_tokens")
        return Response(
            {
                "object": "usage",
                "tenant": tenant.slug,
                "data": [{"day": r.day.isoformat(), **{f: getattr(r, f) for f in fields}}
                         for r in rows],
                "quotas": {
                    "tokens_per_minute": tenant.tokens_per_minute,
                    "requests_per_minute": tenant.requests_per_minute,
                    "max_concurrent_jobs": tenant.max_concurrent_jobs,
                    "storage_bytes": tenant.storage_bytes,
                },
            }
        )  # fmt: skip
