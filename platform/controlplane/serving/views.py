"""/v1/chat/completions: a plain async Django view under ASGI, streaming or not.

Server-sent events exactly as the openai client expects them: a role chunk, content
deltas, a finish chunk, a usage chunk when `stream_options.include_usage` is set, then
`[DONE]`. A failure after the 200 has gone out is sent in the stream as `{"error": ...}`.
A client that disconnects cancels its generation (Django cancels the stream's iterator,
and the engine's `astream` cancels the request when it is closed).
"""

import json
import logging
import time
import uuid

from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.http import Http404, JsonResponse, StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from controlplane.api import ApiKeyRefused, principal_from_authorization
from controlplane.api_errors import error_body
from controlplane.tenancy.models import Role
from controlplane.tenancy.services import RateLimited

from . import services
from .chat import ChatRequestError, parse_chat_request

log = logging.getLogger(__name__)


def _error(status: int, message: str, type_: str = "invalid_request_error", **fields):
    return JsonResponse(error_body(message, type_, **fields), status=status)


def _logprobs_json(items, tokenizer) -> dict | None:
    """OpenAI's logprobs object; token texts come from the engine's tokenizer."""
    if not items:
        return None

    def entry(token_id: int, logprob: float) -> dict:
        text = tokenizer.decode([token_id], skip_special_tokens=False) if tokenizer else ""
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {
        "content": [
            {**entry(i.token_id, i.logprob),
             "top_logprobs": [entry(t, lp) for t, lp in (i.top or [])]}
            for i in items
        ]
    }  # fmt: skip


def _usage_json(usage) -> dict:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    }


def _finish(reason: str) -> str:
    return "stop" if reason == "cancelled" else reason


@csrf_exempt
@require_POST
async def chat_completions(request):
    try:
        principal = await sync_to_async(principal_from_authorization)(
            request.headers.get("Authorization", "")
        )
    except ApiKeyRefused as exc:
        return _error(401, str(exc), code=exc.code or "invalid_api_key")
    if principal is None:
        return _error(401, "You didn't provide an API key.", code="invalid_api_key")
    request.principal = principal  # for the audit middleware
    if not principal.can(Role.MEMBER):
        return _error(403, "Auditors cannot run models.", "permission_error",
                      code="insufficient_permissions")  # fmt: skip
    try:
        body = json.loads(request.body)
    except RequestDataTooBig:  # Django's own answer would be a bare HTML 400
        return _error(
            413, f"The request body is over the limit of {settings.DATA_UPLOAD_MAX_MEMORY_SIZE} "
            "bytes.", param="messages", code="request_too_large",
        )  # fmt: skip
    except UnicodeDecodeError as exc:
        return _error(
            400, f"The request body is not valid UTF-8 (byte {exc.start + 1}).", code="invalid_json"
        )
    except json.JSONDecodeError:
        return _error(400, "The request body is not valid JSON.", code="invalid_json")
    try:
        req = parse_chat_request(body)
    except ChatRequestError as exc:
        return _error(exc.status, str(exc), param=exc.param, code=exc.code)
    tenant = principal.tenant
    try:
        await sync_to_async(services.chat_admission)(tenant=tenant, max_tokens=req.max_tokens)
    except RateLimited as exc:
        response = _error(429, str(exc), "rate_limit_error", code="rate_limit_exceeded")
        response["Retry-After"] = str(exc.retry_after)
        return response
    try:
        resolved = await sync_to_async(services.chat_model_resolve)(tenant=tenant, model=req.model)
    except Http404:
        return _error(404, f"The model '{req.model}' does not exist or you do not have access "
                      "to it.", param="model", code="model_not_found")  # fmt: skip

    from inference.engine import Request

    engine_request = Request(
        messages=req.messages,
        sampling=req.sampling_params(),
        adapter=str(resolved.adapter_dir) if resolved.adapter_dir else None,
        request_id=f"chatcmpl-{uuid.uuid4().hex}",
    )
    try:
        deltas = resolved.engine.astream(engine_request)
        first = await anext(deltas)  # validation errors surface here, before any 200
    except ValueError as exc:
        code = (
            "context_length_exceeded" if "context" in str(exc) or "KV cache" in str(exc) else None
        )
        return _error(400, str(exc), param="messages", code=code or "invalid_value")
    tokenizer = resolved.engine.tokenizer
    created = int(time.time())
    meta = {"id": engine_request.request_id, "created": created, "model": req.model,
            "system_fingerprint": None}  # fmt: skip

    async def record(usage) -> None:
        if usage is not None:
            await sync_to_async(services.chat_usage_record)(
                tenant=tenant,
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens,
            )

    if not req.stream:
        text, logprobs, last = first.text, list(first.logprobs or []), first
        async for delta in deltas:
            text += delta.text
            logprobs += delta.logprobs or []
            last = delta
        await record(last.usage)
        return JsonResponse(
            {
                **meta,
                "object": "chat.completion",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text, "refusal": None},
                        "logprobs": _logprobs_json(logprobs, tokenizer) if req.logprobs else None,
                        "finish_reason": _finish(last.finish_reason),
                    }
                ],
                "usage": _usage_json(last.usage),
            }
        )

    def chunk(delta: dict, finish=None, logprobs=None) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        payload = {**meta, "object": "chat.completion.chunk", "choices": [choice]}
        return f"data: {json.dumps(payload)}\n\n"

    async def events():
        usage = None
        recorded = False
        try:
            yield chunk({"role": "assistant", "content": "", "refusal": None})
            delta = first
            while True:
                if delta.text or delta.logprobs:
                    lp = _logprobs_json(delta.logprobs, tokenizer) if req.logprobs else None
                    yield chunk({"content": delta.text}, logprobs=lp)
                if delta.finish_reason is not None:
                    usage = delta.usage
                    yield chunk({}, finish=_finish(delta.finish_reason))
                    break
                delta = await anext(deltas)
            # Metered before the client can see the end of the stream.
            await record(usage)
            recorded = True
            if req.include_usage and usage is not None:
                payload = {**meta, "object": "chat.completion.chunk", "choices": [],
                           "usage": _usage_json(usage)}  # fmt: skip
                yield f"data: {json.dumps(payload)}\n\n"
            yield "data: [DONE]\n\n"
        except Exception as exc:  # after the 200: tell the client in the stream
            log.exception("chat stream %s failed", engine_request.request_id)
            body = error_body(f"The server had an error while streaming: {exc}", "server_error")
            yield f"data: {json.dumps(body)}\n\n"
        finally:
            await deltas.aclose()
            if not recorded:
                await record(usage)

    response = StreamingHttpResponse(events(), content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"
    return response
