"""The vault's configuration, read when used (never cached), so tests and rotations see
the current environment.

Key material is read from the process environment only, never from Django settings, so
it cannot show up in a settings dump or a debug page.

- ``ENCLAVE_MASTER_KEY``: base64 of 32 bytes, the current master key.
- ``ENCLAVE_MASTER_KEY_PREVIOUS``: comma-separated base64 keys still accepted for
  unwrapping during a rotation (environment source only).
- ``ENCLAVE_MASTER_KEY_FILE``: a keyring file (see `keyring`), used when
  ``ENCLAVE_MASTER_KEY`` is unset.
- Neither: the embedded default, a keyring generated once at
  ``VAR_DIR/keys/master.keyring`` (mode 0600).
- ``ENCLAVE_VAULT_DIR`` (setting or environment): where ciphertext files live; default
  ``VAR_DIR/vault``.
- ``ENCLAVE_VAULT_CHUNK_BYTES`` (setting or environment): plaintext bytes per sealed
  chunk for new blobs; default 1 MiB. Readers take the size from each file's header.
"""

import os
from pathlib import Path

from django.conf import settings

from .crypto import MAX_CHUNK_BYTES

MASTER_KEY_ENV = "ENCLAVE_MASTER_KEY"
MASTER_KEY_PREVIOUS_ENV = "ENCLAVE_MASTER_KEY_PREVIOUS"
MASTER_KEY_FILE_ENV = "ENCLAVE_MASTER_KEY_FILE"

DEFAULT_CHUNK_BYTES = 1024 * 1024


def _setting(name: str) -> str | None:
    value = getattr(settings, name, None)
    if value in (None, ""):
        value = os.environ.get(name) or None
    return None if value is None else str(value)


def var_dir() -> Path:
    return Path(settings.VAR_DIR)


def vault_dir() -> Path:
    """The root of the ciphertext files (created 0700 on first use)."""
    configured = _setting("ENCLAVE_VAULT_DIR")
    return Path(configured) if configured else var_dir() / "vault"


def chunk_bytes() -> int:
    configured = _setting("ENCLAVE_VAULT_CHUNK_BYTES")
    size = int(configured) if configured else DEFAULT_CHUNK_BYTES
    if not 1 <= size <= MAX_CHUNK_BYTES:
        raise ValueError(f"ENCLAVE_VAULT_CHUNK_BYTES must be 1..{MAX_CHUNK_BYTES}, not {size}")
    return size


def embedded_keyring_path() -> Path:
    return var_dir() / "keys" / "master.keyring"
