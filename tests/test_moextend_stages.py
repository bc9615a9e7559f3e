"""MoExtend stages (task and modality extension): new experts added stage by stage to one adapter, earlier stages
frozen, one router over all; reload, export and per-stage modality restriction."""

from __future__ import annotations

import json

import pytest
import torch
from conformance.cases import perturb_adapter
from helpers import snapshot, train_steps
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from tiny_models import NUM_EXPERTS, make_inputs, make_tiny_moe

from peft_moextend import MoExtendConfig
from peft_moextend.compat import known_upstream_break
from peft_moextend.moextend import MoExtendLayer

FAMILIES = ("mixtral", "qwen2_moe", "llama4")  # softmax top-k, shared expert, sigmoid + transposed experts


def two_stage(family: str, **options) -> tuple[torch.nn.Module, dict]:
    """A tiny `family` model whose MoExtend adapter has stage 0 (trained a little) and a stage "task_b"."""
    if (reason := known_upstream_break(family)) is not None:
        pytest.skip(reason)
    model = make_tiny_moe(family)
    batch = make_inputs(model, family)
    torch.manual_seed(0)
    peft_model = get_peft_model(model, MoExtendConfig(**options))
    train_steps(peft_model, batch, steps=2)
    peft_model.base_model.add_stage("task_b")
    return peft_model, batch


def layers(model) -> list[MoExtendLayer]:
    return [m for m in model.modules() if isinstance(m, MoExtendLayer)]


@pytest.mark.parametrize("family", FAMILIES)
def test_a_stage_adds_experts_and_only_it_trains(family):
    model, batch = two_stage(family, num_new_experts=1)
    for layer in layers(model):
        assert layer.stage_sizes("default") == [1, 1]
        assert layer.stage("calibration_in", 1, "default").shape[1] == NUM_EXPERTS + 2
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.split(".")[-2].endswith("_1") for n in trainable)
    kinds = {n.split(".")[-2] for n in trainable}
    assert kinds == {
        f"moextend_{k}_1" for k in ("router", "gate_up_proj", "down_proj", "calibration_in", "calibration_out")
    }
    before = snapshot(model)
    model.set_adapter("default")  # PEFT's switch marks an adapter trainable: the earlier stage stays frozen
    train_steps(model, batch, steps=2)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed <= trainable
    assert {n.split(".")[-2] for n in changed} >= {
        "moextend_router_1",
        "moextend_gate_up_proj_1",
        "moextend_down_proj_1",
    }
    # one routing over base + both stages (the new stage's experts trained above, so they were chosen)
    record = layers(model)[0].routing_records["default"]
    assert record.router_probs.shape[-1] == NUM_EXPERTS + 2


@pytest.mark.parametrize("family", FAMILIES)
def test_two_stages_compute_what_one_stage_with_all_their_experts_computes(family):
    """One router over every stage's experts: stages [1, 1] equal a single stage of 2 experts holding the same
    tensors (no calibration, whose per-stage MLPs have no single-stage counterpart)."""
    options = {"num_new_experts": 1, "calibration": False}
    staged, batch = two_stage(family, **options)
    perturb_adapter(staged, "moextend_", scale=0.3)
    single = get_peft_model(make_tiny_moe(family), MoExtendConfig(**{**options, "num_new_experts": 2}))
    with torch.no_grad():
        for target, source in zip(layers(single), layers(staged), strict=True):
            for kind in ("router", "gate_up_proj", "down_proj"):
                stacked = torch.cat([source.stage(kind, k, "default") for k in (0, 1)])
                target.stage(kind, 0, "default").copy_(stacked)
        staged.eval()
        expected = single(**batch).logits
        torch.testing.assert_close(staged(**batch).logits, expected, rtol=0, atol=1e-5)
        with staged.disable_adapter():
            assert not torch.allclose(staged(**batch).logits, expected, atol=1e-3)


@pytest.mark.parametrize("rank", [None, 2], ids=["full", "low_rank"])
def test_saved_stages_reload_exactly_with_only_added_keys(tmp_path, rank):
    model, batch = two_stage("mixtral", num_new_experts=1, new_expert_rank=rank, expert_init={0: 1, 1: 2})
    sources = {0: 3, 1: 0}
    with torch.no_grad():
        for layer in layers(model):  # stage 1 copies other experts than stage 0, as after measuring usage
            layer.copy_expert_into_new("default", sources[layer.layer_index], zero_down_proj=False, k=1)
    model.peft_config["default"].stages[0]["source_experts"] = sources
    perturb_adapter(model, "moextend_", scale=0.3)
    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert all(".moextend_" in key for key in saved) and any("moextend_router_1" in key for key in saved)
    stages = json.loads((tmp_path / "adapter_config.json").read_text())["stages"]
    assert stages == [
        {"name": "task_b", "num_new_experts": 1, "restrict_to_modalities": None, "source_experts": {"0": 3, "1": 0}}
    ]
    reloaded = PeftModel.from_pretrained(make_tiny_moe("mixtral"), tmp_path)
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, expected)
    if rank is not None:
        assert [layer.moextend_source_expert["default"] for layer in layers(reloaded)] == [[1, 3], [2, 0]]


