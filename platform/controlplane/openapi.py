"""What drf-spectacular cannot see of /v1 (a postprocessing hook): error responses and the
objects the views render by hand.

Every /v1 error is the OpenAI envelope (api_errors). drf-spectacular documents only the
success response of each view, so a client (or schemathesis) reading /api/schema/ would not
know which error statuses an operation can answer. This hook adds them from what the
operation takes, the same for every view, plus the few statuses only some views answer.
"""

ERROR_ENVELOPE = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": "string", "nullable": True},
                "code": {"type": "string", "nullable": True},
            },
        }
    },
}

# Statuses that only some operations answer, by operation id, with the reason.
SPECIFIC = {
    "v1_files_create": {413: "The file is over the upload limit"},
    "v1_files_destroy": {409: "A fine-tuning job uses the file"},
    "chat_completions_create": {413: "The request body is over the upload limit"},
    "v1_fine_tuning_jobs_create": {409: "The Idempotency-Key was used with another body"},
}
# Every write on a federation can clash with its state (already a member, a round running).
FEDERATION_CONFLICT = {409: "The request clashes with the federation's state"}


def _nullable(type_: str, **extra) -> dict:
    return {"type": type_, "nullable": True, **extra}


# The fine-tuning job and batch objects: their views render them by hand (to_representation),
# so drf-spectacular sees fieldless serializers and documents no body at all.
OBJECTS = {
    "FineTuningJob": {
        "type": "object",
        "required": ["object", "id", "model", "created_at", "status", "training_file"],
        "properties": {
            "object": {"type": "string", "enum": ["fine_tuning.job"]},
            "id": {"type": "string"},
            "model": {"type": "string"},
            "created_at": {"type": "integer"},
            "finished_at": _nullable("integer"),
            "fine_tuned_model": _nullable("string"),
            "organization_id": {"type": "string"},
            "result_files": {"type": "array", "items": {"type": "string"}},
            "status": {"type": "string"},
            "training_file": {"type": "string"},
            "validation_file": _nullable("string"),
            "hyperparameters": _nullable("object"),
            "trained_tokens": _nullable("integer"),
            "error": _nullable("object"),
            "user_provided_suffix": _nullable("string"),
            "seed": _nullable("integer"),
            "estimated_finish": _nullable("integer"),
            "integrations": {"type": "array", "items": {}},
            "metadata": _nullable("object"),
            "method": {"type": "object"},
        },
    },
    "Batch": {
        "type": "object",
        "required": ["id", "object", "endpoint", "input_file_id", "status", "created_at"],
        "properties": {
            "id": {"type": "string"},
            "object": {"type": "string", "enum": ["batch"]},
            "endpoint": {"type": "string"},
            "errors": _nullable("object"),
            "input_file_id": {"type": "string"},
            "completion_window": {"type": "string"},
            "status": {"type": "string"},
            "output_file_id": _nullable("string"),
            "error_file_id": _nullable("string"),
            "request_counts": {
                "type": "object",
                "properties": {k: {"type": "integer"} for k in ("total", "completed", "failed")},
            },
            "metadata": _nullable("object"),
            **{
                f"{k}_at": _nullable("integer")
                for k in (
                    "created",
                    "in_progress",
                    "expires",
                    "finalizing",
                    "completed",
                    "failed",
                    "expired",
                    "cancelling",
                    "cancelled",
                )
            },  # fmt: skip
        },
    },
}


