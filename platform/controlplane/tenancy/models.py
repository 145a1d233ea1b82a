from django.conf import settings
from django.db import models
from django.utils import timezone


class Role(models.TextChoices):
    """What a member or an API key may do inside its tenant."""

    ADMIN = "admin"  # everything, including keys and members
    MEMBER = "member"  # use and train models, manage files and jobs
    AUDITOR = "auditor"  # read everything, change nothing


class Tenant(models.Model):
    """An organisation on the platform: a bank, a broker, a hospital."""

    class Vertical(models.TextChoices):
        FINANCE = "finance"
        MEDICAL = "medical"
        OTHER = "other"

    name = models.CharField(max_length=200)
    slug = models.SlugField(max_length=64, unique=True)
    vertical = models.CharField(max_length=16, choices=Vertical.choices, default=Vertical.OTHER)
    #: where the tenant's data must stay (e.g. "eu-west"); recorded, enforced by deployment
    data_region = models.CharField(max_length=64, default="local")
    created_at = models.DateTimeField(auto_now_add=True)

    # Quotas. Rates answer 429 with Retry-After; exhausted totals answer 403.
    tokens_per_minute = models.PositiveIntegerField(default=200_000)
    requests_per_minute = models.PositiveIntegerField(default=600)
    max_concurrent_jobs = models.PositiveIntegerField(default=2)
    storage_bytes = models.PositiveBigIntegerField(default=1 << 30)

    def __str__(self) -> str:
        return self.slug


class Membership(models.Model):
    """A person's role in a tenant; a person may belong to several tenants."""

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="memberships")
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="memberships"
    )
    role = models.CharField(max_length=16, choices=Role.choices, default=Role.MEMBER)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["tenant", "user"], name="one_membership_per_tenant")
        ]

    def __str__(self) -> str:
        return f"{self.user} in {self.tenant} as {self.role}"


class ApiKey(models.Model):
    """A tenant's API key. Only a hash is stored; the key is shown once at creation.

    The prefix (the first characters of the key) is stored in clear so people can tell
    their keys apart and the lookup is an index hit, not a scan.
    """

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="api_keys")
    name = models.CharField(max_length=100, blank=True, default="")
    prefix = models.CharField(max_length=16, unique=True)
    key_hash = models.CharField(max_length=64)
    role = models.CharField(max_length=16, choices=Role.choices, default=Role.MEMBER)
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"{self.prefix}… ({self.tenant}, {self.role})"

    def is_active(self, now=None) -> bool:
        now = now or timezone.now()
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > now)


class DailyUsage(models.Model):
    """Tokens a tenant used on one day (UTC), for metering and billing."""

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="usage")
    day = models.DateField()
    requests = models.PositiveBigIntegerField(default=0)
    prompt_tokens = models.PositiveBigIntegerField(default=0)
    completion_tokens = models.PositiveBigIntegerField(default=0)
    training_tokens = models.PositiveBigIntegerField(default=0)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["tenant", "day"], name="one_usage_row_a_day")
        ]

    def __str__(self) -> str:
        return f"{self.tenant} {self.day}"
