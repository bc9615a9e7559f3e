"""The contract every method of the package keeps, checked on tiny models (issue: conformance suite).

Points: 1 injection and gradients, 2 Trainer (aux loss, checkpoints, resume), 3 save/load paths, 4 multiple
adapters, 5 quantized bases, 6 gradient checkpointing and torch.compile, 8 Hub upload, 9 disable / unload /
delete leave exactly the base model, 10 mixed precision with mixed batches, 11 cached generation, 12
`modules_to_save` (heads, projectors), 13 4-bit MoE bases (4-bit experts). (7, distributed: see
test_distributed.py; PEFT's custom-model points: test_peft_contract.py.)
"""

from __future__ import annotations

import contextlib
import inspect
import json
from types import SimpleNamespace

import pytest
import torch
from helpers import load_quantized_with_reference, run_python, snapshot, train_steps
from huggingface_hub import HfApi, ModelCard
from peft import AutoPeftModelForSequenceClassification, PeftModel, get_peft_model, prepare_model_for_kbit_training
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file
from tiny_models import MOE_FAMILIES
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    BitsAndBytesConfig,
    LlamaForSequenceClassification,
    MixtralForSequenceClassification,
    Trainer,
    TrainingArguments,
)

from conformance.cases import (
    CASES,
    FAMILY_CASES,
    REPRESENTATIVE_CASES,
    case_id,
    is_vision_language,
    make_batch,
    make_mixed_batch,
    make_model,
    perturb_adapter,
)
from peft_moextend.auto import AutoPeftModelForImageTextToText
from peft_moextend.callbacks import add_router_aux_loss_logging
from peft_moextend.modality import modality_token_ids


def adapter_names(model, prefix: str) -> set[str]:
    return {n for n, _ in model.named_parameters() if prefix in n}


# 1 -------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("case", "family"), FAMILY_CASES, ids=case_id)
def test_1_injection_counts_and_gradients(case, family):
    model = make_model(family)
    batch = make_batch(model, family)
    peft_model = get_peft_model(model, case.make_config(family, 0))
    added = adapter_names(peft_model, case.prefix)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert added and trainable == added
    count, _ = peft_model.get_nb_trainable_parameters()
    assert count == sum(p.numel() for n, p in peft_model.named_parameters() if n in added)
    perturb_adapter(peft_model, case.prefix)
    peft_model.train()
    peft_model(**batch).loss.backward()
    assert {n for n, p in peft_model.named_parameters() if p.grad is not None} == added


# 2 -------------------------------------------------------------------------------------------------------------
def _trainer(model, family, output_dir, max_steps, seed=0):
    rows = [make_batch(model, family, batch_size=1, seed=i % 4) for i in range(16)]
    dataset = [{k: v[0] for k, v in row.items()} for row in rows]
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        logging_steps=1,
        save_steps=3,
        save_strategy="steps",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=seed,
        data_seed=seed,
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset)
    add_router_aux_loss_logging(trainer)
    return trainer


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_2_trainer_logs_aux_loss_saves_adapter_only_and_resumes_exactly(case, tmp_path):
    family = case.text_family
    torch.manual_seed(0)
    peft_model = get_peft_model(make_model(family), case.make_config(family, 0))
    before = snapshot(peft_model)
    trainer = _trainer(peft_model, family, tmp_path / "run", max_steps=6)
    trainer.train()
    changed = {n for n, p in peft_model.named_parameters() if not torch.equal(before[n], p)}
    assert changed and changed <= adapter_names(peft_model, case.prefix)
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert sum(e["loss"] for e in logs[-2:]) < sum(e["loss"] for e in logs[:2])
    if case.has_router_aux_loss:
        assert all(e["router_aux_loss"] > 0 for e in logs)
    checkpoint = tmp_path / "run" / "checkpoint-3"
    files = {p.name for p in checkpoint.iterdir()}
    assert "adapter_model.safetensors" in files and not files & {"model.safetensors", "pytorch_model.bin"}
    assert all(case.prefix in key for key in load_file(checkpoint / "adapter_model.safetensors"))
    final = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}

    torch.manual_seed(0)
    resumed_model = get_peft_model(make_model(family), case.make_config(family, 0))
    _trainer(resumed_model, family, tmp_path / "run", max_steps=6).train(resume_from_checkpoint=str(checkpoint))
    resumed = {n: p.detach() for n, p in resumed_model.named_parameters() if p.requires_grad}
    for name, value in final.items():
        torch.testing.assert_close(resumed[name], value, rtol=1e-5, atol=1e-6)


