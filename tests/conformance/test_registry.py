"""A method joins the conformance suite by being registered: each registered PEFT type needs a case."""

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

from conformance.cases import CASES
from peft_moextend import ExpertPeftType


def test_every_registered_method_has_a_conformance_case():
    assert {case.peft_type for case in CASES} == set(ExpertPeftType)
    for peft_type in ExpertPeftType:
        assert peft_type in PEFT_TYPE_TO_CONFIG_MAPPING and peft_type in PEFT_TYPE_TO_TUNER_MAPPING
