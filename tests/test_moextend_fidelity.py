"""MoExtend against its paper and reference code (zhongshsh/MoExtend): where we follow it, the options that give its
choice where our default differs, and the honest default source expert."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import torch.nn.functional as F
from conformance.cases import perturb_adapter
from peft import PeftModel, get_peft_model
from tiny_models import make_inputs, make_tiny_moe

from peft_moextend import MoExtendConfig, measure_expert_usage, tune_routers_and_plan
from peft_moextend.moe_families import family_of, find_moe_blocks
from peft_moextend.moextend import MoExtendLayer

NUM_EXPERTS = 4


def moe_layers(model) -> list[MoExtendLayer]:
    return [m for m in model.modules() if isinstance(m, MoExtendLayer)]


# -- 1. the default source expert says what it copies ----------------------------------------------------------------
def test_default_copies_expert_0_says_so_and_data_replaces_it(caplog):
    model = make_tiny_moe("mixtral")
    config = MoExtendConfig()
    assert config.expert_init == "expert_0_until_measured"
    with caplog.at_level(logging.WARNING, logger="peft_moextend"):
        peft_model = get_peft_model(model, config)
    assert "start as copies of expert 0" in caplog.text and "init_new_experts_from_data" in caplog.text
    for layer in moe_layers(peft_model):
        torch.testing.assert_close(
            layer.moextend_gate_up_proj["default"][0], layer.base_layer.experts.gate_up_proj[0], rtol=0, atol=0
        )
    data = [make_inputs(model, "mixtral", seed=i) for i in range(2)]
    with peft_model.disable_adapter():
        usage = measure_expert_usage(peft_model.get_base_model(), data)
    sources = peft_model.base_model.init_new_experts_from_data(data)
    assert sources == {i: int(u.argmax()) for i, u in usage.items()}
    assert peft_model.peft_config["default"].expert_init == sources
    for layer in moe_layers(peft_model):
        source = layer.base_layer.experts.gate_up_proj[sources[layer.layer_index]]
        assert torch.equal(layer.moextend_gate_up_proj["default"][0], source)


def test_explicit_source_experts_log_nothing(caplog):
    with caplog.at_level(logging.WARNING, logger="peft_moextend"):
        get_peft_model(make_tiny_moe("mixtral"), MoExtendConfig(expert_init={0: 1, 1: 3}))
    assert "copies of expert 0" not in caplog.text


def test_old_most_used_value_is_accepted_means_the_same_and_warns(tmp_path):
    with pytest.warns(FutureWarning, match=r"expert_init='most_used'.*deprecated.*expert_0_until_measured"):
        config = MoExtendConfig(expert_init="most_used")
    assert config.expert_init == "expert_0_until_measured"
    # an adapter saved by an earlier version: low-rank new experts apply their deltas to the source expert, so the
    # source recorded in the config decides the outputs
    model = make_tiny_moe("mixtral")
    batch = make_inputs(model, "mixtral")
    peft_model = get_peft_model(model, MoExtendConfig(new_expert_rank=2))
    perturb_adapter(peft_model, "moextend_")
    with torch.no_grad():
        expected = peft_model(**batch).logits
    peft_model.save_pretrained(tmp_path)
    config_file = tmp_path / "adapter_config.json"
    saved = json.loads(config_file.read_text())
    assert saved["expert_init"] == "expert_0_until_measured"
    config_file.write_text(json.dumps({**saved, "expert_init": "most_used"}))
    with pytest.warns(FutureWarning, match="most_used"):
        loaded = PeftModel.from_pretrained(make_tiny_moe("mixtral"), tmp_path)
    assert loaded.peft_config["default"].expert_init == "expert_0_until_measured"
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, expected)


# -- 2. usage counts only the tokens the new experts serve ----------------------------------------------------------
def hand_usage(model, batch: dict, counted: torch.Tensor) -> dict[int, torch.Tensor]:
    """Top-2 counts per MoE layer over the `counted` `(b*s,)` tokens, from router logits captured by hooks."""
    logits = {}
    handles = [
        block.gate.register_forward_hook(lambda m, a, out, i=i: logits.__setitem__(i, out[0]))
        for i, (_, block) in enumerate(find_moe_blocks(model))
    ]
    with torch.no_grad():
        model(**{k: v for k, v in batch.items() if k not in ("labels", "modality_ids")})
    for handle in handles:
        handle.remove()
    usage = {}
    for i, layer_logits in logits.items():
        chosen = layer_logits.softmax(-1).topk(2).indices[counted]
        counts = torch.bincount(chosen.flatten(), minlength=NUM_EXPERTS).float()
        usage[i] = counts / counts.sum()
    return usage


def test_restricted_usage_counts_only_image_tokens_that_are_not_padding():
    model = make_tiny_moe("llava_mixtral")
    batch = make_inputs(model, "llava_mixtral")
    batch["attention_mask"][1, -3:] = 0
    is_image = batch["input_ids"] == model.config.image_token_id
    batch["attention_mask"][0, is_image[0].nonzero()[-1]] = 0  # one padded image token
    counted = (is_image & batch["attention_mask"].bool()).reshape(-1)
    restricted = measure_expert_usage(model, [batch], restrict_to_modalities=["image"])
    expected = hand_usage(model, batch, counted)
    for layer in expected:
        torch.testing.assert_close(restricted[layer], expected[layer], rtol=0, atol=0)
    everything = measure_expert_usage(model, [batch])
    assert any(not torch.equal(restricted[i], everything[i]) for i in everything)


def test_restricted_usage_reads_explicit_modality_ids_and_feeds_the_source_experts():
    model = make_tiny_moe("mixtral")  # a text model: no image placeholder, tokens are marked explicitly
    batches = [make_inputs(model, "mixtral", seed=i) for i in range(2)]
    for i, batch in enumerate(batches):
        marks = torch.zeros_like(batch["input_ids"])
        marks[:, 2 + i : 9 + i] = 1  # image
        batch["modality_ids"] = marks
    counted = [(b["modality_ids"] == 1).reshape(-1) for b in batches]
    by_batch = [hand_usage(model, b, c) for b, c in zip(batches, counted)]
    expected = {layer: (by_batch[0][layer] + by_batch[1][layer]) / 2 for layer in by_batch[0]}  # same token count
    usage = measure_expert_usage(model, batches, restrict_to_modalities=["image"])
    for layer in expected:
        torch.testing.assert_close(usage[layer], expected[layer])

    peft_model = get_peft_model(model, MoExtendConfig(restrict_to_modalities=["image"]))
    sources = peft_model.base_model.init_new_experts_from_data(batches)
    assert sources == {layer: int(u.argmax()) for layer, u in usage.items()}


def test_restricted_usage_without_a_way_to_mark_tokens_or_without_such_tokens_raises():
    model = make_tiny_moe("mixtral")
    batch = make_inputs(model, "mixtral")
    with pytest.raises(ValueError, match=r"restrict_to_modalities.*modality_ids"):
        measure_expert_usage(model, [batch], restrict_to_modalities=["image"])
    peft_model = get_peft_model(model, MoExtendConfig(restrict_to_modalities=["image"]))
    text_only = {**batch, "modality_ids": torch.zeros_like(batch["input_ids"])}
    with pytest.raises(ValueError, match=r"saw no token that the new experts serve \(\['image'\]"):
        peft_model.base_model.init_new_experts_from_data([text_only])


# -- 3. the routers tuned in the extension stage ------------------------------------------------------------------
def test_keep_tuned_routers_keeps_exactly_the_tuned_routers():
    data = [make_inputs(make_tiny_moe("qwen3_moe"), "qwen3_moe", seed=i) for i in range(3)]
    plans, models = {}, {}
    for keep in (False, True):
        models[keep] = make_tiny_moe("qwen3_moe")
        plans[keep] = tune_routers_and_plan(models[keep], data, steps=3, learning_rate=5e-2, keep_tuned_routers=keep)
    assert plans[True] == plans[False]
    original = make_tiny_moe("qwen3_moe").state_dict()
    assert all(torch.equal(original[k], v) for k, v in models[False].state_dict().items())
    changed = {k for k, v in models[True].state_dict().items() if not torch.equal(original[k], v)}
    assert changed == {f"model.layers.{i}.mlp.gate.weight" for i in (0, 1)}
    assert {n: p.requires_grad for n, p in models[True].named_parameters()} == {
        n: p.requires_grad for n, p in make_tiny_moe("qwen3_moe").named_parameters()
    }
    # the kept routers are the tuned ones: usage measured on the kept model reproduces the planned shift
    before = measure_expert_usage(make_tiny_moe("qwen3_moe"), data)
    after = measure_expert_usage(models[True], data)
    for layer, shift in plans[True].usage_shift.items():
        assert float((after[layer] - before[layer]).std()) == pytest.approx(shift, abs=1e-7)


# -- 4. the load-balancing loss over all MoE layers -----------------------------------------------------------------
def hand_aux_loss(peft_model, batch: dict, layers: list[int]) -> tuple[object, torch.Tensor]:
    """The model's outputs on `batch`, and the Switch loss `E' * sum_e f_e P_e` averaged over `layers`, from the
    routers' inputs and logits captured by hooks: base logits, plus the new router rows' logits where the layer is
    extended (E' = its expert count); P from the softmax of the logits, f from their top-k."""
    inputs, logits = {}, {}
    base = peft_model.get_base_model()
    blocks = {i: block for i, (_, block) in enumerate(find_moe_blocks(base))}
    families = {i: family_of(block) for i, block in blocks.items()}

    def capture(i):
        def hook(module, args, out):
            inputs[i], logits[i] = args[0], out[1] if families[i].scoring == "sigmoid" else out[0]

        return hook

    handles = [families[i].router(block).register_forward_hook(capture(i)) for i, block in blocks.items()]
    outputs = peft_model(**batch)
    for handle in handles:
        handle.remove()
    wrapped = {layer.layer_index: layer for layer in moe_layers(base)}
    losses = []
    for i in layers:
        layer_logits = logits[i]
        if i in wrapped and wrapped[i].extends("default"):
            new_rows = wrapped[i].moextend_router["default"]
            layer_logits = torch.cat([layer_logits, inputs[i] @ new_rows.T], dim=-1)
        probs = layer_logits.float().softmax(-1)
        top_k = layer_logits.float().topk(families[i].top_k(blocks[i])).indices
        dispatched = F.one_hot(top_k, probs.shape[-1]).sum(1).float()
        losses.append(probs.shape[-1] * (dispatched.mean(0) * probs.mean(0)).sum())
    return outputs, torch.stack(losses).mean()


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "llama4"])
@pytest.mark.parametrize("aux_layers", ["extended", "all"])
def test_aux_loss_averages_over_the_chosen_moe_layers(family, aux_layers):
    model = make_tiny_moe(family)
    batch = make_inputs(model, family)
    config = MoExtendConfig(target_layers=[1], router_aux_loss_coef=0.5, router_aux_loss_layers=aux_layers)
    peft_model = get_peft_model(model, config)
    perturb_adapter(peft_model, "moextend_", scale=0.3)
    outputs, expected = hand_aux_loss(peft_model, batch, [0, 1] if aux_layers == "all" else [1])
    torch.testing.assert_close(outputs.router_aux_loss, expected)
    peft_model.peft_config["default"].router_aux_loss_coef = 0.0
    for layer in moe_layers(peft_model):
        layer.moextend_settings["default"] = layer.moextend_settings["default"]._replace(aux_loss_coef=0.0)
    torch.testing.assert_close(outputs.loss, peft_model(**batch).loss + 0.5 * expected)


def test_aux_loss_over_all_layers_changes_no_output_adds_no_tensor_and_reloads(tmp_path):
    batch = make_inputs(make_tiny_moe("mixtral"), "mixtral")
    models = {
        aux_layers: get_peft_model(
            make_tiny_moe("mixtral"), MoExtendConfig(target_layers=[1], router_aux_loss_layers=aux_layers)
        )
        for aux_layers in ("extended", "all")
    }
    perturb_adapter(models["all"], "moextend_", scale=0.3)
    trained = dict(models["all"].named_parameters())
    with torch.no_grad():
        for name, p in models["extended"].named_parameters():
            if "moextend_" in name:
                p.copy_(trained[name])
    assert [layer.extends("default") for layer in moe_layers(models["all"])] == [False, True]
    assert {n for n in trained if "moextend_" in n} == {
        n for n, _ in models["extended"].named_parameters() if "moextend_" in n
    }
    with torch.no_grad():
        outputs = {aux_layers: model(**batch) for aux_layers, model in models.items()}
    assert torch.equal(outputs["all"].logits, outputs["extended"].logits)
    assert not torch.allclose(outputs["all"].router_aux_loss, outputs["extended"].router_aux_loss)

    models["all"].save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_tiny_moe("mixtral"), tmp_path)
    assert loaded.peft_config["default"].router_aux_loss_layers == "all"
    assert [layer.extends("default") for layer in moe_layers(loaded)] == [False, True]
    with torch.no_grad():
        reloaded = loaded(**batch)
    assert torch.equal(reloaded.logits, outputs["all"].logits)
    assert torch.equal(reloaded.router_aux_loss, outputs["all"].router_aux_loss)


def test_aux_loss_layers_option_is_validated():
    with pytest.raises(ValueError, match=r"router_aux_loss_layers.*\('extended', 'all'\).*'every'"):
        MoExtendConfig(router_aux_loss_layers="every")


# -- 5. Mixtral's router jitter -------------------------------------------------------------------------------------
def jittered_mixtral(noise: float, num_new: int = 0):
    """The tiny Mixtral with `router_jitter_noise=noise` (and `num_new` extra experts copying expert 0, a plain
    transformers model with E + num_new experts)."""
    base = make_tiny_moe("mixtral")
    config = base.config.__class__.from_dict({**base.config.to_dict(), "router_jitter_noise": noise})
    config.num_local_experts = NUM_EXPERTS + num_new
    model = type(base)._from_config(config, attn_implementation="eager", dtype=torch.float32)
    state = base.state_dict()
    for key, value in list(state.items()):
        if key.endswith(("experts.gate_up_proj", "experts.down_proj", "mlp.gate.weight")):
            state[key] = torch.cat([value, value[:1].repeat(num_new, *[1] * (value.dim() - 1))])
    model.load_state_dict(state)
    return model.eval()


def forward(model, batch: dict, train: bool, seed: int) -> torch.Tensor:
    model.train(train)
    torch.manual_seed(seed)
    with torch.no_grad():
        return model(**batch).logits


def test_router_jitter_is_the_bases_own_in_training_only():
    batch = make_inputs(make_tiny_moe("mixtral"), "mixtral")
    jittered = get_peft_model(jittered_mixtral(0.2), MoExtendConfig(calibration=False, expert_init=0))
    plain = get_peft_model(jittered_mixtral(0.0), MoExtendConfig(calibration=False, expert_init=0))
    perturb_adapter(jittered, "moextend_", scale=0.3)
    perturb_adapter(plain, "moextend_", scale=0.3)
    assert not torch.equal(forward(jittered, batch, True, 0), forward(jittered, batch, True, 1))
    eval_logits = forward(jittered, batch, False, 0)
    assert torch.equal(eval_logits, forward(jittered, batch, False, 1))
    assert torch.equal(eval_logits, forward(plain, batch, False, 0))
    assert torch.equal(forward(plain, batch, True, 0), forward(plain, batch, True, 1))
    assert torch.equal(forward(plain, batch, True, 0), eval_logits)


def test_router_jitter_follows_transformers_mixtral_formula():
    """At init the adapted model is an MoE with E + 1 experts whose last one copies expert 0: in training, with the
    same seed, it draws the same noise as transformers' own Mixtral block and computes the same logits."""
    batch = make_inputs(make_tiny_moe("mixtral"), "mixtral")
    reference = jittered_mixtral(0.2, num_new=1)
    adapted = get_peft_model(jittered_mixtral(0.2), MoExtendConfig(calibration=False, expert_init=0))
    expected = forward(reference, batch, True, 3)
    torch.testing.assert_close(forward(adapted, batch, True, 3), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(forward(adapted, batch, False, 3), expected, atol=1e-4)


# -- export keeps working with the new options ----------------------------------------------------------------------
def test_export_with_jitter_and_aux_loss_over_all_layers_is_exact_in_training_too():
    batch = make_inputs(make_tiny_moe("mixtral"), "mixtral")
    config = MoExtendConfig(calibration=False, expert_init=1, router_aux_loss_layers="all")
    peft_model = get_peft_model(jittered_mixtral(0.2), config)
    perturb_adapter(peft_model, "moextend_", scale=0.3)
    expected = {train: forward(peft_model, batch, train, 5) for train in (False, True)}
    merged = peft_model.merge_and_unload()
    assert merged.config.num_local_experts == NUM_EXPERTS + 1 and merged.config.router_jitter_noise == 0.2
    for train in (False, True):
        torch.testing.assert_close(forward(merged, batch, train, 5), expected[train], rtol=1e-5, atol=1e-5)


def test_export_of_aux_loss_over_all_layers_with_unextended_layers_is_refused():
    peft_model = get_peft_model(
        make_tiny_moe("mixtral"), MoExtendConfig(calibration=False, target_layers=[1], router_aux_loss_layers="all")
    )
    with pytest.raises(ValueError, match=r"one expert count for every MoE layer.*target_layers=None"):
        peft_model.merge_and_unload()
