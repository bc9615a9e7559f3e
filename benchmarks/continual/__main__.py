"""Continual modality & task extension benchmark, offline on real weights and real data, in three tracks.

SmolLM2-135M-Instruct inside a LLaVA model (plus audio and video towers) is extended in three ways, each a track with
its own tasks, methods and protocol (benchmarks/continual/tracks.py):

- task: image tasks in sequence (digits, animals, fashion), no task id at test -- CMoE, MoExtend in task-extension
  mode, sequential LoRA and one LoRA per task with an oracle id;
- modality: text (the base model's, kept: the text probe) -> image -> audio -> video (digits, spoken digits,
  motion) -- PathWeave, MoExtend, sequential LoRA;
- multitask: joint training on the mixture of digits, fashion and spoken digits -- SMoLA and ModeX against LoRA
  with the same trainable-parameter count and steps.

Each track first picks ONE learning rate (at the track's 2 epochs) for all its methods from a small grid, on
validation splits carved out of the training data, then runs every method and reports the accuracy matrix, average
accuracy, backward transfer, what the language model still knows (factual questions, held-out perplexity), trainable
parameters, time per stage and peak memory. Writes <output-dir>/<track>/{results.json, report.md, plots} and a summary
(<output-dir>/summary.md, summary.json).

    python -m benchmarks.continual --quick          # minutes: three text fact tasks (the README demo; no tracks)
    python -m benchmarks.continual                  # the three tracks (each under 90 min on 2 CPU cores)
    python -m benchmarks.continual --track modality --methods pathweave moextend
    python -m benchmarks.continual --track task --no-grid --learning-rate 3e-3 --epochs 2
"""

from __future__ import annotations

import argparse
import dataclasses
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
from .data import TASK_NAMES, load_tasks  # noqa: E402
from .methods import METHODS, missing_methods  # noqa: E402
from .runner import align, needs_towers, run_grid, run_method  # noqa: E402
from .tracks import PERPLEXITY_BOUND, TRACKS, choose_candidate, track_plan  # noqa: E402

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
# the tracks only: validation examples carved out of each task's training data, and the grid's reduced training size
# (a recall task of taught facts is repeated `recall_repeats` times per epoch); each track may set its own sizes
# and the number of leading tasks the grid runs (None: all of them)
TRACK_SETTINGS = {"validation_size": 100, "grid_train_size": 160, "grid_tasks": None, "recall_repeats": 10}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {memory:.0f} GiB RAM, {platform.system()}"


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the demo: three text fact tasks, a few minutes")
    parser.add_argument(
        "--track",
        nargs="+",
        choices=list(TRACKS),
        help=f"tracks to run, in this order (default: {' '.join(TRACKS)}); ignored by --quick",
    )
    parser.add_argument(
        "--methods", nargs="+", choices=list(METHODS), help=f"default: the track's, quick: {' '.join(QUICK_METHODS)}"
    )
    parser.add_argument(
        "--tasks", nargs="+", choices=TASK_NAMES, help=f"in order; default: the track's, quick: {' '.join(QUICK_TASKS)}"
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
            f"--{key.replace('_', '-')}",
            type=type(value),
            help=f"tracks: {_per_track(key, value)}; quick: {PRESETS['quick'][key]}",
        )
    parser.add_argument("--learning-rate", type=float, help="with --no-grid: every method's learning rate")
    parser.add_argument(
        "--no-grid", action="store_true", help="skip the grid; use --learning-rate and --epochs for every method"
    )
    for key, value in TRACK_SETTINGS.items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, help=f"tracks only: {_per_track(key, value)}")
    args = parser.parse_args(argv)
    if args.no_grid and not args.quick and (args.learning_rate is None or args.epochs is None):
        parser.error("--no-grid needs --learning-rate and --epochs (the one setting every method of a track uses)")
    return args


