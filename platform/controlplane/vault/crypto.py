"""The vault's cryptography: AES-256-GCM from `cryptography`, and nothing hand-made below it.

Three uses of one AEAD, each with its own associated data (AAD), length-prefixed so no two
field lists can encode to the same bytes:

- a tenant key wrapped by a master key: AAD binds the tenant id and the tenant key id;
- a data key wrapped by a tenant key: AAD binds the tenant id, the blob id and the
  tenant key id;
- a blob file, sealed in chunks under its data key: AAD binds the file header (format and
  chunk size), the tenant id, the blob id, the chunk index and a final-chunk flag.

`cryptography` has no streaming AEAD (one GCM tag over a whole file would release
unauthenticated plaintext before the tag is checked), so the chunk framing below is ours:
the STREAM construction (Hoang, Reyhanitabar, Rogaway, Vizar 2015), with the index and the
final flag in the AAD instead of the nonce, and a fresh random 96-bit nonce per chunk.

File format::

    header  = magic (16 bytes) | chunk size (uint32, big-endian)
    record  = nonce (12) | AES-GCM(chunk) | tag (16)        repeated
    every record holds exactly `chunk size` plaintext bytes except the last, which holds
    fewer (possibly none) and is sealed with final=1.

So a reordered chunk fails its index, a dropped tail ends without a final record, a
truncated record fails its tag, an appended record follows a final one (or turns the
final record into a full-length one that fails), and a file moved to another blob or
tenant fails every chunk.
"""

import os
import struct
from collections.abc import Iterable, Iterator
from typing import BinaryIO
from uuid import UUID

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .exceptions import VaultIntegrityError

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
MAGIC = b"ENCLAVE-VAULT\x00v1"
HEADER = struct.Struct(">16sI")
MAX_CHUNK_BYTES = 64 * 1024 * 1024

_TENANT_KEY_LABEL = b"enclave/vault/tenant-key/v1"
_DATA_KEY_LABEL = b"enclave/vault/data-key/v1"
_CHUNK_LABEL = b"enclave/vault/blob-chunk/v1"


def new_key() -> bytes:
    """A fresh random AES-256 key."""
    return AESGCM.generate_key(bit_length=256)


def _aad(label: bytes, *fields: bytes) -> bytes:
    parts = [label]
    for field in fields:
        parts.append(len(field).to_bytes(4, "big"))
        parts.append(field)
    return b"".join(parts)


def _u64(value: int) -> bytes:
    return value.to_bytes(8, "big")


def tenant_key_aad(*, tenant_id: int, tenant_key_id: str) -> bytes:
    return _aad(_TENANT_KEY_LABEL, _u64(tenant_id), tenant_key_id.encode())


def data_key_aad(*, tenant_id: int, blob_id: UUID, tenant_key_id: str) -> bytes:
    return _aad(_DATA_KEY_LABEL, _u64(tenant_id), blob_id.bytes, tenant_key_id.encode())


def _chunk_aad(header: bytes, tenant_id: int, blob_id: UUID, index: int, final: bool) -> bytes:
    flag = b"\x01" if final else b"\x00"
    return _aad(_CHUNK_LABEL, header, _u64(tenant_id), blob_id.bytes, _u64(index), flag)


def wrap_key(*, wrapping_key: bytes, key: bytes, aad: bytes) -> bytes:
    """Seal `key` under `wrapping_key`: nonce | ciphertext | tag."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(wrapping_key).encrypt(nonce, key, aad)


def unwrap_key(*, wrapping_key: bytes, wrapped: bytes, aad: bytes) -> bytes:
    """Open a key sealed by `wrap_key`; VaultIntegrityError when it fails to authenticate."""
    wrapped = bytes(wrapped)
    if len(wrapped) != NONCE_BYTES + KEY_BYTES + TAG_BYTES:
        raise VaultIntegrityError("a wrapped key has the wrong length")
    try:
        key = AESGCM(wrapping_key).decrypt(wrapped[:NONCE_BYTES], wrapped[NONCE_BYTES:], aad)
    except InvalidTag:
        raise VaultIntegrityError("a wrapped key failed to authenticate") from None
    return key


def encrypt_stream(
    *,
    key: bytes,
    tenant_id: int,
    blob_id: UUID,
    chunk_size: int,
    pieces: Iterable[bytes],
    out: BinaryIO,
) -> int:
    """Seal `pieces` (any sizes) into `out` in `chunk_size` chunks; returns the plaintext size.

    Holds at most one piece plus one chunk in memory.
    """
    if not 1 <= chunk_size <= MAX_CHUNK_BYTES:
        raise ValueError(f"chunk_size must be 1..{MAX_CHUNK_BYTES}, not {chunk_size}")
    header = HEADER.pack(MAGIC, chunk_size)
    out.write(header)
    aead = AESGCM(key)

    def seal(index: int, chunk: bytes, final: bool) -> None:
        nonce = os.urandom(NONCE_BYTES)
        aad = _chunk_aad(header, tenant_id, blob_id, index, final)
        out.write(nonce + aead.encrypt(nonce, chunk, aad))

    buffer = bytearray()
    index = total = 0
    for piece in pieces:
        if not isinstance(piece, bytes | bytearray | memoryview):
            raise TypeError(f"a blob source must give bytes, not {type(piece).__name__}")
        buffer += piece
        total += len(piece)
        while len(buffer) >= chunk_size:
            seal(index, bytes(buffer[:chunk_size]), final=False)
            del buffer[:chunk_size]
            index += 1
    seal(index, bytes(buffer), final=True)
    return total


def _read_exact(source: BinaryIO, size: int) -> bytes:
    """Up to `size` bytes; fewer only at the end of the file."""
    parts, missing = [], size
    while missing:
        part = source.read(missing)
        if not part:
            break
        parts.append(part)
        missing -= len(part)
    return b"".join(parts)


def decrypt_stream(
    *, key: bytes, tenant_id: int, blob_id: UUID, source: BinaryIO
) -> Iterator[bytes]:
    """Yield the plaintext chunks of a file written by `encrypt_stream`, each authenticated.

    VaultIntegrityError at the first chunk that fails: everything yielded before it must be
    discarded by the caller.
    """
    header = _read_exact(source, HEADER.size)
    if len(header) != HEADER.size:
        raise VaultIntegrityError("the blob file has no complete header")
    magic, chunk_size = HEADER.unpack(header)
    if magic != MAGIC or not 1 <= chunk_size <= MAX_CHUNK_BYTES:
        raise VaultIntegrityError("the blob file header is not a vault header")
    aead = AESGCM(key)
    record_size = NONCE_BYTES + chunk_size + TAG_BYTES
    index = 0
    while True:
        record = _read_exact(source, record_size)
        final = len(record) < record_size
        if final and len(record) < NONCE_BYTES + TAG_BYTES:
            raise VaultIntegrityError(f"the blob file ends without its final chunk ({index})")
        aad = _chunk_aad(header, tenant_id, blob_id, index, final)
        try:
            chunk = aead.decrypt(record[:NONCE_BYTES], record[NONCE_BYTES:], aad)
        except InvalidTag:
            raise VaultIntegrityError(f"chunk {index} of the blob failed to authenticate") from None
        yield chunk
        if final:
            return
        index += 1
