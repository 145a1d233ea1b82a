"""Tenants, API keys, roles, quotas and usage."""

from datetime import timedelta
from io import StringIO

import pytest
from django.core.exceptions import ValidationError
from django.core.management import CommandError, call_command
from django.utils import timezone

from controlplane.tenancy import services
from controlplane.tenancy.models import ApiKey, DailyUsage, Role, Tenant

pytestmark = pytest.mark.django_db


@pytest.fixture
def bank():
    return services.tenant_create(slug="bank", name="A Bank", vertical="finance")


def test_create_tenant_command_and_its_bad_inputs():
    out = StringIO()
    call_command(
        "create_tenant", "st-mary", "--name", "St Mary's", "--vertical", "medical", stdout=out
    )
    tenant = Tenant.objects.get(slug="st-mary")
    assert (tenant.name, tenant.vertical) == ("St Mary's", "medical")
    assert "created tenant st-mary" in out.getvalue()

    with pytest.raises(CommandError, match="already exists"):
        call_command("create_tenant", "st-mary", "--name", "again")
    with pytest.raises(CommandError, match="not a slug"):
        call_command("create_tenant", "St Mary", "--name", "x")
    assert Tenant.objects.count() == 1


def test_create_api_key_command_prints_the_key_once_and_stores_only_a_hash(bank):
    out, err = StringIO(), StringIO()
    call_command("create_api_key", "bank", "--role", "admin", stdout=out, stderr=err)
    raw = out.getvalue().strip()
    key = ApiKey.objects.get(tenant=bank)

    assert raw.startswith(key.prefix + "_") and len(raw) > 40
    assert key.role == Role.ADMIN
    assert raw not in {key.key_hash, key.prefix} and len(key.key_hash) == 64
    assert key.prefix in err.getvalue() and raw not in err.getvalue()
    assert services.api_key_authenticate(raw=raw) == key

    with pytest.raises(CommandError, match="no tenant with slug"):
        call_command("create_api_key", "nobody", "--role", "admin")


def test_revoked_expired_and_wrong_keys_do_not_authenticate(bank):
    key, raw = services.api_key_create(tenant=bank, role=Role.MEMBER)
    assert services.api_key_authenticate(raw=raw) == key
    assert services.api_key_authenticate(raw=raw[:-1] + ("A" if raw[-1] != "A" else "B")) is None
    assert services.api_key_authenticate(raw="enc_nope") is None
    assert services.api_key_authenticate(raw="") is None

    services.api_key_revoke(key=key)
    assert services.api_key_authenticate(raw=raw) is None

    soon, raw2 = services.api_key_create(
        tenant=bank, expires_at=timezone.now() + timedelta(seconds=60)
    )
    assert services.api_key_authenticate(raw=raw2) == soon
    ApiKey.objects.filter(pk=soon.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    assert services.api_key_authenticate(raw=raw2) is None

    with pytest.raises(ValidationError, match="role"):
        services.api_key_create(tenant=bank, role="owner")
    with pytest.raises(ValidationError, match="future"):
        services.api_key_create(tenant=bank, expires_at=timezone.now() - timedelta(days=1))


def test_rate_limits_raise_with_retry_after(bank):
    bank.requests_per_minute = 3
    bank.tokens_per_minute = 100
    for _ in range(3):
        services.rate_limit_consume(tenant=bank)
    with pytest.raises(services.RateLimited) as raised:
        services.rate_limit_consume(tenant=bank)
    assert 1 <= raised.value.retry_after <= 60
    assert "3 requests per minute" in str(raised.value)

    services.rate_limit_consume(tenant=bank, requests=0, tokens=90)
    with pytest.raises(services.RateLimited, match="100 tokens per minute"):
        services.rate_limit_consume(tenant=bank, requests=0, tokens=20)


def test_usage_is_metered_per_tenant_per_day(bank):
    other = services.tenant_create(slug="other", name="Other")
    services.usage_record(tenant=bank, requests=1, prompt_tokens=10, completion_tokens=5)
    services.usage_record(tenant=bank, requests=1, prompt_tokens=7, training_tokens=100)
    services.usage_record(tenant=other, requests=1, prompt_tokens=1)

    row = DailyUsage.objects.get(tenant=bank, day=timezone.now().date())
    assert (row.requests, row.prompt_tokens, row.completion_tokens, row.training_tokens) == (
        2,
        17,
        5,
        100,
    )
    assert DailyUsage.objects.get(tenant=other).prompt_tokens == 1


def test_delete_tenant_crypto_shreds_its_blobs_and_keeps_the_audit_trail(bank, tmp_path):
    from controlplane.audit.models import AuditEvent
    from controlplane.vault import selectors as vault_selectors
    from controlplane.vault import services as vault_services
    from controlplane.vault.exceptions import BlobNotFound

    blob = vault_services.blob_put(tenant=bank, kind="file", source=[b"secret ledger"])
    path = vault_selectors.blob_path(blob=blob)
    copy = path.read_bytes()

    with pytest.raises(CommandError, match="--yes"):
        call_command("delete_tenant", "bank")
    assert Tenant.objects.filter(slug="bank").exists()
    call_command("delete_tenant", "bank", "--yes", stdout=StringIO())

    assert not Tenant.objects.filter(slug="bank").exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(copy)  # even with its ciphertext put back, nothing can be read
    with pytest.raises(BlobNotFound):
        vault_selectors.blob_read_bytes(tenant=bank, blob_id=blob.pk)
    event = AuditEvent.objects.get(action="delete_tenant")
    assert (event.tenant_slug, event.object_id) == ("bank", "bank")
