"""The engines this process hosts: one `inference.Engine` per base model, made on first use.

The holder lives on the serving AppConfig (one per process), not in a module global.
Adapters are vault blobs; the engine reads PEFT directories, so an adapter is decrypted
into a private directory on /dev/shm (memory-backed, mode 0700, removed at exit) and
never onto the disk.
"""

import atexit
import os
import shutil
import tempfile
import threading
from pathlib import Path

from django.conf import settings


def _memory_dir() -> Path:
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
    path = Path(tempfile.mkdtemp(prefix=f"enclave-adapters-{os.getpid()}-", dir=base))
    path.chmod(0o700)
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


class EngineHost:
    """Engines by base model name, and decrypted adapter directories by model id."""

    def __init__(self):
        self._lock = threading.Lock()
        self._engines: dict[str, object] = {}
        self._adapter_root: Path | None = None
        self._adapters: dict[str, Path] = {}

    def engine(self, name: str, path: Path):
        """The engine for base model `name` at `path`, started on first use."""
        with self._lock:
            engine = self._engines.get(name)
            if engine is None:
                from inference.engine import Engine

                engine = Engine(
                    path,
                    max_batch_tokens=settings.ENCLAVE_ENGINE_MAX_BATCH_TOKENS,
                    kv_cache_bytes=settings.ENCLAVE_ENGINE_KV_CACHE_BYTES,
                    max_active_adapters=settings.ENCLAVE_ENGINE_MAX_ACTIVE_ADAPTERS,
                )
                self._engines[name] = engine
            return engine

    def adapter_dir(self, model_id: str, files_loader) -> Path:
        """A PEFT directory for adapter `model_id`; `files_loader()` gives its files."""
        with self._lock:
            path = self._adapters.get(model_id)
            if path is not None and path.is_dir():
                return path
            if self._adapter_root is None:
                self._adapter_root = _memory_dir()
            path = self._adapter_root / f"a{len(self._adapters)}"
            path.mkdir(mode=0o700)
            for name, data in files_loader().items():
                if "/" in name or name.startswith("."):
                    raise ValueError(f"unexpected adapter file name {name!r}")
                (path / name).write_bytes(data)
            self._adapters[model_id] = path
            return path

    def forget_adapter(self, model_id: str) -> None:
        with self._lock:
            path = self._adapters.pop(model_id, None)
        if path is not None:
            shutil.rmtree(path, ignore_errors=True)

    def close(self) -> None:
        with self._lock:
            engines, self._engines = list(self._engines.values()), {}
        for engine in engines:
            engine.close()


def engine_host() -> EngineHost:
    from django.apps import apps

    return apps.get_app_config("serving").engine_host
