"""Batches: a JSONL file of chat requests, run on the engine by a `train` worker.

Lines are processed in chunks; each finished chunk's output and error lines are stored as
vault blobs and recorded on the row with the lease renewal, so a batch re-queued after
its worker died resumes after its last finished chunk, and a cancel stops it between
chunks (what finished is kept, as OpenAI does).
"""

import io
import json
import secrets
import time

from django.core.exceptions import ValidationError
from django.db import transaction
from django.http import Http404

from controlplane.files.models import File
from controlplane.files.selectors import file_get
from controlplane.files.services import file_create_from_bytes
from controlplane.jobs import services as jobs
from controlplane.jobs.models import LeasedJob
from controlplane.vault import selectors as vault_selectors
from controlplane.vault import services as vault_services

from . import selectors, services
from .chat import ChatRequestError, parse_chat_request
from .models import Batch

CHUNK = 16
ENDPOINTS = ("/v1/chat/completions",)


class NotRunnable(Exception):
    """The batch cannot do that in its current state (HTTP 400)."""


def batch_create(
    *, tenant, input_file_id: str, endpoint: str, completion_window: str = "24h", metadata=None
) -> Batch:
    """Queue a batch; ValidationError names the bad field."""
    if endpoint not in ENDPOINTS:
        raise ValidationError({"endpoint": f"{endpoint!r} is not supported; use {ENDPOINTS[0]}"})
    if completion_window != "24h":
        raise ValidationError({"completion_window": "only '24h' is supported"})
    try:
        file = file_get(tenant=tenant, file_id=input_file_id)
    except Http404 as exc:
        raise ValidationError({"input_file_id": f"no such file: {input_file_id}"}) from exc
    if file.purpose != File.Purpose.BATCH:
        raise ValidationError(
            {"input_file_id": f"{file.id} has purpose {file.purpose!r}, not batch"}
        )
    if file.status != File.Status.PROCESSED:
        raise ValidationError(
            {"input_file_id": f"{file.id} failed validation: {file.status_details or file.status}"}
        )
    with transaction.atomic():
        batch = Batch.objects.create(
            tenant=tenant,
            input_file=file,
            endpoint=endpoint,
            completion_window=completion_window,
            metadata=metadata,
        )
        jobs.job_enqueue(job=batch)
    return batch


def batch_cancel(*, tenant, batch_id: str) -> Batch:
    batch = selectors.batch_get(tenant=tenant, batch_id=batch_id)
    try:
        return jobs.job_request_stop(job=batch, what=LeasedJob.StopRequest.CANCEL)
    except ValueError as exc:
        raise NotRunnable(str(exc)) from exc


# ---- the worker side ---------------------------------------------------------------------


def _lines(batch: Batch) -> list[tuple[str, dict | None, str | None]]:
    """(custom_id, body, error) for every non-blank input line."""
    data = vault_selectors.blob_read_bytes(tenant=batch.tenant, blob_id=batch.input_file.blob_id)
    out = []
    for number, raw in enumerate(io.BytesIO(data).read().splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            out.append((f"line-{number}", None, f"line {number}: invalid JSON"))
            continue
        custom_id = str(obj.get("custom_id", f"line-{number}"))
        url = obj.get("url", batch.endpoint)
        if url != batch.endpoint:
            out.append((custom_id, None, f"url {url!r} differs from the batch's {batch.endpoint}"))
        elif not isinstance(obj.get("body"), dict):
            out.append((custom_id, None, "body must be an object"))
        else:
            out.append((custom_id, obj["body"], None))
    return out


def _completion_body(request_id: str, model: str, completion) -> dict:
    usage = completion.usage
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": completion.text, "refusal": None},
                "logprobs": None,
                "finish_reason": completion.finish_reason,
            }
        ],
        "usage": {
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        },
    }


