"""The shared modality masks: placeholder tokens, explicit ids, towers, generate() and the Trainer."""

from __future__ import annotations

import copy

import pytest
import torch
from conformance.cases import perturb_adapter
from peft import get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from tiny_vlms import (
    AUDIO_FAMILIES,
    VLM_FAMILIES,
    make_qwen_vl_image_and_video_inputs,
    make_tiny_vlm,
    make_vlm_inputs,
    media_token_ids,
)
from transformers import Trainer, TrainingArguments

from peft_moextend import ModeXConfig, PathWeaveConfig, SMoLAConfig
from peft_moextend.call_inputs import CallInputs
from peft_moextend.modality import (
    MODALITIES,
    modality_ids_from_input_ids,
    modality_index,
    modality_token_ids,
    tower_modality,
    validate_modalities,
)
from peft_moextend.smola import SMoLALayer


def groups_for(family: str) -> dict[str, int]:
    media = "audio" if family in AUDIO_FAMILIES else "image"
    return {"text": 2, media: 2, "multimodal": 2}


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_placeholder_tokens_give_the_modality_of_every_position(family):
    model = make_tiny_vlm(family)
    assert modality_token_ids(model.config) == media_token_ids(model)
    batch = make_vlm_inputs(model, family)
    ids = modality_ids_from_input_ids(batch["input_ids"], modality_token_ids(model.config))
    media = "audio" if family in AUDIO_FAMILIES else "image"
    expected = torch.where(batch["input_ids"] == media_token_ids(model)[media], MODALITIES.index(media), 0)
    assert torch.equal(ids, expected) and (ids != 0).any()


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_language_model_layers_see_per_token_modalities_and_towers_their_own(family):
    model = make_tiny_vlm(family)
    batch = make_vlm_inputs(model, family)
    tower = next(n for n, _ in model.named_modules() if tower_modality(n) and n.count(".") <= 2)
    peft_model = get_peft_model(model, SMoLAConfig(expert_groups=groups_for(family)))
    seen = {}

    def record(name):
        def hook(layer, args, output):
            seen[name] = layer.modality_ids(args[0].shape[:-1].numel(), (), args[0].device)

        return hook

    for name, layer in peft_model.named_modules():
        if isinstance(layer, SMoLALayer):
            layer.register_forward_hook(record(name))
    peft_model(**batch)
    media = "audio" if family in AUDIO_FAMILIES else "image"
    expected = (batch["input_ids"] == media_token_ids(model)[media]).long().reshape(-1) * MODALITIES.index(media)
    assert seen and all(tower not in name for name in seen)  # default targets: language model only
    for name, ids in seen.items():
        assert torch.equal(ids, expected), name
    assert tower_modality(f"{tower}.layers.0.q_proj") == media


def test_generate_with_kv_cache_marks_new_tokens_as_text():
    model = make_tiny_vlm("llava")
    batch = make_vlm_inputs(model, "llava")
    batch.pop("labels")
    peft_model = get_peft_model(model, SMoLAConfig())
    context = CallInputs.attach(model)
    steps = []
    model.register_forward_hook(lambda m, a, o: steps.append(context.modality_ids.clone()))
    peft_model.generate(**batch, max_new_tokens=3, do_sample=False, use_cache=True)
    assert steps[0].shape == batch["input_ids"].shape and (steps[0] == 1).sum() > 0
    assert len(steps) == 3 and all(s.shape == (2, 1) and not s.any() for s in steps[1:])

    # an explicit modality_ids for the prompt: decoding steps are text as well
    steps.clear()
    explicit = torch.ones_like(batch["input_ids"])
    peft_model.generate(**batch, modality_ids=explicit, max_new_tokens=3, do_sample=False)
    assert torch.equal(steps[0], explicit) and all(not s.any() for s in steps[1:])


def test_explicit_modality_ids_override_placeholders():
    model = make_tiny_vlm("llava")
    batch = make_vlm_inputs(model, "llava")
    peft_model = get_peft_model(model, SMoLAConfig(expert_groups={"text": 2, "image": 2}))
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.normal_()
        derived = peft_model(**batch).logits
        same = peft_model(**batch, modality_ids=(batch["input_ids"] == model.config.image_token_id).long()).logits
        all_text = peft_model(**batch, modality_ids=torch.zeros_like(batch["input_ids"])).logits
    assert torch.equal(derived, same)
    assert not torch.allclose(derived, all_text)


def test_model_without_placeholder_ids_asks_for_modality_ids():
    model = make_tiny_vlm("qwen2_audio")
    batch = make_vlm_inputs(model, "qwen2_audio")
    peft_model = get_peft_model(model, SMoLAConfig(expert_groups={"text": 2, "image": 2}))
    with pytest.raises(ValueError, match=r"no placeholder token id.*image_token_id.*modality_ids"):
        peft_model(**batch)
    with pytest.raises(ValueError, match="modality_ids"):
        peft_model(**batch, modality_ids=torch.zeros(2, 3))  # float tensor