def _per_track(key: str, default: object) -> str:
    """Each track's value of a size setting, for --help (None: all, e.g. every task in the grid)."""
    values = {track.name: track.sizes.get(key, default) for track in TRACKS.values()}
    return ", ".join(f"{name} {'all' if value is None else value}" for name, value in values.items())


def main(argv: list[str] | None = None) -> None:
    args = parse_arguments(argv)
    if args.from_results:
        output = Path(args.output_dir or args.from_results.parent)
        output.mkdir(parents=True, exist_ok=True)
        write_outputs(json.loads(args.from_results.read_text()), output)
        return
    if args.quick:
        settings = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in PRESETS["quick"].items()}
        settings |= {"seed": args.seed, "threads": args.threads, "quick": True}
        settings["tasks"] = list(args.tasks or QUICK_TASKS)
        if args.learning_rate is not None:
            settings["learning_rate"] = args.learning_rate
        output = Path(args.output_dir or "outputs/continual-quick")
        run(settings, list(args.methods or QUICK_METHODS), output, args.resume)
        return
    output = Path(args.output_dir or "outputs/continual")
    summaries, failed = {}, []
    for name in args.track or list(TRACKS):
        plan = track_plan(TRACKS[name], args.tasks, args.methods)
        defaults = PRESETS["full"] | TRACK_SETTINGS | TRACKS[name].sizes
        track_settings = {
            key: getattr(args, key) if getattr(args, key) is not None else value for key, value in defaults.items()
        }
        track_settings |= {"seed": args.seed, "threads": args.threads, "quick": False}
        track_settings |= {"track": name, "protocol": plan["protocol"], "tasks": plan["tasks"]}
        if args.no_grid:
            track_settings |= {"grid": None, "learning_rate": args.learning_rate, "epochs": args.epochs}
        else:
            track_settings["grid"] = TRACKS[name].candidates()
        print(f"\n######## track {name}: {TRACKS[name].description}", flush=True)
        try:
            results = run(track_settings, plan["methods"], output / name, args.resume)
        except SystemExit as stop:  # one track's failure does not stop the others; reported at the end
            print(stop, flush=True)
            failed.append(name)
            path = output / name / "results.json"
            results = json.loads(path.read_text()) if path.exists() else None
        if results is not None:
            summaries[name] = results
            write_summary(summaries, output)
    if failed:
        raise SystemExit(f"tracks with failures: {', '.join(failed)} (see their report.md and results.json)")


