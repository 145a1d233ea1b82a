"""A run can continue from an earlier global adapter (the control plane runs each
scheduled round as its own run), instead of starting from a fresh one."""

import torch

import inference
from federated.config import FederationConfig
from federated.server_app import initial_adapter
from finetune import lora


def test_a_run_starts_from_the_given_adapter_directory(fed_model_dir, tmp_path):
    model = lora.apply_lora(inference.load_model(fed_model_dir), targets=("mla",), r=2, alpha=4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.fill_(0.125)  # a trained adapter: B is no longer zero
    for name, data in lora.adapter_files(model).items():
        (tmp_path / name).write_bytes(data)

    fresh, _ = initial_adapter(FederationConfig(model_path=fed_model_dir, targets=("mla",),
                                                lora_r=2, lora_alpha=4))  # fmt: skip
    continued, config_text = initial_adapter(
        FederationConfig(
            model_path=fed_model_dir,
            targets=("mla",),
            lora_r=2,
            lora_alpha=4,
            initial_adapter=str(tmp_path),
        )  # fmt: skip
    )

    b_names = [k for k in continued if "lora_B" in k]
    assert b_names and all(torch.all(continued[k] == 0.125) for k in b_names)
    assert all(torch.all(fresh[k] == 0) for k in b_names)
    assert '"r": 2' in config_text