def test_trainer_keeps_the_modality_ids_column(tmp_path):
    datasets = pytest.importorskip("datasets")
    model = make_tiny_vlm("llava")
    peft_model = get_peft_model(model, SMoLAConfig(expert_groups={"text": 2, "image": 2}))
    rows = [make_vlm_inputs(model, "llava", batch_size=1, seed=i) for i in range(4)]
    columns = {key: [row[key][0].tolist() for row in rows] for key in ("input_ids", "attention_mask", "labels")}
    columns["modality_ids"] = [
        [1 if t == model.config.image_token_id else 0 for t in ids] for ids in columns["input_ids"]
    ]
    dataset = datasets.Dataset.from_dict(columns)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, remove_unused_columns=True)
    trainer = Trainer(model=peft_model, args=args, train_dataset=dataset)
    kept = trainer._remove_unused_columns(dataset)
    assert "modality_ids" in kept.column_names and "input_ids" in kept.column_names


# layers in the tower's attention and in the language model; video-specific parts: PathWeave's video stage (stage
# 1, the only trainable one once video is added), SMoLA's video group (the last 2 experts), ModeX's video expert
_TOWER_AND_LM = r".*visual\.blocks\.\d+\.attn\.(qkv|proj)|.*language_model\.layers\.\d+\.self_attn\.(q_proj|o_proj)"
SHARED_TOWER_METHODS = {
    "pathweave": (
        PathWeaveConfig(r=2, modalities=["image", "video"], target_modules=_TOWER_AND_LM),
        lambda layer: [p.grad for n, p in layer.named_parameters() if "pathweave_up_1" in n],
    ),
    "smola": (
        SMoLAConfig(r=2, expert_groups={"image": 2, "video": 2}, target_modules=_TOWER_AND_LM),
        lambda layer: [layer.smola_B["default"].grad[:, 4:]],  # experts 2-3 (rank 2 each) are the video group
    ),
    "modex": (
        ModeXConfig(
            bottleneck_size=4,
            experts={"visual": ["image"], "zvideo": ["video"]},
            target_modules=_TOWER_AND_LM,
            train_layer_norms=False,
        ),
        lambda layer: [layer.modex_up["default"].grad[:, 4:]],  # experts in name order: visual, zvideo
    ),
}


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("method", sorted(SHARED_TOWER_METHODS))
def test_a_shared_vision_tower_encodes_videos_on_their_own_path(method, family):
    model = make_tiny_vlm(family)
    batch = make_qwen_vl_image_and_video_inputs(model, family)
    config, video_grads = SHARED_TOWER_METHODS[method]
    peft_model = get_peft_model(model, copy.deepcopy(config))
    perturb_adapter(peft_model, f"{method}_")
    tower_layers = {n: m for n, m in peft_model.named_modules() if isinstance(m, BaseTunerLayer) and ".visual." in n}
    assert tower_layers
    seen = {name: [] for name in tower_layers}

    def record(name):
        def hook(layer, args, output):
            ids = layer.modality_ids(args[0].shape[:-1].numel(), (), args[0].device)
            seen[name].append({MODALITIES[i] for i in ids.unique().tolist()})

        return hook

    handles = [layer.register_forward_hook(record(name)) for name, layer in tower_layers.items()]
    peft_model.train()
    peft_model(**batch).loss.backward()
    for handle in handles:
        handle.remove()
    # the tower encodes the image, then the video frames, each call on its own modality's path
    assert all(calls == [{"image"}, {"video"}] for calls in seen.values()), seen
    for name, layer in tower_layers.items():
        grads = video_grads(layer)
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads), name


def test_gradient_checkpointing_in_a_shared_tower_with_video_paths_is_refused():
    model = make_tiny_vlm("qwen2_vl")
    batch = make_qwen_vl_image_and_video_inputs(model, "qwen2_vl")
    peft_model = get_peft_model(model, copy.deepcopy(SHARED_TOWER_METHODS["pathweave"][0]))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peft_model.train()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        peft_model(**batch)
    for module in model.get_submodule("model.visual").modules():  # what the error says to do
        module.gradient_checkpointing = False
    peft_model(**batch).loss.backward()
    assert all(p.grad is not None for n, p in peft_model.named_parameters() if p.requires_grad and ".visual." in n)


def test_unknown_modality_error_names_the_option_and_the_choices():
    assert modality_index("video") == MODALITIES.index("video")
    with pytest.raises(ValueError, match=r"^`task.modality` contains unknown modalities \['smell'\]; choose from "):
        modality_index("smell", "task.modality")
    with pytest.raises(ValueError, match=r"^`modality` contains unknown modalities \['smell'\]"):
        modality_index("smell")
    groups = ("image", "multimodal")
    assert validate_modalities(list(groups), "groups", also_allowed=("multimodal",)) == groups
    with pytest.raises(ValueError, match=r"`groups` contains unknown modalities \['smell'\].*'audio', 'multimodal'\]"):
        validate_modalities(["image", "smell"], "groups", also_allowed=("multimodal",))
    with pytest.raises(ValueError, match=r"`groups` contains unknown modalities \['multimodal'\]"):
        validate_modalities(["multimodal"], "groups")
