"""MoExtend on every supported MoE family: what it adds, what it computes, what trains."""

from __future__ import annotations

import pytest
import torch
from conformance.cases import perturb_adapter
from helpers import snapshot, train_steps
from peft import get_peft_model
from tiny_models import EXPERTS_IMPLEMENTATION_FAMILIES, MOE_FAMILIES, VISION_FAMILIES, make_inputs, make_tiny_moe

from peft_moextend import MoExtendConfig
from peft_moextend.compat import known_upstream_break
from peft_moextend.modality import modality_token_ids
from peft_moextend.moe_families import hidden_size_of, moe_blocks
from peft_moextend.moextend import MoExtendLayer

NUM_EXPERTS = 4


def extended(family: str, seed: int = 0, **config) -> torch.nn.Module:
    model = make_tiny_moe(family, seed=seed)
    torch.manual_seed(seed)
    return get_peft_model(model, MoExtendConfig(**config))


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_adds_exactly_the_new_parameters_and_only_they_get_gradients(family):
    model = extended(family, num_new_experts=2)
    base = model.get_base_model()
    layers = [m for m in base.modules() if isinstance(m, MoExtendLayer)]
    assert len(layers) == 2
    expected = {}
    for layer in layers:
        experts = layer.base_layer.experts
        router = layer.family.router(layer.base_layer)
        expected[layer.layer_index] = (
            2 * experts.gate_up_proj[0].numel()
            + 2 * experts.down_proj[0].numel()
            + 2 * router.weight.shape[1]
            + 2 * (NUM_EXPERTS + 2) * 16  # calibration MLP, no biases
        )
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == sum(expected.values())
    trainable_names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable_names and all(".moextend_" in n for n in trainable_names)

    batch = make_inputs(base, family)
    model.train()
    model(**batch).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == trainable_names
    # the calibration's first layer sits behind a zero-initialised output layer (like LoRA's A): zero at step one
    nonzero = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert nonzero == {n for n in trainable_names if "calibration_in" not in n}


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_training_changes_only_added_parameters(family):
    model = extended(family)
    batch = make_inputs(model.get_base_model(), family)
    before = snapshot(model)
    losses = train_steps(model, batch, steps=4)
    after = snapshot(model)
    assert losses[-1] < losses[0]
    for name, value in before.items():
        if ".moextend_" in name:
            if "calibration_in" not in name:  # behind a zero-initialised layer, may not move in 4 steps
                assert not torch.equal(value, after[name]), f"{name} did not train"
        else:
            assert torch.equal(value, after[name]), f"base parameter {name} changed"


def _reference_model_with_duplicated_experts(family: str, num_new: int, source: int):
    """A plain transformers model with E + num_new experts whose extra experts/router rows copy expert `source`."""
    base = make_tiny_moe(family)
    config = base.config.__class__.from_dict(base.config.to_dict())
    attribute = "num_local_experts" if hasattr(config, "num_local_experts") else "num_experts"
    setattr(config, attribute, NUM_EXPERTS + num_new)
    reference = type(base)._from_config(config, attn_implementation="eager", dtype=torch.float32).eval()
    state = base.state_dict()
    for key, value in list(state.items()):
        if key.endswith(("experts.gate_up_proj", "experts.down_proj", "mlp.gate.weight")):
            state[key] = torch.cat([value, value[source : source + 1].repeat(num_new, *[1] * (value.dim() - 1))])
    reference.load_state_dict(state)
    return base, reference


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"])
@pytest.mark.parametrize("source", [0, 2])
def test_initial_model_equals_base_with_duplicated_source_expert(family, source):
    """At init the new experts are clones of the source expert with identical router rows and the calibration is
    the identity: the model computes exactly what an MoE with E + k experts, the extra ones copies, computes."""
    base, reference = _reference_model_with_duplicated_experts(family, num_new=2, source=source)
    batch = make_inputs(base, family)
    model = get_peft_model(base, MoExtendConfig(num_new_experts=2, expert_init=source))
    with torch.no_grad():
        expected = reference(**batch).logits
        got = model(**batch).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # and it is not the base model: the duplicated expert changes the routing weights
    with torch.no_grad(), model.disable_adapter():
        assert not torch.allclose(model(**batch).logits, expected, atol=1e-4)


