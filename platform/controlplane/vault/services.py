"""Writes for the vault: store, destroy, and rotate keys. See the package docstring."""

import logging
import os
import re
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from django.db import IntegrityError, transaction
from django.utils import timezone

from . import conf, crypto
from .exceptions import BlobNotFound, BlobTooLarge, MasterKeyError, VaultIntegrityError
from .keyring import (
    Keyring,
    keyring_install_new_key,
    keyring_retire_keys,
    load_keyring,
)
from .models import Blob, TenantKey
from .selectors import (  # noqa: F401  (blob_read_bytes is re-exported for callers' ease)
    _parse_blob_id,
    blob_path,
    blob_read_bytes,
    tenant_key_unwrap,
)

log = logging.getLogger(__name__)

MAX_KIND_LENGTH = 64
_BLOB_FILE = re.compile(r"\.?[0-9a-f]{32}\.blob(\.partial)?")


# --- storing --------------------------------------------------------------------------


def _tenant_key_for_write(*, tenant, keyring: Keyring) -> tuple[TenantKey, bytes]:
    """The tenant's live key and its material, creating it (under the current master
    key) on the tenant's first blob."""
    tenant_key = TenantKey.objects.filter(tenant=tenant, destroyed_at__isnull=True).first()
    if tenant_key is None:
        material = crypto.new_key()
        key_id = f"tk-{uuid.uuid4().hex}"
        aad = crypto.tenant_key_aad(tenant_id=tenant.pk, tenant_key_id=key_id)
        try:
            with transaction.atomic():
                tenant_key = TenantKey.objects.create(
                    tenant=tenant,
                    key_id=key_id,
                    wrapped_key=crypto.wrap_key(
                        wrapping_key=keyring.current.material, key=material, aad=aad
                    ),
                    master_key_id=keyring.current.key_id,
                )
            return tenant_key, material
        except IntegrityError:  # another process created the tenant's key first
            tenant_key = TenantKey.objects.get(tenant=tenant, destroyed_at__isnull=True)
    try:
        return tenant_key, tenant_key_unwrap(tenant_key=tenant_key, keyring=keyring)
    except VaultIntegrityError as exc:
        raise VaultIntegrityError(f"tenant key {tenant_key.key_id}: {exc}") from None


def _pieces(source: BinaryIO | Iterable[bytes], read_size: int) -> Iterator[bytes]:
    if isinstance(source, bytes | bytearray | memoryview):
        yield bytes(source)
        return
    read = getattr(source, "read", None)
    if read is None:
        yield from source
        return
    while piece := read(read_size):
        yield piece


def _at_most(pieces: Iterable[bytes], max_bytes: int | None) -> Iterator[bytes]:
    total = 0
    for piece in pieces:
        total += len(piece)
        if max_bytes is not None and total > max_bytes:
            raise BlobTooLarge(max_bytes)
        yield piece


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def blob_put(
    *,
    tenant,
    kind: str,
    source: BinaryIO | Iterable[bytes],
    max_bytes: int | None = None,
    chunk_size: int | None = None,
) -> Blob:
    """Encrypt `source` (a binary file or an iterable of bytes) into a new blob, streaming.

    `chunk_size` (plaintext bytes per sealed chunk) defaults to ENCLAVE_VAULT_CHUNK_BYTES.
    Raises BlobTooLarge as soon as more than `max_bytes` arrive, leaving no file and no
    row; MasterKeyError if the master key is not configured; ValueError for a bad `kind`.

    The file is written to a temporary name, fsynced and renamed before the row is
    inserted, so no row ever names a partial file. A crash (or an enclosing transaction
    rolled back) after the rename leaves a file with no row: its data key never reached
    the database, so it is ciphertext nobody can open (see `blob_orphans_remove`).
    """
    if not kind or len(kind) > MAX_KIND_LENGTH:
        raise ValueError(f"kind must be 1..{MAX_KIND_LENGTH} characters, not {kind!r}")
    chunk_size = chunk_size or conf.chunk_bytes()
    keyring = load_keyring()
    tenant_key, tenant_key_material = _tenant_key_for_write(tenant=tenant, keyring=keyring)

    blob_id = uuid.uuid4()
    data_key = crypto.new_key()
    wrapped_data_key = crypto.wrap_key(
        wrapping_key=tenant_key_material,
        key=data_key,
        aad=crypto.data_key_aad(
            tenant_id=tenant.pk, blob_id=blob_id, tenant_key_id=tenant_key.key_id
        ),
    )
    relative = f"{tenant.pk}/{blob_id.hex[:2]}/{blob_id.hex}.blob"
    root = conf.vault_dir()
    path = root.joinpath(*relative.split("/"))
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.partial")

    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            size = crypto.encrypt_stream(
                key=data_key,
                tenant_id=tenant.pk,
                blob_id=blob_id,
                chunk_size=chunk_size,
                pieces=_at_most(_pieces(source, chunk_size), max_bytes),
                out=out,
            )
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, path)
        _fsync_dir(path.parent)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise

    try:
        return Blob.objects.create(
            id=blob_id,
            tenant=tenant,
            kind=kind,
            plaintext_size=size,
            ciphertext_size=path.stat().st_size,
            ciphertext_path=relative,
            wrapped_data_key=wrapped_data_key,
            tenant_key_id=tenant_key.key_id,
        )
    except BaseException:
        path.unlink(missing_ok=True)
        raise