def run(settings: dict, methods: list[str], output: Path, resume: bool) -> dict:
    """One task sequence (the quick demo, or one track): data, alignment, the track's grid (when
    `settings["grid"]`), every method; writes results.json, the plots and report.md to `output`."""
    output.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    track = "track" in settings
    print("== data")
    validation_size = settings["validation_size"] if track else 0
    tasks, notes = load_tasks(
        settings["train_size"], settings["test_size"], settings["seed"], settings["tasks"], validation_size
    )
    for note in notes:
        print(f"NOTE: {note}", flush=True)
    notes += [f"method {m} is not implemented in this package yet (listed, not run)." for m in missing_methods()]
    if not tasks:
        raise SystemExit("No task could be loaded: see the notes above for the install commands.")
    for task in tasks:
        sizes = f"train {len(task.train):4d} test {len(task.test):4d}"
        if track:
            sizes += f" validation {len(task.validation):4d}" + "".join(
                f" {name} {len(rows)}" for name, rows in task.extra_tests.items()
            )
        print(f"{task.name:8s} {task.modality:5s} {sizes}  ({task.source})")
    alignment_settings = {k: settings[k] for k in ("train_size", "align_per_task", "align_epochs", "seed", "threads")}
    alignment_settings["progress"] = not settings["quick"]  # the demo's output: its table, no progress bars
    # the towers depend on these settings only (not on the thread count): a cached alignment is reused
    alignment_settings["tasks"] = [t.name for t in tasks]

    if needs_towers(tasks):
        print("\n== alignment stage: towers + projectors through the frozen language model (captions of the inputs)")
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
                **({"validation": len(t.validation)} if track else {}),
                **{f"test {name}": len(rows) for name, rows in t.extra_tests.items()},
            }
            for t in tasks
        ],
        "alignment": alignment,
        "methods": {},
    }
    previous = {}
    if resume:
        previous = previous_run(output / "results.json", settings)
        results["methods"] = previous.get("methods", {})
        if results["methods"]:
            print(f"\nresuming: {', '.join(results['methods'])} kept from {output / 'results.json'}", flush=True)
    previous_seconds = previous.get("total_seconds", 0.0)
    run_settings = alignment_settings | {k: settings[k] for k in ("epochs", "batch_size")}
    run_settings |= {k: settings[k] for k in ("protocol", "learning_rate") if k in settings}
    if track and settings["grid"]:
        results["grid"] = previous.get("grid") or grid_search(tasks, settings, methods, alignment, run_settings)
        results["total_seconds"] = previous_seconds + time.perf_counter() - started
        save_results(results, output)
        run_settings |= {k: results["grid"]["choice"][k] for k in ("learning_rate", "epochs")}
    if track:
        results["chosen"] = {k: run_settings[k] for k in ("learning_rate", "epochs")}
    for name in [m for m in methods if m not in results["methods"]]:
        print(f"\n== {name}: {METHODS[name].label}", flush=True)
        result = in_subprocess(run_method, name, tasks, run_settings, quiet=True)
        if "error" in result:
            print(f"FAILED: {result['error']}\n{result['traceback']}", flush=True)
        else:
            result["summary"] = report.summary(result["accuracy"])
            print(
                f"  average accuracy {result['summary']['average_accuracy']:.1%}, "
                + (
                    ""
                    if result["summary"]["backward_transfer"] is None
                    else f"BWT {result['summary']['backward_transfer']:+.1%}, "
                )
                + f"text facts {result['text_probe']['fact_accuracy']:.1%}, "
                f"perplexity {result['text_probe']['perplexity']:.2f}",
                flush=True,
            )
        results["methods"][name] = result
        results["total_seconds"] = previous_seconds + time.perf_counter() - started
        save_results(results, output)
    write_outputs(results, output)
    return results


def grid_search(tasks: list, settings: dict, methods: list[str], alignment: dict, run_settings: dict) -> dict:
    """Every method of the track trained with every grid candidate on `grid_train_size` training examples per task
    of the track's first `grid_tasks` tasks (all when None) and scored on their validation splits; the one choice by
    `tracks.choose_candidate`. Returns `{"candidates", "choice", "train_size", "tasks", "validation_size",
    "perplexity_bound"}` (each candidate with every method's scores)."""
    grid_tasks = tasks[: settings.get("grid_tasks") or len(tasks)]
    reduced = [dataclasses.replace(t, train=t.train[: settings["grid_train_size"]]) for t in grid_tasks]
    candidates = [dict(c, methods={}) for c in settings["grid"]]
    print(
        f"\n== grid: learning rate x epochs {[(c['learning_rate'], c['epochs']) for c in candidates]}, every method, "
        f"on {', '.join(t.name for t in reduced)}, {settings['grid_train_size']} training examples per task, scored "
        "on the validation splits",
        flush=True,
    )
    for name in methods:
        scores = in_subprocess(run_grid, name, reduced, run_settings, settings["grid"], quiet=True)
        for candidate, score in zip(candidates, scores.get("candidates") or [scores] * len(candidates), strict=True):
            if "error" in score:
                candidate["methods"][name] = {"error": score["error"]}
                continue
            before = score.get("text_probe_before", alignment["text_probe"])
            candidate["methods"][name] = {
                "validation_accuracy": float(sum(score["validation_accuracy"].values()) / len(reduced)),
                "per_task": score["validation_accuracy"],
                "perplexity_change": score["text_probe"]["perplexity"] / before["perplexity"] - 1,
                "seconds": score["seconds"],
            }
    choice = choose_candidate(candidates)
    print(
        f"grid choice: learning rate {choice['learning_rate']:g}, {choice['epochs']:g} epoch(s) (mean validation "
        f"accuracy {choice['mean_validation_accuracy']:.1%}"
        + ("" if choice["within_bound"] else "; NO candidate kept every perplexity change within the bound")
        + ")",
        flush=True,
    )
    return {
        "candidates": candidates,
        "choice": choice,
        "train_size": settings["grid_train_size"],
        "tasks": [t.name for t in reduced],
        "validation_size": settings["validation_size"],
        "perplexity_bound": PERPLEXITY_BOUND,
    }