@pytest.mark.parametrize("family", EXPERTS_IMPLEMENTATION_FAMILIES)
def test_eager_and_grouped_mm_experts_agree(family):
    """New experts must never reach the base kernel as indices >= E (grouped_mm would compute garbage)."""
    logits = []
    for implementation in ("eager", "grouped_mm"):
        model = make_tiny_moe(family, experts_implementation=implementation)
        torch.manual_seed(0)
        peft_model = get_peft_model(model, MoExtendConfig(num_new_experts=2))
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "moextend_gate_up_proj" in name or "moextend_down_proj" in name:
                    p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
        batch = make_inputs(model, family)
        with torch.no_grad():
            logits.append(peft_model(**batch).logits)
        routed_new = sum(
            int(m.routing_records["default"].dispatch_mask[:, NUM_EXPERTS:].sum())
            for m in model.modules()
            if isinstance(m, MoExtendLayer)
        )
        assert routed_new > 0
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_disable_adapter_gives_base_outputs_exactly(family):
    model = make_tiny_moe(family)
    batch = make_inputs(model, family)
    with torch.no_grad():
        expected = model(**batch).logits
    peft_model = get_peft_model(model, MoExtendConfig())
    with torch.no_grad(), peft_model.disable_adapter():
        assert torch.equal(peft_model(**batch).logits, expected)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_aux_loss_is_added_to_loss_with_its_coefficient(family):
    batch = make_inputs(make_tiny_moe(family), family)
    outputs = {}
    for coef in (0.0, 0.5):
        model = extended(family, router_aux_loss_coef=coef)
        outputs[coef] = model(**batch)
    aux = outputs[0.5].router_aux_loss
    assert aux > 0 and torch.allclose(outputs[0.0].router_aux_loss, aux)
    torch.testing.assert_close(outputs[0.5].loss, outputs[0.0].loss + 0.5 * aux)
    # without labels nothing is added, but the aux loss is still reported
    unlabeled = {k: v for k, v in batch.items() if k != "labels"}
    model = extended(family, router_aux_loss_coef=0.5)
    out = model(**unlabeled)
    assert out.loss is None and out.router_aux_loss > 0


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_models_own_router_logits_path_still_works(family):
    model = extended(family)
    batch = make_inputs(model.get_base_model(), family)
    if known_upstream_break(model.get_base_model(), {"output_router_logits": True}):
        with pytest.raises(RuntimeError, match="breaks .* upstream"):  # this transformers breaks the call itself
            model(**batch, output_router_logits=True)
        return
    out = model(**batch, output_router_logits=True)
    assert torch.isfinite(out.loss)
    if family == "llava_mixtral":  # LlavaCausalLMOutputWithPast has no router_logits field
        assert getattr(out, "router_logits", None) is None
        return
    # the model's own records cover its E base experts, one per MoE layer
    assert len(out.router_logits) == 2
    assert all(r.shape[-1] == NUM_EXPERTS and r.isfinite().all() for r in out.router_logits)


@pytest.mark.parametrize("family", VISION_FAMILIES)
def test_restricted_to_images_text_only_inputs_are_exactly_base(family):
    model = make_tiny_moe(family)
    text_batch = make_inputs(model, family, with_image=False)
    image_batch = make_inputs(model, family, with_image=True)
    with torch.no_grad():
        text_expected = model(**text_batch).logits
        image_base = model(**image_batch).logits
    peft_model = get_peft_model(model, MoExtendConfig(restrict_to_modalities=["image"]))
    train_steps(peft_model, image_batch, steps=3)  # calibration and new experts move away from init
    with torch.no_grad():
        assert torch.equal(peft_model(**text_batch).logits, text_expected)
        image_logits = peft_model(**image_batch).logits
    first_image = int((image_batch["input_ids"][0] == model.config.image_token_id).nonzero()[0])
    # text before the first image token is computed exactly as by the base model; the image changes what follows
    assert torch.equal(image_logits[:, :first_image], image_base[:, :first_image])
    assert not torch.allclose(image_logits[:, first_image:], image_base[:, first_image:], atol=1e-4)


def test_explicit_modality_ids_mark_tokens_where_the_model_has_no_placeholder_ids():
    family = "mixtral"
    model = make_tiny_moe(family)
    batch = make_inputs(model, family)
    with torch.no_grad():
        expected = model(**batch).logits
    peft_model = get_peft_model(model, MoExtendConfig(restrict_to_modalities=["image"]))
    with torch.no_grad():
        text_ids = torch.zeros_like(batch["input_ids"])
        assert torch.equal(peft_model(**batch, modality_ids=text_ids).logits, expected)
        image_ids = torch.ones_like(batch["input_ids"])
        assert not torch.allclose(peft_model(**batch, modality_ids=image_ids).logits, expected, atol=1e-4)
        # a text-only model cannot mark image tokens by itself: the user is told to pass modality_ids
        with pytest.raises(ValueError, match=r"no placeholder token id.*image_token_id.*modality_ids"):
            peft_model(**batch)


