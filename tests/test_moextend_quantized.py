"""4-bit fused experts on MoE bases, new experts in the base dtype, and low-rank new experts (MoExtend)."""

from __future__ import annotations

import pytest
import torch
from conformance.cases import perturb_adapter
from helpers import snapshot, train_steps
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from tiny_models import MOE_FAMILIES, make_inputs, make_tiny_moe
from transformers import BitsAndBytesConfig, MixtralConfig, MixtralForCausalLM

from peft_moextend import MoExtendConfig, quantize_moe_experts
from peft_moextend.moe_families import find_moe_blocks
from peft_moextend.quantization import resident_bytes

bnb_functional = pytest.importorskip("bitsandbytes.functional")


def load_4bit(folder, model_cls, quant_type: str = "nf4", double: bool = False):
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double,
        bnb_4bit_compute_dtype=torch.float32,
    )
    return model_cls.from_pretrained(folder, quantization_config=config, dtype=torch.float32)


def experts_of(model) -> list[torch.nn.Module]:
    return [getattr(block, "base_layer", block).experts for _, block in find_moe_blocks(model)]


def quant_state(experts, name):
    return next(p for p in experts.parametrizations[name] if hasattr(p, "quant_state")).quant_state


def storage(model) -> dict[str, torch.Tensor]:
    """The 4-bit storage of every expert tensor."""
    return {
        f"{index}.{name}": experts.parametrizations[name].original.clone()
        for index, experts in enumerate(experts_of(model))
        for name in ("gate_up_proj", "down_proj")
    }


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_a_4bit_base_gets_4bit_experts_trains_saves_and_reloads(family, tmp_path):
    model = make_tiny_moe(family)
    batch = make_inputs(model, family)
    model.save_pretrained(tmp_path / "base")
    fp32_experts = [(e.gate_up_proj.detach().clone(), e.down_proj.detach().clone()) for e in experts_of(model)]
    peft_model = get_peft_model(load_4bit(tmp_path / "base", type(model)), MoExtendConfig(router_aux_loss_coef=0.0))
    base = peft_model.get_base_model()
    for experts, originals in zip(experts_of(base), fp32_experts):
        for name, original in zip(("gate_up_proj", "down_proj"), originals):
            state = quant_state(experts, name)
            assert state.quant_type == "nf4" and experts.parametrizations[name].original.dtype == torch.uint8
            # exactly bitsandbytes' own nf4 of the same weights
            expected = bnb_functional.dequantize_4bit(*bnb_functional.quantize_4bit(original, quant_type="nf4"))
            assert torch.equal(getattr(experts, name), expected)

    frozen, before = storage(base), snapshot(peft_model)
    perturb_adapter(peft_model, "moextend_")
    train_steps(peft_model, batch, steps=2)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("moextend_" in n for n in trainable)
    assert all(p.grad is not None for n, p in peft_model.named_parameters() if n in trainable)
    changed = {n for n, p in peft_model.named_parameters() if not torch.equal(before[n], p)}
    assert changed and changed <= trainable
    assert all(torch.equal(frozen[k], v) for k, v in storage(base).items())  # the quantized base is unchanged
    with torch.no_grad():
        expected_logits = peft_model(**batch).logits
    peft_model.save_pretrained(tmp_path / "adapter")
    assert all("moextend_" in key for key in load_file(tmp_path / "adapter" / "adapter_model.safetensors"))

    reloaded = PeftModel.from_pretrained(load_4bit(tmp_path / "base", type(model)), tmp_path / "adapter")
    assert all(hasattr(e, "parametrizations") for e in experts_of(reloaded.get_base_model()))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, expected_logits, rtol=0, atol=1e-4)


def mixtral_shaped(seed: int = 0) -> MixtralForCausalLM:
    """Mixtral's shape at a small size: hidden 256, expert width 512, 8 experts (top-2), 4 layers."""
    config = MixtralConfig(
        vocab_size=256,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
    )
    torch.manual_seed(seed)
    return MixtralForCausalLM._from_config(config, attn_implementation="eager", dtype=torch.float32).eval()


