"""Metrics, plots and the markdown report of a continual run."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def summary(accuracy: list[list[float]]) -> dict:
    """Average final accuracy and backward transfer (BWT, Lopez-Paz & Ranzato 2017) of a lower-triangular accuracy
    matrix `accuracy[stage][task]`: BWT = mean over tasks i < T of (acc after the last stage - acc right after i)."""
    final = accuracy[-1]
    num_tasks = len(final)
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
    """MoExtend: per extended layer (rows) the share of routing slots per expert (columns; the last is new), for
    each task's image/audio tokens and for its text tokens."""
    tasks = list(routing)
    figure, axes = plt.subplots(2, len(tasks), figsize=(2.3 * len(tasks) + 1, 7), squeeze=False)
    for column, task in enumerate(tasks):
        for row, kind in enumerate(("modality", "text")):
            axis = axes[row, column]
            shares = np.array(routing[task][kind])
            image = axis.imshow(shares, vmin=0, vmax=1, cmap="magma", aspect="auto")
            num_experts = shares.shape[1]
            axis.set_xticks(range(num_experts), [f"e{i}" for i in range(num_experts - 1)] + ["new"], fontsize=7)
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
    lines = [
        f"# Continual modality & task extension benchmark ({'quick' if settings['quick'] else 'full'} run)",
        "",
        f"Run {results['date']} on {results['machine']}; seed {settings['seed']}, {settings['threads']} threads, "
        f"total {results['total_seconds'] / 60:.1f} min. Tasks in order: "
        + ", ".join(f"{t['name']} ({t['modality']}, {t['train']} train / {t['test']} test)" for t in results["tasks"])
        + f"; {settings['epochs']} epoch(s) of batch {settings.get('batch_size', 16)} per task.",
        "",
        "Model: SmolLM2-135M-Instruct inside transformers' `LlavaForConditionalGeneration` (2-layer SigLIP vision "
        "tower + projector) plus a 3-layer convolutional audio encoder + projector; "
        + (
            "no task has images or audio, so the towers are unused. "
            if alignment["path"] is None
            else "the towers were trained in a label-free alignment stage "
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
        + " | text replies identical | text facts (Δ) | perplexity (Δ) | trainable params (last stage)"
        " | train s / stage | peak RSS MiB |",
        "|---" * (len(tasks) + 9) + "|",
    ]
    for name, result in results["methods"].items():
        if "accuracy" not in result:
            lines.append(f"| {name} | {result.get('error') or result.get('missing')} |" + " |" * (len(tasks) + 7))
            continue
        before = result.get("text_probe_before", base_probe)
        probe = result["text_probe"]
        change = text_change(probe, before)
        stats = result["summary"]
        stage_seconds = [s["seconds"] for s in result["stages"]]
        lines.append(
            f"| {result['label']} | {stats['average_accuracy']:.1%} | {stats['backward_transfer']:+.1%} | "
            + " | ".join(_fmt(a) for a in result["accuracy"][-1])
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
    lines += [
        "",
        "## Accuracy matrices",
        "",
        f"![first task and text]({images['first_task']})",
        "",
        f"![accuracy matrices]({images['accuracy']})",
        "",
        f"![forgetting]({images['forgetting']})",
        "",
    ]
    if "routing" in images:
        lines += ["## MoExtend routing by modality", "", f"![routing]({images['routing']})", ""]
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
            lines.append(f"| {tasks[stage]} | " + " | ".join(_fmt(a) for a in row) + " |" * (len(tasks) - len(row) + 1))
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
