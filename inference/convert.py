"""Convert a checkpoint between float32, bfloat16 and DeepSeek-V3 FP8.

    python -m inference.convert SRC DST --to fp8|bf16|fp32 [--max-shard-mb N]

SRC and DST are Hugging Face checkpoint directories (config.json + safetensors). FP8 output
stores every decoder linear and the LM head as float8_e4m3fn with 128x128 ``weight_scale_inv``
blocks and the embedding in bfloat16; bf16/fp32 output dequantises FP8 input. Tokenizer and
generation files are copied alongside. Exit status 1 with the error on stderr if SRC cannot
be loaded.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

from inference.checkpoint import load_model, save_checkpoint

_SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
)
_TARGETS = {
    "fp8": (torch.float32, True),
    "bf16": (torch.bfloat16, False),
    "fp32": (torch.float32, False),
}


def convert(src: str | Path, dst: str | Path, to: str, max_shard_bytes: int | None = None) -> None:
    """Load SRC converting to ``to`` ("fp8", "bf16" or "fp32") and save it to DST."""
    if to not in _TARGETS:
        raise ValueError(f"--to must be one of {sorted(_TARGETS)}, got {to!r}")
    src, dst = Path(src), Path(dst)
    dtype, fp8 = _TARGETS[to]
    model = load_model(src, dtype=dtype, fp8=fp8)
    save_checkpoint(model, dst, max_shard_bytes=max_shard_bytes)
    for name in _SIDE_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m inference.convert", description=__doc__.split("\n")[0]
    )
    parser.add_argument("src", help="source checkpoint directory")
    parser.add_argument("dst", help="destination directory (created)")
    parser.add_argument("--to", required=True, choices=sorted(_TARGETS))
    parser.add_argument("--max-shard-mb", type=int, default=None, help="shard size limit in MiB")
    args = parser.parse_args(argv)
    shard = args.max_shard_mb * 2**20 if args.max_shard_mb else None
    try:
        convert(args.src, args.dst, args.to, shard)
    except (ValueError, OSError) as e:
        print(f"convert: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
