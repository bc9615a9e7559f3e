"""CMoE's task locator on the continual benchmark's real inputs: which locator and features tell the tasks apart,
how many of a task's own test inputs it rejects, and how many text-only inputs it leaves to the base path.

The locator sees the input of the adapter's first layer, which no adapter precedes: its features do not depend on
what the experts learned, so every locator can be compared without training any expert. The model is the continual
benchmark's (SmolLM2-135M-Instruct in LLaVA with aligned, frozen towers; CMoE on layers 15-29); features are pooled
once per `locator_features` option and every `locator` kind is fitted on them with the library's own functions
(`peft_moextend.cmoe.locator`), with `locator_reject=True` thresholds.

Reported per option: task accuracy per task (the right task among the fitted ones, no task id), false-reject rate
per task (own test inputs no task claims: they would take the base path) and the share of text-only inputs
(factual questions as chat prompts, held-out English text) that some task claims (they would go through its
experts; the rest keep the base model's outputs exactly).

    python -m benchmarks.cmoe_locator [--tasks digits letters animals] [--train-size 256] [--json F]
"""

from __future__ import annotations

import argparse
import json
import os
import time

from .common import in_subprocess, quiet_libraries

if __name__ == "__main__":
    quiet_libraries()

import torch  # noqa: E402
from peft import get_peft_model  # noqa: E402

from peft_moextend import CMoEConfig  # noqa: E402
from peft_moextend.cmoe.locator import fit_task_model, locate, rejection_threshold, task_scores  # noqa: E402

from .continual.data import load_tasks  # noqa: E402
from .continual.methods import ALL_PROJECTIONS  # noqa: E402
from .continual.model import model_inputs  # noqa: E402
from .continual.runner import _frozen_vlm, align, alignment_path  # noqa: E402
from .continual.training import batches, fact_prompts, held_out_windows, task_rows  # noqa: E402

LOCATORS = ("vae", "gaussian", "mahalanobis")
FEATURES = ("mean", "by_modality")


def text_batches(vocabulary) -> list[dict]:
    """Text-only inputs: the 32 factual questions as chat prompts (one batch, right-padded) and the held-out
    English text in 256-token windows (batches of 8)."""
    result = [fact_prompts(vocabulary)]
    result += [{"input_ids": w, "attention_mask": torch.ones_like(w)} for w in held_out_windows(vocabulary).split(8)]
    for batch in result:
        batch["modality_ids"] = torch.zeros_like(batch["input_ids"])
    return result


def pooled_features(features: str, tasks, path) -> dict:
    """`{"train": {task: (n, f)}, "test": {task: (n, f)}, "text": (n, f)}`: the locator features of every input."""
    vlm, towers, vocabulary, _ = _frozen_vlm(0, path)
    model = get_peft_model(vlm, CMoEConfig(r=8, target_modules=ALL_PROJECTIONS, locator_features=features))
    for task in tasks:  # the experts are irrelevant here: the features come from below the first adapted layer
        model.base_model.add_task(task.name)

    def pooled(rows: list[dict]) -> torch.Tensor:
        with torch.no_grad():
            inputs = [
                model_inputs(model, towers, b, vocabulary, with_modality_ids=True)
                for b in batches(rows, 16, vocabulary.pad_id, None)
            ]
            return model.base_model._pooled("default", inputs).float()

    with torch.no_grad():
        text = model.base_model._pooled("default", text_batches(vocabulary)).float()
    return {split: {t.name: pooled(task_rows(t, split, vocabulary)) for t in tasks} for split in ("train", "test")} | {
        "text": text
    }


def evaluate(kind: str, features: dict, latent: int, epochs: int, quantile: float) -> dict:
    """Fit `kind` per task on its training features; accuracy and false-reject rate per task, text claimed."""
    names = list(features["train"])
    models = [fit_task_model(kind, features["train"][n], latent, epochs) for n in names]
    thresholds = [rejection_threshold(kind, features["train"][n], latent, epochs, quantile) for n in names]
    result: dict = {"accuracy": {}, "rejected": {}}
    for index, name in enumerate(names):
        picks = locate(task_scores(kind, features["test"][name], models, latent), thresholds)
        result["accuracy"][name] = float((picks == index).float().mean())
        result["rejected"][name] = float((picks == -1).float().mean())
    text_picks = locate(task_scores(kind, features["text"], models, latent), thresholds)
    result["text_claimed"] = float((text_picks >= 0).float().mean())
    return result


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    tasks, notes = load_tasks(args.train_size, args.test_size, args.seed, args.tasks)
    for note in notes:
        print(f"NOTE: {note}", flush=True)
    settings = {
        "train_size": args.train_size,
        "align_per_task": args.align_per_task,
        "align_epochs": args.align_epochs,
        "seed": args.seed,
        "threads": args.threads,
        "tasks": [t.name for t in tasks],
    }
    alignment = in_subprocess(align, tasks, settings, quiet=True)
    print(f"towers: {'cached ' if alignment['cached'] else ''}{alignment['path']}", flush=True)
    defaults = CMoEConfig()
    results = {"settings": settings | {"test_size": args.test_size, "quantile": args.quantile}, "options": {}}
    for features_option in FEATURES:
        started = time.perf_counter()
        features = pooled_features(features_option, tasks, alignment_path(settings))
        print(f"features {features_option}: {time.perf_counter() - started:.0f} s", flush=True)
        for kind in LOCATORS:
            result = evaluate(kind, features, defaults.locator_latent_size, defaults.locator_epochs, args.quantile)
            results["options"][f"{kind}/{features_option}"] = result
            print(
                f"  {kind:11s} accuracy "
                + ", ".join(f"{t} {a:.1%}" for t, a in result["accuracy"].items())
                + " | rejected "
                + ", ".join(f"{t} {a:.1%}" for t, a in result["rejected"].items())
                + f" | text claimed {result['text_claimed']:.1%}",
                flush=True,
            )
    return results


def table(results: dict) -> str:
    tasks = results["settings"]["tasks"]
    lines = [
        "| locator / features | "
        + " | ".join(f"{t}: right task / rejected" for t in tasks)
        + " | text inputs claimed by a task |",
        "|---" * (len(tasks) + 2) + "|",
    ]
    for option, result in results["options"].items():
        cells = [f"{result['accuracy'][t]:.1%} / {result['rejected'][t]:.1%}" for t in tasks]
        lines.append(f"| {option} | " + " | ".join(cells) + f" | {result['text_claimed']:.1%} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["digits", "letters", "animals"])
    parser.add_argument("--train-size", type=int, default=256)
    parser.add_argument("--test-size", type=int, default=100)
    parser.add_argument("--align-per-task", type=int, default=128)
    parser.add_argument("--align-epochs", type=float, default=1.0)
    parser.add_argument("--quantile", type=float, default=CMoEConfig().locator_reject_quantile)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args()
    results = run(args)
    print(f"\n{table(results)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
