"""The Django admin for platform operators: every page opens, nothing sensitive shows,
and nothing that must go through a service can be deleted or edited here."""

import pytest
from django.contrib import admin
from django.contrib.auth import get_user_model
from django.urls import reverse

from controlplane.audit.models import AuditEvent
from controlplane.tenancy import services
from controlplane.tenancy.models import ApiKey

pytestmark = pytest.mark.django_db


@pytest.fixture
def operator_client(client):
    staff = get_user_model().objects.create_superuser("operator", "op@example.org", "x" * 20)
    client.force_login(staff)
    return client


def test_every_admin_page_opens_and_sensitive_rows_cannot_be_deleted(operator_client):
    tenant = services.tenant_create(slug="bank", name="Bank")
    _key, raw = services.api_key_create(tenant=tenant, role="admin")
    for model, model_admin in admin.site._registry.items():
        opts = model._meta
        url = reverse(f"admin:{opts.app_label}_{opts.model_name}_changelist")
        response = operator_client.get(url)
        assert response.status_code == 200, url
        assert raw not in response.content.decode()
        if opts.app_label in ("files", "tuning", "federation", "serving", "audit", "vault"):
            assert not model_admin.has_delete_permission(None), opts.label
    key_page = operator_client.get(
        reverse("admin:tenancy_apikey_change", args=[ApiKey.objects.get().pk])
    ).content.decode()
    assert ApiKey.objects.get().key_hash not in key_page and raw not in key_page


def test_operators_revoke_keys_with_an_audit_record(operator_client):
    tenant = services.tenant_create(slug="bank", name="Bank")
    key, raw = services.api_key_create(tenant=tenant, role="member")
    response = operator_client.post(
        reverse("admin:tenancy_apikey_changelist"),
        {"action": "revoke", "_selected_action": [key.pk]},
    )
    assert response.status_code == 302
    assert services.api_key_authenticate(raw=raw) is None
    event = AuditEvent.objects.get(action="admin revoke api key")
    assert (event.actor, event.object_id) == ("staff:operator", key.prefix)
    assert not admin.site._registry[ApiKey].has_delete_permission(None)
