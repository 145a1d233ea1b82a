"""The platform master keyring: where master keys come from and how a new one is installed.

A keyring is one current master key (wraps new and re-wrapped tenant keys) and any number
of previous keys (still unwrap tenant keys not yet re-wrapped). A master key's id is
derived from the key (HMAC-SHA256 of a fixed label), so ids need no storage of their own
and reveal nothing about the key.

Sources, first match wins:

1. ``ENCLAVE_MASTER_KEY`` (base64 of 32 bytes) plus ``ENCLAVE_MASTER_KEY_PREVIOUS``
   (comma-separated). Read-only to Enclave: the operator installs new keys.
2. ``ENCLAVE_MASTER_KEY_FILE``: a keyring file.
3. The embedded default: ``VAR_DIR/keys/master.keyring``, generated once (mode 0600).

A keyring file holds one base64 key per line, current first; blank lines and lines
starting with ``#`` are ignored. Enclave rewrites it only by writing a new file beside it
and renaming it over the old one (after fsync), under an exclusive lock, and never drops a
key it did not check is unused, so a crash leaves either the old or the new keyring.

The keyring is read afresh on every use (a stat and a small read): a process never holds
a stale copy after a rotation installs a new key.
"""

import base64
import binascii
import contextlib
import fcntl
import logging
import os
import stat
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import hashes, hmac

from . import conf
from .crypto import KEY_BYTES, new_key
from .exceptions import MasterKeyError

log = logging.getLogger(__name__)

ENVIRONMENT, FILE, EMBEDDED = "environment", "file", "embedded"
_KEY_ID_LABEL = b"enclave/vault/master-key-id/v1"
_FILE_PREAMBLE = (
    "# Enclave master keyring: one base64 key per line. The first line is the current key;\n"
    "# the others still unwrap tenant keys until `manage.py rotate_master_key --retire`.\n"
)
GENERATE_HINT = "python -c 'import base64, os; print(base64.b64encode(os.urandom(32)).decode())'"


def master_key_id(material: bytes) -> str:
    mac = hmac.HMAC(material, hashes.SHA256())
    mac.update(_KEY_ID_LABEL)
    return "mk-" + mac.finalize()[:8].hex()


@dataclass(frozen=True)
class MasterKey:
    key_id: str
    material: bytes = field(repr=False)

    @classmethod
    def of(cls, material: bytes) -> "MasterKey":
        return cls(key_id=master_key_id(material), material=material)


@dataclass(frozen=True)
class Keyring:
    source: str  # ENVIRONMENT, FILE or EMBEDDED
    location: str  # the variable or the file the keys came from
    current: MasterKey
    previous: tuple[MasterKey, ...] = ()

    @property
    def writable(self) -> bool:
        """Whether Enclave installs new keys itself (a file) or the operator does (env)."""
        return self.source != ENVIRONMENT

    @property
    def key_ids(self) -> tuple[str, ...]:
        return (self.current.key_id, *(key.key_id for key in self.previous))

    def get(self, key_id: str) -> MasterKey:
        for key in (self.current, *self.previous):
            if key.key_id == key_id:
                return key
        where = (
            f"{conf.MASTER_KEY_ENV} or {conf.MASTER_KEY_PREVIOUS_ENV}"
            if self.source == ENVIRONMENT
            else f"the keyring file {self.location}"
        )
        raise MasterKeyError(
            f"master key {key_id} is not in the keyring: add it to {where} "
            f"(the keyring holds {', '.join(self.key_ids)})"
        )


def _parse_key(text: str, *, where: str) -> MasterKey:
    try:
        material = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise MasterKeyError(
            f"{where} is not valid base64; it must be base64 of 32 random bytes, "
            f"e.g. from: {GENERATE_HINT}"
        ) from None
    if len(material) != KEY_BYTES:
        raise MasterKeyError(
            f"{where} decodes to {len(material)} bytes; it must be base64 of exactly "
            f"{KEY_BYTES} random bytes, e.g. from: {GENERATE_HINT}"
        )
    return MasterKey.of(material)


def _dedupe(keys: list[MasterKey]) -> list[MasterKey]:
    seen: set[str] = set()
    unique = []
    for key in keys:
        if key.key_id not in seen:
            seen.add(key.key_id)
            unique.append(key)
    return unique


def _from_environment(value: str) -> Keyring:
    if not value.strip():
        raise MasterKeyError(
            f"{conf.MASTER_KEY_ENV} is set but empty: set it to base64 of 32 random bytes "
            f"(e.g. from: {GENERATE_HINT}), or unset it to use {conf.MASTER_KEY_FILE_ENV} "
            f"or the embedded key file"
        )
    if os.environ.get(conf.MASTER_KEY_FILE_ENV):
        raise MasterKeyError(
            f"both {conf.MASTER_KEY_ENV} and {conf.MASTER_KEY_FILE_ENV} are set; set one"
        )
    current = _parse_key(value, where=conf.MASTER_KEY_ENV)
    previous_text = os.environ.get(conf.MASTER_KEY_PREVIOUS_ENV, "")
    previous = [
        _parse_key(item, where=f"{conf.MASTER_KEY_PREVIOUS_ENV} (item {number})")
        for number, item in enumerate(previous_text.split(","), start=1)
        if item.strip()
    ]
    keys = _dedupe([current, *previous])
    return Keyring(ENVIRONMENT, conf.MASTER_KEY_ENV, keys[0], tuple(keys[1:]))


