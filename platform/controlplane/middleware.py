"""Request ids on every response, and an audit record for every mutating API call."""

import re
import uuid

from controlplane.audit.services import audit_event_record

_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,100}$")
MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class RequestIdMiddleware:
    """Take a sane incoming X-Request-Id or make one; echo it as `x-request-id`."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        incoming = request.headers.get("X-Request-Id", "")
        request.request_id = incoming if _SAFE_ID.match(incoming) else f"req_{uuid.uuid4().hex}"
        response = self.get_response(request)
        response["x-request-id"] = request.request_id
        return response


class AuditMiddleware:
    """Record who changed what under /v1, whatever view handled it, success or refusal.

    Views name the object they touched by setting `request.audit_object = (type, id)`;
    otherwise the URL's last segment is used.
    """

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        response = self.get_response(request)
        if request.method in MUTATING and request.path.startswith("/v1/"):
            principal = getattr(request, "principal", None)
            if principal is not None:  # unauthenticated calls change nothing and name no one
                match = getattr(request, "resolver_match", None)
                object_type, object_id = getattr(request, "audit_object", ("", ""))
                if not object_id and match:
                    object_id = next(iter(reversed(match.kwargs.values())), "")
                audit_event_record(
                    tenant=principal.tenant,
                    actor=principal.actor,
                    action=f"{request.method} {match.route if match else request.path}",
                    object_type=object_type,
                    object_id=object_id,
                    request_id=getattr(request, "request_id", ""),
                    status_code=response.status_code,
                )
        return response
