"""What every /v1 endpoint shares: API-key authentication and roles (errors: api_errors)."""

from dataclasses import dataclass

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import exceptions, permissions
from rest_framework.authentication import BaseAuthentication, get_authorization_header
from rest_framework.throttling import BaseThrottle

from controlplane.rls.context import tenant_narrow
from controlplane.tenancy.models import Role, Tenant
from controlplane.tenancy.services import RateLimited, api_key_authenticate, rate_limit_consume


def unix_time(value) -> int | None:
    """A datetime as OpenAI's integer Unix seconds (None stays None)."""
    return int(value.timestamp()) if value else None


ROLE_RANK = {Role.AUDITOR: 0, Role.MEMBER: 1, Role.ADMIN: 2}


@dataclass(frozen=True)
class Principal:
    """Who is calling: a tenant, a role in it, and a name for the audit log."""

    tenant: Tenant
    role: str
    actor: str
    is_authenticated: bool = True

    def can(self, role: str) -> bool:
        return ROLE_RANK[self.role] >= ROLE_RANK[role]


class ApiKeyRefused(Exception):
    """No usable API key: missing, malformed, unknown, revoked or expired (HTTP 401)."""

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        self.code = code


def principal_from_authorization(header: str) -> Principal | None:
    """The Principal an `Authorization` header names; None when there is no header.

    Raises ApiKeyRefused for anything but a valid `Bearer <key>`. Narrows the calling
    thread's database connection to the key's tenant (controlplane.rls).
    """
    if not header:
        return None
    scheme, _, raw = header.partition(" ")
    if scheme.lower() != "bearer" or not raw.strip():
        raise ApiKeyRefused("Use 'Authorization: Bearer <API key>'.")
    key = api_key_authenticate(raw=raw.strip())
    if key is None:
        raise ApiKeyRefused(
            "Incorrect, revoked or expired API key provided.", code="invalid_api_key"
        )
    # The second wall: from here to the end of the request this thread's database
    # connection sees only this tenant's rows (PostgreSQL row-level security).
    tenant_narrow(tenant_id=key.tenant_id)
    return Principal(tenant=key.tenant, role=key.role, actor=f"key:{key.prefix}")


class ApiKeyAuthentication(BaseAuthentication):
    """`Authorization: Bearer enc_...`, as the openai client sends it."""

    def authenticate(self, request):
        try:
            principal = principal_from_authorization(
                get_authorization_header(request).decode("latin-1")
            )
        except ApiKeyRefused as exc:
            raise exceptions.AuthenticationFailed(str(exc), code=exc.code) from exc
        if principal is None:
            return None
        request._request.principal = principal  # for the audit middleware
        return principal, None

    def authenticate_header(self, request):
        return 'Bearer realm="enclave"'


class HasRole(permissions.BasePermission):
    """Reads need any role; writes need the view's `write_role` (default: member)."""

    message = "Your role in this tenant does not allow this action."

    def has_permission(self, request, view):
        principal = request.user
        if not isinstance(principal, Principal):
            return False
        needed = getattr(view, "read_role", Role.AUDITOR)
        if request.method not in permissions.SAFE_METHODS:
            needed = getattr(view, "write_role", Role.MEMBER)
        return principal.can(needed)


class TenantRateThrottle(BaseThrottle):
    """Every authenticated /v1 request counts against its tenant's requests per minute.

    Token rates are charged where tokens are known (chat completions, training).
    """

    def __init__(self):
        self._wait: int | None = None

    def allow_request(self, request, view):
        principal = request.user
        if not isinstance(principal, Principal):
            return True  # authentication or permission will refuse it
        try:
            rate_limit_consume(tenant=principal.tenant, requests=1)
        except RateLimited as exc:
            self._wait = exc.retry_after
            return False
        return True

    def wait(self):
        return self._wait


class ApiKeyScheme(OpenApiAuthenticationExtension):
    """Tells the OpenAPI schema that /v1 takes `Authorization: Bearer <API key>`."""

    target_class = "controlplane.api.ApiKeyAuthentication"
    name = "ApiKey"

    def get_security_definition(self, auto_schema):
        return {"type": "http", "scheme": "bearer", "description": "An Enclave API key"}
