"""The alignment stage and one method's run through the task sequence; each runs in its own process (so that its
peak memory is its own and one failure cannot take the others down)."""

from __future__ import annotations

import hashlib
import json
import resource
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from .data import Task
from .methods import METHODS
from .model import Towers, build_vlm, example, load_language_model, model_inputs
from .training import accuracy, alignment_rows, batches, held_out_perplexity, task_rows, text_probe, train

CACHE_DIR = Path("~/.cache/peft_moextend/continual").expanduser()
ALIGNMENT_VERSION = 14  # bump when the towers, captions or alignment recipe change


def peak_memory_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _frozen_vlm(moe_experts: int, towers_path: Path | None):
    lm, vocabulary, upcycling_error = load_language_model(moe_experts)
    vlm = build_vlm(lm, vocabulary)
    del lm
    towers = Towers(vlm)
    if towers_path is not None:
        towers.load_state_dict(torch.load(towers_path, weights_only=True))
    for parameter in [*vlm.parameters(), *towers.parameters()]:
        parameter.requires_grad_(False)
    return vlm, towers, vocabulary, upcycling_error


def alignment_path(settings: dict) -> Path:
    keys = ("train_size", "align_per_task", "align_epochs", "seed", "tasks")
    key = json.dumps({**{k: settings[k] for k in keys}, "version": ALIGNMENT_VERSION}, sort_keys=True)
    return CACHE_DIR / f"towers-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"


def needs_towers(tasks: list[Task]) -> bool:
    """Whether some task has images or audio (the towers are aligned and used only then)."""
    return any(t.modality != "text" for t in tasks)


def towers_path(tasks: list[Task], settings: dict) -> Path | None:
    """Where the aligned towers of these settings are cached; None when every task is text (no tower is used)."""
    return alignment_path(settings) if needs_towers(tasks) else None