def test_restricted_adapter_without_modality_information_raises():
    model = make_tiny_moe("llava_mixtral")
    batch = make_inputs(model, "llava_mixtral")
    peft_model = get_peft_model(model, MoExtendConfig(restrict_to_modalities=["image"]))
    embeds = model.get_input_embeddings()(batch["input_ids"])
    with pytest.raises(ValueError, match="modality_ids"):
        peft_model(inputs_embeds=embeds, attention_mask=batch["attention_mask"])


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_cached_generation_equals_uncached_on_every_family(family):
    model = extended(family, restrict_to_modalities=["image"] if family in VISION_FAMILIES else None)
    perturb_adapter(model, "moextend_", scale=0.3)
    batch = make_inputs(model.get_base_model(), family)
    batch.pop("labels")
    settings = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False}
    settings["suppress_tokens"] = list(modality_token_ids(model.config).values()) or None
    with torch.no_grad():
        cached, uncached = (model.generate(**batch, **settings, use_cache=use_cache) for use_cache in (True, False))
    assert cached.shape[1] == batch["input_ids"].shape[1] + 4
    assert torch.equal(cached, uncached)


def test_only_routed_tokens_reach_new_experts():
    from peft_moextend.experts import FullExperts, added_experts_forward, grouped_expert_forward

    torch.manual_seed(0)
    hidden = torch.randn(7, 8)
    gate_up, down = torch.randn(3, 12, 8), torch.randn(3, 8, 6)

    def gate(x):
        g, u = x.chunk(2, dim=-1)
        return torch.nn.functional.silu(g) * u

    index = torch.tensor([2, 0, 1, 2, 2, 0, 1])
    rows = grouped_expert_forward(hidden, index, FullExperts(gate_up, down), gate)
    naive = torch.stack([gate(hidden[r] @ gate_up[e].T) @ down[e].T for r, e in enumerate(index.tolist())])
    torch.testing.assert_close(rows, naive)
    # the transposed layout (Llama 4) computes the same
    transposed = FullExperts(gate_up.transpose(1, 2).contiguous(), down.transpose(1, 2).contiguous(), True)
    torch.testing.assert_close(grouped_expert_forward(hidden, index, transposed, gate), naive)

    top_k_index = torch.tensor([[0, 4], [1, 2], [5, 6], [3, 0], [4, 4], [1, 3], [6, 0]])
    top_k_weights = torch.rand(7, 2)
    out = added_experts_forward(hidden, top_k_index, top_k_weights, 4, FullExperts(gate_up, down), gate)
    assert torch.equal(out[[1, 3, 5]], torch.zeros(3, 8))  # tokens that chose no new expert get exactly zero
    expected = torch.zeros(7, 8)
    for t in range(7):
        for slot in range(2):
            e = int(top_k_index[t, slot])
            if e >= 4:
                expected[t] += top_k_weights[t, slot] * (gate(hidden[t] @ gate_up[e - 4].T) @ down[e - 4].T)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("transposed", [False, True], ids=["standard", "transposed"])
def test_low_rank_experts_are_the_source_expert_plus_their_deltas(transposed):
    from peft_moextend.experts import LowRankExperts, grouped_expert_forward

    torch.manual_seed(0)
    hidden, source_gate_up, source_down = torch.randn(9, 8), torch.randn(12, 8), torch.randn(8, 6)
    deltas = [torch.randn(3, 2, 8), torch.randn(3, 12, 2), torch.randn(3, 2, 6), torch.randn(3, 8, 2)]

    def gate(x):
        g, u = x.chunk(2, dim=-1)
        return torch.nn.functional.silu(g) * u

    layout = (
        (source_gate_up.T.contiguous(), source_down.T.contiguous()) if transposed else (source_gate_up, source_down)
    )
    experts = LowRankExperts(*layout, *deltas, is_transposed=transposed)
    index = torch.tensor([2, 0, 1, 2, 2, 0, 1, 1, 0])
    gate_up_a, gate_up_b, down_a, down_b = deltas
    naive = torch.stack(
        [
            gate(hidden[r] @ (source_gate_up + gate_up_b[e] @ gate_up_a[e]).T) @ (source_down + down_b[e] @ down_a[e]).T
            for r, e in enumerate(index.tolist())
        ]
    )
    torch.testing.assert_close(grouped_expert_forward(hidden, index, experts, gate), naive, rtol=1e-4, atol=1e-4)


