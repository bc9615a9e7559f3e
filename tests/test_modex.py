"""ModeX: serial modality-expert adapters with a temperature coordinator, and trainable norm affines."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from tiny_vlms import make_tiny_vlm, make_vlm_inputs

from peft_moextend import ModeXConfig
from peft_moextend.modex import ModeXLayer, ModeXNormLayer


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "gemma3", "internvl"])
def test_starts_as_the_base_model(family):
    model = make_tiny_vlm(family)
    batch = make_vlm_inputs(model, family)
    with torch.no_grad():
        expected = model(**batch).logits
    peft_model = get_peft_model(model, ModeXConfig())
    layers = [m for m in peft_model.modules() if isinstance(m, ModeXLayer)]
    norms = [m for m in peft_model.modules() if isinstance(m, ModeXNormLayer)]
    assert len(layers) == 4  # o_proj and down_proj of both decoder layers
    assert len(norms) >= 5 and all(type(n.base_layer).__name__.endswith("Norm") for n in norms)  # + final norm
    with torch.no_grad():
        assert torch.equal(peft_model(**batch).logits, expected)


def test_layer_matches_the_formula_and_respects_modalities():
    model = make_tiny_vlm("llava")
    config = ModeXConfig(bottleneck_size=4)
    peft_model = get_peft_model(model, config)
    layer = next(m for m in peft_model.modules() if isinstance(m, ModeXLayer))
    with torch.no_grad():
        for p in (layer.modex_up["default"], layer.modex_router["default"]):
            p.normal_()
    context = layer.call_inputs
    x = torch.randn(1, 5, layer.in_features)
    context.modality_ids, context.markable = torch.tensor([[0, 1, 1, 0, 0]]), frozenset({"text", "image"})
    with torch.no_grad():
        got = layer(x)
        y = layer.base_layer(x).reshape(5, -1)
        hidden = torch.relu(y @ layer.modex_down["default"].T)
        up = layer.modex_up["default"].view(-1, 3, 4)  # experts in name order: cross_modal, text, visual
        allowed = torch.tensor([[1, 1, 0], [1, 0, 1], [1, 0, 1], [1, 1, 0], [1, 1, 0]], dtype=torch.bool)
        router = y @ layer.modex_router["default"].T + layer.modex_router_bias["default"]
        logits = (router / 10.0).masked_fill(~allowed, float("-inf"))
        weights = torch.softmax(logits, -1)
        expected = y + sum(weights[:, e : e + 1] * (hidden @ up[:, e].T) for e in range(3))
    torch.testing.assert_close(got.reshape(5, -1), expected, rtol=1e-5, atol=1e-6)


def test_only_modex_tensors_and_norm_affines_train():
    model = make_tiny_vlm("llava")
    peft_model = get_peft_model(model, ModeXConfig())
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all(".modex_" in n for n in trainable)
    assert any("modex_norm_scale" in n for n in trainable)
    off = get_peft_model(make_tiny_vlm("llava"), ModeXConfig(train_layer_norms=False))
    assert not any("modex_norm" in n for n, _ in off.named_parameters())


def test_bad_input():
    with pytest.raises(ValueError, match="unknown modalities"):
        ModeXConfig(experts={"visual": ["pixels"]})
    with pytest.raises(ValueError, match="acts on no modality"):
        ModeXConfig(experts={"visual": []})
    with pytest.raises(ValueError, match="bottleneck_size"):
        ModeXConfig(bottleneck_size=0)


def test_the_coordinator_learns_and_the_experts_diverge():
    """A zero router would keep the zero-initialised experts identical forever and the router's gradient at zero."""
    from conformance.cases import make_llama
    from helpers import snapshot, train_steps

    peft_model = get_peft_model(make_llama(), ModeXConfig(experts={"text": ["text"], "cross_modal": None}))
    input_ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    before = snapshot(peft_model)
    train_steps(peft_model, {"input_ids": input_ids, "labels": input_ids}, steps=20, lr=1e-2)
    for name, p in peft_model.named_parameters():
        if "modex_router" in name:
            assert not torch.equal(p, before[name]), name
        if "modex_up" in name:
            first, second = p.view(p.shape[0], 2, -1).unbind(1)  # experts in name order: cross_modal, text
            assert not torch.allclose(first, second, atol=1e-4), name


def test_an_explicitly_targeted_layer_norm_gets_a_norm_layer_with_features():
    model = make_tiny_vlm("llava")
    peft_model = get_peft_model(
        model,
        ModeXConfig(target_modules=r".*language_model\.layers\.0\.(post_attention_layernorm|self_attn\.o_proj)"),
    )
    norm = next(m for m in peft_model.modules() if isinstance(m, ModeXNormLayer))
    assert norm.in_features == norm.out_features == model.config.text_config.hidden_size
