"""Metrics, plots and the markdown report of a continual run."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def summary(accuracy: list[list[float]]) -> dict:
    """Average final accuracy and backward transfer (BWT, Lopez-Paz & Ranzato 2017) of a lower-triangular accuracy
    matrix `accuracy[stage][task]`: BWT = mean over tasks i < T of (acc after the last stage - acc right after i).
    A single stage over several tasks (joint training) has no BWT (None)."""
    final = accuracy[-1]
    num_tasks = len(final)
    if len(accuracy) < num_tasks:  # joint training: one stage over every task, no backward transfer
        return {"average_accuracy": float(np.mean(final)), "backward_transfer": None}
    bwt = [final[i] - accuracy[i][i] for i in range(num_tasks - 1)]
    return {"average_accuracy": float(np.mean(final)), "backward_transfer": float(np.mean(bwt)) if bwt else 0.0}


def text_change(probe: dict, before: dict) -> dict:
    """How the text probe moved against the model before any stage: the share of the factual questions whose
    greedy reply is identical, the fact accuracy change and the relative perplexity change."""
    identical = [a == b for a, b in zip(probe["replies"], before["replies"], strict=True)]
    return {
        "identical_replies": float(np.mean(identical)),
        "fact_change": probe["fact_accuracy"] - before["fact_accuracy"],
        "perplexity_change": probe["perplexity"] / before["perplexity"] - 1,
    }


BASE_EXPERTS = 4  # the upcycled SmolLM2-MoE's experts


def _fmt(value: float | None, spec: str = ".1%") -> str:
    return "-" if value is None else format(value, spec)


def plot_accuracy_matrices(results: dict, tasks: list[str], path: Path) -> None:
    methods = [m for m, r in results["methods"].items() if "accuracy" in r]
    columns = max(1, min(4, len(methods)))
    rows = -(-len(methods) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.4 * columns, 3.0 * rows), squeeze=False)
    for axis in axes.flat[len(methods) :]:
        axis.axis("off")
    for axis, method in zip(axes.flat, methods, strict=False):
        matrix = np.full((len(tasks), len(tasks)), np.nan)
        for stage, row in enumerate(results["methods"][method]["accuracy"]):
            matrix[stage, : len(row)] = row
        axis.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
        for (i, j), value in np.ndenumerate(matrix):
            if not np.isnan(value):
                axis.text(
                    j,
                    i,
                    f"{value:.0%}",
                    ha="center",
                    va="center",
                    color="white" if value < 0.6 else "black",
                    fontsize=8,
                )
        axis.set_xticks(range(len(tasks)), tasks, rotation=30, fontsize=7)
        axis.set_yticks(range(len(tasks)), [f"after {t}" for t in tasks], fontsize=7)
        axis.set_title(method, fontsize=9)
    figure.suptitle("Accuracy of task (column) after training stage (row)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_first_task(results: dict, tasks: list[str], path: Path) -> None:
    """The five-second plot: accuracy on the first task after every stage (does a method keep what it learned
    first?) and the text probe's identical replies at the end, one line / bar per method."""
    methods = [m for m, r in results["methods"].items() if "accuracy" in r]
    base_probe = results["alignment"]["text_probe"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6), gridspec_kw={"width_ratios": [3, 2]})
    for method in methods:
        result = results["methods"][method]
        first_task = [row[0] for row in result["accuracy"]]
        left.plot(range(len(first_task)), first_task, marker="o", label=result["label"])
    classes = len(results["tasks"][0]["classes"])
    left.axhline(1 / classes, color="grey", linestyle=":", label=f"chance ({classes} classes)")
    left.set_xticks(range(len(tasks)), [f"after {t}" for t in tasks], fontsize=8)
    left.set_ylim(0, 1.05)
    left.set_ylabel(f"accuracy on {tasks[0]} (first task)")
    left.legend(fontsize=7, loc="lower left")
    identical = [
        text_change(results["methods"][m]["text_probe"], results["methods"][m].get("text_probe_before", base_probe))[
            "identical_replies"
        ]
        for m in methods
    ]
    right.barh(range(len(methods)), identical, color="tab:green")
    right.set_yticks(range(len(methods)), methods, fontsize=8)
    right.set_xlim(0, 1)
    right.set_xlabel("text questions: replies identical to base")
    figure.suptitle("Does each method keep its first task, and leave text alone?")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_forgetting(results: dict, tasks: list[str], path: Path) -> None:
    """Per method and task: accuracy right after its stage vs after the last stage."""
    methods = [m for m, r in results["methods"].items() if "accuracy" in r]
    figure, axis = plt.subplots(figsize=(1.6 * len(methods) + 2, 3.6))
    width = 0.8 / len(tasks)
    for t, task in enumerate(tasks):
        drops = []
        for method in methods:
            accuracy = results["methods"][method]["accuracy"]
            drops.append(accuracy[-1][t] - accuracy[t][t] if t < len(accuracy[-1]) else 0.0)
        axis.bar(np.arange(len(methods)) + t * width - 0.4 + width / 2, drops, width, label=task)
    axis.axhline(0, color="black", linewidth=0.8)
    axis.set_xticks(range(len(methods)), methods, rotation=20, fontsize=8)
    axis.set_ylabel("final - just-learned accuracy")
    axis.set_title("Forgetting per task (0 = nothing forgotten)")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_routing(routing: dict, path: Path) -> None:
    """MoExtend: per extended layer (rows) the share of routing slots per expert (columns: the 4 base experts, then
    each stage's new one), for each task's image/audio tokens and for its text tokens."""
    tasks = list(routing)
    figure, axes = plt.subplots(2, len(tasks), figsize=(2.3 * len(tasks) + 1, 7), squeeze=False)
    for column, task in enumerate(tasks):
        for row, kind in enumerate(("modality", "text")):
            axis = axes[row, column]
            shares = np.array(routing[task][kind])
            image = axis.imshow(shares, vmin=0, vmax=1, cmap="magma", aspect="auto")
            num_experts = shares.shape[1]
            labels = [f"e{i}" for i in range(BASE_EXPERTS)] + [f"new{i}" for i in range(num_experts - BASE_EXPERTS)]
            axis.set_xticks(range(num_experts), labels, fontsize=7)
            axis.set_yticks(range(len(routing[task]["layers"])), routing[task]["layers"], fontsize=6)
            tokens = "image/audio" if kind == "modality" else "text"
            axis.set_title(f"{task}: {tokens} tokens", fontsize=8)
            if column == 0:
                axis.set_ylabel("decoder layer")
    figure.colorbar(image, ax=axes, shrink=0.6, label="share of routing slots")
    figure.suptitle("MoExtend routing by modality (test sets, after the last stage)")
    figure.savefig(path, dpi=110)
    plt.close(figure)


