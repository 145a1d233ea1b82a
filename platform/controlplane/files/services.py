"""Writes for files: upload (validate, then store encrypted) and delete (crypto-shred)."""

import io
import json
from collections.abc import Iterator

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import ProtectedError

from controlplane.tenancy.services import QuotaExceeded
from controlplane.vault import services as vault_services

from .models import File
from .selectors import file_get, files_total_bytes

MAX_ERRORS_IN_DETAILS = 20


class FileTooLarge(Exception):
    """Over ENCLAVE_FILE_MAX_BYTES (HTTP 413)."""


class FileInUse(Exception):
    """A fine-tuning job still refers to the file (HTTP 409); nothing was deleted."""


def _check_text(data: bytes) -> None:
    """Refuse (400, nothing stored) what is not JSONL text at all: invalid UTF-8, or a line
    longer than any example may be. Bad examples in good text are stored with line-numbered
    errors instead, so their owner can see them."""
    from finetune.data import DEFAULT_MAX_LINE_BYTES

    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ValidationError(
            {"file": f"the file is not valid UTF-8 (line {line}, byte {exc.start + 1}); "
                     "expected JSONL text (UTF-8)"}
        ) from exc  # fmt: skip
    start = 0
    for number, end in enumerate(_line_ends(data), start=1):
        if end - start > DEFAULT_MAX_LINE_BYTES:
            raise ValidationError(
                {"file": f"line {number} is {end - start} bytes long; a line may have at most "
                         f"{DEFAULT_MAX_LINE_BYTES} bytes (one example per line)"}
            )  # fmt: skip
        start = end + 1


def _line_ends(data: bytes) -> Iterator[int]:
    position = data.find(b"\n")
    while position != -1:
        yield position
        position = data.find(b"\n", position + 1)
    yield len(data)


def _validate(*, purpose: str, data: bytes) -> tuple[str, str | None, dict]:
    """(status, status_details, report) for a file's bytes, by purpose."""
    from finetune.data import validate

    if b"\x00" in data[:8192]:
        raise ValidationError({"file": "the file is binary; expected JSONL text (UTF-8)"})
    _check_text(data)
    if purpose == File.Purpose.FINE_TUNE:
        report = validate(io.BytesIO(data)).to_dict()
    else:
        report = _validate_jsonl(data, require=("custom_id", "body") if purpose == "batch" else ())
    errors = report.get("errors") or []
    if not errors and report.get("ok", True):
        return File.Status.PROCESSED, None, report
    lines = [
        f"line {e['line']}: {e['message']}" if e.get("line") else e["message"]
        for e in errors[:MAX_ERRORS_IN_DETAILS]
    ]
    total = report.get("n_errors", len(errors))
    if total > len(lines):
        lines.append(f"... and {total - len(lines)} more errors")
    return File.Status.ERROR, "\n".join(lines), report


def _validate_jsonl(data: bytes, *, require: tuple[str, ...]) -> dict:
    """Batch and evals files: one JSON object per line, with the `require`d keys."""
    errors = []
    n = 0
    for number, raw in enumerate(data.splitlines(), start=1):
        if not raw.strip():
            continue
        n += 1
        try:
            obj = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            errors.append({"line": number, "message": "not valid UTF-8"})
            continue
        except json.JSONDecodeError as exc:
            errors.append({"line": number, "message": f"invalid JSON: {exc.msg}"})
            continue
        if not isinstance(obj, dict):
            errors.append({"line": number, "message": "each line must be a JSON object"})
            continue
        missing = [k for k in require if k not in obj]
        if missing:
            errors.append({"line": number, "message": f"missing {', '.join(missing)}"})
    if n == 0:
        errors.append({"line": None, "message": "the file has no lines"})
    return {"ok": not errors, "n_examples": n, "n_errors": len(errors), "errors": errors[:100]}


def file_create(*, tenant, filename: str, purpose: str, chunks: Iterator[bytes], size: int) -> File:
    """Validate an upload and store it encrypted. Raises FileTooLarge, QuotaExceeded, or
    ValidationError (bad purpose, binary content); nothing is stored when it raises."""
    if purpose not in File.UPLOADABLE:
        raise ValidationError(
            {"purpose": f"{purpose!r} is not one of {', '.join(File.UPLOADABLE)}"}
        )
    limit = settings.ENCLAVE_FILE_MAX_BYTES
    if size > limit:
        raise FileTooLarge(f"the file is {size} bytes; the limit is {limit} bytes")
    if files_total_bytes(tenant=tenant) + size > tenant.storage_bytes:
        raise QuotaExceeded(
            f"storage quota of {tenant.storage_bytes} bytes for tenant {tenant.slug} is used up"
        )
    data = b"".join(chunks)  # already in memory: uploads never touch the disk in clear
    status, details, report = _validate(purpose=purpose, data=data)
    with transaction.atomic():
        blob = vault_services.blob_put(
            tenant=tenant, kind=f"file:{purpose}", source=[data], max_bytes=limit
        )
        return File.objects.create(
            tenant=tenant,
            filename=filename[:255] or "upload.jsonl",
            purpose=purpose,
            bytes=len(data),
            status=status,
            status_details=details,
            validation=report,
            blob=blob,
        )


def file_delete(*, tenant, file_id: str) -> str:
    """Delete a file and crypto-shred its content; returns the id.

    FileInUse when a fine-tuning job refers to it: the job's record must keep its file,
    and the transaction (with the blob's shredding, whose file goes only after commit)
    rolls back whole.
    """
    file = file_get(tenant=tenant, file_id=file_id)
    try:
        with transaction.atomic():
            if file.blob_id:
                vault_services.blob_destroy(tenant=tenant, blob_id=file.blob_id)
            file.delete()
    except ProtectedError as exc:
        raise FileInUse(
            f"file {file_id} is used by a fine-tuning job and cannot be deleted"
        ) from exc
    return file_id


def file_create_from_bytes(*, tenant, filename: str, purpose: str, data: bytes) -> File:
    """A file the platform writes itself (batch output), stored encrypted, no validation."""
    with transaction.atomic():
        blob = vault_services.blob_put(tenant=tenant, kind=f"file:{purpose}", source=[data])
        return File.objects.create(
            tenant=tenant,
            filename=filename,
            purpose=purpose,
            bytes=len(data),
            status=File.Status.PROCESSED,
            blob=blob,
        )
