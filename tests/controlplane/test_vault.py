"""The vault with real parts: PostgreSQL rows, real files, the real keyring and command.

Small chunks (CHUNK bytes) keep multi-chunk blobs tiny; the format is the same at 1 MiB.
"""

import base64
import io
import os
import random
import stat
from pathlib import Path

import pytest

from controlplane.tenancy.services import tenant_create
from controlplane.vault import conf, crypto, selectors, services
from controlplane.vault.exceptions import (
    BlobNotFound,
    BlobTampered,
    BlobTooLarge,
    VaultIntegrityError,
)
from controlplane.vault.keyring import load_keyring
from controlplane.vault.models import Blob, TenantKey

CHUNK = 64
RECORD = crypto.NONCE_BYTES + CHUNK + crypto.TAG_BYTES
HEADER = crypto.HEADER.size
KEY_VARS = (
    conf.MASTER_KEY_ENV,
    conf.MASTER_KEY_PREVIOUS_ENV,
    conf.MASTER_KEY_FILE_ENV,
    "ENCLAVE_VAULT_DIR",
    "ENCLAVE_VAULT_CHUNK_BYTES",
)


@pytest.fixture(autouse=True)
def var_dir(settings, tmp_path, monkeypatch) -> Path:
    """A private VAR_DIR (so the embedded keyring and the vault dir are this test's own),
    the embedded key source, and small chunks."""
    var = tmp_path / "var"
    var.mkdir()
    settings.VAR_DIR = var
    settings.ENCLAVE_VAULT_CHUNK_BYTES = CHUNK
    for name in KEY_VARS:
        monkeypatch.delenv(name, raising=False)
    return var


@pytest.fixture
def bank(db):
    return tenant_create(slug="bank", name="Bank")


@pytest.fixture
def clinic(db):
    return tenant_create(slug="clinic", name="Clinic")


def _data(size: int, seed: int = 7) -> bytes:
    return random.Random(seed).randbytes(size)


def _path(blob: Blob) -> Path:
    return selectors.blob_path(blob=blob)


def _read(tenant, blob: Blob) -> bytes:
    return selectors.blob_read_bytes(tenant=tenant, blob_id=blob.id)


def _b64key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