# --- crypto-shredding -------------------------------------------------------------------


def _remove_files_later(paths: list[Path]) -> None:
    """Remove ciphertext files once the destruction is committed; best effort, since the
    destroyed key already makes them unreadable."""

    def remove() -> None:
        for path in paths:
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:
                log.warning("could not remove destroyed blob file %s: %s", path, exc)

    transaction.on_commit(remove)


def blob_destroy(*, tenant, blob_id: uuid.UUID | str) -> None:
    """Crypto-shred one blob: its wrapped data key is deleted from its row, then its file
    is removed (best effort, after commit). Destroying a destroyed blob does nothing;
    another tenant's or an unknown id raises BlobNotFound.
    """
    parsed = _parse_blob_id(blob_id)
    with transaction.atomic():
        blob = None
        if parsed is not None:
            blob = Blob.objects.select_for_update().filter(tenant=tenant, id=parsed).first()
        if blob is None:
            raise BlobNotFound(f"no blob {blob_id} for tenant {tenant.slug}")
        if blob.destroyed_at is not None:
            return
        blob.wrapped_data_key = None
        blob.destroyed_at = timezone.now()
        blob.save(update_fields=["wrapped_data_key", "destroyed_at"])
        try:
            paths = [blob_path(blob=blob)]
        except VaultIntegrityError:
            paths = []
        _remove_files_later(paths)


def tenant_keys_destroy(*, tenant) -> None:
    """Crypto-shred everything the tenant has in the vault: its tenant keys are deleted
    (so no data key of theirs can be unwrapped again), its blobs are marked destroyed
    with their wrapped data keys deleted, and their files removed after commit.

    The tenant may store new blobs afterwards; they get a new tenant key.
    """
    now = timezone.now()
    with transaction.atomic():
        # UPDATE locks the rows: a concurrent rotation waits, then skips destroyed keys.
        TenantKey.objects.filter(tenant=tenant, destroyed_at__isnull=True).update(
            wrapped_key=None, destroyed_at=now
        )
        live = Blob.objects.filter(tenant=tenant, destroyed_at__isnull=True)
        paths = []
        for blob in live.only("id", "ciphertext_path"):
            try:
                paths.append(blob_path(blob=blob))
            except VaultIntegrityError:
                pass  # a path outside the vault dir is never removed
        live.update(wrapped_data_key=None, destroyed_at=now)
        _remove_files_later(paths)


def blob_orphans_remove(*, older_than_seconds: float = 3600.0) -> list[Path]:
    """Remove files in the vault dir that no row names (left by a crash or a rolled-back
    transaction after the rename in `blob_put`), and stale partial files. They are
    unreadable anyway; this reclaims space. Returns what it removed."""
    root = conf.vault_dir()
    if not root.is_dir():
        return []
    cutoff = timezone.now().timestamp() - older_than_seconds
    known = set(Blob.objects.values_list("ciphertext_path", flat=True))
    removed = []
    for path in root.glob("*/*/*"):
        parts = path.relative_to(root).parts
        # only names blob_put writes: never anything else someone keeps in the same dir
        if not (parts[0].isdigit() and _BLOB_FILE.fullmatch(parts[2])):
            continue
        if not path.is_file() or path.stat().st_mtime > cutoff:
            continue
        relative = "/".join(parts)
        if relative not in known:
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


# --- master key rotation --------------------------------------------------------------


@dataclass(frozen=True)
class MasterKeyRotation:
    """What `master_key_rotate` did."""

    source: str  # "environment", "file" or "embedded"
    location: str  # the variable or file the keyring came from
    current_key_id: str
    previous_key_ids: tuple[str, ...]
    installed_new_key: bool  # a fresh key was generated into the keyring file
    resumed: bool  # tenant keys were already waiting under an older key (an interrupted
    #                rotation, or an operator-installed key): they were finished, no new key
    rewrapped: int  # tenant keys re-wrapped by this run
    failed: tuple[str, ...]  # tenant key ids that failed to authenticate: left as they were
    pending: int  # live tenant keys still not under the current key after this run


