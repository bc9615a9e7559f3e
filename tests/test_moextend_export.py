"""MoExtend -> a plain transformers MoE (`merge_and_unload`): same class with the new experts appended, logits of the
adapted model, a checkpoint plain transformers loads without this package; refusals that name the option."""

from __future__ import annotations

import json

import pytest
import torch
from conformance.cases import perturb_adapter
from helpers import run_python
from peft import get_peft_model
from tiny_models import MOE_FAMILIES, NUM_EXPERTS, make_inputs, make_tiny_moe, text_config

from peft_moextend import MoExtendConfig, quantize_moe_experts
from peft_moextend.compat import known_upstream_break
from peft_moextend.moe_families import MOE_FAMILIES as FAMILY_REGISTRY
from peft_moextend.moe_families import find_moe_blocks
from peft_moextend.moextend.router import extended_routing

NEW = 2


def adapted(family: str, seed: int = 0, **options) -> tuple[torch.nn.Module, dict]:
    """A tiny `family` model with a trained-looking MoExtend adapter (perturbed), and a batch without labels."""
    model = make_tiny_moe(family, seed=seed)
    batch = make_inputs(model, family)
    batch.pop("labels")
    config = MoExtendConfig(num_new_experts=NEW, calibration=False, router_aux_loss_coef=0.0, **options)
    peft_model = get_peft_model(model, config)
    perturb_adapter(peft_model, "moextend_")
    return peft_model, batch


def expert_count(model) -> int:
    config = text_config(model)
    return getattr(config, "num_local_experts", None) or config.num_experts


@pytest.mark.parametrize("rank", [None, 2], ids=["full", "low_rank"])
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_merge_and_unload_returns_the_same_moe_class_with_the_new_experts(family, rank):
    peft_model, batch = adapted(family, new_expert_rank=rank)
    model_class = type(peft_model.get_base_model())
    with torch.no_grad():
        expected = peft_model(**batch).logits
    merged = peft_model.merge_and_unload()
    assert type(merged) is model_class and expert_count(merged) == NUM_EXPERTS + NEW
    assert not [n for n, _ in merged.named_modules() if "moextend" in n.lower()]
    assert not [n for n, _ in merged.named_parameters() if "moextend_" in n]
    for _, block in find_moe_blocks(merged):
        assert block.experts.gate_up_proj.shape[0] == NUM_EXPERTS + NEW
        assert block.experts.down_proj.shape[0] == NUM_EXPERTS + NEW
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, expected, rtol=0, atol=1e-5)


def test_exported_checkpoints_load_in_plain_transformers_without_this_package(tmp_path):
    """Every family (that the installed transformers does not break upstream, see `peft_moextend.compat`):
    `save_pretrained` of the export, loaded in a fresh process that never imports peft_moextend, gives the adapted
    model's logits."""
    cases = []
    for family in [f for f in MOE_FAMILIES if known_upstream_break(make_tiny_moe(f)) is None]:
        peft_model, batch = adapted(family, seed=1)
        with torch.no_grad():
            expected = peft_model(**batch).logits
        merged = peft_model.merge_and_unload()
        folder = tmp_path / family
        merged.save_pretrained(folder)
        torch.save({"batch": batch, "logits": expected}, folder / "reference.pt")
        cases.append({"folder": str(folder), "class": type(merged).__name__})
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    output = run_python(
        f"""
        import json, sys, torch, transformers
        for case in json.loads(open({str(tmp_path / "cases.json")!r}).read()):
            model = getattr(transformers, case["class"]).from_pretrained(case["folder"], dtype=torch.float32).eval()
            reference = torch.load(case["folder"] + "/reference.pt", weights_only=True)
            with torch.no_grad():
                logits = model(**reference["batch"]).logits
            torch.testing.assert_close(logits, reference["logits"], rtol=0, atol=1e-5)
            print(case["class"], "ok")
        assert not any(name.startswith("peft_moextend") for name in sys.modules)
        """
    )
    assert output.split() == [word for case in cases for word in (case["class"], "ok")]


def test_calibration_is_refused_with_the_option_to_change():
    peft_model, _ = adapted("mixtral")
    peft_model.peft_config["default"].calibration = True  # as trained with the paper's default
    with pytest.raises(ValueError, match=r"calibration=True.*MoExtendConfig\(calibration=False\)"):
        peft_model.merge_and_unload()


def test_restrict_to_modalities_is_refused_with_the_option_to_change():
    peft_model, _ = adapted("llava_mixtral", restrict_to_modalities=["image"])
    with pytest.raises(ValueError, match=r"restrict_to_modalities=\['image'\].*Train without"):
        peft_model.merge_and_unload()


def test_layers_extended_unevenly_are_refused():
    peft_model, _ = adapted("mixtral", target_layers=[1])
    with pytest.raises(ValueError, match=r"one expert count for every MoE layer.*target_layers=None"):
        peft_model.merge_and_unload()


def test_several_adapters_ask_which_one_and_the_chosen_one_is_exported():
    peft_model, batch = adapted("mixtral")
    peft_model.add_adapter("other", MoExtendConfig(num_new_experts=1, calibration=False))
    with pytest.raises(ValueError, match=r"exports one MoExtend adapter.*adapter_names=\[name\]"):
        peft_model.merge_and_unload(adapter_names=["default", "other"])
    with pytest.raises(ValueError, match=r"No adapter 'missing'"):
        peft_model.merge_and_unload(adapter_names=["missing"])
    with torch.no_grad():
        expected = peft_model(**batch).logits  # "default" is active
    merged = peft_model.merge_and_unload(adapter_names=["default"])
    assert expert_count(merged) == NUM_EXPERTS + NEW
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, expected, rtol=0, atol=1e-5)


def test_4bit_experts_are_refused_with_how_to_export():
    pytest.importorskip("bitsandbytes")
    model = make_tiny_moe("mixtral")
    quantize_moe_experts(model)
    peft_model = get_peft_model(model, MoExtendConfig(num_new_experts=1, calibration=False))
    with pytest.raises(ValueError, match=r"stored in 4 bits.*without `quantization_config`"):
        peft_model.merge_and_unload()


def test_llama4_routing_ranks_logits_when_their_sigmoids_saturate():
    """Llama 4 picks top-k on the logits: 71.3 and 67.8 win although sigmoid(67.6) == sigmoid(67.8) == 1."""
    base = torch.tensor([[71.3, 21.3, 39.4, 26.2]])
    new = torch.tensor([[67.6, 67.8]])
    _, index, weights = extended_routing(FAMILY_REGISTRY["Llama4TextMoe"], base, new, 2, False, None)
    assert sorted(index[0].tolist()) == [0, 5] and torch.equal(weights, torch.ones(1, 2))


def test_llama4_base_experts_keep_expert_0_when_the_other_slot_is_a_new_expert():
    """A slot sent to a new expert reaches the base kernel as expert 0 with weight 0; expert 0's real weight in the
    other slot must survive (a plain scatter of the duplicate index could overwrite it)."""
    model = make_tiny_moe("llama4")
    (_, block), *_ = find_moe_blocks(model)
    family = FAMILY_REGISTRY["Llama4TextMoe"]
    hidden = torch.randn(3, block.hidden_dim)
    with torch.no_grad():
        with_dummy = family.routed_experts(block, hidden, torch.tensor([[0, 0]] * 3), torch.tensor([[0.7, 0.0]] * 3))
        alone = family.routed_experts(block, hidden, torch.tensor([[0, 1]] * 3), torch.tensor([[0.7, 0.0]] * 3))
    torch.testing.assert_close(with_dummy, alone, rtol=0, atol=0)
