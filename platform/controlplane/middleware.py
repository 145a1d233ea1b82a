"""Request ids on every response, an audit record for every mutating API call, and static
files; each works in both the sync and the async chain, so an async view (chat
completions) runs on the event loop and is never pushed into a thread by a middleware."""

import re
import uuid

from asgiref.sync import iscoroutinefunction, markcoroutinefunction, sync_to_async
from whitenoise.middleware import WhiteNoiseMiddleware

from controlplane.audit.services import audit_event_record

_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,100}$")
MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class _Hybrid:
    sync_capable = True
    async_capable = True

    def __init__(self, get_response):
        self.get_response = get_response
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)

    def __call__(self, request):
        if self.is_async:
            return self.__acall__(request)
        return self.handle(request)

    def handle(self, request):
        raise NotImplementedError

    async def __acall__(self, request):
        raise NotImplementedError


class RequestIdMiddleware(_Hybrid):
    """Take a sane incoming X-Request-Id or make one; echo it as `x-request-id`."""

    @staticmethod
    def _assign(request) -> None:
        incoming = request.headers.get("X-Request-Id", "")
        request.request_id = incoming if _SAFE_ID.match(incoming) else f"req_{uuid.uuid4().hex}"

    def handle(self, request):
        self._assign(request)
        response = self.get_response(request)
        response["x-request-id"] = request.request_id
        return response

    async def __acall__(self, request):
        self._assign(request)
        response = await self.get_response(request)
        response["x-request-id"] = request.request_id
        return response


def _audit(request, response) -> None:
    if request.method not in MUTATING or not request.path.startswith("/v1/"):
        return
    principal = getattr(request, "principal", None)
    if principal is None:  # unauthenticated calls change nothing and name no one
        return
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


class AuditMiddleware(_Hybrid):
    """Record who changed what under /v1, whatever view handled it, success or refusal.

    Views name the object they touched by setting `request.audit_object = (type, id)`;
    otherwise the URL's last segment is used.
    """

    def handle(self, request):
        response = self.get_response(request)
        _audit(request, response)
        return response

    async def __acall__(self, request):
        response = await self.get_response(request)
        await sync_to_async(_audit)(request, response)
        return response


class StaticFilesMiddleware(_Hybrid):
    """WhiteNoise's static files, in either chain (WhiteNoise itself is sync only)."""

    def __init__(self, get_response):
        super().__init__(get_response)
        self.whitenoise = WhiteNoiseMiddleware(get_response)

    def _static(self, request):
        wn = self.whitenoise
        found = (
            wn.find_file(request.path_info) if wn.autorefresh else wn.files.get(request.path_info)
        )
        return wn.serve(found, request) if found is not None else None

    def handle(self, request):
        return self._static(request) or self.get_response(request)

    async def __acall__(self, request):
        return self._static(request) or await self.get_response(request)