def align(tasks: list[Task], settings: dict) -> dict:
    """Train the vision, audio and video towers and projectors through the frozen language model on captions
    computed from the training inputs (`alignment_rows`; cached by settings; skipped when every task is text), then
    measure the base model: task accuracies (before any adapter) and the text probe."""
    torch.manual_seed(settings["seed"])
    torch.set_num_threads(settings["threads"])
    path = towers_path(tasks, settings)
    cached = path is not None and path.exists()
    vlm, towers, vocabulary, _ = _frozen_vlm(0, path if cached else None)
    report: dict = {"cached": cached, "path": None if path is None else str(path)}
    if path is not None and not cached:
        rows = alignment_rows(tasks, vocabulary, settings["align_per_task"])
        parameters = list(towers.parameters())
        for parameter in parameters:
            parameter.requires_grad_(True)
        report |= train(
            vlm,
            towers,
            rows,
            vocabulary,
            epochs=settings["align_epochs"],
            batch_size=16,
            learning_rate=1e-3,
            seed=settings["seed"],
            description="alignment (towers + projectors)",
            progress=settings["progress"],
            parameters=parameters,
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(towers.state_dict(), path)
        for parameter in parameters:
            parameter.requires_grad_(False)
    report["base_accuracy"] = {
        t.name: accuracy(vlm, towers, task_rows(t, "test", vocabulary), vocabulary) for t in tasks
    }
    report["text_probe"] = text_probe(vlm, vocabulary)
    report["peak_memory_mib"] = peak_memory_mib()
    return report


def run_method(name: str, tasks: list[Task], settings: dict) -> dict:
    """Train method `name` through `tasks` (in order, or jointly when `settings["protocol"] == "joint"`); evaluate
    every seen task after every stage."""
    try:
        return _run_method(name, tasks, settings)
    except Exception as error:  # reported in the results, the other methods still run
        return {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}


def run_grid(name: str, tasks: list[Task], settings: dict, candidates: list[dict]) -> dict:
    """Method `name` trained once per grid candidate (`{"learning_rate", "epochs"}`) and scored on the tasks'
    validation splits after the last stage: `{"candidates": [...]}`, per candidate `{"validation_accuracy": {task:
    accuracy}, "text_probe", "text_probe_before"?, "seconds"}` (the probes: held-out perplexity only) or `{"error",
    "traceback"}`. One process for all candidates; no progress bars (a line per candidate instead)."""
    scores = []
    for candidate in candidates:
        started = time.perf_counter()
        result = run_method(name, tasks, settings | candidate | {"split": "validation", "progress": False})
        if "error" in result:
            scores.append(result)
            continue
        if "text_probe_before" in result:
            settings = settings | {"text_probe_before": result["text_probe_before"]}
        scores.append(
            {
                "validation_accuracy": dict(zip([t.name for t in tasks], result["accuracy"][-1], strict=True)),
                "text_probe": result["text_probe"],
                **({"text_probe_before": result["text_probe_before"]} if "text_probe_before" in result else {}),
                "seconds": time.perf_counter() - started,
            }
        )
        print(
            f"  {name} lr {candidate['learning_rate']:g}, {candidate['epochs']:g} epoch(s): "
            + ", ".join(f"{task} {a:.1%}" for task, a in scores[-1]["validation_accuracy"].items()),
            flush=True,
        )
    return {"candidates": scores}


def _run_method(name: str, tasks: list[Task], settings: dict) -> dict:
    torch.manual_seed(settings["seed"])
    torch.set_num_threads(settings["threads"])
    method = METHODS[name]
    method.plan(tasks)
    split = settings.get("split", "test")  # the grid scores on "validation", after the last stage only
    vlm, towers, vocabulary, upcycling_error = _frozen_vlm(4 if method.moe else 0, towers_path(tasks, settings))
    # a recall task (its training and test sets are the same taught facts) is repeated to `recall_repeats` copies
    # per epoch in a track, so that its stage trains about as many steps as the other tasks' (the demo: 1)
    repeats = {t.name: settings.get("recall_repeats", 1) if t.train == t.test else 1 for t in tasks}
    train_rows = {t.name: task_rows(t, "train", vocabulary) * repeats[t.name] for t in tasks}
    test_rows = {t.name: task_rows(t, split, vocabulary) for t in tasks}

    def model_batches(model, rows: list[dict], limit: int | None = None) -> list[dict]:
        with torch.no_grad():
            selected = list(batches(rows, 16, vocabulary.pad_id, settings["seed"]))[:limit]
            return [model_inputs(model, towers, b, vocabulary, with_modality_ids=True) for b in selected]

    result: dict = {"label": method.label, "upcycling_max_logit_difference": upcycling_error}
    # the grid needs only the perplexity (its bound), not the factual questions' generations
    probe = text_probe if split == "test" else lambda m, v: {"perplexity": held_out_perplexity(m, v)}
    if method.moe:  # the same for every candidate of the grid: measured once
        result["text_probe_before"] = settings.get("text_probe_before") or probe(vlm, vocabulary)
    model = method.create(vlm, tasks[0], model_batches(vlm, train_rows[tasks[0].name], 4))
    result |= {"accuracy": [], "stages": []}
    joint = settings.get("protocol", "sequential") == "joint"
    # a sequential track trains a stage per task; the joint protocol trains one stage on the mixture of all tasks
    stages = (
        [(tasks, [r for t in tasks for r in train_rows[t.name]])]
        if joint
        else [([t], train_rows[t.name]) for t in tasks]
    )
    for stage, (stage_tasks, rows) in enumerate(stages):
        task = stage_tasks[0]
        started = time.perf_counter()
        extension = method.start_stage(model, stage, task, model_batches(model, train_rows[task.name], 4))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        description = f"{name}: {'mixture of ' + ', '.join(t.name for t in stage_tasks) if joint else task.name}"
        if method.trains(task):
            stage_report = train(
                model,
                towers,
                rows,
                vocabulary,
                epochs=settings["epochs"],
                batch_size=settings["batch_size"],
                learning_rate=settings.get("learning_rate", method.learning_rate),
                seed=settings["seed"] + stage,
                description=description,
                progress=settings["progress"],
            )
        else:
            stage_report = {"seconds": 0.0, "steps": 0, "final_loss": None, "skipped": "nothing trainable sees it"}
        fitted = method.end_stage(model, task, model_batches(model, train_rows[task.name]))
        stage_report |= {
            "task": "mixture" if joint else task.name,
            "trainable": trainable,
            "stage_seconds": time.perf_counter() - started,
        }
        stage_report |= (extension or {}) | (fitted or {})
        result["stages"].append(stage_report)
        seen = tasks if joint else tasks[: stage + 1]
        if split == "validation" and stage < len(stages) - 1:
            continue
        result["accuracy"].append(
            [
                accuracy(model, towers, test_rows[t.name], vocabulary, call_kwargs=method.eval_kwargs(model, t))
                for t in seen
            ]
        )
        for t in seen if split == "test" else []:
            for test_name, test in t.extra_tests.items():
                rows_extra = [example(t, x, t.classes[y], vocabulary) for x, y in test]
                extra = accuracy(model, towers, rows_extra, vocabulary, call_kwargs=method.eval_kwargs(model, t))
                result.setdefault("extra_accuracy", {}).setdefault(t.name, {}).setdefault(test_name, []).append(extra)
        print(
            f"  {name} after {'the mixture' if joint else task.name}"
            + (" (validation)" if split == "validation" else "")
            + ": "
            + ", ".join(f"{t.name} {a:.1%}" for t, a in zip(seen, result["accuracy"][-1], strict=False)),
            flush=True,
        )
    with method.text_context(model):
        result["text_probe"] = probe(model, vocabulary)
    if split == "test" and method.moe:
        result["routing"] = routing_statistics(model, towers, tasks, test_rows, vocabulary)
    if split == "test" and name == "cmoe":
        located = {t.name: model.base_model.locate(model_batches(model, test_rows[t.name])) for t in tasks}
        result["locator_accuracy"] = {task: float(np.mean([p == task for p in ps])) for task, ps in located.items()}
        result["locator_rejected"] = {task: float(np.mean([p is None for p in ps])) for task, ps in located.items()}
    result["trainable_total"] = sum(p.numel() for n, p in model.named_parameters() if model.base_model.prefix in n)
    result["peak_memory_mib"] = peak_memory_mib()
    return result


def routing_statistics(model, towers: Towers, tasks: list[Task], test_rows: dict, vocabulary) -> dict:
    """Per extended layer and task: the share of each expert among the routing slots of the task's image/audio
    tokens and of its text tokens (test sets), for the tasks with image/audio inputs (a text task's tokens keep the
    base routing: MoExtend records none for them). Returns {task: {"layers", "modality", "text"}}."""
    layers = {
        int(n.split(".layers.")[1].split(".")[0]): m
        for n, m in model.named_modules()
        if type(m).__name__ == "MoExtendLayer"
    }
    statistics = {}
    for task in [t for t in tasks if t.modality != "text"]:
        counts = {kind: {i: 0 for i in layers} for kind in ("modality", "text")}

        def collect(batch: dict, counts=counts) -> None:
            modality_ids = batch["modality_ids"].reshape(-1)
            valid = batch["attention_mask"].reshape(-1).bool()
            for index, layer in layers.items():
                dispatch = layer.routing_records["default"].dispatch_mask.float()  # (t, e)
                counts["modality"][index] = counts["modality"][index] + dispatch[valid & (modality_ids > 0)].sum(0)
                counts["text"][index] = counts["text"][index] + dispatch[valid & (modality_ids == 0)].sum(0)

        accuracy(model, towers, test_rows[task.name], vocabulary, on_batch=collect)
        statistics[task.name] = {
            "layers": sorted(layers),
            **{kind: [(c[i] / c[i].sum()).tolist() for i in sorted(layers)] for kind, c in counts.items()},
        }
    return statistics
