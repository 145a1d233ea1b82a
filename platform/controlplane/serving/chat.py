"""Parsing and checking an OpenAI chat-completions request body, with OpenAI's errors."""

import math
from dataclasses import dataclass

from django.conf import settings

ROLES = ("system", "developer", "user", "assistant")


class ChatRequestError(Exception):
    """A bad request: HTTP `status` with OpenAI's error fields."""

    def __init__(self, message: str, *, param: str | None = None, code: str = "invalid_value",
                 status: int = 400):  # fmt: skip
        super().__init__(message)
        self.param, self.code, self.status = param, code, status


@dataclass
class ChatRequest:
    model: str
    messages: list[dict]
    stream: bool
    include_usage: bool
    max_tokens: int
    temperature: float
    top_p: float
    stop: list[str]
    seed: int | None
    presence_penalty: float
    frequency_penalty: float
    logprobs: bool
    top_logprobs: int
    user: str | None

    def sampling_params(self):
        """The engine's SamplingParams for this request (chat completions and batches)."""
        from inference.sampling import SamplingParams

        return SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            max_tokens=self.max_tokens,
            stop=self.stop,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            logprobs=self.logprobs,
            top_logprobs=self.top_logprobs,
        )


def _number(body: dict, name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ChatRequestError(f"{name} must be a number", param=name)
    if not low <= value <= high:
        raise ChatRequestError(f"{name} must be between {low} and {high}, got {value}", param=name)
    return float(value)


def _content(message: dict, index: int) -> str:
    """A message's text: a string, or OpenAI's list of text parts."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise ChatRequestError(
                    "only text content parts are supported", param=f"messages[{index}].content"
                )
            if not isinstance(part.get("text"), str):
                raise ChatRequestError(
                    "a text part needs a string 'text'", param=f"messages[{index}].content"
                )
            texts.append(part["text"])
        return "".join(texts)
    if content is None and message.get("role") == "assistant":
        return ""
    raise ChatRequestError("content must be a string", param=f"messages[{index}].content")


def parse_chat_request(body) -> ChatRequest:
    """Check a decoded JSON body; ChatRequestError names the first bad parameter."""
    if not isinstance(body, dict):
        raise ChatRequestError("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ChatRequestError(
            "model is required", param="model", code="missing_required_parameter"
        )
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise ChatRequestError(
            "messages must be a non-empty array",
            param="messages",
            code="missing_required_parameter",
        )
    if len(raw) > settings.ENCLAVE_CHAT_MAX_MESSAGES:
        raise ChatRequestError(
            f"too many messages: {len(raw)} (at most {settings.ENCLAVE_CHAT_MAX_MESSAGES})",
            param="messages",
        )
    messages = []
    for i, message in enumerate(raw):
        if not isinstance(message, dict):
            raise ChatRequestError("each message must be an object", param=f"messages[{i}]")
        role = message.get("role")
        if role not in ROLES:
            raise ChatRequestError(
                f"role must be one of {', '.join(ROLES)}, got {role!r}", param=f"messages[{i}].role"
            )
        # OpenAI's "developer" is the system role of newer models.
        messages.append({"role": "system" if role == "developer" else role,
                         "content": _content(message, i)})  # fmt: skip
    if body.get("n", 1) != 1:
        raise ChatRequestError("only n=1 is supported", param="n", code="unsupported_value")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is None:
        max_tokens = 256
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ChatRequestError("max_tokens must be a positive integer", param="max_tokens")
    stop = body.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if (
        not isinstance(stop, list)
        or len(stop) > 4
        or not all(isinstance(s, str) and s for s in stop)
    ):
        raise ChatRequestError("stop must be a string or up to 4 non-empty strings", param="stop")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ChatRequestError("seed must be an integer", param="seed")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ChatRequestError("stream must be a boolean", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ChatRequestError("stream_options must be an object", param="stream_options")
    top_logprobs = body.get("top_logprobs") or 0
    if (
        isinstance(top_logprobs, bool)
        or not isinstance(top_logprobs, int)
        or not (0 <= top_logprobs <= 20)
    ):
        raise ChatRequestError("top_logprobs must be an integer in [0, 20]", param="top_logprobs")
    return ChatRequest(
        model=model,
        messages=messages,
        stream=stream,
        include_usage=bool(options.get("include_usage")),
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 1e-9, 1.0),
        stop=stop,
        seed=seed,
        presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
        logprobs=bool(body.get("logprobs")),
        top_logprobs=top_logprobs,
        user=body.get("user") if isinstance(body.get("user"), str) else None,
    )
