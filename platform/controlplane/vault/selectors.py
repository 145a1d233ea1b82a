"""Reads for the vault. Every blob is reached through its tenant: another tenant's id,
an unknown id and a destroyed blob all answer BlobNotFound."""

import uuid
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from uuid import UUID

from django.db.models import QuerySet

from . import conf, crypto
from .exceptions import BlobNotFound, BlobTampered, VaultIntegrityError
from .keyring import Keyring, load_keyring
from .models import Blob, TenantKey


def _parse_blob_id(blob_id: UUID | str) -> UUID | None:
    if isinstance(blob_id, UUID):
        return blob_id
    try:
        return uuid.UUID(str(blob_id))
    except ValueError:
        return None


def blob_get(*, tenant, blob_id: UUID | str) -> Blob:
    """The tenant's live blob with this id; BlobNotFound for anyone else's or a destroyed one."""
    parsed = _parse_blob_id(blob_id)
    blob = None
    if parsed is not None:
        blob = Blob.objects.filter(tenant=tenant, id=parsed, destroyed_at__isnull=True).first()
    if blob is None or blob.wrapped_data_key is None:
        raise BlobNotFound(f"no blob {blob_id} for tenant {tenant.slug}")
    return blob


def blob_list(*, tenant, kind: str | None = None) -> QuerySet[Blob]:
    """The tenant's live blobs, newest first, optionally of one kind."""
    blobs = Blob.objects.filter(tenant=tenant, destroyed_at__isnull=True)
    if kind is not None:
        blobs = blobs.filter(kind=kind)
    return blobs.order_by("-created_at")


def tenant_key_unwrap(*, tenant_key: TenantKey, keyring: Keyring) -> bytes:
    """The tenant key's material. VaultIntegrityError if it fails to authenticate,
    MasterKeyError if its master key is not in the keyring."""
    master = keyring.get(tenant_key.master_key_id)
    aad = crypto.tenant_key_aad(tenant_id=tenant_key.tenant_id, tenant_key_id=tenant_key.key_id)
    return crypto.unwrap_key(wrapping_key=master.material, wrapped=tenant_key.wrapped_key, aad=aad)


def blob_path(*, blob: Blob) -> Path:
    """The blob's file; BlobTampered if the recorded path would leave the vault dir."""
    relative = PurePosixPath(blob.ciphertext_path)
    if relative.is_absolute() or ".." in relative.parts or not relative.parts:
        raise BlobTampered(f"blob {blob.id} records a path outside the vault")
    return conf.vault_dir().joinpath(*relative.parts)


def blob_open(*, tenant, blob_id: UUID | str) -> Iterator[bytes]:
    """The blob's plaintext as an iterator of chunks, each authenticated before it is given.

    Raises at once: BlobNotFound (foreign, unknown or destroyed id, or a destroyed tenant
    key), BlobTampered (a wrapped key fails to authenticate, the file is missing),
    MasterKeyError (the master key it needs is not configured). Raises while iterating:
    BlobTampered at the first chunk that fails; discard what came before it.
    """
    blob = blob_get(tenant=tenant, blob_id=blob_id)
    tenant_key = TenantKey.objects.filter(tenant=tenant, key_id=blob.tenant_key_id).first()
    if tenant_key is None:
        raise BlobTampered(f"blob {blob.id} names a tenant key its tenant does not have")
    if tenant_key.destroyed_at is not None or tenant_key.wrapped_key is None:
        raise BlobNotFound(f"no blob {blob.id} for tenant {tenant.slug} (its key was destroyed)")
    keyring = load_keyring()
    try:
        tenant_key_material = tenant_key_unwrap(tenant_key=tenant_key, keyring=keyring)
        data_key = crypto.unwrap_key(
            wrapping_key=tenant_key_material,
            wrapped=blob.wrapped_data_key,
            aad=crypto.data_key_aad(
                tenant_id=tenant.pk, blob_id=blob.id, tenant_key_id=blob.tenant_key_id
            ),
        )
    except VaultIntegrityError as exc:
        raise BlobTampered(f"blob {blob.id}: {exc}") from None
    path = blob_path(blob=blob)
    if not path.is_file():
        raise BlobTampered(f"blob {blob.id}: its ciphertext file is missing")
    return _decrypted_chunks(
        path=path, key=data_key, tenant_id=tenant.pk, blob_id=blob.id, size=blob.plaintext_size
    )


def _decrypted_chunks(
    *, path: Path, key: bytes, tenant_id: int, blob_id: UUID, size: int
) -> Iterator[bytes]:
    total = 0
    try:
        source = open(path, "rb")  # noqa: SIM115  (closed below, however the stream ends)
    except FileNotFoundError:  # removed since blob_open looked: destroyed meanwhile
        raise BlobNotFound(f"blob {blob_id} was destroyed while it was being opened") from None
    with source:
        try:
            for chunk in crypto.decrypt_stream(
                key=key, tenant_id=tenant_id, blob_id=blob_id, source=source
            ):
                total += len(chunk)
                if total > size:
                    raise BlobTampered(f"blob {blob_id}: longer than its recorded size")
                yield chunk
        except BlobTampered:
            raise
        except VaultIntegrityError as exc:
            raise BlobTampered(f"blob {blob_id}: {exc}") from None
    if total != size:
        raise BlobTampered(f"blob {blob_id}: shorter than its recorded size")


def blob_read_bytes(*, tenant, blob_id: UUID | str) -> bytes:
    """The whole plaintext, for small blobs; all or nothing (same errors as blob_open)."""
    return b"".join(blob_open(tenant=tenant, blob_id=blob_id))