# 3 -------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("case", "family"), REPRESENTATIVE_CASES, ids=case_id)
def test_3_reload_in_a_fresh_process_through_every_loading_path(case, family, tmp_path):
    vision = is_vision_language(family)
    auto_model = AutoModelForImageTextToText if vision else AutoModelForCausalLM
    make_model(family).save_pretrained(tmp_path / "base")
    base = auto_model.from_pretrained(tmp_path / "base", dtype=torch.float32, attn_implementation="eager")
    batch = make_batch(base, family)
    peft_model = get_peft_model(base, case.make_config(family, 0))
    perturb_adapter(peft_model, case.prefix)
    with torch.no_grad():
        expected = peft_model(**batch).logits
    peft_model.save_pretrained(tmp_path / "adapter")
    torch.save(batch, tmp_path / "batch.pt")
    auto_peft = "AutoPeftModelForImageTextToText" if vision else "AutoPeftModelForCausalLM"
    auto_import = "from peft_moextend.auto import" if vision else "from peft import"
    run_python(
        f"""
        import torch, peft_moextend
        from peft import PeftModel
        {auto_import} {auto_peft}
        from transformers import {auto_model.__name__}
        batch = torch.load("{tmp_path / "batch.pt"}")
        def base():
            return {auto_model.__name__}.from_pretrained("{tmp_path / "base"}", dtype=torch.float32,
                                                          attn_implementation="eager")
        loaded = {{
            "peft_model": PeftModel.from_pretrained(base(), "{tmp_path / "adapter"}"),
            "auto": {auto_peft}.from_pretrained("{tmp_path / "adapter"}", dtype=torch.float32,
                                                 attn_implementation="eager"),
        }}
        plain = base()
        plain.load_adapter("{tmp_path / "adapter"}")
        loaded["load_adapter"] = plain
        with torch.no_grad():
            torch.save({{k: m(**batch).logits for k, m in loaded.items()}}, "{tmp_path / "logits.pt"}")
        """
    )
    for path, logits in torch.load(tmp_path / "logits.pt").items():
        assert torch.equal(logits, expected), path

    resumed = PeftModel.from_pretrained(
        auto_model.from_pretrained(tmp_path / "base", attn_implementation="eager"),
        tmp_path / "adapter",
        is_trainable=True,
    )
    assert {n for n, p in resumed.named_parameters() if p.requires_grad} == adapter_names(resumed, case.prefix)
    before = snapshot(resumed)
    train_steps(resumed, batch, steps=2)
    assert any(not torch.equal(before[n], p) for n, p in resumed.named_parameters() if case.prefix in n)


# 4 -------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("case", "family"), REPRESENTATIVE_CASES, ids=case_id)
def test_4_multiple_adapters(case, family):
    model = make_model(family)
    batch = make_batch(model, family)
    with torch.no_grad():
        base_logits = model(**batch).logits
    peft_model = get_peft_model(model, case.make_config(family, 0))
    peft_model.add_adapter("second", case.make_config(family, 1))
    perturb_adapter(peft_model, case.prefix)
    with torch.no_grad():
        first = peft_model(**batch).logits
        peft_model.set_adapter("second")
        assert all(".second" in n for n, p in peft_model.named_parameters() if p.requires_grad)
        second = peft_model(**batch).logits
        assert not torch.allclose(first, second)
        with peft_model.disable_adapter():
            assert torch.equal(peft_model(**batch).logits, base_logits)
        peft_model.set_adapter("default")
        assert torch.equal(peft_model(**batch).logits, first)
        peft_model.delete_adapter("second")
        assert not any(".second" in n for n, _ in peft_model.named_parameters())
        assert torch.equal(peft_model(**batch).logits, first)


