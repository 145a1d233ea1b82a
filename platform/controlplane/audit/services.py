"""Writes for the audit log. There is only one: append."""

from .models import AuditEvent


def audit_event_record(
    *,
    actor: str,
    action: str,
    tenant=None,
    object_type: str = "",
    object_id: str = "",
    request_id: str = "",
    status_code: int | None = None,
) -> AuditEvent:
    return AuditEvent.objects.create(
        tenant=tenant,
        tenant_slug=getattr(tenant, "slug", ""),
        actor=actor,
        action=action,
        object_type=object_type,
        object_id=str(object_id),
        request_id=request_id,
        status_code=status_code,
    )