def markdown(results: dict, tasks: list[str], images: dict[str, str]) -> str:
    """The report: set-up, per-method table, accuracy matrices, notes."""
    settings, alignment = results["settings"], results["alignment"]
    base_probe = alignment["text_probe"]
    track = settings.get("track")
    joint = settings.get("protocol") == "joint"
    epochs = results.get("chosen", settings)["epochs"]
    extra_tests = [(t["name"], key[5:]) for t in results["tasks"] for key in t if key.startswith("test ")]
    lines = [
        f"# Continual modality & task extension benchmark ({'quick' if settings['quick'] else 'full'} run)"
        if track is None
        else f"# Continual benchmark, {track} track",
        "",
        f"Run {results['date']} on {results['machine']}; seed {settings['seed']}, {settings['threads']} threads, "
        f"total {results['total_seconds'] / 60:.1f} min. "
        + ("Tasks trained jointly (one shuffled mixture): " if joint else "Tasks in order: ")
        + ", ".join(
            f"{t['name']} ({t['modality']}, {t['train']} train / {t['test']} test"
            + (f" / {t['validation']} validation" if "validation" in t else "")
            + "".join(f" / {t[key]} {key[5:]}" for key in t if key.startswith("test "))
            + ")"
            for t in results["tasks"]
        )
        + f"; {epochs} epoch(s) of batch {settings.get('batch_size', 16)} "
        + ("of the mixture." if joint else "per task.")
        + (
            f" Every method trains with learning rate {results['chosen']['learning_rate']:g}"
            f" ({'chosen on the grid below' if results.get('grid') else 'given with --no-grid'})."
            if "chosen" in results
            else ""
        ),
        "",
        "Model: SmolLM2-135M-Instruct inside transformers' `LlavaForConditionalGeneration` (2-layer SigLIP vision "
        "tower + projector) plus convolutional audio and video encoders + projectors; "
        + (
            "no task has images, audio or video, so the towers are unused. "
            if alignment["path"] is None
            else "the towers were trained in an alignment stage on captions computed from the inputs "
            f"({'cached' if alignment['cached'] else 'this run'}) and are frozen and shared. "
        )
        + "Every method adapts layers 15-29. Accuracy = greedy exact match of the answer.",
        "",
    ]
    for note in results["notes"]:
        lines.append(f"> **Note:** {note}")
    if results["notes"]:
        lines.append("")
    lines += [
        "Base model before any stage: task accuracy "
        + ", ".join(f"{t} {_fmt(alignment['base_accuracy'][t])}" for t in tasks)
        + f"; text probe {_fmt(base_probe['fact_accuracy'])} of {len(base_probe['replies'])} facts, "
        f"held-out perplexity {base_probe['perplexity']:.2f}.",
        "",
        "| method | avg final acc | BWT | "
        + " | ".join(f"final {t}" for t in tasks)
        + "".join(f" | final {task} ({test}, not in avg)" for task, test in extra_tests)
        + " | text replies identical | text facts (Δ) | perplexity (Δ) | trainable params (last stage)"
        " | train s / stage | peak RSS MiB |",
        "|---" * (len(tasks) + len(extra_tests) + 9) + "|",
    ]
    for name, result in results["methods"].items():
        if "accuracy" not in result:
            lines.append(
                f"| {name} | {result.get('error') or result.get('missing')} |"
                + " |" * (len(tasks) + len(extra_tests) + 7)
            )
            continue
        before = result.get("text_probe_before", base_probe)
        probe = result["text_probe"]
        change = text_change(probe, before)
        stats = result["summary"]
        stage_seconds = [s["seconds"] for s in result["stages"]]
        lines.append(
            f"| {result['label']} | {stats['average_accuracy']:.1%} | {_fmt(stats['backward_transfer'], '+.1%')} | "
            + " | ".join(_fmt(a) for a in result["accuracy"][-1])
            + "".join(
                f" | {_fmt(result.get('extra_accuracy', {}).get(task, {}).get(test, [None])[-1])}"
                for task, test in extra_tests
            )
            + f" | {change['identical_replies']:.0%}"
            f" | {probe['fact_accuracy']:.1%} ({change['fact_change'] * 100:+.1f} pt)"
            f" | {probe['perplexity']:.2f} ({change['perplexity_change']:+.1%})"
            f" | {result['stages'][-1]['trainable']:,}"
            f" | {' / '.join(f'{s:.0f}' for s in stage_seconds)} | {result['peak_memory_mib']:.0f} |"
        )
    lines += [
        "",
        "BWT: mean over tasks but the last of (final accuracy - accuracy right after learning the task). Text replies "
        "identical: the share of the factual questions whose greedy reply equals the model's before any stage.",
        "",
    ]
    lines += grid_lines(results) + gate_lines(results) + stage_lines(results)
    for name, result in results["methods"].items():
        if name == "moextend" and result.get("upcycling_max_logit_difference") is not None:
            lines.append(
                f"MoExtend runs on SmolLM2 upcycled into a 4-expert top-2 MoE; upcycled vs dense max |logit "
                f"difference| on a text prompt: {result['upcycling_max_logit_difference']:.1e}."
            )
        if "locator_accuracy" in result:
            lines.append(
                "CMoE task-locator accuracy on the test sets (no task id given): "
                + ", ".join(f"{t} {a:.1%}" for t, a in result["locator_accuracy"].items())
                + "; inputs no task claimed (base path): "
                + ", ".join(f"{t} {a:.1%}" for t, a in result.get("locator_rejected", {}).items())
                + "."
            )
        if any("extended_layers" in stage for stage in result.get("stages", [])):
            lines.append(
                "CMoE layers extended per task (PGKE): "
                + "; ".join(
                    f"{stage['task']} {stage['extended_modules']} modules in layers {_ranges(stage['extended_layers'])}"
                    for stage in result["stages"]
                )
                + "."
            )
    lines += ["", "## Accuracy matrices", ""]
    if "track" in images:
        lines += [
            f"![{'accuracy per task and method' if joint else 'earlier tasks over the stages'}]({images['track']})",
            "",
        ]
    for key, alt in (
        ("first_task", "first task and text"),
        ("accuracy", "accuracy matrices"),
        ("forgetting", "forgetting"),
    ):
        if key in images:
            lines += [f"![{alt}]({images[key]})", ""]
    for key in [k for k in images if k.startswith("routing")]:
        lines += [f"## {key.removeprefix('routing_')} routing by modality", "", f"![routing]({images[key]})", ""]
    lines += ["## Accuracy of task (column) after stage (row)", ""]
    for result in results["methods"].values():
        if "accuracy" not in result:
            continue
        lines += [
            f"**{result['label']}**",
            "",
            "| after | " + " | ".join(tasks) + " |",
            "|---" * (len(tasks) + 1) + "|",
        ]
        for stage, row in enumerate(result["accuracy"]):
            lines.append(
                f"| {'the mixture' if joint else tasks[stage]} | "
                + " | ".join(_fmt(a) for a in row)
                + " |" * (len(tasks) - len(row) + 1)
            )
        lines.append("")
    return "\n".join(lines)