def _read_file(path: Path, *, source: str) -> Keyring:
    where = f"{conf.MASTER_KEY_FILE_ENV} ({path})" if source == FILE else f"the key file {path}"
    try:
        text = path.read_text()
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise MasterKeyError(f"{where} does not exist") from None
    except OSError as exc:
        raise MasterKeyError(f"{where} cannot be read: {exc.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        # warnings, not logging: shown once per file, not on every blob read
        warnings.warn(
            f"the master keyring {path} is readable by others; chmod 600 it", stacklevel=1
        )
    keys = [
        _parse_key(line, where=f"line {number} of {where}")
        for number, line in enumerate(text.splitlines(), start=1)
        if line.strip() and not line.lstrip().startswith("#")
    ]
    if not keys:
        raise MasterKeyError(f"{where} holds no key; it needs one base64 key (32 bytes) a line")
    keys = _dedupe(keys)
    return Keyring(source, str(path), keys[0], tuple(keys[1:]))


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_temp(directory: Path, keys: list[MasterKey]) -> Path:
    temp = directory / f".master.keyring.{os.getpid()}.{os.urandom(4).hex()}.tmp"
    body = _FILE_PREAMBLE + "".join(base64.b64encode(k.material).decode() + "\n" for k in keys)
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(body)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return temp


def _create_embedded(path: Path) -> None:
    """Generate the embedded keyring once; concurrent first starts agree on one key."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    temp = _write_temp(path.parent, [MasterKey.of(new_key())])
    try:
        os.link(temp, path)  # atomic, and fails if another process won the race
        _fsync_dir(path.parent)
        log.warning("generated the embedded master key at %s (mode 0600)", path)
    except FileExistsError:
        pass
    finally:
        temp.unlink(missing_ok=True)


def load_keyring() -> Keyring:
    """The keyring from the environment, the key file, or the embedded default.

    MasterKeyError naming the variable or file when a key is missing or garbled.
    """
    value = os.environ.get(conf.MASTER_KEY_ENV)
    if value is not None:
        return _from_environment(value)
    if os.environ.get(conf.MASTER_KEY_PREVIOUS_ENV):
        raise MasterKeyError(
            f"{conf.MASTER_KEY_PREVIOUS_ENV} is set but {conf.MASTER_KEY_ENV} is not; "
            f"previous keys are only read together with {conf.MASTER_KEY_ENV}"
        )
    file_value = os.environ.get(conf.MASTER_KEY_FILE_ENV)
    if file_value is not None:
        if not file_value.strip():
            raise MasterKeyError(f"{conf.MASTER_KEY_FILE_ENV} is set but empty")
        return _read_file(Path(file_value), source=FILE)
    path = conf.embedded_keyring_path()
    if not path.exists():
        _create_embedded(path)
    return _read_file(path, source=EMBEDDED)


@contextlib.contextmanager
def _locked(keyring: Keyring) -> Iterator[Keyring]:
    """Hold the keyring file's lock and yield it re-read, so no concurrent edit is lost."""
    if not keyring.writable:
        raise MasterKeyError(
            f"the master key comes from {conf.MASTER_KEY_ENV}; Enclave cannot change it"
        )
    path = Path(keyring.location)
    lock_path = path.parent / f".{path.name}.lock"
    try:
        lock_fd = os.open(lock_path, os.O_WRONLY | os.O_CREAT, 0o600)
    except OSError as exc:
        raise MasterKeyError(
            f"cannot lock the keyring file {path} ({exc.strerror}); if it is read-only, "
            f"rotate by installing a new key in it by hand (new key on the first line, "
            f"the old keys below) and run rotate_master_key again"
        ) from None
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        yield _read_file(path, source=keyring.source)
    finally:
        os.close(lock_fd)  # releases the lock


def _replace(path: Path, keys: list[MasterKey]) -> None:
    temp = _write_temp(path.parent, keys)
    try:
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def keyring_install_new_key(*, keyring: Keyring) -> Keyring:
    """Make a fresh key current in a keyring file, keeping every existing key readable."""
    with _locked(keyring) as fresh:
        fresh_key = MasterKey.of(new_key())
        _replace(Path(fresh.location), [fresh_key, fresh.current, *fresh.previous])
    return _read_file(Path(keyring.location), source=keyring.source)


def keyring_retire_keys(*, keyring: Keyring, key_ids: set[str]) -> Keyring:
    """Remove previous keys from a keyring file; the current key is never removed."""
    with _locked(keyring) as fresh:
        kept = [key for key in fresh.previous if key.key_id not in key_ids]
        if len(kept) != len(fresh.previous):
            _replace(Path(fresh.location), [fresh.current, *kept])
    return _read_file(Path(keyring.location), source=keyring.source)
