"""Robustness, for every method: mismatched bases, damaged or foreign files, non-finite values, and property-based
checks of config validation."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import train_steps
from hypothesis import HealthCheck, given, settings
from peft import PeftModel, get_peft_model

from conformance.cases import CASES, case_id, make_batch, make_model, perturb_adapter
from peft_moextend.modality import MODALITIES


@pytest.fixture
def saved(tmp_path, request):
    """(case, folder) of a saved, perturbed adapter on the case's text family."""
    case = request.param
    model = get_peft_model(make_model(case.text_family), case.make_config(case.text_family, 0))
    perturb_adapter(model, case.prefix)
    model.save_pretrained(tmp_path / "adapter")
    return case, tmp_path / "adapter"


def _variant(family: str, **changes):
    reference = make_model(family)
    values = {**reference.config.to_dict(), **changes}
    if "hidden_size" in changes and getattr(reference.config, "head_dim", None):
        values["head_dim"] = changes["hidden_size"] // reference.config.num_attention_heads
    return type(reference)._from_config(reference.config.__class__.from_dict(values))


CHANGES = {
    "hidden size": {"hidden_size": 64},
    "more layers": {"num_hidden_layers": 3},
    "fewer layers": {"num_hidden_layers": 1},
}


@pytest.mark.parametrize("change", CHANGES, ids=str)
@pytest.mark.parametrize("saved", CASES, ids=case_id, indirect=True)
def test_loading_onto_another_base_names_the_mismatch(saved, change):
    case, folder = saved
    other = _variant(case.text_family, **CHANGES[change])
    with pytest.raises(ValueError, match=r"does not fit this base model|num_base_experts|hidden_size") as error:
        PeftModel.from_pretrained(other, folder)
    assert "base model" in str(error.value)


@pytest.mark.parametrize("saved", [c for c in CASES if c.name == "moextend"], ids=case_id, indirect=True)
def test_loading_moextend_onto_another_number_of_experts(saved):
    case, folder = saved
    with pytest.raises(ValueError, match="num_base_experts=4, but this model has num_base_experts=6"):
        PeftModel.from_pretrained(_variant(case.text_family, num_local_experts=6), folder)


@pytest.mark.parametrize("saved", CASES, ids=case_id, indirect=True)
def test_damaged_or_foreign_adapter_folders_give_clear_errors(saved, monkeypatch):
    case, folder = saved
    weights = folder / "adapter_model.safetensors"
    good = weights.read_bytes()

    weights.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="truncated or corrupted"):
        PeftModel.from_pretrained(make_model(case.text_family), folder)
    weights.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="truncated or corrupted"):
        PeftModel.from_pretrained(make_model(case.text_family), folder)

    weights.unlink()
    torch.save({}, folder / "adapter_model.bin")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("a pickle was loaded"))
    with pytest.raises(ValueError, match="pickle weights"):
        PeftModel.from_pretrained(make_model(case.text_family), folder)
    (folder / "adapter_model.bin").unlink()
    weights.write_bytes(good)

    config_path = folder / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "option_from_the_future": 3}))
    with pytest.raises(ValueError, match=r"unknown options \['option_from_the_future'\].*upgrade"):
        PeftModel.from_pretrained(make_model(case.text_family), folder)
    config_path.unlink()
    with pytest.raises(ValueError, match="adapter_config.json"):
        PeftModel.from_pretrained(make_model(case.text_family), folder)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_non_finite_values_propagate_and_are_never_saved(case, tmp_path):
    """Documented behaviour: NaN inputs give NaN outputs (as in the base model); weights that became NaN are
    refused by save_pretrained, and the last good save stays intact."""
    model = make_model(case.text_family)
    batch = make_batch(model, case.text_family)
    peft_model = get_peft_model(model, case.make_config(case.text_family, 0))
    peft_model.save_pretrained(tmp_path)
    good = (tmp_path / "adapter_model.safetensors").read_bytes()

    embeds = model.get_input_embeddings()(batch["input_ids"]).detach()
    embeds[0, 3] = float("nan")
    inputs = {"inputs_embeds": embeds, "attention_mask": batch["attention_mask"], "labels": batch["labels"]}
    inputs["modality_ids"] = torch.zeros_like(batch["input_ids"])  # no input_ids: modalities are given
    with torch.no_grad():
        assert peft_model(**inputs).logits.isnan().any()
    train_steps(peft_model, inputs, steps=1)
    assert any(p.isnan().any() for n, p in peft_model.named_parameters() if case.prefix in n)
    with pytest.raises(ValueError, match="NaN or inf"):
        peft_model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == good


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_property_invalid_options_rejected_valid_ones_build_and_run(case):
    family = case.text_family
    model_template = make_model(family)
    batch = make_batch(model_template, family, batch_size=1)
    config_cls = type(case.make_config(family, 0))

    @settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(options=case.options)
    def check(options):
        if not case.is_valid(options):
            with pytest.raises(ValueError):
                config_cls(**options)
            return
        config = config_cls(**options)
        if not case.fits_text_model(options):
            with pytest.raises(ValueError):
                get_peft_model(make_model(family), config)
            return
        peft_model = get_peft_model(make_model(family), config)
        modality_ids = torch.randint(0, len(MODALITIES), batch["input_ids"].shape, generator=torch.Generator())
        with torch.no_grad():
            out = peft_model(**batch, modality_ids=modality_ids)
        assert out.logits.shape[:2] == batch["input_ids"].shape and out.logits.isfinite().all()

    check()