# 5 -------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_5_quantized_base_gradients_match_dequantized_model(case, bits, tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    family = case.text_family
    model = make_model(family)
    batch = make_batch(model, family)
    model.save_pretrained(tmp_path)
    quantized, reference = load_quantized_with_reference(tmp_path, bits)
    batch = {key: value.to(quantized.device) for key, value in batch.items()}
    quantized = prepare_model_for_kbit_training(quantized, use_gradient_checkpointing=False)
    grads = []
    for base in (quantized, reference):
        torch.manual_seed(0)
        peft_model = get_peft_model(base, case.make_config(family, 0))
        perturb_adapter(peft_model, case.prefix)
        peft_model.eval()
        with torch.no_grad():
            peft_model(**batch)  # an eval forward first: the CPU 4-bit repacking trap
        peft_model.train()
        peft_model(**batch).loss.backward()
        grads.append({n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad})
    layer_cls = bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt
    assert any(isinstance(m, layer_cls) for m in quantized.modules())
    # the plugin itself protects 4-bit layers from the CPU AVX512-BF16 repacking trap
    assert not any(getattr(m, "support_avx512bf16_for_cpu", False) for m in quantized.modules())
    # 4-bit dequantizes then runs the fp32 matmul (on CUDA the reference's matmuls may take other kernels);
    # LLM.int8 also quantizes activations (on CUDA after casting them to float16)
    on_cpu = quantized.device.type == "cpu"
    tolerance = (1e-5 if on_cpu else 1e-3) if bits == 4 else (0.05 if on_cpu else 0.1)
    for name, expected in grads[1].items():
        error = (grads[0][name] - expected).norm() / expected.norm().clamp_min(1e-12)
        assert error < tolerance, (name, float(error))


# 6 -------------------------------------------------------------------------------------------------------------
def _grads(case, family, checkpointing: dict | None):
    model = make_model(family)
    batch = make_batch(model, family)
    torch.manual_seed(0)
    peft_model = get_peft_model(model, case.make_config(family, 0))
    perturb_adapter(peft_model, case.prefix)
    if checkpointing is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
    peft_model.train()
    loss = peft_model(**{**batch, "use_cache": False}).loss
    loss.backward()
    return {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(("case", "family"), REPRESENTATIVE_CASES, ids=case_id)
def test_6_gradient_checkpointing_gives_the_same_gradients(case, family):
    expected = _grads(case, family, None)
    got = _grads(case, family, {"use_reentrant": False})
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-7)
    if case.has_router_aux_loss:
        # reentrant checkpointing runs layers without autograd: the aux loss would silently get no gradient
        with pytest.raises(RuntimeError, match="use_reentrant"):
            _grads(case, family, {"use_reentrant": True})


@pytest.mark.parametrize(("case", "family"), REPRESENTATIVE_CASES, ids=case_id)
def test_6_torch_compile_keeps_the_outputs(case, family):
    model = make_model(family)
    batch = make_batch(model, family)
    peft_model = get_peft_model(model, case.make_config(family, 0))
    perturb_adapter(peft_model, case.prefix)
    with torch.no_grad():
        expected = peft_model(**batch)
        compiled = torch.compile(peft_model, backend="aot_eager")(**batch)
    torch.testing.assert_close(compiled.logits, expected.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled.loss, expected.loss, rtol=1e-5, atol=1e-5)


# 8 -------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_8_push_to_hub_uploads_adapter_files_and_model_card(case, tmp_path, monkeypatch):
    from huggingface_hub import CommitOperationAdd

    family = case.text_family
    make_model(family).save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    peft_model = get_peft_model(base, case.make_config(family, 0))
    uploaded = {}

    def create_commit(self, repo_id, operations, **kwargs):
        for op in operations:
            assert isinstance(op, CommitOperationAdd)
            content = op.path_or_fileobj
            uploaded[op.path_in_repo] = content.read() if hasattr(content, "read") else open(content, "rb").read()

    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kwargs: SimpleNamespace(repo_id=repo_id))
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    peft_model.push_to_hub("me/my-experts", token="dummy")
    assert set(uploaded) == {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    assert json.loads(uploaded["adapter_config.json"])["peft_type"] == case.peft_type.value
    (tmp_path / "README.md").write_bytes(uploaded["README.md"])
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.library_name == "peft"
    assert card.data.base_model == str(tmp_path / "base")
    assert {"peft-moextend", case.name} <= set(card.data.tags)
    assert "import peft_moextend" in card.text

    hub_like = tmp_path / "hub_repo"  # loading from a local folder laid out like the Hub repo
    hub_like.mkdir()
    for name, content in uploaded.items():
        (hub_like / name).write_bytes(content)
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), hub_like)
    batch = make_batch(base, family)
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, peft_model(**batch).logits)


