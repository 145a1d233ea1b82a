"""The model as a library: two engines side by side, FP8 memory, package boundaries."""

from __future__ import annotations

import subprocess
import sys

import torch

from inference import FP8Linear, ModelConfig, Transformer, load_model
from tests.inference.hf_factory import hf_model, save_hf


def test_two_different_models_side_by_side(tmp_path):
    """A V3 (sigmoid, groups, q-LoRA) and a V2-Lite-style (softmax, plain q) model, one of
    them FP8, used in turns: each still matches its own transformers reference."""
    v3 = hf_model(seed=11)
    v2 = hf_model(
        {"hidden_size": 96, "num_attention_heads": 6, "num_key_value_heads": 6},
        "deepseek_v2",
        seed=12,
    )
    a = load_model(save_hf(v3, tmp_path / "v3"))
    b = load_model(save_hf(v2, tmp_path / "v2"))
    a8 = load_model(tmp_path / "v3", fp8=True)
    assert a.config != b.config
    ids = torch.randint(0, 160, (1, 20), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        ref_a, ref_b = v3(ids).logits, v2(ids).logits
        for _ in range(2):
            out_b, out_a, out_a8 = b(ids), a(ids), a8(ids)
            assert ((out_a - ref_a).abs().max() / ref_a.abs().max()) < 1e-4
            assert ((out_b - ref_b).abs().max() / ref_b.abs().max()) < 1e-4
            assert out_a8.shape == out_a.shape and torch.isfinite(out_a8).all()
    # Kernel choices belong to one engine: the FP8 model's record is not shared elsewhere.
    kernels = {id(m.kernels) for m in a8.modules() if isinstance(m, FP8Linear)}
    assert len(kernels) == 1 and next(iter(kernels)) != id(None)


def test_fp8_resident_weights_are_under_30_percent_of_fp32(tmp_path):
    config = ModelConfig.from_json("models/configs/tiny.json")
    torch.manual_seed(0)
    from inference.checkpoint import save_checkpoint

    save_checkpoint(Transformer(config), tmp_path / "tiny")

    def resident(model: torch.nn.Module) -> int:
        tensors = list(model.state_dict().values())
        return sum(t.numel() * t.element_size() for t in tensors)

    fp32 = resident(load_model(tmp_path / "tiny"))
    fp8 = resident(load_model(tmp_path / "tiny", fp8=True))
    assert fp8 <= 0.30 * fp32


def test_random_init_model_runs_forward():
    config = ModelConfig.from_json("models/configs/tiny.json").replace(num_hidden_layers=2)
    model = Transformer(config).eval()
    with torch.inference_mode():
        out = model(torch.randint(0, config.vocab_size, (2, 9)))
    assert out.shape == (2, 9, config.vocab_size) and torch.isfinite(out).all()


def test_inference_never_imports_django():
    code = (
        "import sys, inference, inference.convert; "
        "print(any(m.split('.')[0] in ('django', 'controlplane', 'celery') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_moe_inference_path_equals_the_autograd_path():
    """MoE has two dispatches: the autograd one (one gather, split/cat) and the no-grad one
    (expert by expert, in place). Same function, shared experts or not, some experts idle."""
    base = ModelConfig.from_json("models/configs/tiny.json").replace(num_hidden_layers=2)
    for shared in (base.n_shared_experts, 0):
        torch.manual_seed(3)
        moe = Transformer(base.replace(n_shared_experts=shared)).model.layers[-1].mlp
        x = torch.randn(2, 1, base.hidden_size)  # 2 tokens: some experts get none
        with torch.no_grad():
            _, indices = moe.gate(x.view(-1, base.hidden_size))
            fast = moe(x)
        assert len(indices.unique()) < base.n_routed_experts
        slow = moe(x)
        assert slow.requires_grad and not fast.requires_grad
        torch.testing.assert_close(fast, slow.detach(), rtol=1e-5, atol=1e-6)
