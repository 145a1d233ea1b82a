"""The error responses of /v1 in the OpenAPI schema (a drf-spectacular postprocessing hook).

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
    "v1_fine_tuning_jobs_create": {409: "The Idempotency-Key was used with another body"},
}
# Every write on a federation can clash with its state (already a member, a round running).
FEDERATION_CONFLICT = {409: "The request clashes with the federation's state"}


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
    result.setdefault("components", {}).setdefault("schemas", {})["Error"] = ERROR_ENVELOPE
    ref = {"$ref": "#/components/schemas/Error"}
    for path, operations in result.get("paths", {}).items():
        if not path.startswith("/v1/"):
            continue
        for method, operation in operations.items():
            responses = operation.setdefault("responses", {})
            for status, description in _errors_for(path, method, operation).items():
                responses[str(status)] = {
                    "description": description,
                    "content": {"application/json": {"schema": ref}},
                }
    return result
