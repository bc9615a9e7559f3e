"""The five methods on a CUDA GPU: what only shows up there (tensors created on the CPU by a layer or by a growth
operation after the model is on the GPU, per-call tensors left on the CPU, bfloat16 autocast dtypes, bitsandbytes'
CUDA 4-bit kernels).

For each method, with the base model on the device before `get_peft_model` and every growth operation (MoExtend's
`add_stage`, PathWeave's `add_modality`, CMoE's `add_task` with PGKE probes and `fit_locator`) run there: every
tensor stays on the device, bfloat16 autocast training reaches every trainable tensor and no frozen one, fp32 logits
equal the CPU's, cached greedy generation equals uncached, save/reload is exact; and a 4-bit bitsandbytes base
trains, reaches the adapter only and reloads exactly.

Run on a GPU machine: `python -m pytest tests/test_cuda.py`. Without a GPU every test is skipped. The device is
`cuda` unless `PEFT_MOEXTEND_TEST_DEVICE` says otherwise: `PEFT_MOEXTEND_TEST_DEVICE=cpu` runs the same checks on
the CPU (which validates the tests themselves, not the CUDA paths).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

# cuBLAS reads this when its first handle is created: reproducible GEMMs under deterministic mode (see below)
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import pytest  # noqa: E402
import torch  # noqa: E402
from conformance.cases import make_llama, perturb_adapter  # noqa: E402
from peft import PeftModel, get_peft_model  # noqa: E402
from peft.config import PeftConfig  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from tiny_models import make_inputs, make_tiny_moe  # noqa: E402
from tiny_vlms import IMAGE_ID, make_tiny_vlm, make_vlm_inputs  # noqa: E402
from torch import nn  # noqa: E402

from peft_moextend import METHODS, CMoEConfig, ModeXConfig, MoExtendConfig, PathWeaveConfig, SMoLAConfig  # noqa: E402
from peft_moextend.modality import modality_ids_from_input_ids, modality_token_ids  # noqa: E402

DEVICE = os.environ.get("PEFT_MOEXTEND_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU")

# fp32 logits on the device vs the CPU: max |difference| / max |CPU logit|. Measured on the CPU for these scenarios:
# the eval batch computed one sample at a time (other GEMM shapes, so other summation orders) differs from the whole
# batch by at most 6e-7 of the logits' scale; 1e-4 leaves over 100x that for CUDA's own summation orders (TF32 off),
# while the adapters themselves move the logits by 0.5 to 1.6 of that scale (a stage, expert or token mask lost on
# the way is far above it).
FP32_RELATIVE_TOLERANCE = 1e-4

# Tensors that may sit on the CPU inside per-adapter settings: SMoLA's small constants, built with the config and
# moved once to the input's device on first use (`_GroupSettings.expert_group_on`, `eligible`, `zero`; the expert
# modalities only build the eligibility table), (class, attribute).
CPU_CONSTANTS = {
    ("_GroupSettings", "expert_group"),
    ("_GroupSettings", "expert_modality"),
    ("_GroupSettings", "_eligibility"),
    ("_GroupSettings", "_zero"),
}


@pytest.fixture(autouse=True)
def _reproducible_fp32_kernels():
    """Exact comparisons compare two runs on the device: kernels that add with atomics (CUDA's `index_add`, which
    MoExtend's added experts use) would add in a run-dependent order, so deterministic algorithms are on. TF32 (on
    by default for cuDNN convolutions, i.e. the vision towers' patch embeddings) would make "fp32" logits differ from
    the CPU's by 1e-3, so it is off. Both are restored afterwards."""
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.allow_tf32,
        torch.backends.cuda.matmul.allow_tf32,
    )
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved[2:]


# -- per-method scenarios ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Scenario:
    """One method on one tiny model: how to build its base (on the CPU) and config, its batches, the growth
    operations run once the adapter is on the device, and the extra keywords of its calls."""

    name: str
    make_base: Callable[[], nn.Module]
    make_config: Callable[[], PeftConfig]
    # (base) -> {"train": batch whose samples train the newest stage, "eval": batch for logits and generate}
    make_batches: Callable[[nn.Module], dict[str, dict[str, torch.Tensor]]]
    # (peft_model, batches on the device, check) -> None: the growth operations, `check()` after each
    grow: Callable[[PeftModel, dict, Callable[[], None]], None] = lambda peft_model, batches, check: None
    # (batch) -> keywords added to forward calls (not to generate): e.g. explicit `modality_ids`
    call_keywords: Callable[[dict[str, torch.Tensor]], dict] = lambda batch: {}
    generate_keywords: tuple[tuple[str, object], ...] = ()

    @property
    def prefix(self) -> str:
        return METHODS[self.make_config().peft_type].prefix

    def __str__(self) -> str:
        return self.name


