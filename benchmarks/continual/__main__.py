"""Continual modality & task extension benchmark, offline on real weights and real data.

SmolLM2-135M-Instruct inside a LLaVA model learns, in sequence: scikit-learn digits, Animal-MNIST, Fashion-MNIST
(images) and spoken digits (audio: espeak-ng synthesis for training, human recordings for testing), each asked as
a question with a short answer. Every method is compared on the accuracy matrix, average accuracy, backward
transfer, what the language model still knows (factual questions, held-out perplexity), trainable parameters,
time per stage and peak memory. Writes results.json, PNG plots and report.md to --output-dir.

    python -m benchmarks.continual --quick          # minutes: small subsets (the README demo)
    python -m benchmarks.continual                  # full run (under 90 min on 2 CPU cores)
    python -m benchmarks.continual --methods cmoe moextend
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from pathlib import Path

from ..common import in_subprocess, quiet_libraries

# before the imports below load bitsandbytes (the alignment and method processes are quiet too: `in_subprocess`)
if __name__ == "__main__":
    quiet_libraries()

from . import report  # noqa: E402
from .data import DEFAULT_TASKS, TASK_NAMES, load_tasks  # noqa: E402
from .methods import METHODS, missing_methods  # noqa: E402
from .runner import align, needs_towers, run_method  # noqa: E402

PRESETS = {
    "quick": {
        "train_size": 64,
        "test_size": 30,
        "epochs": 10,
        "batch_size": 8,
        "align_per_task": 64,
        "align_epochs": 2,
    },
    "full": {
        "train_size": 640,
        "test_size": 200,
        "epochs": 2,
        "batch_size": 16,
        "align_per_task": 400,
        "align_epochs": 1.5,
    },
}
# the demo: three sets of new facts taught in sequence, the story of CMoE against sequential LoRA
QUICK_TASKS = ("animal_teams", "fruit_teams", "tool_teams")
QUICK_METHODS = ("sequential_lora", "cmoe")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {memory:.0f} GiB RAM, {platform.system()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small subsets, a few minutes")
    parser.add_argument(
        "--methods", nargs="+", choices=list(METHODS), help=f"full: all, quick: {' '.join(QUICK_METHODS)}"
    )
    parser.add_argument(
        "--tasks",
        nargs="+",
        choices=TASK_NAMES,
        help=f"in order; full: {' '.join(DEFAULT_TASKS)}, quick: {' '.join(QUICK_TASKS)}",
    )
    parser.add_argument("--output-dir", help="default: outputs/continual[-quick]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--from-results", type=Path, help="only rewrite the report and plots of this results.json")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument(
        "--resume", action="store_true", help="keep the finished methods of --output-dir's results.json (same settings)"
    )
    for key, value in PRESETS["full"].items():
        parser.add_argument(
            f"--{key.replace('_', '-')}", type=type(value), help=f"full: {value}, quick: {PRESETS['quick'][key]}"
        )
    args = parser.parse_args()
    if args.from_results:
        output = Path(args.output_dir or args.from_results.parent)
        output.mkdir(parents=True, exist_ok=True)
        write_outputs(json.loads(args.from_results.read_text()), output)
        return
    preset = PRESETS["quick" if args.quick else "full"]
    settings = {key: getattr(args, key) if getattr(args, key) is not None else value for key, value in preset.items()}
    settings |= {"seed": args.seed, "threads": args.threads, "quick": args.quick}
    task_names = args.tasks or (QUICK_TASKS if args.quick else DEFAULT_TASKS)
    methods = args.methods or (QUICK_METHODS if args.quick else list(METHODS))
    settings["tasks"] = list(task_names)
    output = Path(args.output_dir or ("outputs/continual-quick" if args.quick else "outputs/continual"))
    output.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    print("== data")
    tasks, notes = load_tasks(settings["train_size"], settings["test_size"], settings["seed"], task_names)
    for note in notes:
        print(f"NOTE: {note}", flush=True)
    notes += [f"method {m} is not implemented in this package yet (listed, not run)." for m in missing_methods()]
    if not tasks:
        raise SystemExit("No task could be loaded: see the notes above for the install commands.")
    for task in tasks:
        print(f"{task.name:8s} {task.modality:5s} train {len(task.train):4d} test {len(task.test):4d}  ({task.source})")
    alignment_settings = {k: settings[k] for k in ("train_size", "align_per_task", "align_epochs", "seed", "threads")}
    alignment_settings["progress"] = not args.quick  # the demo's output: its table, no progress bars
    # the towers depend on these settings only (not on the thread count): a cached alignment is reused
    alignment_settings["tasks"] = [t.name for t in tasks]

    if needs_towers(tasks):
        print("\n== alignment stage: towers + projectors through the frozen language model (label-free captions)")
    else:
        print("\n== base model")
    alignment = in_subprocess(align, tasks, alignment_settings, quiet=True)
    towers = "no image or audio task, nothing to align" if alignment["path"] is None else alignment["path"]
    print(
        f"{'cached: ' if alignment['cached'] else ''}{towers}; base accuracy "
        + ", ".join(f"{t} {a:.1%}" for t, a in alignment["base_accuracy"].items())
        + f"; text facts {alignment['text_probe']['fact_accuracy']:.1%}, "
        f"perplexity {alignment['text_probe']['perplexity']:.2f}",
        flush=True,
    )

    results = {
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "settings": settings,
        "notes": notes,
        "tasks": [
            {
                "name": t.name,
                "modality": t.modality,
                "classes": t.classes,
                "source": t.source,
                "train": len(t.train),
                "test": len(t.test),
            }
            for t in tasks
        ],
        "alignment": alignment,
        "methods": {},
    }
    previous_seconds = 0.0
    if args.resume:
        results["methods"], previous_seconds = finished_methods(output / "results.json", settings)
        if results["methods"]:
            print(f"\nresuming: {', '.join(results['methods'])} kept from {output / 'results.json'}", flush=True)
    for name in [m for m in methods if m not in results["methods"]]:
        print(f"\n== {name}: {METHODS[name].label}", flush=True)
        result = in_subprocess(
            run_method,
            name,
            tasks,
            alignment_settings | {k: settings[k] for k in ("epochs", "batch_size")},
            quiet=True,
        )
        if "error" in result:
            print(f"FAILED: {result['error']}\n{result['traceback']}", flush=True)
        else:
            result["summary"] = report.summary(result["accuracy"])
            print(
                f"  average accuracy {result['summary']['average_accuracy']:.1%}, "
                f"BWT {result['summary']['backward_transfer']:+.1%}, "
                f"text facts {result['text_probe']['fact_accuracy']:.1%}, "
                f"perplexity {result['text_probe']['perplexity']:.2f}",
                flush=True,
            )
        results["methods"][name] = result
        results["total_seconds"] = previous_seconds + time.perf_counter() - started
        save_results(results, output)
    write_outputs(results, output)


def finished_methods(path: Path, settings: dict) -> tuple[dict, float]:
    """The methods that finished without error in an earlier run's results.json, and that run's duration; nothing
    when the file is missing or its settings differ."""
    if not path.exists():
        return {}, 0.0
    previous = json.loads(path.read_text())
    if previous["settings"] != settings:
        print(f"\nnot resuming: {path} was made with other settings ({previous['settings']})", flush=True)
        return {}, 0.0
    finished = {name: result for name, result in previous["methods"].items() if "error" not in result}
    return finished, previous.get("total_seconds", 0.0)


def save_results(results: dict, output: Path) -> None:
    """results.json after each method, so that a run stopped part-way keeps what it measured."""
    (output / "results.json").write_text(json.dumps(results, indent=1))


def write_outputs(results: dict, output: Path) -> None:
    """results.json, the plots and report.md in `output`; prints the summary table."""
    task_names = [t["name"] for t in results["tasks"]]
    images = {"first_task": "first_task.png", "accuracy": "accuracy_matrices.png", "forgetting": "forgetting.png"}
    report.plot_first_task(results, task_names, output / images["first_task"])
    report.plot_accuracy_matrices(results, task_names, output / images["accuracy"])
    report.plot_forgetting(results, task_names, output / images["forgetting"])
    if "routing" in results["methods"].get("moextend", {}):
        images["routing"] = "moextend_routing.png"
        report.plot_routing(results["methods"]["moextend"]["routing"], output / images["routing"])
    save_results(results, output)
    text = report.markdown(results, task_names, images)
    (output / "report.md").write_text(text)
    print(f"\n{text.split('## Accuracy matrices')[0]}")
    print(f"results: {output / 'results.json'}, report: {output / 'report.md'}, plots: {', '.join(images.values())}")
    failed = [m for m, r in results["methods"].items() if "error" in r]
    if failed:
        raise SystemExit(f"methods failed: {', '.join(failed)} (tracebacks above and in results.json)")


if __name__ == "__main__":
    main()
