"""The benchmark's three tracks -- each its own task list, method list and protocol -- and the pure rules they share:
the hyper-parameter grid and its choice, the joint-training mixture, and the LoRA rank that matches a method's
trainable-parameter count.

- **task**: image tasks in sequence, no task id at test (two of them visually similar grey 28x28 domains).
- **modality**: text (the language model's own modality, kept: the text probe) -> image -> audio -> video, one task
  per new modality.
- **multitask**: one stage of joint training on the shuffled mixture of all the track's tasks.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Track:
    """One track: tasks in order, methods, protocol ("sequential": a stage per task; "joint": one stage on the
    mixture of all tasks) and the grid of shared hyper-parameters every method of the track is run with."""

    name: str
    tasks: tuple[str, ...]
    methods: tuple[str, ...]
    protocol: str
    description: str
    learning_rates: tuple[float, ...] = (1e-3, 3e-3)
    # one number of epochs: in the first full task-track run (2026-11-30) a 1-vs-2-epoch grid on 48 examples per
    # task left every validation score within noise of chance; its time now goes to the training data
    epochs: tuple[float, ...] = (2,)
    # the track's own sizes over the full preset's and TRACK_SETTINGS' values (train_size, test_size, grid_tasks,
    # ...): chosen so that the track, grid included, stays under 90 minutes on 2 CPU cores (docs/continual.md, "Time")
    sizes: dict = field(default_factory=dict)

    def candidates(self) -> list[dict]:
        """The grid, learning rate x epochs, in order (ties in the choice go to the earlier candidate)."""
        return [
            {"learning_rate": lr, "epochs": epochs}
            for lr, epochs in itertools.product(self.learning_rates, self.epochs)
        ]


# Sizes per track (examples per task) from the first full task-track run on the 2-core development machine
# (2026-11-30: a LoRA step of batch 16 took 2.8 s, evaluation and the text probe about 2.6 min per method), so that
# each track, grid included, is estimated under 90 minutes (docs/continual.md, "Time"). A sequential track's grid runs
# its first task only (`grid_tasks`: hyper-parameters chosen on the first task of the stream, as in A-GEM's protocol,
# not on tasks a continual learner has not seen yet); the joint track's grid runs the reduced mixture.
TASK_SIZES = {
    "train_size": 512,
    "test_size": 100,
    "validation_size": 50,
    "grid_train_size": 128,
    "grid_tasks": 1,
    "align_per_task": 256,
}
MODALITY_SIZES = {
    "train_size": 640,
    "test_size": 150,
    "validation_size": 60,
    "grid_train_size": 128,
    "grid_tasks": 1,
    "align_per_task": 300,
}
MULTITASK_SIZES = {
    "train_size": 448,
    "test_size": 150,
    "validation_size": 60,
    "grid_train_size": 64,
    "align_per_task": 300,
}
TRACKS: dict[str, Track] = {
    track.name: track
    for track in (
        Track(
            "task",
            ("digits", "animals", "fashion"),
            ("sequential_lora", "oracle_lora", "cmoe", "moextend_tasks"),
            "sequential",
            "continual image tasks, no task id at test; animals and fashion are both grey 28x28 silhouettes",
            sizes=TASK_SIZES,
        ),
        Track(
            "modality",
            ("digits", "spoken", "motion"),
            ("sequential_lora", "pathweave", "moextend"),
            "sequential",
            "text (the base model's, measured by the text probe) -> image -> audio -> video, one task per new modality",
            sizes=MODALITY_SIZES,
        ),
        Track(
            "multitask",
            ("digits", "fashion", "spoken"),
            ("smola", "lora_as_smola", "modex", "lora_as_modex"),
            "joint",
            "joint training on the shuffled mixture of all tasks; LoRA with the trainable-parameter count of each",
            sizes=MULTITASK_SIZES,
        ),
    )
}
PERPLEXITY_BOUND = 1.0  # a grid candidate is rejected when some method's held-out perplexity grows by more (+100%)


def track_plan(track: Track, tasks: list[str] | None = None, methods: list[str] | None = None) -> dict:
    """The task list, method list and protocol a track runs, with the `--tasks` / `--methods` overrides."""
    return {
        "track": track.name,
        "tasks": list(tasks or track.tasks),
        "methods": list(methods or track.methods),
        "protocol": track.protocol,
    }


def choose_candidate(grid: list[dict], perplexity_bound: float = PERPLEXITY_BOUND) -> dict:
    """The track's one choice from the grid's validation runs.

    `grid`: one entry per candidate, `{"learning_rate", "epochs", "methods": {method: {"validation_accuracy",
    "perplexity_change"} or {"error"}}}`. A candidate is rejected when some method failed or its held-out perplexity
    grew by more than `perplexity_bound` (relative, 1.0 = +100%); the choice is the admissible candidate with the
    highest mean over methods of the validation average accuracy (ties: the earlier candidate). When every candidate
    is rejected, the one with the smallest worst perplexity change is chosen and `within_bound` is False.

    Returns `{"index", "learning_rate", "epochs", "mean_validation_accuracy", "within_bound", "rejected"}`."""
    if not grid:
        raise ValueError("The grid is empty: give at least one (learning_rate, epochs) candidate.")

    def worst_perplexity(candidate: dict) -> float:
        return max(
            math.inf if "error" in score else score["perplexity_change"] for score in candidate["methods"].values()
        )

    rejected = [i for i, candidate in enumerate(grid) if worst_perplexity(candidate) > perplexity_bound]
    admissible = [i for i in range(len(grid)) if i not in rejected]
    means = [
        float(np.mean([s.get("validation_accuracy", 0.0) for s in candidate["methods"].values()])) for candidate in grid
    ]
    if admissible:
        index = max(admissible, key=lambda i: (means[i], -i))
    else:
        index = min(range(len(grid)), key=lambda i: (worst_perplexity(grid[i]), i))
    return {
        "index": index,
        "learning_rate": grid[index]["learning_rate"],
        "epochs": grid[index]["epochs"],
        "mean_validation_accuracy": means[index],
        "within_bound": bool(admissible),
        "rejected": rejected,
    }


def mixture_plan(modalities: list[str], epochs: float, batch_size: int, seed: int) -> list[list[int]]:
    """The order in which training visits `rows` (given by their modalities): per epoch, each modality's rows
    shuffled with `seed + epoch` and cut into batches of one modality; then all batches shuffled with `seed`, and a
    fractional last epoch cut from the shuffled plan. Returns the row indices of each batch; with whole `epochs`,
    every row appears exactly once per epoch. (The joint-training stage of the multitask track is this plan over
    the rows of all its tasks.)"""
    by_modality: dict[str, list[int]] = {}
    for index, modality in enumerate(modalities):
        by_modality.setdefault(modality, []).append(index)
    plan = []
    for epoch in range(math.ceil(epochs)):
        for indices in by_modality.values():
            order = np.random.default_rng(seed + epoch).permutation(len(indices))
            plan += [
                [indices[i] for i in order[start : start + batch_size]] for start in range(0, len(order), batch_size)
            ]
    rng = np.random.default_rng(seed)
    return [plan[i] for i in rng.permutation(len(plan))][: max(1, round(len(plan) * epochs / math.ceil(epochs)))]


def matched_lora_rank(target_parameters: int, parameters_per_rank: int) -> int:
    """The LoRA rank whose trainable-parameter count (`rank * parameters_per_rank`) is closest to
    `target_parameters` (at least 1)."""
    if parameters_per_rank <= 0:
        raise ValueError(f"parameters_per_rank must be positive, got {parameters_per_rank}: no module matched.")
    below = max(1, target_parameters // parameters_per_rank)
    return min((below, below + 1), key=lambda r: abs(r * parameters_per_rank - target_parameters))