def _vlm_batches(family: str) -> Callable[[nn.Module], dict]:
    def make(model: nn.Module) -> dict:
        return {
            "train": make_vlm_inputs(model, family, seed=0),
            "eval": make_vlm_inputs(model, family, seed=1),
        }

    return make


def _explicit_modality_ids(batch: dict[str, torch.Tensor], token_ids: dict[str, int]) -> dict:
    """The modality ids the placeholders give, passed explicitly (the `modality_ids` path of the call inputs)."""
    return {"modality_ids": modality_ids_from_input_ids(batch["input_ids"], token_ids)}


def _moextend_grow(peft_model: PeftModel, batches: dict, check: Callable[[], None]) -> None:
    """A second stage, for image tokens only, its experts copied from each layer's most used expert (measured on the
    device): new tensors, a per-token stage mask and the multi-stage calibration."""
    stage = peft_model.base_model.add_stage("images", batches=[batches["train"]], restrict_to_modalities=["image"])
    assert stage["stage"] == 1
    check()


def _pathweave_grow(peft_model: PeftModel, batches: dict, check: Callable[[], None]) -> None:
    """A second modality stage (text): a new adapter, in-adapters over the image stage's and the noisy gate."""
    peft_model.base_model.add_modality("text")
    check()


# CMoE's two tasks: inputs from disjoint token ranges (as tests/test_cmoe.py)
_CMOE_TASKS = {"low": (3, 40), "high": (80, 127)}


def _cmoe_batch(task: str, seed: int, size: int = 16) -> dict[str, torch.Tensor]:
    input_ids = torch.randint(*_CMOE_TASKS[task], (size, 12), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}


def _cmoe_batches(model: nn.Module) -> dict:
    low, high = _cmoe_batch("low", 99, size=2), _cmoe_batch("high", 99, size=2)
    return {
        "train": _cmoe_batch("high", 0, size=4),
        "train_low": _cmoe_batch("low", 0, size=4),
        "eval": {key: torch.cat([low[key], high[key]]) for key in low},  # two samples of each task
        **{f"{task}_{seed}": _cmoe_batch(task, seed) for task in _CMOE_TASKS for seed in range(4)},
    }


def _cmoe_grow(peft_model: PeftModel, batches: dict, check: Callable[[], None]) -> None:
    """Task "low" (trained a little), its locator fitted; task "high" with PGKE probes trained on the device, which
    extend some layers; its locator fitted. Both locators on the device, read by every eval call without `task=`."""
    tuner = peft_model.base_model
    tuner.add_task("low")
    check()
    _train(peft_model, batches["train_low"], steps=2)
    tuner.fit_locator("low", [batches[f"low_{seed}"] for seed in range(4)])
    check()
    info = tuner.add_task("high", probe_data=[batches[f"high_{seed}"] for seed in range(4)])
    assert info["extended_layers"], info  # some layer gets experts created on the device
    check()
    tuner.fit_locator("high", [batches[f"high_{seed}"] for seed in range(4)])
    check()


SCENARIOS: tuple[Scenario, ...] = (
    Scenario(
        name="moextend",
        make_base=lambda: make_tiny_moe("llava_mixtral"),
        make_config=lambda: MoExtendConfig(num_new_experts=1, router_aux_loss_coef=1e-2),
        make_batches=lambda model: {
            "train": make_inputs(model, "llava_mixtral", seed=0),
            "eval": make_inputs(model, "llava_mixtral", seed=1),
        },
        grow=_moextend_grow,
    ),
    Scenario(
        name="pathweave",
        make_base=lambda: make_tiny_vlm("llava"),
        make_config=lambda: PathWeaveConfig(r=4, modalities=["image"]),
        make_batches=_vlm_batches("llava"),
        grow=_pathweave_grow,
    ),
    Scenario(
        name="cmoe",
        make_base=make_llama,
        make_config=lambda: CMoEConfig(
            r=2, experts_per_task=2, probe_threshold=0.0, probe_steps=4, locator="vae", locator_epochs=40
        ),
        make_batches=_cmoe_batches,
        grow=_cmoe_grow,
        generate_keywords=(("task", ("low", "low", "high", "high")),),
    ),
    Scenario(
        name="smola",
        make_base=lambda: make_tiny_vlm("llava"),
        # the routed path (top-2 within groups of 3) with its load-balancing loss
        make_config=lambda: SMoLAConfig(
            r=2,
            expert_groups={"text": 3, "image": 3, "multimodal": 2},
            router="top_k",
            top_k=2,
            router_aux_loss_coef=1e-2,
        ),
        make_batches=_vlm_batches("llava"),
        call_keywords=lambda batch: _explicit_modality_ids(batch, {"image": IMAGE_ID}),
    ),
    Scenario(
        name="modex",
        make_base=lambda: make_tiny_vlm("llava"),
        make_config=ModeXConfig,
        make_batches=_vlm_batches("llava"),
        call_keywords=lambda batch: _explicit_modality_ids(batch, {"image": IMAGE_ID}),
    ),
)


