"""The OpenAI error envelope for everything under /v1.

Errors always look like OpenAI's, so existing clients understand them:
`{"error": {"message": ..., "type": ..., "param": ..., "code": ...}}`.
"""

from django.core.exceptions import ValidationError as DjangoValidationError
from django.http import Http404, JsonResponse
from rest_framework import exceptions
from rest_framework.views import exception_handler as drf_exception_handler

from controlplane.tenancy.services import QuotaExceeded, RateLimited


def error_body(message: str, type_: str, *, param=None, code=None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _first_error(detail, param=None) -> tuple[str, str | None]:
    """The first message in a DRF error detail, with the field it belongs to."""
    if isinstance(detail, dict):
        field, value = next(iter(detail.items()))
        # DRF's own errors (authentication, permission, 404) come as {"detail": ...}: no field.
        return _first_error(value, param if field in ("non_field_errors", "detail") else field)
    if isinstance(detail, list) and detail:
        return _first_error(detail[0], param)
    return str(detail), param


def openai_exception_handler(exc, context):
    """DRF's handler, re-shaped into the OpenAI envelope; our domain errors mapped too."""
    if isinstance(exc, RateLimited):
        response = JsonResponse(
            error_body(str(exc), "rate_limit_error", code="rate_limit_exceeded"), status=429
        )
        response["Retry-After"] = str(exc.retry_after)
        return response
    if isinstance(exc, QuotaExceeded):
        return JsonResponse(
            error_body(str(exc), "insufficient_quota", code="quota_exceeded"), status=403
        )
    if isinstance(exc, Http404):
        exc = exceptions.NotFound(str(exc) or "Not found.")
    if isinstance(exc, DjangoValidationError):  # services speak Django; the API speaks DRF
        exc = exceptions.ValidationError(
            exc.message_dict if hasattr(exc, "error_dict") else exc.messages
        )
    response = drf_exception_handler(exc, context)
    if response is None:
        return None  # a bug: Django's 500 handler takes it (and the envelope, see urls)
    message, param = _first_error(response.data)
    type_, code = {
        400: ("invalid_request_error", None),
        401: ("invalid_request_error", "invalid_api_key"),
        403: ("permission_error", "insufficient_permissions"),
        404: ("invalid_request_error", "not_found"),
        405: ("invalid_request_error", "method_not_allowed"),
        413: ("invalid_request_error", "file_too_large"),
        415: ("invalid_request_error", "unsupported_media_type"),
        429: ("rate_limit_error", "rate_limit_exceeded"),
    }.get(response.status_code, ("server_error", None))
    if isinstance(exc, exceptions.ValidationError):
        code = getattr(exc, "enclave_code", None) or "invalid_value"
    response.data = error_body(message, type_, param=param, code=code)
    return response


def envelope_404(request, exception=None):
    if request.path.startswith("/v1/"):
        body = error_body(
            f"Unknown URL: {request.method} {request.path}", "invalid_request_error",
            code="unknown_url",
        )  # fmt: skip
        return JsonResponse(body, status=404)
    from django.views.defaults import page_not_found

    return page_not_found(request, exception)


def envelope_500(request):
    if request.path.startswith("/v1/"):
        body = error_body("The server had an error processing your request.", "server_error")
        return JsonResponse(body, status=500)
    from django.views.defaults import server_error

    return server_error(request)
