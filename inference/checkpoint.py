"""Hugging Face safetensors checkpoints in and out: single file or sharded with
``model.safetensors.index.json``, full-width or DeepSeek-V3 FP8 (``weight`` +
``weight_scale_inv``, ``quantization_config`` in config.json).

Loading builds the model on the meta device, then reads one tensor at a time from the
memory-mapped files (safetensors ``safe_open``), converts it if needed (dtype, FP8
quantise or dequantise) and assigns it, so the process never holds a second full copy.

Accepted layouts: per-expert weights (``mlp.experts.E.gate_proj.weight``, what DeepSeek ships
and what transformers' ``save_pretrained`` writes) and transformers-5's fused in-memory form
(``mlp.experts.gate_up_proj`` [E, 2I, H], ``mlp.experts.down_proj`` [E, H, I]). Multi-token
prediction layers (layer ids >= num_hidden_layers) are skipped.

Every error about a file names the file and, where one is involved, the tensor.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from inference import fp8 as fp8_mod
from inference.config import FP8_QUANTIZATION_CONFIG, ModelConfig
from inference.cpu_linear import LinearKernels, use_measured_linear
from inference.host_memory import retain_freed_memory
from inference.model import Transformer

INDEX_NAME = "model.safetensors.index.json"
REMAP_BYTES = 256 * 2**20  # unmap a file after this many bytes were read through the mapping
SINGLE_NAME = "model.safetensors"
_SCALE_SUFFIX = ".weight_scale_inv"
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")
_FUSED_RE = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$")
# Tensors kept in float32 whatever the compute dtype (routing decisions are sensitive).
_FP32_SUFFIXES = (".mlp.gate.weight", ".mlp.gate.e_score_correction_bias")


class CheckpointError(ValueError):
    """A checkpoint file or tensor that cannot be loaded; the message names both."""


# ---- reading ----------------------------------------------------------------------------


def _check_safetensors_file(path: Path) -> list[str]:
    """Validate a safetensors file's header against its size; return its tensor names.

    safetensors reports a short file without saying which tensor is cut; reading the
    header ourselves lets the error name it.
    """
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: truncated: {size} bytes, no safetensors header")
            (header_len,) = struct.unpack("<Q", raw)
            if 8 + header_len > size:
                raise CheckpointError(
                    f"{path}: truncated: header says {header_len} bytes, file has {size - 8}"
                )
            header = json.loads(f.read(header_len))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e}") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header: {e}") from e
    data_size = size - 8 - header_len
    names = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        end = info["data_offsets"][1]
        if end > data_size:
            raise CheckpointError(
                f"{path}: truncated: tensor {name} needs bytes up to {end}, data has {data_size}"
            )
        names.append(name)
    return names


class CheckpointReader:
    """Tensor name -> file map over a checkpoint directory; reads tensors one at a time.

    Use as a context manager (files are memory-mapped while open). Raises CheckpointError
    for a missing index shard, a truncated or corrupt file, or a tensor listed twice.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        index = self.directory / INDEX_NAME
        single = self.directory / SINGLE_NAME
        self.file_of: dict[str, Path] = {}
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: cannot read the weight_map: {e}") from e
            by_file: dict[str, list[str]] = {}
            for name, file in weight_map.items():
                by_file.setdefault(file, []).append(name)
            for file, listed in by_file.items():
                path = self.directory / file
                if not path.exists():
                    raise CheckpointError(
                        f"{path}: shard is missing (listed in {index.name} for tensor {listed[0]})"
                    )
                present = set(_check_safetensors_file(path))
                for name in listed:
                    if name not in present:
                        raise CheckpointError(
                            f"{path}: tensor {name} listed in {index.name} is not in the file"
                        )
                    self.file_of[name] = path
        elif single.exists():
            for name in _check_safetensors_file(single):
                self.file_of[name] = single
        else:
            raise CheckpointError(f"{self.directory}: no {SINGLE_NAME} or {INDEX_NAME}")
        self._handles: dict[Path, object] = {}
        self._mapped_bytes: dict[Path, int] = {}

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        for path in list(self._handles):
            self._close(path)

    def names(self) -> list[str]:
        return list(self.file_of)

    def shape(self, name: str) -> list[int]:
        return list(self._handle(name).get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        """The tensor ``name`` (a fresh CPU tensor copied out of the mapped file)."""
        path = self.file_of[name]
        try:
            tensor = self._handle(name).get_tensor(name)
        except SafetensorError as e:
            raise CheckpointError(f"{path}: tensor {name}: {e}") from e
        # Pages of the mapping we have read count as this process's resident memory until
        # the file is unmapped; remap every so often so a load never holds the model twice.
        self._mapped_bytes[path] += tensor.numel() * tensor.element_size()
        if self._mapped_bytes[path] > REMAP_BYTES:
            self._close(path)
        return tensor

    def _handle(self, name: str):
        path = self.file_of[name]
        if path not in self._handles:
            try:
                self._handles[path] = safe_open(str(path), framework="pt").__enter__()
            except SafetensorError as e:
                raise CheckpointError(f"{path}: {e}") from e
            self._mapped_bytes[path] = 0
        return self._handles[path]

    def _close(self, path: Path) -> None:
        self._handles.pop(path).__exit__(None, None, None)


def _source_plan(
    config: ModelConfig, reader: CheckpointReader
) -> dict[str, tuple[str, slice | None, int | None]]:
    """Model tensor name -> (checkpoint tensor, row slice, expert index) for fused experts;
    every other name maps to itself. Drops MTP layers and non-persistent rotary buffers."""
    plan: dict[str, tuple[str, slice | None, int | None]] = {}
    inter = config.moe_intermediate_size
    for name in reader.names():
        m = _LAYER_RE.match(name)
        if m and int(m.group(1)) >= config.num_hidden_layers:
            continue  # multi-token-prediction layers: not part of the causal LM forward
        if name.endswith("rotary_emb.inv_freq"):
            continue
        if config.tie_word_embeddings and name == "lm_head.weight":
            continue  # tied: the embedding is the head
        fused = _FUSED_RE.match(name)
        if fused:
            prefix, kind = fused.groups()
            for e in range(reader.shape(name)[0]):
                if kind == "gate_up_proj":
                    plan[f"{prefix}.{e}.gate_proj.weight"] = (name, slice(0, inter), e)
                    plan[f"{prefix}.{e}.up_proj.weight"] = (name, slice(inter, 2 * inter), e)
                else:
                    plan[f"{prefix}.{e}.down_proj.weight"] = (name, None, e)
            continue
        plan[name] = (name, None, None)
    return plan


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[attr] = value


def load_model(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    fp8: bool | None = None,
    fp8_kernels: fp8_mod.FP8Kernels | None = None,
    linear_kernels: LinearKernels | None = None,
) -> Transformer:
    """Load a checkpoint directory (config.json + safetensors) into a ``Transformer``.

    ``dtype`` is the compute dtype and the storage dtype of every non-FP8 weight (the router
    stays float32). ``fp8``: None keeps what the checkpoint holds (FP8 tensors stay FP8),
    True quantises every decoder linear and the LM head to FP8, False dequantises FP8
    tensors to ``dtype``. A model with FP8 linears keeps its embedding in bfloat16 when
    ``dtype`` is float32. ``fp8_kernels`` is the kernel-choice record the FP8 linears share
    (default: a new one for this model; pass ``FP8Kernels(force=...)`` to pin a kernel).
    ``linear_kernels`` is the same for the float32 CPU linears (``inference.cpu_linear``):
    two models measuring separately may choose differently and so round differently.
    On the CPU it also sets this process's malloc to keep freed memory for reuse
    (``inference.host_memory``; ``ENCLAVE_RETAIN_FREED_MEMORY=0`` turns that off).

    Returns the model in eval mode with ``.config``. Raises CheckpointError (a ValueError)
    naming the file and tensor for a bad config, truncated or missing file, missing or
    unexpected tensor, or a shape that disagrees with config.json.
    """
    path = Path(path)
    device = torch.device(device)
    if device.type == "cpu":
        retain_freed_memory()  # no page faults on every forward's temporaries (host_memory)
    config = ModelConfig.from_json(path)
    config_file = path / "config.json"
    with CheckpointReader(path) as reader:
        plan = _source_plan(config, reader)
        stored_fp8 = {n[: -len(_SCALE_SUFFIX)] for n in plan if n.endswith(_SCALE_SUFFIX)}
        with torch.device("meta"):
            model = Transformer(config.replace(quantization_config=None), compute_dtype=dtype)
        kernels = fp8_kernels if fp8_kernels is not None else fp8_mod.FP8Kernels()
        if fp8 is None:
            targets = sorted(stored_fp8)
        elif fp8:
            targets = fp8_mod.fp8_target_names(model)
        else:
            targets = []
        unknown = [t for t in targets if not _is_linear(model, t)]
        if unknown:
            t = unknown[0]
            raise CheckpointError(
                f"{reader.file_of[t + _SCALE_SUFFIX]}: tensor {t}{_SCALE_SUFFIX} has no linear layer"
            )
        fp8_mod.swap_to_fp8(model, targets, dtype, kernels, quantize=False)
        # FP8 models keep the embedding in bfloat16 (as DeepSeek ships it): a float32 copy would
        # be a large share of their memory, and rows are only gathered, never multiplied.
        narrow_embed = bool(targets) and dtype == torch.float32

        expected = dict(model.state_dict(keep_vars=True))
        for name in plan:
            owner = (
                name[: -len(_SCALE_SUFFIX)] + ".weight" if name.endswith(_SCALE_SUFFIX) else name
            )
            if owner not in expected:
                raise CheckpointError(
                    f"{reader.file_of[plan[name][0]]}: tensor {name} does not belong to the "
                    f"{config.model_type} model described by {config_file}"
                )
        for name in expected:
            if name not in plan and not name.endswith(_SCALE_SUFFIX):
                raise CheckpointError(f"{path}: tensor {name} is missing from the checkpoint")

        for name, target in expected.items():
            if name.endswith(_SCALE_SUFFIX):
                continue  # set together with its weight
            source, rows, expert = plan[name]
            file = reader.file_of[source]
            tensor = reader.get(source)
            if expert is not None:
                tensor = tensor[expert]
                if rows is not None:
                    tensor = tensor[rows]
            scale_name = name[: -len(".weight")] + _SCALE_SUFFIX
            is_fp8_stored = tensor.dtype == fp8_mod.FP8_DTYPE
            if is_fp8_stored and scale_name not in plan:
                raise CheckpointError(
                    f"{file}: tensor {name} is float8 but {scale_name} is missing"
                )
            _check_shape(file, config_file, name, list(tensor.shape), list(target.shape))
            module_name = name.rpartition(".")[0]
            module = model.get_submodule(module_name) if module_name else model
            if isinstance(module, fp8_mod.FP8Linear) and name.endswith(".weight"):
                if is_fp8_stored:
                    scale = reader.get(scale_name).float()
                    _check_shape(
                        reader.file_of[scale_name],
                        config_file,
                        scale_name,
                        list(scale.shape),
                        list(module.weight_scale_inv.shape),
                    )
                    q = tensor
                else:
                    q, scale = fp8_mod.quantize_weight(tensor)
                _set_tensor(model, name, q.to(device, copy=True))
                _set_tensor(model, scale_name, scale.to(device, copy=True))
                continue
            if is_fp8_stored:
                tensor = fp8_mod.dequantize_weight(
                    tensor, reader.get(scale_name).float(), torch.float32
                )
            if name.endswith(_FP32_SUFFIXES):
                want = torch.float32
            elif name == "model.embed_tokens.weight" and narrow_embed:
                want = torch.bfloat16
            else:
                want = dtype
            # copy=True: safetensors hands out views of the file mapping. Weights that stay
            # file-backed can be evicted under memory pressure and re-read mid-forward;
            # an owned copy is resident and the mapping can go.
            _set_tensor(model, name, tensor.to(device=device, dtype=want, copy=True))
            del tensor
    model.config = config.replace(
        quantization_config=dict(FP8_QUANTIZATION_CONFIG) if targets else None
    )
    if device.type == "cpu" and dtype == torch.float32:
        # float32 linears run on whichever CPU GEMM this machine measures fastest per shape
        model.linear_kernels = use_measured_linear(model, linear_kernels)
    return model.eval()


def _is_linear(model: nn.Module, name: str) -> bool:
    try:
        return isinstance(model.get_submodule(name), nn.Linear)
    except AttributeError:
        return False


def _check_shape(file: Path, config_file: Path, name: str, got: list[int], want: list[int]) -> None:
    if got != want:
        raise CheckpointError(
            f"{file}: tensor {name} has shape {got}, but {config_file} implies {want}"
        )


# ---- writing ----------------------------------------------------------------------------


def _state_for_saving(model: Transformer) -> Iterator[tuple[str, torch.Tensor]]:
    for name, tensor in model.state_dict().items():
        yield name, tensor.detach().to("cpu").contiguous()


def save_checkpoint(
    model: Transformer, path: str | Path, max_shard_bytes: int | None = None
) -> None:
    """Write config.json and safetensors (sharded with an index when larger than
    ``max_shard_bytes``). FP8 linears are written as ``weight`` (float8_e4m3fn) plus
    ``weight_scale_inv``, with DeepSeek's quantization_config in config.json."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    has_fp8 = any(isinstance(m, fp8_mod.FP8Linear) for m in model.modules())
    config = model.config.replace(
        quantization_config=dict(FP8_QUANTIZATION_CONFIG) if has_fp8 else None
    )
    shards: list[dict[str, torch.Tensor]] = [{}]
    sizes = [0]
    for name, tensor in _state_for_saving(model):
        nbytes = tensor.numel() * tensor.element_size()
        if max_shard_bytes is not None and sizes[-1] and sizes[-1] + nbytes > max_shard_bytes:
            shards.append({})
            sizes.append(0)
        shards[-1][name] = tensor
        sizes[-1] += nbytes
    for stale in [*path.glob("model*.safetensors"), path / INDEX_NAME]:
        stale.unlink(missing_ok=True)
    if len(shards) == 1:
        save_file(shards[0], str(path / SINGLE_NAME), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(path / file), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, file))
        index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
        (path / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    config.save(path / "config.json")