# -- helpers ----------------------------------------------------------------------------------------------------
def _to(batch: dict[str, torch.Tensor], device: str) -> dict[str, torch.Tensor]:
    return {key: value.to(device) for key, value in batch.items()}


def _train(
    model: nn.Module, batch: dict, steps: int, autocast: bool = False, **keywords
) -> list[dict[str, torch.Tensor | None]]:
    """`steps` AdamW steps on the trainable tensors (under bfloat16 autocast on `DEVICE` with `autocast`); returns
    each step's gradients `{name: grad}`, checking that every loss is finite."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(params.values(), lr=1e-2)
    model.train()
    grads = []
    for _ in range(steps):
        optimizer.zero_grad()
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
            loss = model(**batch, **keywords).loss
        assert loss.isfinite(), float(loss)
        loss.backward()
        grads.append({name: None if p.grad is None else p.grad.detach().clone() for name, p in params.items()})
        optimizer.step()
    model.eval()
    return grads


def _misplaced(model: nn.Module) -> list[str]:
    """Every tensor of `model` not on `DEVICE`: parameters, buffers, and tensors held as plain attributes by this
    package's modules, directly or inside their dicts, lists, tuples and helper objects (settings, routing records,
    call inputs, task selection), except `CPU_CONSTANTS`."""
    tensors = (*model.named_parameters(), *model.named_buffers())
    wrong = [f"{name} ({t.device})" for name, t in tensors if t.device.type != DEVICE]
    seen: set[int] = set()
    module_internals = set(vars(nn.Module()))

    def walk(value: object, path: str, owner: str, attribute: str) -> None:
        if isinstance(value, torch.Tensor):
            if value.device.type not in (DEVICE, "meta") and (owner, attribute) not in CPU_CONSTANTS:
                wrong.append(f"{path} ({value.device})")
            return
        if isinstance(value, nn.Module) or id(value) in seen:  # modules are walked on their own
            return
        seen.add(id(value))
        if isinstance(value, dict):
            for key, item in value.items():
                walk(item, f"{path}[{key!r}]", owner, attribute)
        elif isinstance(value, tuple) and hasattr(value, "_fields"):  # a NamedTuple: its own fields
            for key, item in zip(value._fields, value):
                walk(item, f"{path}.{key}", type(value).__name__, key)
        elif isinstance(value, list | tuple | set | frozenset):
            for index, item in enumerate(value):
                walk(item, f"{path}[{index}]", owner, attribute)
        elif type(value).__module__.startswith("peft_moextend"):
            for key, item in getattr(value, "__dict__", {}).items():
                walk(item, f"{path}.{key}", type(value).__name__, key)

    for name, module in model.named_modules():
        if type(module).__module__.startswith("peft_moextend"):
            for key, item in vars(module).items():
                if key not in module_internals:
                    walk(item, f"{name}.{key}", type(module).__name__, key)
    return wrong


def _assert_on_device(model: nn.Module, when: str) -> None:
    wrong = _misplaced(model)
    assert not wrong, f"{when}: {len(wrong)} tensors are not on {DEVICE}: {wrong[:10]}"


def _built(scenario: Scenario, check_placement: bool = False) -> tuple[PeftModel, dict, dict]:
    """The scenario's adapter on a base already on `DEVICE`, grown there, its adapter perturbed (zero-initialised
    parts non-zero), in eval mode; with the batches on `DEVICE` and the call keywords of the eval batch. With
    `check_placement`, placement is checked after wrapping and after each growth operation."""
    base = scenario.make_base()
    batches = {name: _to(batch, DEVICE) for name, batch in scenario.make_batches(base).items()}
    torch.manual_seed(0)
    peft_model = get_peft_model(base.to(DEVICE), scenario.make_config())

    def check() -> None:
        if check_placement:
            _assert_on_device(peft_model, "after a growth operation")

    if check_placement:
        _assert_on_device(peft_model, "after get_peft_model")
    scenario.grow(peft_model, batches, check)
    fitted = {name: p.detach().clone() for name, p in peft_model.named_parameters() if _is_fitted(name)}
    perturb_adapter(peft_model, scenario.prefix)  # zero-initialised parts become non-zero
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if name in fitted:  # CMoE's task locators and thresholds are fitted statistics, not weights
                p.copy_(fitted[name])
    peft_model.eval()
    return peft_model, batches, scenario.call_keywords(batches["eval"])


def _is_fitted(name: str) -> bool:
    return "cmoe_locator_" in name or "cmoe_threshold_" in name


def _logits(model: nn.Module, batch: dict, keywords: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch, **keywords).logits


# -- 1 placement ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scenario", SCENARIOS, ids=str)
def test_every_tensor_stays_on_the_device_through_growth_training_and_calls(scenario):
    peft_model, batches, keywords = _built(scenario, check_placement=True)
    _train(peft_model, batches["train"], steps=1, **scenario.call_keywords(batches["train"]))
    _logits(peft_model, batches["eval"], keywords)  # per-call state: routing records, task selection, call inputs
    _assert_on_device(peft_model, "after a training step and an eval call")


# -- 2 bfloat16 autocast training -------------------------------------------------------------------------------
@pytest.mark.parametrize("scenario", SCENARIOS, ids=str)
def test_bf16_autocast_training_reaches_every_trainable_tensor_and_no_frozen_one(scenario):
    peft_model, batches, _ = _built(scenario)
    trainable = {name for name, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all(scenario.prefix in name for name in trainable)
    frozen = {name: p.detach().clone() for name, p in peft_model.named_parameters() if not p.requires_grad}
    grads = _train(peft_model, batches["train"], steps=3, autocast=True, **scenario.call_keywords(batches["train"]))
    for name in trainable:
        steps = [step[name] for step in grads]
        assert all(g is not None and g.isfinite().all() for g in steps), name
        assert any(bool(g.ne(0).any()) for g in steps), f"{name} never got a non-zero gradient"
    changed = [name for name, p in peft_model.named_parameters() if name in frozen and not torch.equal(p, frozen[name])]
    assert not changed, changed


# -- 3 fp32 logits: device vs CPU -------------------------------------------------------------------------------
@pytest.mark.parametrize("scenario", SCENARIOS, ids=str)
def test_fp32_logits_on_the_device_equal_the_cpu_logits(scenario, tmp_path):
    """The same adapter (saved on the device, loaded onto the base on the CPU) gives the same fp32 logits."""
    peft_model, batches, keywords = _built(scenario)
    _train(peft_model, batches["train"], steps=2, **scenario.call_keywords(batches["train"]))
    device_logits = _logits(peft_model, batches["eval"], keywords)
    assert device_logits.device.type == DEVICE and device_logits.dtype == torch.float32
    peft_model.save_pretrained(tmp_path)
    on_cpu = PeftModel.from_pretrained(scenario.make_base(), tmp_path).eval()
    cpu_logits = _logits(on_cpu, _to(batches["eval"], "cpu"), _to(keywords, "cpu"))
    error = float((device_logits.cpu() - cpu_logits).abs().max() / cpu_logits.abs().max())
    assert error <= FP32_RELATIVE_TOLERANCE, error
    if scenario.name == "cmoe":  # the locator picked each sample's task alike on both
        located = peft_model.base_model.locate([batches["eval"]])
        assert located == on_cpu.base_model.locate([_to(batches["eval"], "cpu")]) == ["low", "low", "high", "high"]


# -- 4 cached generation ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("scenario", SCENARIOS, ids=str)
def test_cached_greedy_generation_equals_uncached_on_the_device(scenario):
    peft_model, batches, _ = _built(scenario)
    prompt = {key: value for key, value in batches["eval"].items() if key != "labels"}
    settings = {"max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False, **dict(scenario.generate_keywords)}
    # a generated media placeholder would ask an uncached step for media features the prompt does not have
    settings["suppress_tokens"] = list(modality_token_ids(peft_model.get_base_model().config).values()) or None
    with torch.no_grad():
        cached, uncached = (peft_model.generate(**prompt, **settings, use_cache=cache) for cache in (True, False))
        with peft_model.disable_adapter():
            base = peft_model.generate(**prompt, **settings)
    assert cached.device.type == DEVICE
    assert cached.shape == (prompt["input_ids"].shape[0], prompt["input_ids"].shape[1] + 6)
    assert torch.equal(cached, uncached)
    assert not torch.equal(cached, base)  # the adapter takes part in generation


# -- 5 save / reload --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scenario", SCENARIOS, ids=str)
def test_save_and_reload_onto_a_base_on_the_device_is_exact(scenario, tmp_path):
    peft_model, batches, keywords = _built(scenario)
    _train(peft_model, batches["train"], steps=2, **scenario.call_keywords(batches["train"]))
    expected = _logits(peft_model, batches["eval"], keywords)
    peft_model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert saved and all(scenario.prefix in key for key in saved), [k for k in saved if scenario.prefix not in k]
    reloaded = PeftModel.from_pretrained(scenario.make_base().to(DEVICE), tmp_path).eval()
    _assert_on_device(reloaded, "after PeftModel.from_pretrained")
    assert torch.equal(_logits(reloaded, batches["eval"], keywords), expected)


# -- 6 4-bit bitsandbytes base ----------------------------------------------------------------------------------
def _quantized_storage(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the 4-bit storage: bitsandbytes' Linear4bit weights and the fused experts' parametrizations."""
    import bitsandbytes as bnb

    storage = {}
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            storage[name] = module.weight.data.clone()
        for tensor, parametrization in getattr(module, "parametrizations", {}).items():
            storage[f"{name}.{tensor}"] = parametrization.original.detach().clone()
    return storage


