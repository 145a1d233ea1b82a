"""Writes for tenancy: tenants, members, API keys, usage, quota enforcement."""

import hashlib
import secrets
from datetime import date

from django.core.cache import cache
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import IntegrityError, transaction
from django.db.models import F
from django.utils import timezone
from django.utils.text import slugify

from .models import ApiKey, DailyUsage, Membership, Role, Tenant

API_KEY_PREFIX = "enc_"


class RateLimited(Exception):
    """A per-minute rate is exhausted; retry after `retry_after` seconds (HTTP 429)."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class QuotaExceeded(Exception):
    """A total (storage, concurrent jobs) is exhausted (HTTP 403)."""


def tenant_create(
    *, slug: str, name: str, vertical: str = Tenant.Vertical.OTHER, data_region: str = "local"
) -> Tenant:
    """Create a tenant; ValidationError names the field that is wrong."""
    if slugify(slug) != slug:
        raise ValidationError({"slug": f"{slug!r} is not a slug (lowercase letters, digits, -)"})
    if Tenant.objects.filter(slug=slug).exists():
        raise ValidationError({"slug": f"a tenant with slug {slug!r} already exists"})
    tenant = Tenant(slug=slug, name=name, vertical=vertical, data_region=data_region)
    tenant.full_clean()
    tenant.save()
    return tenant


def membership_set(*, tenant: Tenant, user, role: str) -> Membership:
    """Give `user` `role` in `tenant` (adding them when they are not a member yet).

    ValidationError names the problem: an unknown role, or demoting the tenant's last
    admin (nobody could manage its keys and members any more).
    """
    if role not in Role.values:
        raise ValidationError({"role": f"{role!r} is not one of {', '.join(Role.values)}"})
    with transaction.atomic():
        _lock_members(tenant)
        current = Membership.objects.filter(tenant=tenant, user=user).first()
        if current is not None and current.role == Role.ADMIN and role != Role.ADMIN:
            _refuse_last_admin(tenant, f"{user.get_username()} is the last admin of {tenant.slug}")
        membership, _ = Membership.objects.update_or_create(
            tenant=tenant, user=user, defaults={"role": role}
        )
    return membership


def membership_remove(*, tenant: Tenant, membership_id: int, by_role: str) -> Membership:
    """Remove a person from `tenant`; returns the removed membership (no longer saved).

    Http404 for a membership of another tenant (or none), PermissionDenied unless
    `by_role` (the acting principal's role) is admin, ValidationError for the last admin.
    """
    from .selectors import access_membership_by_id

    membership = access_membership_by_id(tenant=tenant, membership_id=membership_id)
    if by_role != Role.ADMIN:
        raise PermissionDenied("Only an admin can remove members.")
    with transaction.atomic():
        _lock_members(tenant)
        membership = access_membership_by_id(tenant=tenant, membership_id=membership_id)
        if membership.role == Role.ADMIN:
            _refuse_last_admin(
                tenant, f"{membership.user.get_username()} is the last admin of {tenant.slug}"
            )
        membership.delete()
    return membership


def _lock_members(tenant: Tenant) -> None:
    # Two admins demoting or removing each other at once must not leave the tenant with
    # none: the tenant row serialises changes to its memberships.
    Tenant.objects.select_for_update().filter(pk=tenant.pk).first()


def _refuse_last_admin(tenant: Tenant, message: str) -> None:
    if Membership.objects.filter(tenant=tenant, role=Role.ADMIN).count() <= 1:
        raise ValidationError({"role": f"{message}; make someone else admin first"})


def _hash_key(raw: str) -> str:
    # API keys carry 256 bits of randomness, so a fast hash is enough (no password stretching).
    return hashlib.sha256(raw.encode()).hexdigest()


def api_key_create(
    *, tenant: Tenant, role: str = Role.MEMBER, name: str = "", expires_at=None
) -> tuple[ApiKey, str]:
    """Create a key; returns the row and the key itself, which is never stored or shown again."""
    if role not in Role.values:
        raise ValidationError({"role": f"{role!r} is not one of {', '.join(Role.values)}"})
    if expires_at is not None and expires_at <= timezone.now():
        raise ValidationError({"expires_at": "the expiry must be in the future"})
    for _ in range(5):  # a prefix collision is astronomically rare; retry rather than fail
        prefix = API_KEY_PREFIX + secrets.token_hex(4)
        raw = f"{prefix}_{secrets.token_urlsafe(32)}"
        try:
            with transaction.atomic():
                key = ApiKey.objects.create(
                    tenant=tenant,
                    name=name,
                    prefix=prefix,
                    key_hash=_hash_key(raw),
                    role=role,
                    expires_at=expires_at,
                )
            return key, raw
        except IntegrityError:
            continue
    raise RuntimeError("could not find a free API key prefix")


def api_key_revoke(*, key: ApiKey) -> ApiKey:
    if key.revoked_at is None:
        key.revoked_at = timezone.now()
        key.save(update_fields=["revoked_at"])
    return key


def api_key_authenticate(*, raw: str) -> ApiKey | None:
    """The active key `raw` names, or None (unknown, wrong secret, revoked or expired)."""
    prefix = raw.split("_", 2)
    if len(prefix) != 3 or f"{prefix[0]}_" != API_KEY_PREFIX:
        return None
    key = ApiKey.objects.select_related("tenant").filter(prefix=f"{prefix[0]}_{prefix[1]}").first()
    if key is None or not secrets.compare_digest(key.key_hash, _hash_key(raw)):
        return None
    if not key.is_active():
        return None
    now = timezone.now()
    if key.last_used_at is None or (now - key.last_used_at).total_seconds() > 60:
        ApiKey.objects.filter(pk=key.pk).update(last_used_at=now)  # coarse: not on every call
    return key


def usage_record(
    *,
    tenant: Tenant,
    requests: int = 0,
    prompt_tokens: int = 0,
    completion_tokens: int = 0,
    training_tokens: int = 0,
    day: date | None = None,
) -> None:
    """Add to the tenant's usage for `day` (today, UTC), atomically."""
    day = day or timezone.now().date()
    counts = {
        "requests": requests,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "training_tokens": training_tokens,
    }
    increments = {name: F(name) + n for name, n in counts.items() if n}
    if not increments:
        return
    DailyUsage.objects.get_or_create(tenant=tenant, day=day)
    DailyUsage.objects.filter(tenant=tenant, day=day).update(**increments)


def rate_limit_consume(*, tenant: Tenant, requests: int = 1, tokens: int = 0) -> None:
    """Count a request (and its tokens) against the tenant's per-minute rates.

    Fixed one-minute windows in the shared cache (Redis in production). Raises
    RateLimited with the seconds left in the window when a rate is exhausted.
    """
    now = timezone.now()
    window = int(now.timestamp() // 60)
    retry_after = 60 - int(now.timestamp() % 60)
    for what, amount, limit in (
        ("requests", requests, tenant.requests_per_minute),
        ("tokens", tokens, tenant.tokens_per_minute),
    ):
        if not amount:
            continue
        key = f"rate:{tenant.pk}:{what}:{window}"
        cache.add(key, 0, timeout=120)
        used = cache.incr(key, amount)
        if used > limit:
            raise RateLimited(
                f"rate limit of {limit} {what} per minute reached for tenant {tenant.slug}",
                retry_after=retry_after,
            )


def tenant_delete(*, tenant: Tenant) -> None:
    """Erase a tenant: crypto-shred every blob (its keys are destroyed first, so even a
    copy of its files or an old backup of its rows cannot be decrypted), then delete its
    rows. The audit log keeps the tenant's slug."""
    from controlplane.vault.services import tenant_keys_destroy

    with transaction.atomic():
        tenant_keys_destroy(tenant=tenant)
        tenant.delete()
