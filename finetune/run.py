"""Pieces the SFT and GRPO loops share: device, schedule, clipping, RNG and adapter state,
and the in-memory state envelope.

State bytes are ``torch.save`` of a dict of tensors, numbers and JSON strings, read back
with ``weights_only=True`` (no pickled code runs when a checkpoint blob is loaded).
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping

import torch

from finetune import lora
from inference.fp8 import bf16_matmul_is_fast

STATE_VERSION = 1


def pick_device() -> torch.device:
    """CUDA when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


PRECISIONS = ("auto", "fp32", "bf16")


def matmul_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The dtype of the frozen base's matmuls for a config's ``precision``: "fp32", "bf16",
    or "auto" (bf16 where it is fast, ``inference.fp8.bf16_matmul_is_fast``; else fp32)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "bf16" or (precision == "auto" and bf16_matmul_is_fast(device)):
        return torch.bfloat16
    return torch.float32


def prepare_base(model, precision: str, fp8_cache_mb: float, device: torch.device) -> str:
    """Set the frozen FP8 base of a training model to its matmul dtype and weight cache
    (``lora.prepare_fp8_for_training``); returns the dtype used, "fp32" or "bf16"."""
    dtype = matmul_dtype(precision, device)
    lora.prepare_fp8_for_training(model, dtype, fp8_cache_mb)
    return "bf16" if dtype == torch.bfloat16 else "fp32"


LR_SCHEDULES = ("cosine", "constant")


def lr_factor(step: int, warmup: int, total: int, schedule: str = "cosine") -> float:
    """Linear warmup over ``warmup`` steps, then cosine from 1 to 0 at ``total`` (the shape of
    transformers' get_cosine_schedule_with_warmup, with step 0 already above zero), or 1
    throughout for ``schedule="constant"``."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))))


def clip_gradients(params: list[torch.Tensor], max_norm: float) -> float:
    """Clip the global gradient norm to ``max_norm`` (0: no clipping); returns the norm
    before clipping."""
    if max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return float(torch.stack(grads).norm()) if grads else 0.0


def rng_state() -> dict:
    """torch's CPU (and CUDA) generator states: LoRA dropout and initialisation use them."""
    out = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: Mapping) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def lora_tensors(model) -> dict[str, torch.Tensor]:
    """CPU copies of the LoRA tensors, for state bytes."""
    return {k: v.detach().to("cpu").clone() for k, v in lora.lora_state(model).items()}


def load_lora_tensors(model, tensors: Mapping[str, torch.Tensor]) -> None:
    """Copy saved LoRA tensors into ``model``; ValueError when names or shapes differ."""
    params = lora.lora_state(model)
    if set(params) != set(tensors):
        raise ValueError("the state holds a different adapter than the config builds")
    with torch.no_grad():
        for name, p in params.items():
            if p.shape != tensors[name].shape:
                raise ValueError(f"state: {name} has shape {tuple(tensors[name].shape)}")
            p.copy_(tensors[name])


def dump_state(kind: str, config_view: dict, payload: dict) -> bytes:
    """Envelope + payload -> bytes. ``config_view`` must equal the resuming run's view."""
    state = {
        "version": STATE_VERSION,
        "kind": kind,
        "config": json.dumps(config_view, sort_keys=True),
        **payload,
    }
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def load_state(raw: bytes, kind: str, config_view: dict) -> dict:
    """Bytes -> payload dict. ValueError for foreign or corrupt bytes, another loop's state,
    another version, or a config that differs in a field the state depends on."""
    try:
        state = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises a zoo of types for corrupt or foreign bytes
        raise ValueError(f"resume_state is not a {kind} state: {e}") from e
    if not isinstance(state, dict) or state.get("kind") != kind:
        raise ValueError(f"resume_state is not a {kind} state")
    if state.get("version") != STATE_VERSION:
        raise ValueError(f"resume_state has version {state.get('version')}, not {STATE_VERSION}")
    saved = json.loads(state["config"])
    for key, value in config_view.items():
        if saved.get(key) != value:
            raise ValueError(
                f"resume_state was written with {key}={saved.get(key)!r}, not {value!r}"
            )
    return state


# ---- the chat template: serving's renderer is the reference ----------------------------


def chat_text(model_path: str, messages, *, add_generation_prompt: bool) -> str:
    """``messages`` rendered exactly as serving renders them: ``inference.chat``'s
    ``apply_chat_template`` with the template and special tokens stored in ``model_path``."""
    from inference.chat import apply_chat_template, load_chat_template, special_tokens

    return apply_chat_template(
        messages,
        add_generation_prompt=add_generation_prompt,
        template=load_chat_template(model_path),
        **special_tokens(model_path),
    )


def prompt_ids(model_path: str, tokenizer, messages) -> list[int]:
    """Token ids of the generation prompt for ``messages``, as serving would feed them."""
    text = chat_text(model_path, messages, add_generation_prompt=True)
    return list(tokenizer.encode(text, add_special_tokens=False))


def check_chat_encoding(model_path: str, tokenizer, messages) -> None:
    """Raise ValueError when ``finetune.data.encode_chat`` (which builds the loss mask piece
    by piece) disagrees with serving's rendering of the same conversation: the model would be
    trained on token sequences it is never served (e.g. a custom template in the model dir)."""
    from finetune import data

    ids, _ = data.encode_chat(tokenizer, messages)
    served = tokenizer.encode(
        chat_text(model_path, messages, add_generation_prompt=False), add_special_tokens=False
    )
    if list(served) != ids:
        raise ValueError(
            f"{model_path}: the stored chat template renders conversations differently from "
            "finetune.data.encode_chat; training would not match serving"
        )
