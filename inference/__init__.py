"""Enclave's engine: a DeepSeek-V2/V3-architecture model (MLA, DeepSeekMoE) with FP8 weights.

Public API:
    ModelConfig                      the model's shape, from/to HF config.json
    load_model(path, device, dtype, fp8) -> Transformer   (model(input_ids) -> logits)
    save_checkpoint(model, path)     HF safetensors, FP8 in DeepSeek-V3's format
    Transformer, FP8Linear, FP8Kernels, LinearKernels   (kernel-choice records, shareable)
    Engine(model_path, *, device, max_batch_tokens, kv_cache_bytes, max_active_adapters)
        continuous-batching serving: generate(requests), stream(request), astream(request)
    Request, SamplingParams, Completion, Delta, Usage
    apply_chat_template, load_chat_template, load_tokenizer   (the one chat template)

torch only: this package never imports Django or the control plane.
"""

from inference.chat import apply_chat_template, load_chat_template, load_tokenizer  # noqa: I001
from inference.checkpoint import CheckpointError, load_model, save_checkpoint
from inference.config import ModelConfig
from inference.cpu_linear import LinearKernels
from inference.engine import Completion, Delta, Engine, Request, Usage
from inference.fp8 import FP8Kernels, FP8Linear
from inference.model import Transformer
from inference.sampling import SamplingParams

__all__ = [
    "CheckpointError",
    "Completion",
    "Delta",
    "Engine",
    "Request",
    "SamplingParams",
    "Usage",
    "apply_chat_template",
    "load_chat_template",
    "load_tokenizer",
    "FP8Kernels",
    "FP8Linear",
    "LinearKernels",
    "ModelConfig",
    "Transformer",
    "load_model",
    "save_checkpoint",
]