# 9 -------------------------------------------------------------------------------------------------------------
_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


def _hooks(module: torch.nn.Module) -> dict[str, list]:
    return {d: list(getattr(module, d, {})) for d in _HOOK_DICTS}


def model_trace(model: torch.nn.Module) -> dict:
    """Per module: its class, its instance attribute names and its registered hooks."""
    return {name: (type(m), sorted(vars(m)), _hooks(m)) for name, m in model.named_modules()}


def _configs_for_trace(case, family):
    configs = [(case.make_config(family, 0), {})]
    if case.make_image_config is not None and not is_vision_language(family):
        configs.append((case.make_image_config(), {"modality_ids": None}))  # needs explicit ids on a text model
    return configs


@pytest.mark.parametrize(("case", "family"), REPRESENTATIVE_CASES, ids=case_id)
def test_9_disable_and_unload_give_back_exactly_the_base_model(case, family):
    for config, needs in _configs_for_trace(case, family):
        model = make_model(family)
        batch = make_batch(model, family)
        with torch.no_grad():
            base_logits = model(**batch).logits
        trace, signature = model_trace(model), inspect.signature(model.forward)
        peft_model = get_peft_model(model, config)
        perturb_adapter(peft_model, case.prefix)
        assert {"modality_ids", "task"} <= set(inspect.signature(model.forward).parameters)  # the Trainer keeps them
        with torch.no_grad():
            if needs:  # the layers cannot tell image tokens apart on a text model: a clear error, then explicit ids
                with pytest.raises(ValueError, match="modality_ids"):
                    peft_model(**batch)
                ids = torch.zeros_like(batch["input_ids"])
                ids[:, ::3] = 1
                adapted = peft_model(**batch, modality_ids=ids).logits
            else:
                adapted = peft_model(**batch).logits
            assert not torch.equal(adapted, base_logits)
            with peft_model.disable_adapter():
                assert torch.equal(peft_model(**batch).logits, base_logits)
                assert torch.equal(model(**batch).logits, base_logits)  # the plain model, inside the context
            assert torch.equal(peft_model(**batch, **({"modality_ids": ids} if needs else {})).logits, adapted)
        unloaded = peft_model.unload()
        assert unloaded is model
        assert model_trace(unloaded) == trace  # no hooks, attributes or wrapped modules left behind
        assert "forward" not in vars(unloaded) and inspect.signature(unloaded.forward) == signature
        with torch.no_grad():
            assert torch.equal(unloaded(**batch).logits, base_logits)


@pytest.mark.parametrize(("case", "family"), REPRESENTATIVE_CASES, ids=case_id)
def test_9_deleting_the_last_adapter_leaves_no_hooks_keywords_or_settings(case, family):
    model = make_model(family)
    batch = make_batch(model, family)
    with torch.no_grad():
        base_logits = model(**batch).logits
    hooks = {id(m): _hooks(m) for m in model.modules()}
    signature = inspect.signature(model.forward)
    peft_model = get_peft_model(model, case.make_config(family, 0))
    peft_model.add_adapter("second", case.make_config(family, 1))
    perturb_adapter(peft_model, case.prefix)
    with torch.no_grad():
        peft_model(**batch)
    peft_model.delete_adapter("second")
    peft_model.delete_adapter("default")
    plain = peft_model.base_model.model  # (PeftModel itself needs an adapter to call, for LoRA too)
    layers = [m for m in plain.modules() if isinstance(m, BaseTunerLayer)]
    assert layers  # PEFT keeps the (now empty) wrappers, as for LoRA
    for layer in layers:  # every per-adapter container and setting is gone (e.g. CMoE's cmoe_settings)
        for name in (*layer.adapter_layer_names, *layer.other_param_names):
            assert not len(getattr(layer, name)), (type(layer).__name__, name)
    # the base modules have exactly their own hooks again, the (empty) wrappers none
    assert all(_hooks(m) == hooks.get(id(m), _hooks(torch.nn.Module())) for m in plain.modules())
    assert "forward" not in vars(plain) and inspect.signature(plain.forward) == signature
    with torch.no_grad():
        assert torch.equal(plain(**batch).logits, base_logits)