def test_zeros_init_outputs_zero_from_new_experts_and_still_trains():
    model = extended("mixtral", expert_init="zeros")
    for name, p in model.named_parameters():
        if "moextend_down_proj" in name:
            assert torch.equal(p, torch.zeros_like(p))
    batch = make_inputs(model.get_base_model(), "mixtral")
    before = snapshot(model)
    train_steps(model, batch, steps=2)
    after = snapshot(model)
    assert any(not torch.equal(before[n], after[n]) for n in before if "moextend_gate_up_proj" in n)
    assert any(not torch.equal(before[n], after[n]) for n in before if "moextend_down_proj" in n)


def test_target_layers_extend_only_those_layers():
    model = extended("qwen2_moe", target_layers=[1])
    layers = [m for m in model.modules() if isinstance(m, MoExtendLayer)]
    assert [layer.layer_index for layer in layers] == [1]
    assert model.peft_config["default"].num_base_experts == NUM_EXPERTS


def test_merge_into_existing_weights_is_refused_and_points_to_the_export():
    model = extended("mixtral")
    with pytest.raises(ValueError, match=r"cannot be merged.*`merge_and_unload\(\)` instead exports"):
        model.merge_adapter()
    with pytest.raises(ValueError, match=r"cannot export .*calibration=True"):  # the paper's default calibration
        model.merge_and_unload()


def test_unload_restores_the_base_blocks():
    base = make_tiny_moe("qwen2_moe")
    batch = make_inputs(base, "qwen2_moe")
    with torch.no_grad():
        expected = base(**batch).logits
    unloaded = get_peft_model(base, MoExtendConfig()).unload()
    assert not any(isinstance(m, MoExtendLayer) for m in unloaded.modules())
    with torch.no_grad():
        assert torch.equal(unloaded(**batch).logits, expected)


def test_moe_blocks_name_a_wrapped_block_by_its_wrapper_and_a_second_adapter_finds_the_same_layers():
    base = make_tiny_moe("qwen2_moe")
    before = moe_blocks(base)
    model = get_peft_model(base, MoExtendConfig(target_layers=[1]))
    after = moe_blocks(model.get_base_model())
    assert [b.name for b in after] == [b.name for b in before]  # never `...base_layer`
    assert [b.layer_index for b in after] == [b.layer_index for b in before] == [0, 1]
    assert [b.block for b in after] == [b.block for b in before]
    assert [type(b.module) for b in after] == [type(before[0].block), MoExtendLayer]
    assert after[1].module.base_layer is after[1].block
    assert all(b.family is not None and b.family.name == "qwen2_moe" for b in after)
    model.add_adapter("second", MoExtendConfig(target_layers=[0]))
    layers = {layer.layer_index: layer for layer in model.modules() if isinstance(layer, MoExtendLayer)}
    assert sorted(layers) == [0, 1]
    assert layers[0].extends("second") and not layers[0].extends("default")
    assert layers[1].extends("default") and not layers[1].extends("second")


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_router_output_accessors_agree_with_the_families_routing(family):
    """`route`, a hook's view of the router output (`read_router_output`, `router_logits`) and `top_k_index` on the
    logits pick the same experts with the same logits: the output layout is read in one place."""
    model = make_tiny_moe(family)
    moe_block = moe_blocks(model)[0]
    block, family_spec = moe_block.block, moe_block.family
    hidden = torch.randn(5, hidden_size_of(block.experts))
    with torch.no_grad():
        output = family_spec.router(block)(hidden)
        logits, weights, index = family_spec.route(block, hidden)
    read_logits, read_weights, read_index = family_spec.read_router_output(block, output)
    assert torch.equal(read_logits, logits) and torch.equal(read_weights, weights) and torch.equal(read_index, index)
    assert torch.equal(family_spec.router_logits(output), logits)
    assert logits.shape == (5, NUM_EXPERTS) and index.shape == (5, family_spec.top_k(block))
    chosen = family_spec.top_k_index(logits, family_spec.top_k(block))
    assert torch.equal(chosen.sort(dim=-1).values, index.sort(dim=-1).values)