def _ranges(numbers: list[int]) -> str:
    """[15, 16, 17, 20] -> "15-17, 20"; "none" for an empty list."""
    if not numbers:
        return "none"
    spans, start = [], numbers[0]
    for previous, current in zip(numbers, [*numbers[1:], None], strict=True):
        if current != previous + 1:
            spans.append(f"{start}-{previous}" if previous != start else str(start))
            start = current
    return ", ".join(spans)


def _chance(results: dict, task: str) -> float:
    return 1 / len(next(t["classes"] for t in results["tasks"] if t["name"] == task))


def earlier_tasks_change(accuracy: list[list[float]]) -> list[float]:
    """Sequential accuracy matrix (row s: every task seen after stage s) -> per stage, the mean over the tasks learned
    before it of (accuracy now - accuracy right after their own stage), in points: the BWT of the stages so far
    (`summary`); 0.0 after the first stage."""
    return [100 * summary(accuracy[: stage + 1])["backward_transfer"] for stage in range(len(accuracy))]


def plot_track(results: dict, tasks: list[str], path: Path) -> None:
    """The track's five-second plot. Sequential tracks: after every stage, how far the tasks learned before it have
    moved since their own stage (mean over them of accuracy now - accuracy right after their stage, in points; 0
    after the first stage), one line per method -- a line at 0 forgets nothing. Joint training: accuracy per task
    (and the average) as grouped bars, one bar per method, and chance."""
    methods = [m for m, r in results["methods"].items() if "accuracy" in r]
    if results["settings"].get("protocol") == "joint":
        figure, axis = plt.subplots(figsize=(2.2 * (len(tasks) + 1) + 2, 3.8))
        width = 0.8 / max(1, len(methods))
        for m, method in enumerate(methods):
            final = results["methods"][method]["accuracy"][-1]
            values = [*final, float(np.mean(final))]
            axis.bar(np.arange(len(values)) + m * width - 0.4 + width / 2, values, width, label=method)
        axis.set_xticks(range(len(tasks) + 1), [*tasks, "average"])
        axis.set_ylabel("test accuracy after joint training")
        axis.set_title("Per-task accuracy: does each method beat LoRA of its size?")
        axis.axhline(float(np.mean([_chance(results, t) for t in tasks])), color="grey", linestyle=":", label="chance")
        axis.set_ylim(0, 1.05)
    else:
        figure, axis = plt.subplots(figsize=(7, 3.8))
        lowest = 0.0
        for index, method in enumerate(methods):
            rows = results["methods"][method]["accuracy"]
            change = earlier_tasks_change(rows)
            lowest = min(lowest, *change)
            # lines that coincide (e.g. two methods at 0) stay visible: larger markers first, then dashed lines
            style = {"marker": "osD^v"[index % 5], "markersize": max(4, 10 - 2 * index), "linestyle": "-:"[index % 2]}
            axis.plot(range(len(change)), change, **style, label=results["methods"][method]["label"])
        axis.axhline(0, color="black", linewidth=0.8)
        axis.set_xticks(range(len(tasks)), [f"after {t}" for t in tasks], fontsize=8)
        axis.set_ylabel("earlier tasks: accuracy now -\naccuracy right after their stage (pt)")
        axis.set_title("Do earlier tasks survive the later stages? (0 = nothing forgotten)")
        axis.set_ylim(lowest - 5, 5)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def grid_lines(results: dict) -> list[str]:
    """The grid section of a track's report: every candidate, every method's validation accuracy and perplexity
    change, and the choice."""
    grid = results.get("grid")
    if not grid:
        return []
    methods = list(grid["candidates"][0]["methods"])
    choice = grid["choice"]
    lines = [
        "## Shared hyper-parameters (grid)",
        "",
        f"Every method ran every candidate on {grid['train_size']} training examples per task of "
        f"{', '.join(grid.get('tasks') or [t['name'] for t in results['tasks']])} (reduced for time; the "
        f"chosen setting then trains on the full training split) and was scored on the validation splits "
        f"({grid['validation_size']} examples per task carved out of the training data; a recall task of taught facts "
        "is validated on its facts). Rule: reject a candidate where some method failed or its held-out perplexity "
        f"grew by more than {grid['perplexity_bound']:+.0%}; choose the highest mean over methods of the validation "
        "average accuracy. Cells: validation accuracy (perplexity change).",
        "",
        "| learning rate | epochs | " + " | ".join(methods) + " | mean | admissible |",
        "|---" * (len(methods) + 4) + "|",
    ]
    for index, candidate in enumerate(grid["candidates"]):
        cells = [
            f"failed: {score['error']}"
            if "error" in score
            else f"{score['validation_accuracy']:.1%} ({score['perplexity_change']:+.0%})"
            for score in candidate["methods"].values()
        ]
        valid = [s["validation_accuracy"] for s in candidate["methods"].values() if "error" not in s]
        mean = float(np.mean(valid)) if len(valid) == len(cells) else None
        marker = " **chosen**" if index == choice["index"] else ""
        lines.append(
            f"| {candidate['learning_rate']:g} | {candidate['epochs']:g} | "
            + " | ".join(cells)
            + f" | {_fmt(mean)} | {'no' if index in choice['rejected'] else 'yes'}{marker} |"
        )
    lines += [
        "",
        f"Choice: learning rate {choice['learning_rate']:g}, {choice['epochs']:g} epoch(s)"
        + (
            "." if choice["within_bound"] else " (no candidate within the perplexity bound: the smallest worst change)."
        ),
        "",
    ]
    return lines