def _run_chunk(batch: Batch, chunk) -> tuple[list[dict], list[dict], int, int]:
    """Output lines, error lines, prompt and completion tokens for a chunk of requests."""
    from inference.engine import Request

    outputs, errors = [], []
    prompt_tokens = completion_tokens = 0
    runnable = []  # (custom_id, model, engine, Request)

    def fail(custom_id: str, code: str, message: str) -> None:
        errors.append({"id": f"batch_req_{secrets.token_hex(12)}", "custom_id": custom_id,
                       "response": None, "error": {"code": code, "message": message}})  # fmt: skip

    for custom_id, body, error in chunk:
        if error:
            fail(custom_id, "invalid_request", error)
            continue
        try:
            req = parse_chat_request(body)
            resolved = services.chat_model_resolve(tenant=batch.tenant, model=req.model)
        except ChatRequestError as exc:
            fail(custom_id, exc.code, str(exc))
            continue
        except Http404:
            fail(custom_id, "model_not_found", f"The model '{body.get('model')}' does not exist")
            continue
        sampling = req.sampling_params()
        adapter = str(resolved.adapter_dir) if resolved.adapter_dir else None
        request = Request(messages=req.messages, sampling=sampling, adapter=adapter,
                          request_id=f"chatcmpl-{secrets.token_hex(12)}")  # fmt: skip
        runnable.append((custom_id, req.model, resolved.engine, request))

    for engine in {id(r[2]): r[2] for r in runnable}.values():
        group = [r for r in runnable if r[2] is engine]
        try:
            completions = engine.generate([r[3] for r in group])
        except ValueError:  # one bad request refuses the lot: run them one by one
            completions = []
            for r in group:
                try:
                    completions.append(engine.generate([r[3]])[0])
                except ValueError as exc:
                    completions.append(exc)
        for (custom_id, model, _engine, request), done in zip(group, completions, strict=True):
            if isinstance(done, Exception):
                fail(custom_id, "invalid_request", str(done))
                continue
            prompt_tokens += done.usage.prompt_tokens
            completion_tokens += done.usage.completion_tokens
            outputs.append(
                {
                    "id": f"batch_req_{secrets.token_hex(12)}",
                    "custom_id": custom_id,
                    "response": {
                        "status_code": 200,
                        "request_id": request.request_id,
                        "body": _completion_body(request.request_id, model, done),
                    },
                    "error": None,
                }
            )
    return outputs, errors, prompt_tokens, completion_tokens


def _jsonl(rows: list[dict]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


def batch_run(*, batch_id: str) -> bool:
    """The worker's side: run the remaining chunks, then write the output files."""

    def work(batch: Batch) -> dict:
        lines = _lines(batch)
        done = sum(p["lines"] for p in batch.parts)
        parts = list(batch.parts)
        completed, failed = batch.completed, batch.failed
        for start in range(done, len(lines), CHUNK):
            chunk = lines[start : start + CHUNK]
            outputs, errors, p_tok, c_tok = _run_chunk(batch, chunk)
            out_blob = vault_services.blob_put(
                tenant=batch.tenant, kind="batch-part", source=[_jsonl(outputs)]
            )
            err_blob = vault_services.blob_put(
                tenant=batch.tenant, kind="batch-part", source=[_jsonl(errors)]
            )
            parts.append({"lines": len(chunk), "output": str(out_blob.pk),
                          "errors": str(err_blob.pk)})  # fmt: skip
            completed += len(outputs)
            failed += len(errors)
            services.chat_usage_record(
                tenant=batch.tenant, prompt_tokens=p_tok, completion_tokens=c_tok
            )
            stop = jobs.job_renew_lease(
                job=batch, parts=parts, completed=completed, failed=failed, total=len(lines)
            )
            if stop == LeasedJob.StopRequest.CANCEL:
                break
        fields = _finalize(batch, parts)
        fields.update(total=len(lines), completed=completed, failed=failed)
        if batch.stop_request == LeasedJob.StopRequest.CANCEL:
            fields["status"] = LeasedJob.Status.CANCELLED
        return fields

    return jobs.job_run(model=Batch, job_id=batch_id, work=work)


def _finalize(batch: Batch, parts: list[dict]) -> dict:
    """Join the parts into the output and error files (none when empty); destroy the parts."""
    tenant = batch.tenant
    out = b"".join(
        vault_selectors.blob_read_bytes(tenant=tenant, blob_id=p["output"]) for p in parts
    )
    err = b"".join(
        vault_selectors.blob_read_bytes(tenant=tenant, blob_id=p["errors"]) for p in parts
    )
    fields = {}
    if out:
        fields["output_file"] = file_create_from_bytes(
            tenant=tenant, filename=f"{batch.id}_output.jsonl", purpose="batch_output", data=out
        )
    if err:
        fields["error_file"] = file_create_from_bytes(
            tenant=tenant, filename=f"{batch.id}_error.jsonl", purpose="batch_output", data=err
        )
    for p in parts:
        for key in ("output", "errors"):
            vault_services.blob_destroy(tenant=tenant, blob_id=p[key])
    return fields