# 10 ------------------------------------------------------------------------------------------------------------
def _merge_call_keywords(per_sample: list[dict]) -> dict:
    return {key: [kw[key] for kw in per_sample] for key in per_sample[0]}


def _mixed_precision_model(case, family, base_dtype, autocast_adapter_dtype):
    model = make_model(family).to(base_dtype)
    mixed, singles = make_mixed_batch(model, family)
    torch.manual_seed(0)
    peft_model = get_peft_model(model, case.make_config(family, 0), autocast_adapter_dtype=autocast_adapter_dtype)
    per_sample = case.split_samples(peft_model)
    perturb_adapter(peft_model, case.prefix)
    return peft_model, mixed, singles, per_sample


def _check_mixed_batch(peft_model, mixed, singles, per_sample, context):
    """Forward, a training step and generate on a batch that mixes modalities/tasks: finite, and each sample's
    outputs equal (within bfloat16 tolerance) those of the sample computed alone."""
    mixed_kwargs = _merge_call_keywords(per_sample)
    prompt = {k: v for k, v in mixed.items() if k != "labels"}
    peft_model.eval()
    with context(), torch.no_grad():
        logits = peft_model(**mixed, **mixed_kwargs).logits.float()
        assert logits.isfinite().all()
        for index, (single, kwargs) in enumerate(zip(singles, per_sample)):
            alone = peft_model(**single, **kwargs).logits.float()
            torch.testing.assert_close(logits[index], alone[0], rtol=3e-2, atol=3e-2)
        generated = peft_model.generate(
            **prompt,
            **mixed_kwargs,
            max_new_tokens=3,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
        )
        assert generated.sequences.shape == (2, prompt["input_ids"].shape[1] + 3)
        assert all(score.isfinite().all() for score in generated.scores)
        for index, (single, kwargs) in enumerate(zip(singles, per_sample)):
            single_prompt = {k: v for k, v in single.items() if k != "labels"}
            alone = peft_model.generate(
                **single_prompt,
                **kwargs,
                max_new_tokens=1,
                do_sample=False,
                output_scores=True,
                return_dict_in_generate=True,
            )
            torch.testing.assert_close(
                generated.scores[0][index].float(), alone.scores[0][0].float(), rtol=3e-2, atol=3e-2
            )
    peft_model.train()
    with context():
        loss = peft_model(**mixed, **mixed_kwargs).loss
    assert loss.isfinite()
    loss.backward()
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all(p.grad is not None and p.grad.isfinite().all() for p in trainable.values())


@pytest.mark.parametrize(("case", "family"), REPRESENTATIVE_CASES, ids=case_id)
def test_10_bf16_autocast_with_batches_that_mix_modalities_and_tasks(case, family):
    peft_model, mixed, singles, per_sample = _mixed_precision_model(case, family, torch.float32, True)
    _check_mixed_batch(peft_model, mixed, singles, per_sample, lambda: torch.autocast("cpu", dtype=torch.bfloat16))


