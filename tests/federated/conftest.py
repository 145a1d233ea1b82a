"""Fixtures for the federated tests: a tiny FP8 DeepSeek-V3 with its tokenizer, and three
members' data drawn from a domain suite (each member mostly one task family, non-IID).

Everything is made in temporary directories; nothing is downloaded.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import inference
from finetune.domains import SUITES
from finetune.tokenizer import train_tokenizer
from tests.inference.hf_factory import hf_model, save_hf

TINY = {
    "vocab_size": 512,
    "num_hidden_layers": 2,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "n_group": 1,
    "topk_group": 1,
}


@pytest.fixture(scope="session")
def fed_model_dir(tmp_path_factory) -> str:
    """An FP8 model directory (config.json, safetensors, tokenizer files)."""
    root = tmp_path_factory.mktemp("fed_model")
    tokenizer_dir = train_tokenizer(root / "tok", vocab_size=512, n_docs=200)
    hf = hf_model(TINY, seed=4)
    with torch.no_grad():  # a calmer init, so a few LoRA steps visibly move the loss
        for name, p in hf.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.mul_(0.3)
    save_hf(hf, root / "hf")
    inference.save_checkpoint(inference.load_model(root / "hf", fp8=True), root / "fp8")
    for f in Path(tokenizer_dir).iterdir():
        shutil.copy(f, root / "fp8" / f.name)
    return str(root / "fp8")


def member_rows(suite: str, family: str, n: int, seed: int) -> list[dict]:
    """SFT rows of one task family, each carrying its task for reward scoring."""
    items = SUITES[suite].generate(n, seed=seed, families=[family])
    return [{"messages": it.sft_messages(), "task": it.to_dict()} for it in items]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def member_files(tmp_path_factory) -> list[dict]:
    """Three hospitals, each with its own medical task family: train and val JSONL."""
    root = tmp_path_factory.mktemp("fed_data")
    families = SUITES["medical"].families[:3]
    out = []
    for i, family in enumerate(families):
        name = f"hospital-{'abc'[i]}"
        train = write_jsonl(root / f"{name}-train.jsonl", member_rows("medical", family, 8, i))
        val = write_jsonl(root / f"{name}-val.jsonl", member_rows("medical", family, 2, 100 + i))
        out.append({"name": name, "data": str(train), "val_data": str(val)})
    return out