# --- round trip and streaming -----------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, 3 * CHUNK, 1000])
def test_round_trip_from_a_file_and_from_odd_sized_pieces(bank, size):
    data = _data(size)
    from_file = services.blob_put(tenant=bank, kind="dataset", source=io.BytesIO(data))
    pieces = [data[i : i + 7] for i in range(0, size, 7)]
    from_pieces = services.blob_put(tenant=bank, kind="dataset", source=iter(pieces))

    for blob in (from_file, from_pieces):
        chunks = list(selectors.blob_open(tenant=bank, blob_id=blob.id))
        assert b"".join(chunks) == data
        # every chunk but the last is full; the last is short (possibly empty) and final
        assert [len(c) for c in chunks] == [CHUNK] * (size // CHUNK) + [size % CHUNK]
        assert blob.plaintext_size == size
        assert _path(blob).stat().st_size == HEADER + (size // CHUNK) * RECORD + (
            crypto.NONCE_BYTES + size % CHUNK + crypto.TAG_BYTES
        )
    assert from_file.wrapped_data_key != from_pieces.wrapped_data_key  # a data key each
    assert _path(from_file).read_bytes() != _path(from_pieces).read_bytes()


@pytest.mark.django_db
def test_blob_put_streams_to_disk_before_the_source_ends(bank):
    root = conf.vault_dir()
    seen_on_disk = []

    def source():
        for i in range(200):
            if i == 150:  # earlier chunks must already be sealed into the file (less an
                # 8 KiB write buffer); a whole-file implementation would show nothing yet
                partial = list(root.rglob("*.partial"))
                seen_on_disk.append(sum(p.stat().st_size for p in partial))
            yield _data(CHUNK, seed=i)

    blob = services.blob_put(tenant=bank, kind="checkpoint", source=source())
    assert seen_on_disk and seen_on_disk[0] >= 50 * RECORD
    assert blob.plaintext_size == 200 * CHUNK
    assert not list(root.rglob("*.partial"))


# --- integrity -----------------------------------------------------------------------


def _flip_a_byte(raw: bytes) -> bytes:
    middle = HEADER + RECORD + 30
    return raw[:middle] + bytes([raw[middle] ^ 0x01]) + raw[middle + 1 :]


def _swap_chunks_1_and_2(raw: bytes) -> bytes:
    one = raw[HEADER + RECORD : HEADER + 2 * RECORD]
    two = raw[HEADER + 2 * RECORD : HEADER + 3 * RECORD]
    return raw[: HEADER + RECORD] + two + one + raw[HEADER + 3 * RECORD :]


def _drop_the_last_chunk(raw: bytes) -> bytes:
    return raw[: HEADER + 15 * RECORD]  # 1000 bytes = 15 full chunks + a final one


def _cut_into_the_last_chunk(raw: bytes) -> bytes:
    return raw[:-5]


def _append_a_chunk(raw: bytes) -> bytes:
    return raw + raw[HEADER : HEADER + RECORD]


def _change_the_header(raw: bytes) -> bytes:
    return raw[: HEADER - 1] + bytes([raw[HEADER - 1] ^ 0x40]) + raw[HEADER:]


@pytest.mark.django_db
@pytest.mark.parametrize(
    "tamper",
    [
        _flip_a_byte,
        _swap_chunks_1_and_2,
        _drop_the_last_chunk,
        _cut_into_the_last_chunk,
        _append_a_chunk,
        _change_the_header,
    ],
)
def test_a_tampered_blob_file_raises_blob_tampered(bank, tamper):
    data = _data(1000)
    blob = services.blob_put(tenant=bank, kind="dataset", source=io.BytesIO(data))
    path = _path(blob)
    raw = path.read_bytes()
    assert len(raw) == HEADER + 15 * RECORD + crypto.NONCE_BYTES + 40 + crypto.TAG_BYTES
    path.write_bytes(tamper(raw))

    with pytest.raises(BlobTampered):
        _read(bank, blob)
    path.write_bytes(raw)
    assert _read(bank, blob) == data  # the same blob, untouched, is fine


@pytest.mark.django_db
def test_a_tampered_or_swapped_wrapped_data_key_raises_blob_tampered(bank):
    first = services.blob_put(tenant=bank, kind="dataset", source=[b"first"])
    second = services.blob_put(tenant=bank, kind="dataset", source=[b"second"])

    # the other blob's (valid) wrapped data key: bound to the other blob id
    Blob.objects.filter(pk=first.pk).update(wrapped_data_key=second.wrapped_data_key)
    with pytest.raises(BlobTampered):
        _read(bank, first)

    flipped = bytearray(first.wrapped_data_key)
    flipped[-1] ^= 1
    Blob.objects.filter(pk=first.pk).update(wrapped_data_key=bytes(flipped))
    with pytest.raises(BlobTampered):
        _read(bank, first)
    assert _read(bank, second) == b"second"


@pytest.mark.django_db
def test_a_blob_file_and_row_moved_to_another_tenant_fails_to_decrypt(bank, clinic):
    data = _data(300)
    blob = services.blob_put(tenant=bank, kind="dataset", source=[data])
    services.blob_put(tenant=clinic, kind="dataset", source=[b"the clinic's own"])
    clinic_key = TenantKey.objects.get(tenant=clinic)
    old_path = _path(blob)

    # Move everything: the file into the clinic's folder, the row to the clinic, and
    # point it at the clinic's tenant key.
    new_relative = blob.ciphertext_path.replace(f"{bank.pk}/", f"{clinic.pk}/", 1)
    new_path = conf.vault_dir() / new_relative
    new_path.parent.mkdir(parents=True, exist_ok=True)
    old_path.rename(new_path)
    Blob.objects.filter(pk=blob.pk).update(
        tenant=clinic, ciphertext_path=new_relative, tenant_key_id=clinic_key.key_id
    )
    with pytest.raises(BlobTampered):
        _read(clinic, blob)
    # Keeping the bank's tenant key id does not help: the clinic has no such key.
    Blob.objects.filter(pk=blob.pk).update(tenant_key_id=blob.tenant_key_id)
    with pytest.raises(BlobTampered):
        _read(clinic, blob)
    with pytest.raises(BlobNotFound):
        _read(bank, blob)

    # Moved back, it reads again: the failure was the move, not damage.
    new_path.rename(old_path)
    Blob.objects.filter(pk=blob.pk).update(tenant=bank, ciphertext_path=blob.ciphertext_path)
    assert _read(bank, blob) == data


@pytest.mark.django_db
def test_a_wrapped_tenant_key_moved_to_another_tenant_fails(bank, clinic):
    services.blob_put(tenant=bank, kind="dataset", source=[b"bank"])
    theirs = services.blob_put(tenant=clinic, kind="dataset", source=[b"clinic"])
    bank_key = TenantKey.objects.get(tenant=bank)
    TenantKey.objects.filter(tenant=clinic).update(wrapped_key=bank_key.wrapped_key)

    with pytest.raises(BlobTampered):
        _read(clinic, theirs)


# --- tenant scoping and limits ------------------------------------------------------------


@pytest.mark.django_db
def test_another_tenants_id_is_not_found(bank, clinic):
    blob = services.blob_put(tenant=bank, kind="dataset", source=[b"bank only"])

    for blob_id in (blob.id, str(blob.id)):
        with pytest.raises(BlobNotFound):
            selectors.blob_open(tenant=clinic, blob_id=blob_id)
        with pytest.raises(BlobNotFound):
            selectors.blob_read_bytes(tenant=clinic, blob_id=blob_id)
        with pytest.raises(BlobNotFound):
            services.blob_destroy(tenant=clinic, blob_id=blob_id)
    for bogus in ("not-a-uuid", "00000000-0000-0000-0000-000000000000"):
        with pytest.raises(BlobNotFound):
            selectors.blob_open(tenant=bank, blob_id=bogus)
    assert list(selectors.blob_list(tenant=clinic)) == []
    assert _read(bank, blob) == b"bank only"


@pytest.mark.django_db
def test_over_max_bytes_raises_blob_too_large_and_leaves_nothing(bank):
    consumed = []

    def source():
        for i in range(100):
            consumed.append(i)
            yield _data(CHUNK, seed=i)

    with pytest.raises(BlobTooLarge) as caught:
        services.blob_put(tenant=bank, kind="dataset", source=source(), max_bytes=5 * CHUNK)

    assert caught.value.max_bytes == 5 * CHUNK
    assert len(consumed) == 6  # it stopped reading at the first byte too many
    assert not Blob.objects.exists()
    assert [p for p in conf.vault_dir().rglob("*") if p.is_file()] == []
    exact = services.blob_put(
        tenant=bank, kind="dataset", source=[_data(5 * CHUNK)], max_bytes=5 * CHUNK
    )
    assert exact.plaintext_size == 5 * CHUNK


# --- no plaintext at rest ---------------------------------------------------------------


MARKER = b"ENCLAVE-PLAINTEXT-MARKER-5f0c1e"


@pytest.mark.django_db
def test_no_plaintext_reaches_the_disk(bank, var_dir):
    sample = b"".join(MARKER + b" patient %05d\n" % i for i in range(40))  # many chunks
    blobs = [
        services.blob_put(tenant=bank, kind="dataset", source=io.BytesIO(sample)),
        services.blob_put(tenant=bank, kind="dataset", source=[sample[:100], sample[100:]]),
    ]
    assert all(_read(bank, blob) == sample for blob in blobs)

    scanned = 0
    for root in {var_dir, conf.vault_dir()}:
        for path in root.rglob("*"):
            if path.is_file():
                scanned += 1
                assert MARKER not in path.read_bytes(), path
    assert scanned >= 3  # the two blob files and the keyring, at least
    for blob in Blob.objects.all():  # nor the rows
        assert MARKER not in bytes(blob.wrapped_data_key)


# --- crypto-shredding ---------------------------------------------------------------------


def _try_every_remaining_key(tenant, blob: Blob, raw: bytes) -> None:
    """Decrypting `raw` must fail under every key the system still holds."""
    keyring = load_keyring()
    candidates = [key.material for key in (keyring.current, *keyring.previous)]
    for tenant_key in TenantKey.objects.filter(tenant=tenant, wrapped_key__isnull=False):
        candidates.append(selectors.tenant_key_unwrap(tenant_key=tenant_key, keyring=keyring))
    assert candidates
    for key in candidates:
        with pytest.raises(VaultIntegrityError):
            list(
                crypto.decrypt_stream(
                    key=key, tenant_id=tenant.pk, blob_id=blob.id, source=io.BytesIO(raw)
                )
            )


@pytest.mark.django_db
def test_a_destroyed_blob_is_unrecoverable_even_with_its_file_on_disk(
    bank, django_capture_on_commit_callbacks
):
    blob = services.blob_put(tenant=bank, kind="dataset", source=[_data(500)])
    keep = services.blob_put(tenant=bank, kind="dataset", source=[b"kept"])
    path = _path(blob)
    copy = path.read_bytes()

    with django_capture_on_commit_callbacks(execute=True):
        services.blob_destroy(tenant=bank, blob_id=blob.id)
    services.blob_destroy(tenant=bank, blob_id=blob.id)  # again: nothing to do

    row = Blob.objects.get(pk=blob.pk)
    assert row.wrapped_data_key is None and row.destroyed_at is not None
    assert not path.exists()
    # Put the file back and even "undelete" the row: there is no data key left to open it.
    path.write_bytes(copy)
    Blob.objects.filter(pk=blob.pk).update(destroyed_at=None)
    with pytest.raises(BlobNotFound):
        _read(bank, blob)
    _try_every_remaining_key(bank, blob, copy)
    assert _read(bank, keep) == b"kept"


@pytest.mark.django_db
def test_a_destroyed_tenants_blobs_are_unrecoverable(
    bank, clinic, django_capture_on_commit_callbacks
):
    blobs = [services.blob_put(tenant=bank, kind="dataset", source=[_data(200, s)]) for s in (1, 2)]
    theirs = services.blob_put(tenant=clinic, kind="dataset", source=[b"clinic"])
    copies = {blob.pk: _path(blob).read_bytes() for blob in blobs}
    old_key = TenantKey.objects.get(tenant=bank)

    with django_capture_on_commit_callbacks(execute=True):
        services.tenant_keys_destroy(tenant=bank)

    destroyed = TenantKey.objects.get(pk=old_key.pk)
    assert destroyed.wrapped_key is None and destroyed.destroyed_at is not None
    for blob in blobs:
        assert not _path(blob).exists()
        with pytest.raises(BlobNotFound):
            _read(bank, blob)
        # The file and the wrapped data key restored (say, from a file backup and an old
        # row): the tenant key that unwraps the data key is gone.
        _path(blob).write_bytes(copies[blob.pk])
        Blob.objects.filter(pk=blob.pk).update(
            destroyed_at=None, wrapped_data_key=blob.wrapped_data_key
        )
        with pytest.raises(BlobNotFound):
            _read(bank, blob)
        _try_every_remaining_key(bank, blob, copies[blob.pk])
    assert _read(clinic, theirs) == b"clinic"
    fresh = services.blob_put(tenant=bank, kind="dataset", source=[b"after"])
    assert fresh.tenant_key_id != old_key.key_id
    assert _read(bank, fresh) == b"after"


# --- storage housekeeping -----------------------------------------------------------------


@pytest.mark.django_db
def test_the_vault_dir_is_configurable_and_orphans_are_removed(bank, tmp_path, monkeypatch):
    monkeypatch.setenv("ENCLAVE_VAULT_DIR", str(tmp_path / "elsewhere"))
    blob = services.blob_put(tenant=bank, kind="dataset", source=[b"kept"])
    assert _path(blob).is_relative_to(tmp_path / "elsewhere")
    assert stat.S_IMODE(_path(blob).stat().st_mode) == 0o600
    # what a crash between rename and insert, or a rolled-back transaction, leaves behind
    orphan = _path(blob).with_name("0" * 32 + ".blob")
    partial = _path(blob).with_name("." + "1" * 32 + ".blob.partial")
    not_ours = _path(blob).with_name("notes.txt")
    for path in (orphan, partial, not_ours):
        path.write_bytes(b"ciphertext nobody has a key for")
        os.utime(path, (0, 0))

    removed = services.blob_orphans_remove(older_than_seconds=60)

    assert sorted(removed) == sorted([orphan, partial])
    assert not_ours.exists()
    assert _read(bank, blob) == b"kept"