@pytest.mark.parametrize(("case", "family"), REPRESENTATIVE_CASES, ids=case_id)
def test_10_bf16_base_keeps_adapters_in_its_dtype_unless_autocast(case, family):
    peft_model, mixed, singles, per_sample = _mixed_precision_model(case, family, torch.bfloat16, False)
    adapter = {n: p.dtype for n, p in peft_model.named_parameters() if case.prefix in n}
    locators = {n for n in adapter if "cmoe_locator" in n}  # CMoE's density models stay float32 by design
    assert adapter and all(dtype == torch.bfloat16 for n, dtype in adapter.items() if n not in locators)
    _check_mixed_batch(peft_model, mixed, singles, per_sample, contextlib.nullcontext)
    upcast, *_ = _mixed_precision_model(case, family, torch.bfloat16, True)  # PEFT's default, as for LoRA
    assert all(p.dtype == torch.float32 for n, p in upcast.named_parameters() if case.prefix in n)


# 11 ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("case", "family"), REPRESENTATIVE_CASES, ids=case_id)
def test_11_cached_greedy_generation_equals_uncached(case, family):
    model = make_model(family)
    batch = make_batch(model, family)
    peft_model = get_peft_model(model, case.make_config(family, 0))
    perturb_adapter(peft_model, case.prefix, scale=0.3)
    prompt = {k: v for k, v in batch.items() if k != "labels"}
    # a generated media placeholder would ask an uncached step for media features the prompt does not have
    settings = {"max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False}
    settings["suppress_tokens"] = list(modality_token_ids(model.config).values()) or None
    with torch.no_grad():
        runs = [peft_model.generate(**prompt, **settings, use_cache=use_cache) for use_cache in (True, False)]
        with peft_model.disable_adapter():
            base = peft_model.generate(**prompt, **settings)
    assert runs[0].shape == (prompt["input_ids"].shape[0], prompt["input_ids"].shape[1] + 6)
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], base)  # the adapter changes what is generated


# 12 ------------------------------------------------------------------------------------------------------------
def _sequence_classifier(family: str, tmp_path) -> tuple[type, dict]:
    """The text family as a 3-label sequence classifier, saved to `tmp_path / "base"`; returns its class and a
    labelled batch."""
    model = make_model(family)
    classifier_cls = MixtralForSequenceClassification if family in MOE_FAMILIES else LlamaForSequenceClassification
    config = model.config
    config.num_labels, config.pad_token_id = 3, 0
    torch.manual_seed(0)
    classifier_cls._from_config(config, attn_implementation="eager").save_pretrained(tmp_path / "base")
    batch = make_batch(model, family)
    return classifier_cls, {**batch, "labels": torch.tensor([0, 2])}


