"""Serving: which engine and adapter a model name means for a tenant, and metering."""

from dataclasses import dataclass
from pathlib import Path

from django.http import Http404

from controlplane.tenancy.services import rate_limit_consume, usage_record
from controlplane.tuning import selectors as tuning_selectors
from controlplane.tuning import services as tuning_services
from controlplane.vault import selectors as vault_selectors

from .engines import engine_host


@dataclass
class ResolvedModel:
    engine: object  # inference.engine.Engine
    adapter_dir: Path | None


def chat_model_resolve(*, tenant, model: str) -> ResolvedModel:
    """A base model name, one of the tenant's adapters, or the global adapter of a
    federation it belongs to; Http404 for anything else (another tenant's adapter
    included: the same answer as a model that does not exist)."""
    host = engine_host()
    base = tuning_selectors.base_model_get(name=model)
    if base is not None:
        return ResolvedModel(host.engine(base.name, base.path), None)
    if model.startswith("fed:"):
        from controlplane.federation.selectors import global_adapter_get

        shared = global_adapter_get(tenant=tenant, model_id=model)
        base_name = shared.federation.base_model
        owner = shared.federation.owner

        def load() -> dict[str, bytes]:  # the owner's keys hold a federation's adapters
            packed = vault_selectors.blob_read_bytes(tenant=owner, blob_id=shared.blob_id)
            return tuning_services.adapter_unpack(packed)
    else:
        adapter = tuning_selectors.adapter_get(tenant=tenant, model_id=model)
        base_name = adapter.base_model

        def load() -> dict[str, bytes]:
            return tuning_services.adapter_files(adapter=adapter)

    base = tuning_selectors.base_model_get(name=base_name)
    if base is None:
        raise Http404(f"The base model of '{model}' is not installed")
    return ResolvedModel(host.engine(base.name, base.path), host.adapter_dir(model, load))


def chat_admission(*, tenant, max_tokens: int) -> None:
    """Charge a request and its token budget against the tenant's rates (RateLimited)."""
    rate_limit_consume(tenant=tenant, requests=1, tokens=max_tokens)


def chat_usage_record(*, tenant, prompt_tokens: int, completion_tokens: int) -> None:
    usage_record(
        tenant=tenant,
        requests=1,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
    )