def gates(results: dict) -> list[dict]:
    """The issue's gates of a track, measured: `{"method", "gate", "value", "passed"}` per gate. Task track (CMoE):
    BWT >= -1 pt, average >= the oracle's - 2 pt, text replies identical >= 95% and perplexity change <= 1%, locator
    accuracy >= 98% and false rejects < 2% per task. Modality track (every method): each earlier task within 1 pt
    of its accuracy right after its stage, the same text conditions, each task right after its stage >= 3x chance
    (at most 90%)."""
    track, methods = results["settings"].get("track"), results["methods"]
    base = results["alignment"]["text_probe"]
    found = []

    def text_gates(name: str, result: dict) -> None:
        change = text_change(result["text_probe"], result.get("text_probe_before", base))
        found.append(
            dict(
                method=name,
                gate="text replies identical >= 95%",
                value=change["identical_replies"],
                passed=change["identical_replies"] >= 0.95,
            )
        )
        found.append(
            dict(
                method=name,
                gate="perplexity change <= +1%",
                value=change["perplexity_change"],
                passed=change["perplexity_change"] <= 0.01,
            )
        )

    if track == "task" and "accuracy" in methods.get("cmoe", {}):
        cmoe = methods["cmoe"]
        bwt = cmoe["summary"]["backward_transfer"]
        found.append(dict(method="cmoe", gate="BWT >= -1 pt", value=bwt, passed=bwt >= -0.01))
        if "accuracy" in methods.get("oracle_lora", {}):
            gap = cmoe["summary"]["average_accuracy"] - methods["oracle_lora"]["summary"]["average_accuracy"]
            found.append(dict(method="cmoe", gate="average >= oracle - 2 pt", value=gap, passed=gap >= -0.02))
        text_gates("cmoe", cmoe)
        for task, value in cmoe.get("locator_accuracy", {}).items():
            found.append(dict(method="cmoe", gate=f"locator {task} >= 98%", value=value, passed=value >= 0.98))
        for task, value in cmoe.get("locator_rejected", {}).items():
            found.append(dict(method="cmoe", gate=f"false rejects {task} < 2%", value=value, passed=value < 0.02))
    if track == "modality":
        tasks = [t["name"] for t in results["tasks"]]
        for name, result in methods.items():
            if "accuracy" not in result:
                continue
            matrix = result["accuracy"]
            for i, task in enumerate(tasks[: len(matrix)]):
                learned = matrix[i][i]
                bar = min(0.9, 3 * _chance(results, task))
                found.append(
                    dict(method=name, gate=f"{task} learned >= {bar:.0%}", value=learned, passed=learned >= bar)
                )
                if i < len(matrix) - 1:
                    drop = matrix[-1][i] - learned
                    found.append(dict(method=name, gate=f"{task} kept (>= -1 pt)", value=drop, passed=drop >= -0.01))
            text_gates(name, result)
    return found