def test_a_modality_stage_leaves_earlier_modalities_and_text_unchanged():
    """Stage 0 serves image tokens, stage 1 audio tokens: training the audio stage changes audio tokens only;
    text tokens take the base computation exactly, image tokens the routing and calibration of stage 0."""
    model = make_tiny_moe("mixtral")
    batch = make_inputs(model, "mixtral")
    seq = batch["input_ids"].shape[1]
    text = torch.zeros_like(batch["input_ids"])
    image, audio = text.clone(), text.clone()
    image[:, 4 : seq // 2] = 1  # MODALITIES: text 0, image 1, video 2, audio 3
    audio[:, 4 : seq // 2] = 3
    peft_model = get_peft_model(model, MoExtendConfig(restrict_to_modalities=["image"]))
    train_steps(peft_model, batch | {"modality_ids": image}, steps=2)
    with torch.no_grad(), peft_model.disable_adapter():
        base_text = peft_model(**batch).logits
    with torch.no_grad():
        image_before = peft_model(**batch, modality_ids=image).logits
    stage = peft_model.base_model.add_stage(
        "audio", batches=[batch | {"modality_ids": audio}], num_new_experts=2, restrict_to_modalities=["audio"]
    )
    assert stage["stage"] == 1 and set(stage["source_experts"]) == {0, 1}
    assert [layer.stage_sizes("default") for layer in layers(peft_model)] == [[1, 2], [1, 2]]
    with torch.no_grad():
        audio_start = peft_model(**batch, modality_ids=audio).logits
    train_steps(peft_model, batch | {"modality_ids": audio}, steps=3)
    with torch.no_grad():
        assert torch.equal(peft_model(**batch, modality_ids=text).logits, base_text)
        torch.testing.assert_close(peft_model(**batch, modality_ids=image).logits, image_before)
        audio_after = peft_model(**batch, modality_ids=audio).logits
    assert not torch.allclose(audio_after, audio_start, atol=1e-4)
    # the image stage's experts never see audio tokens and vice versa: masked, not merely unlikely
    probabilities = layers(peft_model)[0].routing_records["default"].router_probs  # the last (audio) call
    audio_tokens = audio.reshape(-1) == 3
    assert torch.equal(probabilities[audio_tokens, NUM_EXPERTS], torch.zeros(int(audio_tokens.sum())))


def test_merge_and_unload_appends_every_stage(tmp_path):
    model, batch = two_stage("mixtral", num_new_experts=1, calibration=False, router_aux_loss_coef=0.0)
    perturb_adapter(model, "moextend_", scale=0.3)
    model.eval()
    batch.pop("labels")
    with torch.no_grad():
        expected = model(**batch).logits
    merged = model.merge_and_unload()
    assert merged.config.num_local_experts == NUM_EXPERTS + 2
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, expected, rtol=0, atol=1e-5)


def test_bad_stages_are_refused_with_the_fix():
    model, _ = two_stage("mixtral")
    with pytest.raises(ValueError, match="already has a stage 'task_b'"):
        model.base_model.add_stage("task_b")
    with pytest.raises(ValueError, match="`num_new_experts` must be an integer >= 1"):
        model.base_model.add_stage("task_c", num_new_experts=0)
    with pytest.raises(ValueError, match="restrict_to_modalities"):
        model.base_model.add_stage("task_c", restrict_to_modalities=["smell"])
    assert [s["name"] for s in model.peft_config["default"].stages] == ["task_b"]
    with pytest.raises(ValueError, match="unique names"):
        MoExtendConfig(stages=[model.peft_config["default"].stages[0]] * 2)


def test_cached_generation_with_stages_equals_uncached():
    model, batch = two_stage("mixtral", num_new_experts=1)
    perturb_adapter(model, "moextend_", scale=0.3)
    batch.pop("labels")
    settings = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False}
    with torch.no_grad():
        cached, uncached = (model.generate(**batch, **settings, use_cache=use_cache) for use_cache in (True, False))
    assert torch.equal(cached, uncached)
