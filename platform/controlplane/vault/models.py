"""Vault records: tenant keys and blobs. Key material is stored only wrapped, never shown."""

import uuid

from django.db import models
from django.db.models import Q


class TenantKey(models.Model):
    """A tenant's key, wrapped by a platform master key; it wraps the tenant's data keys.

    `wrapped_key` is AES-GCM(master key, tenant key) with the tenant id and `key_id` as
    associated data. Destroying it (NULL, `destroyed_at` set) crypto-shreds every blob
    whose data key it wraps.
    """

    tenant = models.ForeignKey(
        "tenancy.Tenant", on_delete=models.CASCADE, related_name="vault_keys"
    )
    key_id = models.CharField(max_length=64, unique=True)
    wrapped_key = models.BinaryField(null=True)
    master_key_id = models.CharField(max_length=64, db_index=True)
    created_at = models.DateTimeField(auto_now_add=True)
    rewrapped_at = models.DateTimeField(null=True, blank=True)
    destroyed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            # One live key per tenant: two processes creating a tenant's first key race
            # on this constraint instead of leaving two.
            models.UniqueConstraint(
                fields=["tenant"],
                condition=Q(destroyed_at__isnull=True),
                name="vault_one_live_key_per_tenant",
            ),
            models.CheckConstraint(
                condition=Q(destroyed_at__isnull=True) | Q(wrapped_key__isnull=True),
                name="vault_destroyed_key_has_no_material",
            ),
        ]

    def __str__(self) -> str:
        return self.key_id


class Blob(models.Model):
    """One encrypted object (dataset, adapter, checkpoint) stored as a file.

    `wrapped_data_key` is AES-GCM(tenant key `tenant_key_id`, data key) with the tenant id,
    the blob id and the tenant key id as associated data; the file is sealed in chunks
    under the data key (see `crypto`). `ciphertext_path` is relative to the vault dir.
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    tenant = models.ForeignKey("tenancy.Tenant", on_delete=models.CASCADE, related_name="blobs")
    kind = models.CharField(max_length=64)
    plaintext_size = models.BigIntegerField()
    ciphertext_size = models.BigIntegerField()
    ciphertext_path = models.CharField(max_length=500)
    wrapped_data_key = models.BinaryField(null=True)
    tenant_key_id = models.CharField(max_length=64)
    created_at = models.DateTimeField(auto_now_add=True)
    destroyed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        indexes = [models.Index(fields=["tenant", "kind", "created_at"])]
        constraints = [
            models.CheckConstraint(
                condition=Q(destroyed_at__isnull=True) | Q(wrapped_data_key__isnull=True),
                name="vault_destroyed_blob_has_no_key",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.kind} {self.id}"
