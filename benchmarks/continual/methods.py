"""How each compared method is set up and trained through the task sequence.

Every method adapts the upper half of the language model (layers 15-29 of 30) so that they see the same layers;
the towers stay frozen. A method is a small class: `create` wraps the model, `start_stage` runs before a task is
trained (new adapter / task / modality), `end_stage` after it, and `eval_kwargs` / `text_kwargs` say how a task or
the text probe is evaluated. `plan` sees the whole task list before `create`; `trains(task)` says whether a stage
trains anything (MoExtend's new experts never see a text task's tokens, so its text stage trains nothing).

Every method of a track trains with the track's one learning rate (chosen on the grid) and number of epochs; the
class's `learning_rate` applies only where no track setting is given (the `--quick` demo).
"""

from __future__ import annotations

import copy
from contextlib import nullcontext

import torch
from peft import LoraConfig, PeftModel, get_peft_model

import peft_moextend
from peft_moextend import CMoEConfig, ModeXConfig, MoExtendConfig, PathWeaveConfig, SMoLAConfig

from .data import Task
from .tracks import matched_lora_rank

NUM_LAYERS = 30
UPPER = rf"model\.language_model\.layers\.({'|'.join(str(i) for i in range(NUM_LAYERS // 2, NUM_LAYERS))})"
ALL_PROJECTIONS = UPPER + r"\.(self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj"
OUTPUT_PROJECTIONS = UPPER + r"\.(self_attn\.o_proj|mlp\.down_proj)"


class Method:
    """A method of the comparison; `moe` says whether it runs on the upcycled MoE language model."""

    name = ""
    label = ""
    moe = False
    learning_rate = 3e-3

    def plan(self, tasks: list[Task]) -> None:
        """Sees the whole task list before `create` (e.g. which modalities will come)."""

    def create(self, model: torch.nn.Module, first_task: Task, calibration_batches: list[dict]) -> PeftModel:
        raise NotImplementedError

    def trains(self, task: Task) -> bool:
        """Whether training on `task` can change the model (False: the stage is skipped and reported so)."""
        return True

    def start_stage(self, model: PeftModel, stage: int, task: Task, probe_batches: list[dict]) -> dict | None:
        """Before training `task` (stage > 0 for every task but the first); what it returns goes in the report."""
        return None

    def end_stage(self, model: PeftModel, task: Task, batches: list[dict]) -> dict | None:
        """After training `task`; what it returns goes in the report."""
        return None

    def eval_kwargs(self, model: PeftModel, task: Task) -> dict:
        """Extra keyword arguments of the forward call when evaluating `task`."""
        return {}

    def text_context(self, model: PeftModel):
        """Context in which the text probe runs."""
        return nullcontext()


class SequentialLoRA(Method):
    name, label = "sequential_lora", "LoRA, fine-tuned sequentially"

    def create(self, model, first_task, calibration_batches):
        return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=ALL_PROJECTIONS))


class OracleLoRA(Method):
    """One LoRA per task; each task is evaluated with its own adapter (the task id is given: an upper bound), and
    the text probe runs on the base model (the oracle knows it is a text question)."""

    name, label = "oracle_lora", "one LoRA per task + oracle task id"

    @staticmethod
    def _config() -> LoraConfig:
        return LoraConfig(r=8, lora_alpha=16, target_modules=ALL_PROJECTIONS)

    def create(self, model, first_task, calibration_batches):
        return get_peft_model(model, self._config(), adapter_name=first_task.name)

    def start_stage(self, model, stage, task, probe_batches):
        if stage > 0:
            model.add_adapter(task.name, self._config())
            model.set_adapter(task.name)
        return None

    def eval_kwargs(self, model, task):
        model.set_adapter(task.name)
        return {}

    def text_context(self, model):
        return model.disable_adapter()


MEDIA = ("image", "video", "audio")  # the modalities new MoExtend experts may serve (text: never)