def test_a_mixtral_shaped_4bit_base_is_resident_in_4bits_and_close_to_fp32(tmp_path):
    model = mixtral_shaped()
    fp32_bytes = resident_bytes(model)
    model.save_pretrained(tmp_path)
    input_ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    loaded = load_4bit(tmp_path, MixtralForCausalLM)
    attention_only = resident_bytes(loaded)  # what bitsandbytes' from_pretrained alone gives
    peft_model = get_peft_model(loaded, MoExtendConfig())
    adapter_bytes = sum(p.numel() * p.element_size() for n, p in peft_model.named_parameters() if "moextend_" in n)
    base_bytes = resident_bytes(peft_model) - adapter_bytes
    assert attention_only > 0.9 * fp32_bytes  # experts in full precision without us
    assert base_bytes <= 0.20 * fp32_bytes, base_bytes / fp32_bytes
    with torch.no_grad():
        cosine = torch.nn.functional.cosine_similarity(
            peft_model(input_ids=input_ids).logits.flatten(), model(input_ids=input_ids).logits.flatten(), dim=0
        )
    assert cosine >= 0.95


def test_double_quantization_and_fp4_follow_the_config(tmp_path):
    model = make_tiny_moe("mixtral")
    model.save_pretrained(tmp_path)
    peft_model = get_peft_model(load_4bit(tmp_path, MixtralForCausalLM, "fp4", double=True), MoExtendConfig())
    for experts in experts_of(peft_model.get_base_model()):
        state = quant_state(experts, "gate_up_proj")
        assert state.quant_type == "fp4" and state.nested


def test_an_8bit_base_warns_that_its_experts_stay_in_full_precision(tmp_path):
    model = make_tiny_moe("mixtral")
    model.save_pretrained(tmp_path)
    base = MixtralForCausalLM.from_pretrained(tmp_path, quantization_config=BitsAndBytesConfig(load_in_8bit=True))
    with pytest.warns(UserWarning, match="stay in full precision.*load_in_4bit"):
        peft_model = get_peft_model(base, MoExtendConfig())
    assert not any(hasattr(e, "parametrizations") for e in experts_of(peft_model.get_base_model()))


def test_quantize_moe_experts_for_models_quantized_otherwise():
    model = make_tiny_moe("qwen2_moe")
    batch = make_inputs(model, "qwen2_moe")
    with torch.no_grad():
        expected = model(**batch).logits
    assert quantize_moe_experts(model) == 4  # 2 layers x (gate_up, down)
    assert quantize_moe_experts(model) == 0  # already 4-bit
    peft_model = get_peft_model(model, MoExtendConfig())
    with torch.no_grad():
        cosine = torch.nn.functional.cosine_similarity(peft_model(**batch).logits.flatten(), expected.flatten(), dim=0)
    assert cosine > 0.9
    with pytest.raises(ValueError, match="quant_type"):
        quantize_moe_experts(model, quant_type="int4")


