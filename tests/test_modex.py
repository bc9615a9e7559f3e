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


def random_modex_layer(routing: str) -> tuple[ModeXLayer, torch.Tensor]:
    """The first ModeX layer of a tiny LLaVA (bottleneck 4, three experts) with random experts and coordinator, and
    an input `(1, 5, i)` whose tokens 1 and 2 are image tokens (set on the layer's call inputs)."""
    peft_model = get_peft_model(make_tiny_vlm("llava"), ModeXConfig(bottleneck_size=4, routing=routing))
    layer = next(m for m in peft_model.modules() if isinstance(m, ModeXLayer))
    with torch.no_grad():
        for p in (layer.modex_up["default"], layer.modex_router["default"]):
            p.normal_()
    x = torch.randn(1, 5, layer.in_features)
    layer.call_inputs.modality_ids = torch.tensor([[0, 1, 1, 0, 0]])
    layer.call_inputs.markable = frozenset({"text", "image"})
    return layer, x


def reference_modex_output(
    layer: ModeXLayer, x: torch.Tensor, allowed: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ModeX formula by hand: `(5, o)` output and `(5, 3)` coordinator weights, with the `(5, 3)` bool mask of
    the experts each token may use (None: every expert, no mask)."""
    y = layer.base_layer(x).reshape(5, -1)
    hidden = torch.relu(y @ layer.modex_down["default"].T)
    up = layer.modex_up["default"].view(-1, 3, 4)  # experts in name order: cross_modal, text, visual
    logits = (y @ layer.modex_router["default"].T + layer.modex_router_bias["default"]) / 10.0
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    weights = torch.softmax(logits, -1)
    return y + sum(weights[:, e : e + 1] * (hidden @ up[:, e].T) for e in range(3)), weights


def test_layer_matches_the_formula_and_respects_modalities():
    layer, x = random_modex_layer("modality_masks")
    allowed = torch.tensor([[1, 1, 0], [1, 0, 1], [1, 0, 1], [1, 1, 0], [1, 1, 0]], dtype=torch.bool)
    with torch.no_grad():
        got = layer(x)
        expected, _ = reference_modex_output(layer, x, allowed)
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


def _text_only_gradients(routing: str) -> dict[str, torch.Tensor]:
    """Gradient of every `modex_up` after one text-only batch (no image token) of a tiny LLaVA, per layer name."""
    model = make_tiny_vlm("llava")
    peft_model = get_peft_model(model, ModeXConfig(bottleneck_size=4, routing=routing))
    batch = make_vlm_inputs(model, "llava", with_media=False)
    peft_model.train()
    peft_model(**batch).loss.backward()
    return {n: p.grad for n, p in peft_model.named_parameters() if "modex_up" in n}


def test_paper_routing_trains_every_expert_on_text_tokens():
    """Experts in name order: cross_modal, text, visual. With modality masks the visual expert never sees a text
    token, so a text-only batch leaves it without gradient; with the reference's routing every expert gets one."""
    assert ModeXConfig().routing == "modality_masks"
    masked, paper = _text_only_gradients("modality_masks"), _text_only_gradients("paper")
    assert masked.keys() == paper.keys() and len(paper) == 4
    for name in paper:
        masked_by_expert = masked[name].view(masked[name].shape[0], 3, 4).unbind(1)
        paper_by_expert = paper[name].view(paper[name].shape[0], 3, 4).unbind(1)
        assert all(g.abs().sum() > 0 for g in masked_by_expert[:2]), name
        assert torch.equal(masked_by_expert[2], torch.zeros_like(masked_by_expert[2])), name
        assert all(g.abs().sum() > 0 for g in paper_by_expert), name


def test_paper_routing_mixes_every_expert_on_every_token():
    layer, x = random_modex_layer("paper")
    with torch.no_grad():
        got = layer(x).reshape(5, -1)
        expected, weights = reference_modex_output(layer, x, allowed=None)  # image and text tokens alike
        layer.modex_settings["default"].uses_masks = True  # the same tensors under modality masks
        masked = layer(x).reshape(5, -1)
    assert bool((weights > 0).all())
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(masked, got, atol=1e-4)


TOWER_AND_LM = r".*(vision_tower\.encoder\.layers\.0\.mlp\.fc2|language_model\.layers\.0\.self_attn\.o_proj)"


def test_paper_routing_gives_tower_layers_a_single_expert_adapter():
    model = make_tiny_vlm("llava")
    peft_model = get_peft_model(model, ModeXConfig(bottleneck_size=4, routing="paper", target_modules=TOWER_AND_LM))
    tower, language = (
        next(m for m in peft_model.modules() if isinstance(m, ModeXLayer) and part in m.module_name)
        for part in ("vision_tower", "language_model")
    )
    assert "default" not in tower.modex_router and "default" not in tower.modex_router_bias
    assert tower.modex_up["default"].shape == (tower.out_features, 4)
    assert language.modex_up["default"].shape == (language.out_features, 12) and "default" in language.modex_router
    with torch.no_grad():
        tower.modex_up["default"].normal_()
        x = torch.randn(2, 3, tower.in_features)
        y = tower.base_layer(x)
        expected = y + torch.relu(y @ tower.modex_down["default"].T) @ tower.modex_up["default"].T
        torch.testing.assert_close(tower(x), expected, rtol=1e-5, atol=1e-6)
    masked = get_peft_model(make_tiny_vlm("llava"), ModeXConfig(bottleneck_size=4, target_modules=TOWER_AND_LM))
    masked_tower = next(m for m in masked.modules() if isinstance(m, ModeXLayer) and "vision_tower" in m.module_name)
    assert masked_tower.modex_up["default"].shape == (masked_tower.out_features, 12)
    assert "default" in masked_tower.modex_router


def test_paper_routing_saves_and_reloads_exactly(tmp_path):
    from conformance.cases import perturb_adapter
    from peft import PeftConfig, PeftModel

    model = make_tiny_vlm("llava")
    batch = make_vlm_inputs(model, "llava")
    peft_model = get_peft_model(model, ModeXConfig(bottleneck_size=4, routing="paper", target_modules=TOWER_AND_LM))
    perturb_adapter(peft_model, "modex_", scale=0.5)
    with torch.no_grad():
        expected = peft_model(**batch).logits
        with peft_model.disable_adapter():
            assert not torch.allclose(peft_model(**batch).logits, expected, atol=1e-4)
    peft_model.save_pretrained(tmp_path)
    assert PeftConfig.from_pretrained(tmp_path).routing == "paper"
    loaded = PeftModel.from_pretrained(make_tiny_vlm("llava"), tmp_path)
    assert loaded.peft_config["default"].routing == "paper"
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, expected)


def test_bad_routing_names_the_allowed_values():
    with pytest.raises(ValueError, match=r"`routing` must be one of \('modality_masks', 'paper'\), got 'dense'"):
        ModeXConfig(routing="dense")


def test_paper_routing_needs_no_modality_ids():
    """The expert modalities are not used: a text model runs without `modality_ids`, and any ids give the same
    outputs; with modality masks the visual expert needs them."""
    from conformance.cases import make_llama, perturb_adapter

    input_ids = torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    paper = get_peft_model(make_llama(), ModeXConfig(routing="paper"))
    perturb_adapter(paper, "modex_", scale=0.5)
    with torch.no_grad():
        unmarked = paper(input_ids=input_ids).logits
        marked = paper(input_ids=input_ids, modality_ids=(input_ids % 2)).logits
        with paper.disable_adapter():
            assert not torch.allclose(paper(input_ids=input_ids).logits, unmarked, atol=1e-4)
    assert torch.equal(unmarked, marked)
    masked = get_peft_model(make_llama(), ModeXConfig())
    with pytest.raises(ValueError, match=r"needs to tell \['image'\].*modality_ids"):
        masked(input_ids=input_ids)