def _pending(keyring: Keyring):
    return TenantKey.objects.filter(destroyed_at__isnull=True).exclude(
        master_key_id=keyring.current.key_id
    )


def master_key_rotate(*, install_new_key: bool = True) -> MasterKeyRotation:
    """Re-wrap every live tenant key under the current master key; no blob is touched.

    If no tenant key is waiting under an older key and the keyring is a file (embedded
    or ENCLAVE_MASTER_KEY_FILE), a fresh key is first installed in it as current, the old
    ones kept. With ENCLAVE_MASTER_KEY the operator installs the new key (see the
    command); this then finishes the job. Each tenant key is re-wrapped in its own
    transaction, so a crash leaves every key under either an old or the new master key,
    both in the keyring; running again resumes. MasterKeyError, before any change, if a
    master key some tenant key needs is not in the keyring.
    """
    keyring = load_keyring()
    resumed = _pending(keyring).exists()
    installed = False
    if not resumed and install_new_key and keyring.writable:
        keyring = keyring_install_new_key(keyring=keyring)
        installed = True
    needed = set(_pending(keyring).values_list("master_key_id", flat=True).distinct())
    missing = needed - set(keyring.key_ids)
    if missing:
        keyring.get(sorted(missing)[0])  # raises MasterKeyError naming where to add it

    current = keyring.current
    rewrapped, failed = 0, []
    for pk in list(_pending(keyring).values_list("pk", flat=True)):
        with transaction.atomic():
            tenant_key = _pending(keyring).select_for_update().filter(pk=pk).first()
            if tenant_key is None:  # destroyed or re-wrapped meanwhile
                continue
            try:
                material = tenant_key_unwrap(tenant_key=tenant_key, keyring=keyring)
            except VaultIntegrityError:
                log.error("tenant key %s failed to authenticate; left as is", tenant_key.key_id)
                failed.append(tenant_key.key_id)
                continue
            aad = crypto.tenant_key_aad(
                tenant_id=tenant_key.tenant_id, tenant_key_id=tenant_key.key_id
            )
            tenant_key.wrapped_key = crypto.wrap_key(
                wrapping_key=current.material, key=material, aad=aad
            )
            tenant_key.master_key_id = current.key_id
            tenant_key.rewrapped_at = timezone.now()
            tenant_key.save(update_fields=["wrapped_key", "master_key_id", "rewrapped_at"])
            rewrapped += 1
    return MasterKeyRotation(
        source=keyring.source,
        location=keyring.location,
        current_key_id=current.key_id,
        previous_key_ids=tuple(key.key_id for key in keyring.previous),
        installed_new_key=installed,
        resumed=resumed,
        rewrapped=rewrapped,
        failed=tuple(failed),
        pending=_pending(keyring).count(),
    )


@dataclass(frozen=True)
class MasterKeyRetirement:
    """What `master_key_retire_previous` did."""

    source: str
    location: str
    current_key_id: str
    retired: tuple[str, ...]  # removed from the keyring file (or removable from the env)
    still_needed: tuple[str, ...]  # previous keys some live tenant key is still under


def master_key_retire_previous() -> MasterKeyRetirement:
    """Drop previous master keys that no live tenant key is wrapped under.

    A separate step from the rotation, run once it reported nothing pending, so that a
    process that read the keyring just before the rotation cannot wrap a new tenant key
    under a key that is being removed. With ENCLAVE_MASTER_KEY nothing is changed: the
    result says which keys the operator may drop from ENCLAVE_MASTER_KEY_PREVIOUS.
    """
    keyring = load_keyring()
    in_use = set(
        TenantKey.objects.filter(destroyed_at__isnull=True)
        .values_list("master_key_id", flat=True)
        .distinct()
    )
    previous = [key.key_id for key in keyring.previous]
    unused = tuple(key_id for key_id in previous if key_id not in in_use)
    still_needed = tuple(key_id for key_id in previous if key_id in in_use)
    if unused and keyring.writable:
        keyring = keyring_retire_keys(keyring=keyring, key_ids=set(unused))
        if set(unused) & set(keyring.key_ids):
            raise MasterKeyError(f"could not retire keys from {keyring.location}")
    return MasterKeyRetirement(
        source=keyring.source,
        location=keyring.location,
        current_key_id=keyring.current.key_id,
        retired=unused,
        still_needed=still_needed,
    )