OBJECTS["ChatCompletion"] = {
    "type": "object",
    "required": ["id", "object", "created", "model", "choices", "usage"],
    "properties": {
        "id": {"type": "string"},
        "object": {"type": "string", "enum": ["chat.completion"]},
        "created": {"type": "integer"},
        "model": {"type": "string"},
        "system_fingerprint": _nullable("string"),
        "choices": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["index", "message", "finish_reason"],
                "properties": {
                    "index": {"type": "integer"},
                    "message": {
                        "type": "object",
                        "required": ["role", "content"],
                        "properties": {
                            "role": {"type": "string", "enum": ["assistant"]},
                            "content": _nullable("string"),
                        },
                    },
                    "finish_reason": {"type": "string", "enum": ["stop", "length"]},
                    "logprobs": _nullable("object"),
                },
            },
        },
        "usage": {
            "type": "object",
            "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
            "properties": {
                k: {"type": "integer", "minimum": 0}
                for k in ("prompt_tokens", "completion_tokens", "total_tokens")
            },
        },
    },
}
# One server-sent event of a streamed completion: `data:` is a chat.completion.chunk in
# JSON, or `[DONE]` at the end.
SSE_EVENT = {"type": "object", "required": ["data"], "properties": {"data": {"type": "string"}}}


def _list_of(name: str) -> dict:
    return {
        "type": "object",
        "required": ["object", "data"],
        "properties": {
            "object": {"type": "string", "enum": ["list"]},
            "data": {"type": "array", "items": {"$ref": f"#/components/schemas/{name}"}},
            "has_more": {"type": "boolean"},
            "first_id": _nullable("string"),
            "last_id": _nullable("string"),
        },
    }


# Success bodies by operation id: (object, whether the operation answers a list of them).
SUCCESS = {
    **{f"v1_fine_tuning_jobs_{op}": ("FineTuningJob", False)
       for op in ("create", "retrieve", "cancel_create", "pause_create", "resume_create")},
    "v1_fine_tuning_jobs_list": ("FineTuningJob", True),
    **{f"v1_batches_{op}": ("Batch", False) for op in ("create", "retrieve", "cancel_create")},
    "v1_batches_list": ("Batch", True),
}  # fmt: skip


def _errors_for(path: str, method: str, operation: dict) -> dict[int, str]:
    errors = {
        401: "Missing, invalid, revoked or expired API key",
        403: "The key's role may not do this, or a quota is exhausted",
        429: "Rate limit exceeded; see Retry-After",
    }
    parameters = operation.get("parameters", [])
    if (
        method != "get"  # an action the object's state refuses (cancel a finished job)
        or "requestBody" in operation
        or any(p["in"] == "query" for p in parameters)
    ):
        errors[400] = "Invalid request; `param` names the field"
    if "requestBody" in operation:
        errors[415] = "Unsupported Content-Type"
    if any(p["in"] == "path" for p in parameters) or path == "/v1/chat/completions":
        errors[404] = "No such object in this tenant (another tenant's id answers the same)"
    errors.update(SPECIFIC.get(operation.get("operationId"), {}))
    if path.startswith("/v1/federations") and method != "get":
        errors.update(FEDERATION_CONFLICT)
    return errors


def add_error_responses(result, generator, request, public):
    """Document the OpenAI error envelope and each /v1 operation's error statuses."""
    schemas = result.setdefault("components", {}).setdefault("schemas", {})
    schemas.update(Error=ERROR_ENVELOPE, **OBJECTS)
    ref = {"$ref": "#/components/schemas/Error"}
    for path, operations in result.get("paths", {}).items():
        if not path.startswith("/v1/"):
            continue
        for method, operation in operations.items():
            responses = operation.setdefault("responses", {})
            if operation.get("operationId") == "chat_completions_create":
                responses["200"]["content"] = {
                    "application/json": {"schema": {"$ref": "#/components/schemas/ChatCompletion"}},
                    "text/event-stream": {"schema": SSE_EVENT},
                }
            if operation.get("operationId") in SUCCESS:
                name, many = SUCCESS[operation["operationId"]]
                body = _list_of(name) if many else {"$ref": f"#/components/schemas/{name}"}
                responses["200"] = {
                    "description": "",
                    "content": {"application/json": {"schema": body}},
                }
            for status, description in _errors_for(path, method, operation).items():
                responses[str(status)] = {
                    "description": description,
                    "content": {"application/json": {"schema": ref}},
                }
    return result
