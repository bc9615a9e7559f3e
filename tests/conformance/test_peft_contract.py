"""Points of PEFT's own custom-model contract (the checks PEFT applies to every in-tree method) that are not covered
by test_contract.py: loading with `low_cpu_mem_usage=True`, `safe_serialization=False`, and models whose forward
takes neither `input_ids` nor `inputs_embeds` (PEFT's test MLPs)."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn

from conformance.cases import CASES, case_id, make_batch, make_model, perturb_adapter
from peft_moextend import CMoEConfig, ModeXConfig, MoExtendConfig, PathWeaveConfig, SMoLAConfig


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_loading_with_low_cpu_mem_usage_gives_the_same_outputs(case, tmp_path):
    family = case.text_family
    model = make_model(family)
    batch = make_batch(model, family)
    peft_model = get_peft_model(model, case.make_config(family, 0))
    perturb_adapter(peft_model, case.prefix)
    with torch.no_grad():
        expected = peft_model(**batch).logits
    peft_model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_model(family), tmp_path, low_cpu_mem_usage=True)
    assert not any(p.device.type == "meta" for p in loaded.parameters())
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, expected)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_unsafe_serialization_still_writes_loadable_safetensors(case, tmp_path):
    family = case.text_family
    model = make_model(family)
    batch = make_batch(model, family)
    peft_model = get_peft_model(model, case.make_config(family, 0))
    perturb_adapter(peft_model, case.prefix)
    with torch.no_grad():
        expected = peft_model(**batch).logits
    with pytest.warns(UserWarning, match="safetensors only"):
        peft_model.save_pretrained(tmp_path, safe_serialization=False)
    assert {p.name for p in tmp_path.iterdir()} >= {"adapter_model.safetensors", "adapter_config.json"}
    assert not (tmp_path / "adapter_model.bin").exists()
    with torch.no_grad():
        assert torch.equal(PeftModel.from_pretrained(make_model(family), tmp_path)(**batch).logits, expected)


class MLP(nn.Module):
    """PEFT's custom-model test MLP: forward takes `X`, neither `input_ids` nor `inputs_embeds`."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.relu = nn.ReLU()
        self.lin1 = nn.Linear(20, 2)

    def forward(self, X):
        return self.lin1(self.relu(self.lin0(X)))


# configs whose layers tell image rows from text rows (MoExtend needs MoE layers, see the last test)
MLP_CONFIGS = {
    "smola": lambda targets: SMoLAConfig(r=2, expert_groups={"text": 2, "image": 2}, target_modules=targets),
    "cmoe": lambda targets: CMoEConfig(r=2, target_modules=targets, tasks=[{"name": "a", "layers": None}]),
    "modex": lambda targets: ModeXConfig(
        experts={"text": ["text"], "visual": ["image"]}, target_modules=targets, train_layer_norms=False
    ),
    "pathweave": lambda targets: PathWeaveConfig(r=2, modalities=["text", "image"], target_modules=targets),
}


@pytest.mark.parametrize("sequential", [False, True], ids=["mlp_X", "sequential"])
@pytest.mark.parametrize("name", sorted(MLP_CONFIGS))
def test_models_without_input_ids_take_explicit_modality_ids(name, sequential):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 2)) if sequential else MLP()
    x = torch.randn(4, 10)

    def call(model, **kwargs):
        return model(x, **kwargs) if sequential else model(X=x, **kwargs)

    with torch.no_grad():
        base_out = call(base)
    peft_model = get_peft_model(base, MLP_CONFIGS[name](["0"] if sequential else ["lin0"]))
    perturb_adapter(peft_model, f"{name}_", scale=0.5)
    peft_model.eval()  # rows compared across calls: no training-time noise (PathWeave's noisy gate)
    image_rows = torch.tensor([[0], [1], [1], [0]])  # (batch, seq=1): one token per row
    with torch.no_grad():
        if name != "cmoe":  # CMoE routes by task, not modality
            with pytest.raises(ValueError, match="modality_ids"):
                call(peft_model)
        mixed = call(peft_model, modality_ids=image_rows)
        as_text = call(peft_model, modality_ids=torch.zeros_like(image_rows))
        as_image = call(peft_model, modality_ids=torch.ones_like(image_rows))
        with peft_model.disable_adapter():
            assert torch.equal(call(peft_model), base_out)
    rows = image_rows[:, 0].bool()
    torch.testing.assert_close(mixed[rows], as_image[rows], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mixed[~rows], as_text[~rows], rtol=1e-5, atol=1e-6)
    if name != "cmoe":
        assert not torch.allclose(as_image, as_text)  # the ids are used, not dropped
    assert not torch.allclose(mixed, base_out)
    peft_model.train()
    loss = call(peft_model, modality_ids=image_rows).sum()
    loss.backward()
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for p in trainable)


def test_moextend_on_a_model_without_moe_layers_says_so():
    with pytest.raises(ValueError, match="has no MoE layer"):
        get_peft_model(MLP(), MoExtendConfig())
