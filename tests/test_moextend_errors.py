"""Bad input to MoExtend gets a clear error that names the problem and the fix."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from tiny_models import make_tiny_moe
from transformers import GptOssConfig, GptOssForCausalLM, LlamaConfig, LlamaForCausalLM

from peft_moextend import MoExtendConfig

TINY = {"vocab_size": 128, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4}


def test_dense_model_is_refused_with_the_supported_families():
    model = LlamaForCausalLM(LlamaConfig(intermediate_size=64, **TINY))
    with pytest.raises(ValueError, match=r"has no MoE layer.*MixtralSparseMoeBlock.*upcycle"):
        get_peft_model(model, MoExtendConfig())


def test_unsupported_moe_family_names_block_and_model_type():
    config = GptOssConfig(
        intermediate_size=32,
        num_key_value_heads=2,
        head_dim=8,
        num_local_experts=4,
        layer_types=["full_attention"],
        **TINY,
    )
    with pytest.raises(ValueError, match=r"GptOssMLP.*'gpt_oss'.*Supported MoE blocks: mixtral"):
        get_peft_model(GptOssForCausalLM(config), MoExtendConfig())


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"num_new_experts": 0}, "num_new_experts"),
        ({"num_new_experts": 1.5}, "num_new_experts"),
        ({"target_layers": []}, "target_layers"),
        ({"target_layers": [-1]}, "target_layers"),
        ({"expert_init": "largest"}, "expert_init"),
        ({"expert_init": -2}, "expert_init"),
        ({"expert_init": {"a": 1}}, "expert_init"),
        ({"restrict_to_modalities": ["smell"]}, "unknown modalities"),
        ({"restrict_to_modalities": []}, "restrict_to_modalities"),
        ({"router_aux_loss_coef": -1.0}, "router_aux_loss_coef"),
        ({"calibration_hidden_size": 0}, "calibration_hidden_size"),
    ],
)
def test_invalid_options_are_rejected_at_construction(options, message):
    with pytest.raises(ValueError, match=message):
        MoExtendConfig(**options)


def test_layer_index_out_of_range_lists_the_moe_layers():
    with pytest.raises(ValueError, match=r"\[5\] are not MoE layers.*\[0, 1\]"):
        get_peft_model(make_tiny_moe("mixtral"), MoExtendConfig(target_layers=[1, 5]))


def test_source_expert_out_of_range():
    with pytest.raises(ValueError, match="copy expert 9.*4 experts"):
        get_peft_model(make_tiny_moe("olmoe"), MoExtendConfig(expert_init=9))


def test_two_active_adapters_are_refused():
    model = get_peft_model(make_tiny_moe("mixtral"), MoExtendConfig())
    model.add_adapter("other", MoExtendConfig())
    model.base_model.set_adapter(["default", "other"])
    with pytest.raises(ValueError, match="one set of new experts at a time"):
        model(input_ids=torch.tensor([[3, 4, 5]]))


def test_malformed_modality_ids():
    model = get_peft_model(make_tiny_moe("mixtral"), MoExtendConfig(restrict_to_modalities=["image"]))
    with pytest.raises(ValueError, match="modality_ids"):
        model(input_ids=torch.tensor([[3, 4, 5]]), modality_ids=torch.zeros(1, 3))
