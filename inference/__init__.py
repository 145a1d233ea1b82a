"""Enclave's engine: a DeepSeek-V2/V3-architecture model (MLA, DeepSeekMoE) with FP8 weights.

Public API:
    ModelConfig                      the model's shape, from/to HF config.json
    load_model(path, device, dtype, fp8) -> Transformer   (model(input_ids) -> logits)
    save_checkpoint(model, path)     HF safetensors, FP8 in DeepSeek-V3's format
    Transformer, FP8Linear, FP8Kernels

torch only: this package never imports Django or the control plane.
"""

from inference.checkpoint import CheckpointError, load_model, save_checkpoint
from inference.config import ModelConfig
from inference.fp8 import FP8Kernels, FP8Linear
from inference.model import Transformer

__all__ = [
    "CheckpointError",
    "FP8Kernels",
    "FP8Linear",
    "ModelConfig",
    "Transformer",
    "load_model",
    "save_checkpoint",
]