def _extra_keys(folder, prefix: str) -> set[str]:
    return {k for k in load_file(folder / "adapter_model.safetensors") if prefix not in k}


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_12_seq_cls_trains_and_saves_the_head_as_lora_does(case, tmp_path):
    family = case.text_family
    classifier_cls, batch = _sequence_classifier(family, tmp_path)
    model = classifier_cls.from_pretrained(tmp_path / "base", dtype=torch.float32)
    config = case.make_config(family, 0)
    config.task_type = "SEQ_CLS"
    peft_model = get_peft_model(model, config)
    head = "score.modules_to_save.default.weight"
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert {n for n in trainable if case.prefix not in n} == {f"base_model.model.{head}"}
    before = snapshot(peft_model)
    train_steps(peft_model, batch, steps=3)
    changed = {n for n, p in peft_model.named_parameters() if not torch.equal(before[n], p)}
    assert f"base_model.model.{head}" in changed and changed <= trainable  # the original head stays frozen
    with torch.no_grad():
        expected = peft_model(**batch).logits
    peft_model.save_pretrained(tmp_path / "adapter")
    assert _extra_keys(tmp_path / "adapter", case.prefix) == {"base_model.model.score.weight"}

    def base():
        return classifier_cls.from_pretrained(tmp_path / "base", dtype=torch.float32)

    plain = base()
    plain.load_adapter(str(tmp_path / "adapter"))
    loaded = {
        "peft_model": PeftModel.from_pretrained(base(), tmp_path / "adapter"),
        "auto": AutoPeftModelForSequenceClassification.from_pretrained(tmp_path / "adapter", dtype=torch.float32),
        "load_adapter": plain,
    }
    with torch.no_grad():
        for path, reloaded in loaded.items():
            assert torch.equal(reloaded(**batch).logits, expected), path


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_12_a_projector_in_modules_to_save_trains_saves_and_reloads_per_adapter(case, tmp_path):
    family = case.vision_family
    make_model(family).save_pretrained(tmp_path / "base")

    def base():
        return AutoModelForImageTextToText.from_pretrained(
            tmp_path / "base", dtype=torch.float32, attn_implementation="eager"
        )

    model = base()
    batch = make_batch(model, family)
    with torch.no_grad():
        base_logits = model(**batch).logits
    configs = [case.make_config(family, variant) for variant in (0, 1)]
    for config in configs:
        config.modules_to_save = ["multi_modal_projector"]
    peft_model = get_peft_model(model, configs[0])
    peft_model.add_adapter("second", configs[1])
    logits = {}
    for adapter in ("second", "default"):
        peft_model.set_adapter(adapter)
        projector = {n for n, p in peft_model.named_parameters() if p.requires_grad and case.prefix not in n}
        assert projector and all(f"multi_modal_projector.modules_to_save.{adapter}." in n for n in projector)
        before = snapshot(peft_model)
        train_steps(peft_model, batch, steps=2)
        changed = {n for n, p in peft_model.named_parameters() if not torch.equal(before[n], p)}
        assert projector <= changed and all(case.prefix in n or n in projector for n in changed)
        with torch.no_grad():
            logits[adapter] = peft_model(**batch).logits
    with torch.no_grad(), peft_model.disable_adapter():
        assert torch.equal(peft_model(**batch).logits, base_logits)
    peft_model.save_pretrained(tmp_path / "adapter")
    for folder in (tmp_path / "adapter", tmp_path / "adapter" / "second"):
        extra = _extra_keys(folder, case.prefix)
        assert extra and all(".multi_modal_projector." in k for k in extra)

    reloaded = PeftModel.from_pretrained(base(), tmp_path / "adapter")
    reloaded.load_adapter(tmp_path / "adapter" / "second", adapter_name="second")
    auto = AutoPeftModelForImageTextToText.from_pretrained(
        tmp_path / "adapter", dtype=torch.float32, attn_implementation="eager"
    )
    plain = base()
    plain.load_adapter(str(tmp_path / "adapter"))
    with torch.no_grad():
        for adapter in ("default", "second"):
            reloaded.set_adapter(adapter)
            assert torch.equal(reloaded(**batch).logits, logits[adapter]), adapter
        assert torch.equal(auto(**batch).logits, logits["default"])
        assert torch.equal(plain(**batch).logits, logits["default"])


# 13 ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_13_a_4bit_moe_base_gets_4bit_experts_for_every_method(case, tmp_path):
    pytest.importorskip("bitsandbytes")
    family = "mixtral"
    model = make_model(family)
    batch = make_batch(model, family)
    model.save_pretrained(tmp_path / "base")

    def load_4bit():
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
        return AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=config, dtype=torch.float32)

    def expert_storage(peft_model):
        experts = [m for m in peft_model.modules() if "gate_up_proj" in getattr(m, "parametrizations", {})]
        return {
            f"{i}.{name}": module.parametrizations[name].original.clone()
            for i, module in enumerate(experts)
            for name in ("gate_up_proj", "down_proj")
        }

    peft_model = get_peft_model(load_4bit(), case.make_config(family, 0))
    stored = expert_storage(peft_model)
    assert len(stored) == 4 and all(t.dtype == torch.uint8 for t in stored.values())  # 2 MoE layers, 4-bit
    perturb_adapter(peft_model, case.prefix)
    train_steps(peft_model, batch, steps=2)
    assert {n for n, p in peft_model.named_parameters() if p.requires_grad} == adapter_names(peft_model, case.prefix)
    assert all(torch.equal(stored[k], v) for k, v in expert_storage(peft_model).items())
    with torch.no_grad():
        expected = peft_model(**batch).logits
    peft_model.save_pretrained(tmp_path / "adapter")
    assert all(case.prefix in k for k in load_file(tmp_path / "adapter" / "adapter_model.safetensors"))
    reloaded = PeftModel.from_pretrained(load_4bit(), tmp_path / "adapter")
    assert len(expert_storage(reloaded)) == 4
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, expected, rtol=0, atol=1e-4)