def _moextend_config(restrict_to_modalities: list[str]) -> MoExtendConfig:
    return MoExtendConfig(
        num_new_experts=1,
        target_layers=list(range(NUM_LAYERS // 2, NUM_LAYERS)),
        restrict_to_modalities=restrict_to_modalities,
        expert_init=0,  # replaced before training by each layer's most used expert (`init_new_experts_from_data`)
    )


class MoExtend(Method):
    """A stage of new experts per modality on the upper half of the upcycled 4-expert SmolLM2-MoE (one new expert
    per layer and stage): the first image/audio modality of the sequence is stage 0, each later one
    `add_stage(task, restrict_to_modalities=[modality])`; each stage's experts are used by its modality's tokens only
    (text keeps the base experts and routing exactly) and copy each layer's most used expert on the stage's first
    task. Tasks of a modality already staged train that stage further; a text task trains nothing."""

    name, label, moe = "moextend", "MoExtend (upcycled 4-expert MoE, +1 expert/layer per modality)", True
    learning_rate = 1e-3  # the demo's own step (full-size experts); a track uses its grid's choice for every method

    def plan(self, tasks):
        media = [t.modality for t in tasks if t.modality in MEDIA]
        self.modalities = list(dict.fromkeys(media)) or ["image"]
        self.staged: list[str] = []

    def create(self, model, first_task, calibration_batches):
        return get_peft_model(model, _moextend_config(self.modalities[:1]))

    def trains(self, task):
        return task.modality in MEDIA

    def start_stage(self, model, stage, task, probe_batches):
        if task.modality not in MEDIA or task.modality in self.staged:
            return None
        if not self.staged:
            model.base_model.init_new_experts_from_data(probe_batches)
            extension = {"stage": 0}
        else:
            extension = model.base_model.add_stage(
                task.name, batches=probe_batches, restrict_to_modalities=[task.modality]
            )
        self.staged.append(task.modality)
        return {"moextend_stage": extension["stage"], "stage_modality": task.modality}


class MoExtendTasks(Method):
    """MoExtend's task-extension mode: a stage of new experts per task (stage 0 for the first, then
    `add_stage(task)`; earlier stages' experts and router rows frozen), one router over the base and all stages'
    experts decides -- no task id. New experts see media (image, video, audio) tokens only, so text stays untouched."""

    name, label, moe = "moextend_tasks", "MoExtend (upcycled MoE, +1 expert/layer per task, router decides)", True

    def create(self, model, first_task, calibration_batches):
        peft_model = get_peft_model(model, _moextend_config(list(MEDIA)))
        peft_model.base_model.init_new_experts_from_data(calibration_batches)
        return peft_model

    def start_stage(self, model, stage, task, probe_batches):
        if stage == 0:
            return {"moextend_stage": 0}
        extension = model.base_model.add_stage(task.name, batches=probe_batches)
        return {"moextend_stage": extension["stage"]}


class SMoLA(Method):
    name, label = "smola", "SMoLA (soft low-rank experts per modality group)"

    def create(self, model, first_task, calibration_batches):
        config = SMoLAConfig(
            r=4, expert_groups={"text": 2, "image": 4, "audio": 4, "multimodal": 2}, target_modules=ALL_PROJECTIONS
        )
        return get_peft_model(model, config)


class CMoE(Method):
    """A task per stage (probe-guided expansion); evaluated without a task id: the VAE locator picks the task."""

    name, label = "cmoe", "CMoE (PGKE + task locator, no task id)"

    def create(self, model, first_task, calibration_batches):
        return get_peft_model(model, CMoEConfig(r=8, experts_per_task=2, target_modules=ALL_PROJECTIONS))

    def start_stage(self, model, stage, task, probe_batches):
        extension = model.base_model.add_task(task.name, probe_data=probe_batches)
        layers = sorted({int(key.split(".layers.")[1].split(".")[0]) for key in extension["extended_layers"]})
        return {"extended_modules": len(extension["extended_layers"]), "extended_layers": layers}

    def end_stage(self, model, task, batches):
        return {"locator": model.base_model.fit_locator(task.name, batches)}


class PathWeave(Method):
    """A stage per modality: image tasks share stage 0 (trained in sequence), audio adds stage 1."""

    name, label = "pathweave", "PathWeave (a stage per modality)"

    def create(self, model, first_task, calibration_batches):
        config = PathWeaveConfig(r=8, modalities=[first_task.modality], target_modules=ALL_PROJECTIONS)
        return get_peft_model(model, config)

    def start_stage(self, model, stage, task, probe_batches):
        if task.modality not in model.peft_config["default"].modalities:
            model.base_model.add_modality(task.modality)
        return None


class ModeX(Method):
    name, label = "modex", "ModeX (text / visual / audio / cross-modal experts)"

    def create(self, model, first_task, calibration_batches):
        config = ModeXConfig(
            experts={"text": ["text"], "visual": ["image"], "audio": ["audio"], "cross_modal": None},
            target_modules=OUTPUT_PROJECTIONS,
        )
        return get_peft_model(model, config)


def lora_parameters_per_rank(model: torch.nn.Module, pattern: str) -> int:
    """Trainable parameters a LoRA of rank 1 adds on the `nn.Linear` modules whose name fully matches `pattern`
    (A and B: in + out features per module)."""
    import re

    return sum(
        module.in_features + module.out_features
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and re.fullmatch(pattern, name)
    )


class MatchedLoRA(Method):
    """LoRA on all 7 projections of layers 15-29 with the rank whose trainable-parameter count is closest to
    method `target`'s on this model (counted on a copy of the model wrapped by `target`)."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.name = f"lora_as_{target}"
        self.label = f"LoRA, {target.replace('smola', 'SMoLA').replace('modex', 'ModeX')}'s parameter count"

    def create(self, model, first_task, calibration_batches):
        target_model = METHODS[self.target].create(copy.deepcopy(model), first_task, calibration_batches)
        self.target_parameters = sum(p.numel() for p in target_model.parameters() if p.requires_grad)
        del target_model
        self.rank = matched_lora_rank(self.target_parameters, lora_parameters_per_rank(model, ALL_PROJECTIONS))
        return get_peft_model(model, LoraConfig(r=self.rank, lora_alpha=2 * self.rank, target_modules=ALL_PROJECTIONS))

    def start_stage(self, model, stage, task, probe_batches):
        return {"lora_rank": self.rank, "matched_parameters": self.target_parameters} if stage == 0 else None


METHODS: dict[str, Method] = {
    method.name: method
    for method in (
        SequentialLoRA(),
        OracleLoRA(),
        MoExtend(),
        MoExtendTasks(),
        SMoLA(),
        CMoE(),
        PathWeave(),
        ModeX(),
        MatchedLoRA("smola"),
        MatchedLoRA("modex"),
    )
}


def missing_methods() -> list[str]:
    """Methods of the issue's list that this package does not register (reported, never faked)."""
    registered = {method.name.lower() for method in peft_moextend.METHODS.values()}
    return [m for m in ("moextend", "smola", "cmoe", "pathweave", "modex") if m not in registered]