def test_new_experts_copy_their_source_from_a_4bit_base(tmp_path):
    model = make_tiny_moe("mixtral")
    model.save_pretrained(tmp_path)
    batch = make_inputs(model, "mixtral")
    for rank in (None, 2):
        peft_model = get_peft_model(load_4bit(tmp_path, MixtralForCausalLM), MoExtendConfig(new_expert_rank=rank))
        sources = peft_model.base_model.init_new_experts_from_data([batch])
        for layer in peft_model.base_model._layers():
            experts, source = layer.base_layer.experts, sources[layer.layer_index]
            if rank is None:
                assert torch.equal(layer.moextend_gate_up_proj["default"][0], experts.gate_up_proj[source])
                assert torch.equal(layer.moextend_down_proj["default"][0], experts.down_proj[source])
            else:
                assert layer.moextend_source_expert["default"] == [source]
            router = layer.family.router(layer.base_layer).weight
            assert torch.equal(layer.moextend_router["default"][0], router[source])


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "llama4"])
def test_low_rank_new_experts_start_as_copies_and_save_only_their_deltas(family, tmp_path):
    model = make_tiny_moe(family)
    batch = make_inputs(model, family)
    torch.manual_seed(0)
    full = get_peft_model(make_tiny_moe(family), MoExtendConfig(expert_init=1))
    with torch.no_grad():
        full_logits = full(**batch).logits
    low_rank = get_peft_model(model, MoExtendConfig(expert_init=1, new_expert_rank=2))
    with torch.no_grad():  # a zero delta: the same model as full copies of the source expert
        torch.testing.assert_close(low_rank(**batch).logits, full_logits, rtol=1e-5, atol=1e-5)
    trainable = {n for n, p in low_rank.named_parameters() if p.requires_grad}
    kinds = {n.split(".")[-2] for n in trainable}
    assert kinds == {
        "moextend_gate_up_A",
        "moextend_gate_up_B",
        "moextend_down_A",
        "moextend_down_B",
        "moextend_router",
        "moextend_calibration_in",
        "moextend_calibration_out",
    }
    full_count, _ = full.get_nb_trainable_parameters()
    low_count, _ = low_rank.get_nb_trainable_parameters()
    assert low_count < full_count
    train_steps(low_rank, batch, steps=3)
    with torch.no_grad():
        expected = low_rank(**batch).logits
    assert not torch.allclose(expected, full_logits)
    low_rank.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert {k.split(".")[-1] for k in saved} == kinds
    reloaded = PeftModel.from_pretrained(make_tiny_moe(family), tmp_path)
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, expected)


def test_a_low_rank_adapter_on_a_base_with_other_expert_shapes_names_the_mismatch(tmp_path):
    model = make_tiny_moe("mixtral")
    get_peft_model(model, MoExtendConfig(new_expert_rank=2)).save_pretrained(tmp_path)
    other_config = MixtralConfig.from_dict({**make_tiny_moe("mixtral").config.to_dict(), "intermediate_size": 48})
    other = MixtralForCausalLM._from_config(other_config)
    with pytest.raises(ValueError, match="other shapes"):
        PeftModel.from_pretrained(other, tmp_path)


@pytest.mark.parametrize("rank", [0, -1, 1.5, "2", True])
def test_bad_new_expert_rank_is_refused(rank):
    with pytest.raises(ValueError, match="new_expert_rank"):
        MoExtendConfig(new_expert_rank=rank)
    with pytest.raises(ValueError, match="zeros"):
        MoExtendConfig(new_expert_rank=2, expert_init="zeros")


def test_new_experts_follow_the_base_dtype_unless_autocast():
    model = make_tiny_moe("mixtral").to(torch.bfloat16)
    kept = get_peft_model(model, MoExtendConfig(), autocast_adapter_dtype=False)
    assert {p.dtype for n, p in kept.named_parameters() if "moextend_" in n} == {torch.bfloat16}
    upcast = get_peft_model(make_tiny_moe("mixtral").to(torch.bfloat16), MoExtendConfig())
    assert {p.dtype for n, p in upcast.named_parameters() if "moextend_" in n} == {torch.float32}


def test_a_4bit_base_with_an_unsupported_moe_family_gets_a_warning_naming_it(tmp_path):
    from transformers import GptOssConfig, GptOssForCausalLM

    from peft_moextend import SMoLAConfig

    config = GptOssConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_local_experts=4,
        num_experts_per_tok=2,
        layer_types=["full_attention"] * 2,
    )
    GptOssForCausalLM._from_config(config, dtype=torch.float32).save_pretrained(tmp_path)
    base = load_4bit(tmp_path, GptOssForCausalLM)
    with pytest.warns(UserWarning, match=r"GptOssMLP at 'model.layers.0.mlp'.*gate_up_proj"):
        get_peft_model(base, SMoLAConfig(r=2, expert_groups={"multimodal": 2}, target_modules=["q_proj"]))