def previous_run(path: Path, settings: dict) -> dict:
    """What an earlier run with the same settings left in `path`: its methods that finished without error, its grid
    (when it finished) and its duration; nothing when the file is missing or its settings differ."""
    if not path.exists():
        return {}
    previous = json.loads(path.read_text())
    if previous["settings"] != settings:
        print(f"\nnot resuming: {path} was made with other settings ({previous['settings']})", flush=True)
        return {}
    finished = {name: result for name, result in previous["methods"].items() if "error" not in result}
    return {
        "methods": finished,
        "total_seconds": previous.get("total_seconds", 0.0),
        **({"grid": previous["grid"]} if "grid" in previous else {}),
    }


def finished_methods(path: Path, settings: dict) -> tuple[dict, float]:
    """The methods that finished without error in an earlier run's results.json, and that run's duration; nothing
    when the file is missing or its settings differ."""
    previous = previous_run(path, settings)
    return previous.get("methods", {}), previous.get("total_seconds", 0.0)


def save_results(results: dict, output: Path) -> None:
    """results.json after each method, so that a run stopped part-way keeps what it measured."""
    (output / "results.json").write_text(json.dumps(results, indent=1))


def write_outputs(results: dict, output: Path) -> None:
    """results.json, the plots and report.md in `output`; prints the summary table."""
    task_names = [t["name"] for t in results["tasks"]]
    joint = results["settings"].get("protocol") == "joint"
    images = {"track": "track.png"} if "track" in results["settings"] else {}
    if images:
        report.plot_track(results, task_names, output / images["track"])
    if not joint:  # one stage: no accuracy-over-stages, no forgetting
        images |= {"first_task": "first_task.png", "accuracy": "accuracy_matrices.png", "forgetting": "forgetting.png"}
        report.plot_first_task(results, task_names, output / images["first_task"])
        report.plot_accuracy_matrices(results, task_names, output / images["accuracy"])
        report.plot_forgetting(results, task_names, output / images["forgetting"])
    for name in ("moextend", "moextend_tasks"):
        if results["methods"].get(name, {}).get("routing"):  # none when every task is text
            images[f"routing_{name}"] = f"{name}_routing.png"
            report.plot_routing(results["methods"][name]["routing"], output / images[f"routing_{name}"])
    save_results(results, output)
    text = report.markdown(results, task_names, images)
    (output / "report.md").write_text(text)
    print(f"\n{text.split('## Accuracy matrices')[0]}")
    print(f"results: {output / 'results.json'}, report: {output / 'report.md'}, plots: {', '.join(images.values())}")
    failed = [m for m, r in results["methods"].items() if "error" in r]
    if failed:
        raise SystemExit(f"methods failed: {', '.join(failed)} (tracebacks above and in results.json)")


def write_summary(tracks: dict[str, dict], output: Path) -> None:
    """<output>/summary.md and summary.json: each track's chosen setting and one row per method -- the tracks of
    this run (`tracks`) and, for the others, their results.json left in `output` by an earlier run."""
    for name in TRACKS:
        path = output / name / "results.json"
        if name not in tracks and path.exists():
            tracks = tracks | {name: json.loads(path.read_text())}
    summary = {name: report.track_summary(tracks[name]) for name in TRACKS if name in tracks}
    (output / "summary.json").write_text(json.dumps(summary, indent=1))
    (output / "summary.md").write_text(report.summary_markdown(summary))


if __name__ == "__main__":
    main()
