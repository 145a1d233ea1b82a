"""Who is using the console: the session's user -> a tenant and a role in it.

The console reuses the API's `Principal(tenant, role, actor)`, so `principal.can(role)`
means the same thing in a browser as with an API key. The current tenant is kept in the
session (the tenant switcher) and checked against the user's memberships on every
request, so a stale or forged session value falls back to a tenant the user belongs to.

`console_view` wraps every console page: login required, a membership required (403
otherwise), a role for reads and a role for writes (403 when the role is too low), and
an audit event for every POST, success or refusal, with actor "user:<username>".
"""

import functools

from django.contrib.auth.views import redirect_to_login
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpResponse
from django.template.response import TemplateResponse
from django.urls import reverse

from controlplane.api import Principal
from controlplane.audit.services import audit_event_record
from controlplane.rls.context import tenant_narrow
from controlplane.tenancy.models import Membership, Role
from controlplane.tenancy.selectors import memberships_of_user

SESSION_TENANT = "console_tenant_id"
#: Console pages load only their own scripts, styles and data: no inline script, no CDN.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'; "
    "object-src 'none'"
)
MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def memberships_of(user) -> list[Membership]:
    """The user's memberships, by tenant name (the tenant switcher's choices)."""
    if not user.is_authenticated:
        return []
    return list(memberships_of_user(user=user))


def principal_for(request) -> Principal | None:
    """The request's Principal: the session's tenant when the user still belongs to it,
    else the user's first tenant; None for a user in no tenant."""
    memberships = memberships_of(request.user)
    request.console_memberships = memberships
    if not memberships:
        return None
    wanted = request.session.get(SESSION_TENANT)
    membership = next((m for m in memberships if m.tenant_id == wanted), memberships[0])
    tenant_narrow(tenant_id=membership.tenant_id)  # row-level security, until the request ends
    return Principal(
        tenant=membership.tenant, role=membership.role, actor=f"user:{request.user.get_username()}"
    )


def tenant_switch(request, *, tenant_id: int) -> Principal:
    """Make `tenant_id` the session's tenant; PermissionDenied when the user is not a member."""
    if not any(m.tenant_id == tenant_id for m in memberships_of(request.user)):
        raise PermissionDenied("You are not a member of that tenant.")
    request.session[SESSION_TENANT] = tenant_id
    return principal_for(request)


def audit_console_request(request, response) -> None:
    """One audit event for a mutating console request (views may set `audit_object`)."""
    principal = getattr(request, "principal", None)
    if principal is None or request.method not in MUTATING:
        return
    match = getattr(request, "resolver_match", None)
    object_type, object_id = getattr(request, "audit_object", ("", ""))
    if not object_id and match and match.kwargs:
        object_id = next(iter(reversed(match.kwargs.values())))
    audit_event_record(
        tenant=principal.tenant,
        actor=principal.actor,
        action=f"{request.method} /{match.route if match else request.path}",
        object_type=object_type,
        object_id=str(object_id),
        request_id=getattr(request, "request_id", ""),
        status_code=response.status_code,
    )


def console_view(read_role: str = Role.AUDITOR, write_role: str = Role.MEMBER):
    """Decorate a console view: login, membership, role checks and the audit record.

    The view gets `request.principal`. Reads need `read_role`, POSTs need `write_role`.
    """

    def decorate(view):
        @functools.wraps(view)
        def wrapper(request, *args, **kwargs):
            if not request.user.is_authenticated:
                return redirect_to_login(request.get_full_path(), reverse("console:login"))
            principal = principal_for(request)
            if principal is None:
                raise PermissionDenied("Your account is not a member of any tenant.")
            request.principal = principal
            needed = write_role if request.method in MUTATING else read_role
            if not principal.can(needed):
                response = _forbidden(request, needed)
            else:
                try:
                    response = view(request, *args, **kwargs)
                except PermissionDenied as exc:  # a service's own rule (e.g. owner only)
                    response = _forbidden(request, needed, reason=str(exc))
                except Http404:
                    audit_console_request(request, HttpResponse(status=404))
                    raise
            audit_console_request(request, response)
            return with_csp(response)

        return wrapper

    return decorate


def with_csp(response):
    response.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
    return response


def csp(view):
    """The console's Content-Security-Policy on a view not wrapped by console_view."""

    @functools.wraps(view)
    def wrapper(request, *args, **kwargs):
        return with_csp(view(request, *args, **kwargs))

    return wrapper


def _forbidden(request, needed: str, reason: str = ""):
    response = TemplateResponse(
        request,
        "console/forbidden.html",
        {
            "needed": needed,
            "reason": reason,
            "principal": request.principal,
            "tenant": request.principal.tenant,
            "my_memberships": getattr(request, "console_memberships", []),
        },
        status=403,
    )
    return response.render()
