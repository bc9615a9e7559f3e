"""The PEFT-type enum's name, its old alias, and adapters saved under the (unchanged) type strings."""

from __future__ import annotations

import json
import pickle

import peft.mapping
import pytest
import torch
from conformance.cases import CASES, make_batch, make_model, perturb_adapter
from peft import PeftConfig, PeftModel, get_peft_model

import peft_moextend
from peft_moextend import METHODS, ExpertMethod, ExpertPeftType, MoExtendPeftType, SMoLAConfig, SMoLAModel
from peft_moextend.registration import MoExtendPeftType as MoExtendPeftTypeFromModule
from peft_moextend.registration import register_method

# what `adapter_config.json` stores as `peft_type`, written by every release so far: must never change
SAVED_PEFT_TYPES = {
    "moextend": "MOEXTEND",
    "smola": "SMOLA",
    "cmoe": "CMOE",
    "modex": "MODEX",
    "pathweave": "PATHWEAVE",
}


def test_old_enum_name_is_the_same_enum():
    assert MoExtendPeftType is ExpertPeftType and MoExtendPeftTypeFromModule is ExpertPeftType
    assert MoExtendPeftType.SMOLA is ExpertPeftType.SMOLA
    assert pickle.loads(pickle.dumps(MoExtendPeftType.CMOE)) is ExpertPeftType.CMOE
    assert {"ExpertPeftType", "MoExtendPeftType", "METHODS", "ExpertMethod"} <= set(peft_moextend.__all__)


def test_each_method_has_one_record_of_name_type_and_prefix():
    assert {case.name: METHODS[case.peft_type].peft_type.value for case in CASES} == SAVED_PEFT_TYPES
    assert {m.name: m.prefix for m in METHODS.values()} == {
        "MoExtend": "moextend_",
        "SMoLA": "smola_",
        "CMoE": "cmoe_",
        "ModeX": "modex_",
        "PathWeave": "pathweave_",
    }
    for peft_type, method in METHODS.items():
        tuner = peft.mapping.PEFT_TYPE_TO_TUNER_MAPPING[peft_type]
        config = peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING[peft_type]
        assert tuner.prefix == method.prefix and tuner.method_name == config.method_name == method.name
    with pytest.raises(ValueError, match=r"prefix 'smola' of SMoLA must be 'smola_'"):
        ExpertMethod("SMoLA", ExpertPeftType.SMOLA, "smola")


def test_register_method_rejects_a_tuner_that_disagrees_with_the_record():
    class Renamed(SMoLAModel):
        method_name = "Smola"

    class Prefixed(SMoLAModel):
        prefix = "smola_x_"

    with pytest.raises(ValueError, match=r"Renamed.method_name must be 'SMoLA'"):
        register_method(ExpertPeftType.SMOLA, SMoLAConfig, Renamed)
    with pytest.raises(ValueError, match=r"Prefixed.prefix must be 'smola_'"):
        register_method(ExpertPeftType.SMOLA, SMoLAConfig, Prefixed)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_adapter_config_with_the_old_peft_type_string_loads(case, tmp_path):
    family = case.text_family
    torch.manual_seed(0)
    peft_model = get_peft_model(make_model(family), case.make_config(family, 0))
    perturb_adapter(peft_model, case.prefix)
    peft_model.eval()
    batch = make_batch(peft_model.get_base_model(), family)
    batch.pop("labels", None)
    with torch.no_grad():
        expected = peft_model(**batch).logits
    peft_model.save_pretrained(tmp_path)
    config_file = tmp_path / "adapter_config.json"
    saved = json.loads(config_file.read_text())
    assert saved["peft_type"] == SAVED_PEFT_TYPES[case.name]  # the string the code before the rename wrote

    config = PeftConfig.from_pretrained(tmp_path)
    assert type(config) is type(peft_model.peft_config["default"])
    assert (
        config.peft_type is ExpertPeftType(SAVED_PEFT_TYPES[case.name]) is getattr(MoExtendPeftType, case.name.upper())
    )
    torch.manual_seed(1)
    loaded = PeftModel.from_pretrained(make_model(family), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, expected, rtol=0, atol=0)