def gate_lines(results: dict) -> list[str]:
    measured = gates(results)
    if not measured:
        return []
    lines = ["## Gates", "", "| method | gate | measured | passed |", "|---|---|---|---|"]
    for gate in measured:
        value = f"{gate['value'] * 100:+.1f} pt" if "pt" in gate["gate"] else f"{gate['value']:.1%}"
        lines.append(f"| {gate['method']} | {gate['gate']} | {value} | {'yes' if gate['passed'] else '**no**'} |")
    return [*lines, ""]


def stage_lines(results: dict) -> list[str]:
    """MoExtend's stages and the matched LoRA ranks; for joint training, whether each method beats LoRA of its
    trainable-parameter count."""
    lines = []
    methods = results["methods"]
    for name, result in methods.items():
        for stage in result.get("stages", []):
            if "lora_rank" in stage:
                lines.append(
                    f"{result['label']}: rank {stage['lora_rank']}, {result['stages'][-1]['trainable']:,} trainable "
                    f"parameters against {stage['matched_parameters']:,} of {name.removeprefix('lora_as_')} "
                    f"({result['stages'][-1]['trainable'] / stage['matched_parameters'] - 1:+.1%})."
                )
        if any("moextend_stage" in stage for stage in result.get("stages", [])):
            lines.append(
                f"{result['label']} stages: "
                + "; ".join(
                    f"{stage['task']} "
                    + (f"stage {stage['moextend_stage']}" if "moextend_stage" in stage else "no new stage")
                    + (" (not trained: no new expert sees its tokens)" if stage.get("skipped") else "")
                    for stage in result["stages"]
                )
                + "."
            )
    for name in ("smola", "modex"):
        own, lora = methods.get(name, {}), methods.get(f"lora_as_{name}", {})
        if "accuracy" in own and "accuracy" in lora:
            ours, theirs = own["summary"]["average_accuracy"], lora["summary"]["average_accuracy"]
            lines.append(
                f"**{own['label']} {'beats' if ours > theirs else 'does not beat'} LoRA with its parameter count and "
                f"steps**: average accuracy {ours:.1%} vs {theirs:.1%}."
            )
    return [*lines, ""] if lines else []


