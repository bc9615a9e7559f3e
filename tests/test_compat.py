"""Known upstream breaks give a clear error for the affected family only; PEFT internals are checked at import."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from packaging.version import Version
from peft import get_peft_model
from tiny_models import make_inputs, make_tiny_moe

from peft_moextend import MoExtendConfig, compat


@pytest.fixture
def transformers_5_24(monkeypatch):
    monkeypatch.setattr(compat, "transformers_version", lambda: Version("5.24.0"))


def test_a_family_broken_upstream_gets_an_error_naming_the_release(transformers_5_24):
    with pytest.raises(
        RuntimeError, match=r"transformers 5\.24\.0 breaks Llama 4.*pip install 'transformers<5\.24\.0'"
    ):
        get_peft_model(make_tiny_moe("llama4"), MoExtendConfig())


def test_other_families_keep_working_on_that_release(transformers_5_24):
    model = make_tiny_moe("mixtral")
    peft_model = get_peft_model(model, MoExtendConfig())
    assert torch.isfinite(peft_model(**make_inputs(model, "mixtral")).loss)


def test_a_broken_call_of_a_family_gets_the_error_and_other_calls_work(transformers_5_24):
    model = make_tiny_moe("llava_mixtral")
    batch = make_inputs(model, "llava_mixtral")
    peft_model = get_peft_model(model, MoExtendConfig())
    with torch.no_grad():
        assert torch.isfinite(peft_model(**batch).loss)
        with pytest.raises(RuntimeError, match=r"LLaVA on a mixture-of-experts.*output_router_logits"):
            peft_model(**batch, output_router_logits=True)


def test_a_fixed_release_is_not_refused(monkeypatch):
    broken = compat.UPSTREAM_BREAKS[0]
    monkeypatch.setattr(compat, "UPSTREAM_BREAKS", (dataclasses.replace(broken, fixed_in="5.25.0"),))
    monkeypatch.setattr(compat, "transformers_version", lambda: Version("5.25.0"))
    assert compat.known_upstream_break(make_tiny_moe("llama4")) is None
    monkeypatch.setattr(compat, "transformers_version", lambda: Version("5.24.1"))
    assert "pip install -U 'transformers>=5.25.0'" in compat.known_upstream_break(make_tiny_moe("llama4"))


def test_missing_peft_internals_name_the_peft_version(monkeypatch):
    import peft.tuners.tuners_utils as peft_tuners_utils

    monkeypatch.delattr(peft_tuners_utils, "_get_tuner_state_dict_key_prefixes")
    with pytest.raises(ImportError, match=r"peft .* does not have: \['_get_tuner_state_dict_key_prefixes'\]"):
        compat.check_peft_internals()
