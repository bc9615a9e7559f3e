"""Saving, loading, registration and the Trainer for MoExtend adapters."""

from __future__ import annotations

import importlib
import json

import pytest
import torch
from helpers import run_python, snapshot, train_steps
from peft import AutoPeftModelForCausalLM, PeftConfig, PeftModel, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from safetensors.torch import load_file
from tiny_models import make_inputs, make_tiny_moe
from transformers import AutoModelForCausalLM

import peft_moextend
from peft_moextend import ExpertPeftType, MoExtendConfig, MoExtendModel, register_method


@pytest.fixture
def trained_adapter(tmp_path):
    """A trained MoExtend adapter on the tiny Mixtral (seed 0), saved; returns (folder, batch, logits)."""
    model = make_tiny_moe("mixtral")
    batch = make_inputs(model, "mixtral")
    peft_model = get_peft_model(model, MoExtendConfig(num_new_experts=2))
    train_steps(peft_model, batch, steps=3)
    with torch.no_grad():
        logits = peft_model(**batch).logits
    peft_model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter", batch, logits, peft_model


def test_registration_is_idempotent_and_complete():
    peft_type = ExpertPeftType.MOEXTEND
    assert PEFT_TYPE_TO_CONFIG_MAPPING["MOEXTEND"] is MoExtendConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[peft_type] is MoExtendModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] == "moextend_"
    register_method(peft_type, MoExtendConfig, MoExtendModel)
    importlib.reload(peft_moextend)
    assert PEFT_TYPE_TO_CONFIG_MAPPING[peft_type].__name__ == "MoExtendConfig"

    class Other(MoExtendModel):
        pass

    with pytest.raises(KeyError, match="already registered"):
        register_method(peft_type, MoExtendConfig, Other)


def test_saved_file_holds_only_the_added_parameters(trained_adapter):
    folder, _, _, peft_model = trained_adapter
    state = load_file(folder / "adapter_model.safetensors")
    trainable = {n.replace(".default", "") for n, p in peft_model.named_parameters() if p.requires_grad}
    assert set(state) == trainable
    assert all(".moextend_" in key for key in state)
    payload = sum(t.numel() * t.element_size() for t in state.values())
    size = (folder / "adapter_model.safetensors").stat().st_size
    assert payload <= size <= payload + 4096
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "MOEXTEND" and config["num_base_experts"] == 4 and config["hidden_size"] == 32


def test_fresh_process_reload_gives_identical_logits(trained_adapter, tmp_path):
    folder, batch, logits, _ = trained_adapter
    torch.save(batch, tmp_path / "batch.pt")
    run_python(
        f"""
        import torch, peft_moextend
        from peft import PeftModel
        from tiny_models import make_tiny_moe
        model = PeftModel.from_pretrained(make_tiny_moe("mixtral"), "{folder}")
        batch = torch.load("{tmp_path / "batch.pt"}")
        with torch.no_grad():
            torch.save(model(**batch).logits, "{tmp_path / "logits.pt"}")
        """
    )
    assert torch.equal(torch.load(tmp_path / "logits.pt"), logits)


def test_peft_config_and_load_adapter_paths(trained_adapter):
    folder, batch, logits, _ = trained_adapter
    assert isinstance(PeftConfig.from_pretrained(folder), MoExtendConfig)
    model = make_tiny_moe("mixtral")
    model.load_adapter(str(folder))
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, logits)


def test_auto_peft_model_loads_base_and_adapter(tmp_path):
    base = make_tiny_moe("mixtral")
    base.save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    batch = make_inputs(base, "mixtral")
    peft_model = get_peft_model(base, MoExtendConfig())
    train_steps(peft_model, batch, steps=2)
    peft_model.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        expected = peft_model(**batch).logits
    loaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter", dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, expected)


def test_is_trainable_resumes_training(trained_adapter):
    folder, batch, _, _ = trained_adapter
    frozen = PeftModel.from_pretrained(make_tiny_moe("mixtral"), folder)
    assert not any(p.requires_grad for p in frozen.parameters())
    resumed = PeftModel.from_pretrained(make_tiny_moe("mixtral"), folder, is_trainable=True)
    names = {n for n, p in resumed.named_parameters() if p.requires_grad}
    assert names and all(".moextend_" in n for n in names)
    before = snapshot(resumed)
    losses = train_steps(resumed, batch, steps=3)
    after = snapshot(resumed)
    assert losses[-1] < losses[0]
    assert all(torch.equal(before[n], after[n]) for n in before if ".moextend_" not in n)


@pytest.mark.parametrize("change", [{"num_local_experts": 6}, {"hidden_size": 64, "head_dim": 16}])
def test_loading_onto_another_base_names_the_mismatch(trained_adapter, change):
    folder = trained_adapter[0]
    reference = make_tiny_moe("mixtral")
    config = reference.config.__class__.from_dict({**reference.config.to_dict(), **change})
    other = type(reference)._from_config(config)
    option = "num_base_experts" if "num_local_experts" in change else "hidden_size"
    with pytest.raises(ValueError, match=option):
        PeftModel.from_pretrained(other, folder)
