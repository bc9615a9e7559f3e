"""SMoLA on the supported vision-language models: what it adds, trains, saves, and refuses."""

from __future__ import annotations

import pytest
import torch
from helpers import run_python, snapshot, train_steps
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from tiny_vlms import AUDIO_FAMILIES, VLM_FAMILIES, make_tiny_vlm, make_vlm_inputs, vision_tower_prefix

from peft_moextend import SMoLAConfig
from peft_moextend.routing import load_balancing_loss
from peft_moextend.smola import SMoLALayer


def groups_for(family: str) -> dict[str, int]:
    media = "audio" if family in AUDIO_FAMILIES else "image"
    return {"text": 2, media: 3, "multimodal": 2}


def randomize_up_projections(model) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "smola_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(hash(name) % 2**31))


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_starts_as_base_model_and_trains_only_its_parameters(family):
    model = make_tiny_vlm(family)
    batch = make_vlm_inputs(model, family)
    with torch.no_grad():
        expected = model(**batch).logits
    config = SMoLAConfig(r=2, expert_groups=groups_for(family))
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        assert torch.equal(peft_model(**batch).logits, expected)
    layers = [m for m in peft_model.modules() if isinstance(m, SMoLALayer)]
    assert len(layers) == 14 and all(m.tower_modality is None for m in layers)  # 2 x 7 language-model linears
    experts = config.num_experts
    assert peft_model.get_nb_trainable_parameters()[0] == sum(
        experts * config.r * (m.in_features + m.out_features) + experts * m.in_features for m in layers
    )
    before = snapshot(peft_model)
    losses = train_steps(peft_model, batch, steps=3, lr=1e-2)
    after = snapshot(peft_model)
    assert losses[-1] < losses[0]
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed == {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert all(".smola_" in n for n in changed)


def test_vision_tower_linears_can_be_targeted_and_use_the_image_group():
    model = make_tiny_vlm("llava")
    tower = vision_tower_prefix(model)
    config = SMoLAConfig(expert_groups={"text": 2, "image": 2}, target_modules=r".*\.(q_proj|v_proj)$")
    peft_model = get_peft_model(model, config)
    layers = {n: m for n, m in peft_model.named_modules() if isinstance(m, SMoLALayer)}
    tower_layers = {n: m for n, m in layers.items() if f".{tower}." in f".{n.removeprefix('base_model.model.')}"}
    assert tower_layers and len(layers) > len(tower_layers)
    assert all(m.tower_modality == "image" for m in tower_layers.values())
    batch = make_vlm_inputs(model, "llava")
    randomize_up_projections(peft_model)
    with torch.no_grad():
        reference = peft_model(**batch).logits
        for layer in tower_layers.values():  # text experts (0, 1) never act inside the image tower
            layer.smola_B["default"].view(layer.out_features, 4, -1)[:, :2].add_(5.0)
        assert torch.equal(peft_model(**batch).logits, reference)


def test_saves_only_smola_tensors_and_reloads_identically_in_a_fresh_process(tmp_path):
    model = make_tiny_vlm("qwen2_vl")
    batch = make_vlm_inputs(model, "qwen2_vl")
    peft_model = get_peft_model(model, SMoLAConfig(expert_groups=groups_for("qwen2_vl"), router="top_k"))
    train_steps(peft_model, batch, steps=2, lr=1e-2)
    with torch.no_grad():
        expected = peft_model(**batch).logits
    peft_model.save_pretrained(tmp_path / "adapter")
    state = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    trainable = {n.replace(".default", "") for n, p in peft_model.named_parameters() if p.requires_grad}
    assert set(state) == trainable and all(".smola_" in k for k in state)
    torch.save(batch, tmp_path / "batch.pt")
    run_python(
        f"""
        import torch, peft_moextend
        from peft import PeftModel
        from tiny_vlms import make_tiny_vlm
        model = PeftModel.from_pretrained(make_tiny_vlm("qwen2_vl"), "{tmp_path / "adapter"}")
        with torch.no_grad():
            torch.save(model(**torch.load("{tmp_path / "batch.pt"}")).logits, "{tmp_path / "logits.pt"}")
        """
    )
    assert torch.equal(torch.load(tmp_path / "logits.pt"), expected)
    resumed = PeftModel.from_pretrained(make_tiny_vlm("qwen2_vl"), tmp_path / "adapter", is_trainable=True)
    assert {n for n, p in resumed.named_parameters() if p.requires_grad} == {
        n for n, p in peft_model.named_parameters() if p.requires_grad
    }


def test_top_k_router_adds_its_load_balancing_loss():
    model = make_tiny_vlm("llava")
    batch = make_vlm_inputs(model, "llava")
    losses = {}
    for coef in (0.0, 0.5):
        torch.manual_seed(0)
        peft_model = get_peft_model(make_tiny_vlm("llava"), SMoLAConfig(router="top_k", router_aux_loss_coef=coef))
        losses[coef] = peft_model(**batch)
    aux = losses[0.5].router_aux_loss
    assert aux > 0
    torch.testing.assert_close(losses[0.5].loss, losses[0.0].loss + 0.5 * aux)
    soft = get_peft_model(model, SMoLAConfig())(**batch)
    assert "router_aux_loss" not in soft


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("aux_loss_coef", [0.0, 0.5])
def test_top_k_routers_get_gradients_from_the_task_loss_and_from_the_balancing_loss(top_k, aux_loss_coef):
    """Every router gets a gradient, with top-1 too: from the task loss alone (coefficient 0; a top-1 gate is the
    chosen expert's probability, not a renormalised 1) and from the load-balancing loss alone (task loss left out:
    the balancing loss takes the full softmax, not the 0/1 top-1 gates)."""
    torch.manual_seed(0)
    config = SMoLAConfig(
        r=2, expert_groups={"multimodal": 3}, router="top_k", top_k=top_k, router_aux_loss_coef=aux_loss_coef
    )
    peft_model = get_peft_model(make_tiny_vlm("llava"), config)
    for name, parameter in peft_model.named_parameters():
        if "smola_B" in name:
            torch.nn.init.normal_(parameter, std=0.1)  # zero up-projections would give the routers no task gradient
    batch = make_vlm_inputs(peft_model.get_base_model(), "llava")
    output = peft_model(**batch)
    loss = output.loss if aux_loss_coef == 0.0 else output.router_aux_loss
    loss.backward()
    routers = [p for n, p in peft_model.named_parameters() if "smola_router" in n]
    assert routers and all(p.grad is not None and p.grad.abs().sum() > 0 for p in routers)


def test_padding_does_not_count_in_the_load_balancing_loss_and_each_adapter_uses_its_coefficient():
    """SMoLA and MoExtend share one aux-loss mechanism: padding tokens are left out, and with several active
    adapters each routing record is weighted by its own adapter's coefficient."""
    from conformance.cases import make_llama

    input_ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    padded = torch.cat([input_ids, torch.zeros(2, 5, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(2, 12, dtype=torch.long), torch.zeros(2, 5, dtype=torch.long)], dim=1)
    config = {"r": 2, "expert_groups": {"multimodal": 4}, "router": "top_k", "top_k": 1}
    torch.manual_seed(0)
    peft_model = get_peft_model(make_llama(), SMoLAConfig(**config, router_aux_loss_coef=0.5))
    with torch.no_grad():
        trimmed = peft_model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
        with_padding = peft_model(input_ids=padded, attention_mask=mask)
    torch.testing.assert_close(with_padding.router_aux_loss, trimmed.router_aux_loss)

    peft_model.add_adapter("other", SMoLAConfig(**config, router_aux_loss_coef=0.0))
    peft_model.base_model.set_adapter(["default", "other"])
    labels = {"input_ids": input_ids, "labels": input_ids}
    with torch.no_grad():
        both = peft_model(**labels)
        layers = [m for m in peft_model.modules() if getattr(m, "routing_records", None)]
        records = [(r, name) for m in layers for name, r in m.routing_records.items()]
    assert {name for _, name in records} == {"default", "other"}
    assert {name: r.aux_loss_coef for r, name in records} == {"default": 0.5, "other": 0.0}
    per_record = torch.stack([load_balancing_loss(r) for r, _ in records])
    weights = torch.tensor([r.aux_loss_coef for r, _ in records])
    torch.testing.assert_close(both.router_aux_loss, per_record.mean())
    logits = both.logits[:, :-1].reshape(-1, both.logits.shape[-1])
    lm_loss = torch.nn.functional.cross_entropy(logits, input_ids[:, 1:].reshape(-1))
    torch.testing.assert_close(both.loss, lm_loss + (per_record * weights).mean())
    assert (per_record * weights).sum() > 0


def test_merge_is_refused_with_the_reason():
    peft_model = get_peft_model(make_tiny_vlm("llava"), SMoLAConfig())
    with pytest.raises(ValueError, match="depend on each token"):
        peft_model.merge_and_unload()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"expert_groups": {"text": 2, "smell": 2}}, r"`expert_groups` contains unknown modalities \['smell'\]"),
        ({"expert_groups": {"text": 2, "image": 0}}, "at least one expert"),
        ({"expert_groups": {}}, "non-empty"),
        ({"router": "top_k", "top_k": 3, "expert_groups": {"text": 2, "image": 4}}, "smallest group"),
        ({"r": 0}, "positive integer"),
        ({"router": "hard"}, "router"),
        ({"router_temperature": 0}, "router_temperature"),
        ({"router_temperature": 1e-40}, "overflow"),
        ({"dropout": 1.0}, "dropout"),
    ],
)
def test_invalid_options_are_rejected_at_construction(options, message):
    with pytest.raises(ValueError, match=message):
        SMoLAConfig(**options)


def test_targets_that_match_nothing_or_no_linear_are_reported():
    with pytest.raises(ValueError, match="not found in the base model"):
        get_peft_model(make_tiny_vlm("llava"), SMoLAConfig(target_modules=["no_such_module"]))
    with pytest.raises(ValueError, match=r"adapts linear layers.*Embedding"):
        get_peft_model(make_tiny_vlm("llava"), SMoLAConfig(target_modules=["embed_tokens"]))
