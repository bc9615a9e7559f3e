"""The shared modality masks: placeholder tokens, explicit ids, towers, generate() and the Trainer."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from tiny_vlms import AUDIO_FAMILIES, VLM_FAMILIES, make_tiny_vlm, make_vlm_inputs, media_token_ids
from transformers import Trainer, TrainingArguments

from peft_moextend import SMoLAConfig
from peft_moextend.call_inputs import CallInputs
from peft_moextend.modality import MODALITIES, modality_ids_from_input_ids, modality_token_ids, tower_modality
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