# Every method supports 4-bit bases (tests/conformance test 13); these configs suit the tiny (text) Mixtral.
QUANTIZED_CONFIGS: dict[str, Callable[[], PeftConfig]] = {
    "moextend": lambda: MoExtendConfig(num_new_experts=1, router_aux_loss_coef=1e-2),
    "pathweave": lambda: PathWeaveConfig(r=4, modalities=["text"]),
    "cmoe": lambda: CMoEConfig(r=2, experts_per_task=2, tasks=[{"name": "first", "layers": None}]),
    "smola": lambda: SMoLAConfig(r=2, expert_groups={"multimodal": 3}, router="top_k", top_k=2),
    "modex": lambda: ModeXConfig(experts={"text": ["text"], "cross_modal": None}),
}


@pytest.mark.parametrize("method", QUANTIZED_CONFIGS)
def test_a_4bit_base_trains_only_the_adapter_and_reloads_exactly(method, tmp_path):
    """The tiny Mixtral in bitsandbytes 4 bits with bfloat16 compute (its fused experts in 4 bits too, as
    `get_peft_model` stores them), on the device: bitsandbytes' CUDA kernels under the adapters."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    family = "mixtral"
    model = make_tiny_moe(family)
    batch = _to(make_inputs(model, family), DEVICE)
    model.save_pretrained(tmp_path / "base")

    def load_4bit() -> nn.Module:
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16)
        return AutoModelForCausalLM.from_pretrained(
            tmp_path / "base", quantization_config=quantization, dtype=torch.float32, device_map={"": DEVICE}
        )

    torch.manual_seed(0)
    config = QUANTIZED_CONFIGS[method]()
    prefix = METHODS[config.peft_type].prefix
    peft_model = get_peft_model(load_4bit(), config)
    stored = _quantized_storage(peft_model)
    # per decoder layer: q, k, v, o in Linear4bit and the fused experts' gate_up_proj and down_proj in 4 bits
    assert len(stored) == 2 * (4 + 2), sorted(stored)
    _assert_on_device(peft_model, "4-bit base, after get_peft_model")
    perturb_adapter(peft_model, prefix)
    trainable = {name for name, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all(prefix in name for name in trainable)
    grads = _train(peft_model, batch, steps=2)
    for name in trainable:
        assert all(step[name] is not None and step[name].isfinite().all() for step in grads), name
        assert any(bool(step[name].ne(0).any()) for step in grads), f"{name} never got a non-zero gradient"
    assert all(p.grad is None for name, p in peft_model.named_parameters() if name not in trainable)
    assert all(torch.equal(stored[key], value) for key, value in _quantized_storage(peft_model).items())
    expected = _logits(peft_model, batch, {})
    assert expected.device.type == DEVICE and expected.isfinite().all()
    peft_model.save_pretrained(tmp_path / "adapter")
    assert all(prefix in key for key in load_file(tmp_path / "adapter" / "adapter_model.safetensors"))
    reloaded = PeftModel.from_pretrained(load_4bit(), tmp_path / "adapter").eval()
    assert torch.equal(_logits(reloaded, batch, {}), expected)