def track_summary(results: dict) -> dict:
    """A track's headline: the chosen setting and per method the average accuracy, BWT, text change, trainable
    parameters, seconds per stage and peak memory."""
    base = results["alignment"]["text_probe"]
    rows = {}
    for name, result in results["methods"].items():
        if "accuracy" not in result:
            rows[name] = {"error": result.get("error")}
            continue
        change = text_change(result["text_probe"], result.get("text_probe_before", base))
        rows[name] = {
            "label": result["label"],
            **result["summary"],
            "identical_replies": change["identical_replies"],
            "perplexity_change": change["perplexity_change"],
            "trainable": result["stages"][-1]["trainable"],
            "stage_seconds": [s["stage_seconds"] for s in result["stages"]],
            "peak_memory_mib": result["peak_memory_mib"],
        }
    return {
        "tasks": [t["name"] for t in results["tasks"]],
        "chosen": results.get("chosen"),
        "minutes": results.get("total_seconds", 0.0) / 60,
        "gates_passed": [g["gate"] for g in gates(results) if g["passed"]],
        "gates_failed": [f"{g['method']}: {g['gate']}" for g in gates(results) if not g["passed"]],
        "methods": rows,
    }


def summary_markdown(summary: dict) -> str:
    lines = ["# Continual benchmark: summary of the tracks", ""]
    for track, headline in summary.items():
        chosen = headline["chosen"] or {}
        lines += [
            f"## {track} track ([report]({track}/report.md))",
            "",
            f"Tasks: {', '.join(headline['tasks'])}; learning rate {chosen.get('learning_rate', '-')}, "
            f"{chosen.get('epochs', '-')} epoch(s) for every method; {headline['minutes']:.1f} min.",
            "",
            "| method | avg acc | BWT | text replies identical | perplexity (Δ) | trainable | s / stage | peak MiB |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, row in headline["methods"].items():
            if "error" in row:
                lines.append(f"| {name} | failed: {row['error']} | | | | | | |")
                continue
            lines.append(
                f"| {row['label']} | {row['average_accuracy']:.1%} | {_fmt(row['backward_transfer'], '+.1%')} | "
                f"{row['identical_replies']:.0%} | {row['perplexity_change']:+.1%} | {row['trainable']:,} | "
                f"{' / '.join(f'{s:.0f}' for s in row['stage_seconds'])} | {row['peak_memory_mib']:.0f} |"
            )
        if headline["gates_failed"]:
            lines += ["", "Gates not met: " + "; ".join(headline["gates_failed"]) + "."]
        lines.append("")
    return "\n".join(lines)
