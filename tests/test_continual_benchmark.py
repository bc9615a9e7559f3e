"""The continual benchmark's own logic (benchmarks/continual): metrics, data loading and reporting of missing
packages, example encoding, and the greedy exact-match rule. The full run on real weights is the `slow` test."""

import dataclasses
import gzip
import importlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import run_command
from tiny_vlms import make_tiny_vlm, make_vlm_inputs

from benchmarks.continual import data
from benchmarks.continual.__main__ import finished_methods
from benchmarks.continual.model import (
    NUM_AUDIO_TOKENS,
    NUM_IMAGE_TOKENS,
    NUM_VIDEO_TOKENS,
    VideoTower,
    Vocabulary,
    collate,
    example,
)
from benchmarks.continual.report import earlier_tasks_change, markdown, plot_first_task, summary, text_change
from benchmarks.continual.training import alignment_rows, exact_match, frame_shifts

ROOT = Path(__file__).parents[1]


class CharTokenizer:
    """One id per character (ids 10+), enough for `Vocabulary.encode`."""

    def __call__(self, text, add_special_tokens=False):
        return type("Encoding", (), {"input_ids": [10 + ord(c) % 200 for c in text]})()


VOCABULARY = Vocabulary(CharTokenizer(), image_id=1, audio_id=2, video_id=3, pad_id=0)


def test_summary_average_accuracy_and_backward_transfer():
    accuracy = [[1.0], [0.5, 0.8], [0.2, 0.6, 0.9]]
    result = summary(accuracy)
    assert result["average_accuracy"] == pytest.approx((0.2 + 0.6 + 0.9) / 3)
    assert result["backward_transfer"] == pytest.approx(((0.2 - 1.0) + (0.6 - 0.8)) / 2)
    assert summary([[0.7]]) == {"average_accuracy": 0.7, "backward_transfer": 0.0}


def test_exact_match_is_greedy_decoding():
    model = make_tiny_vlm("llava")
    prompt = make_vlm_inputs(model, "llava", batch_size=2, with_media=True)
    prompt.pop("labels")
    with torch.no_grad():
        generated = model.generate(**prompt, max_new_tokens=3, do_sample=False)
        input_ids = generated
        labels = torch.full_like(input_ids, -100)
        labels[:, -3:] = generated[:, -3:]
        wrong = labels.clone()
        wrong[1, -2] = (wrong[1, -2] + 1) % model.config.text_config.vocab_size
        logits = model(input_ids=input_ids, pixel_values=prompt["pixel_values"]).logits
    assert exact_match(logits, labels).tolist() == [True, True]
    assert exact_match(logits, wrong).tolist() == [True, False]


def test_example_labels_only_the_answer_and_marks_placeholders():
    image_task = data.Task("digits", "image", "Which digit?", ["0", "1"], "", [], [])
    audio_task = data.Task("spoken", "audio", "Which digit?", ["0", "1"], "", [], [])
    image_row = example(image_task, np.zeros((28, 28), np.float32), "1", VOCABULARY)
    audio_row = example(audio_task, np.zeros((40, 100), np.float32), "1", VOCABULARY)
    answer = VOCABULARY.encode("1<|im_end|>")
    for row, placeholder, count, modality in ((image_row, 1, NUM_IMAGE_TOKENS, 1), (audio_row, 2, NUM_AUDIO_TOKENS, 3)):
        assert [t for t in row["labels"] if t != -100] == answer
        assert row["labels"][-len(answer) :] == answer and row["input_ids"][-len(answer) :] == answer
        assert row["input_ids"].count(placeholder) == count
        assert [m for m, t in zip(row["modality_ids"], row["input_ids"]) if t == placeholder] == [modality] * count
        assert set(m for m, t in zip(row["modality_ids"], row["input_ids"]) if t != placeholder) == {0}
    batch = collate(
        [
            image_row,
            {
                **image_row,
                "input_ids": image_row["input_ids"][:-1],
                "labels": image_row["labels"][:-1],
                "modality_ids": image_row["modality_ids"][:-1],
            },
        ],
        0,
    )
    assert batch["pixel_values"].shape == (2, 1, 28, 28) and float(batch["pixel_values"].min()) == -1.0
    assert batch["attention_mask"][1, -1] == 0 and batch["labels"][1, -1] == -100 and batch["input_ids"][1, -1] == 0
    assert collate([audio_row], 0)["audio_features"].shape == (1, 40, 100)


def test_motion_videos_move_the_same_digit_one_step_per_frame_in_the_labelled_direction():
    task = data.moving_digits(train_size=24, test_size=12, seed=0)
    assert task.modality == "video" and task.classes == list(data.DIRECTIONS)
    for video, label in task.train + task.test:
        assert video.shape == (data.VIDEO_FRAMES, 28, 28) and video.dtype == np.float32
        row_step, column_step = data.DIRECTIONS[task.classes[label]]
        for t in range(1, data.VIDEO_FRAMES):
            shift = (t * data.MOTION_STEP * row_step, t * data.MOTION_STEP * column_step)
            assert np.array_equal(video[t], np.roll(video[0], shift, axis=(0, 1)))
    assert {label for _, label in task.train} == set(range(4))

    def rolls(frame: np.ndarray) -> np.ndarray:  # (784, 28, 28): the frame at every place
        return np.stack([np.roll(frame, (r, c), axis=(0, 1)) for r in range(28) for c in range(28)])

    # no test video shows a digit image used in training, wherever it is placed
    train_frames = np.stack([video[0] for video, _ in task.train])
    for video, _ in task.test:
        placed = rolls(video[0]).reshape(-1, 1, 28 * 28)
        assert not (placed == train_frames.reshape(1, -1, 28 * 28)).all(-1).any()


def test_video_captions_give_the_shift_between_frames_across_the_wrapping_edges():
    task = data.moving_digits(train_size=40, test_size=0, seed=1)
    for video, label in task.train:
        row_step, column_step = data.DIRECTIONS[task.classes[label]]
        expected = (column_step * data.MOTION_STEP, row_step * data.MOTION_STEP)
        assert frame_shifts(video) == [expected] * (data.VIDEO_FRAMES - 1)
    frame = np.zeros((28, 28), np.float32)
    frame[10:14, 20:28] = frame[8:10, 22:24] = 1.0  # an asymmetric glyph cut by the right edge after the shift
    video = np.stack([frame, np.roll(frame, (-3, 11), axis=(0, 1))])
    assert frame_shifts(video) == [(11, -3)]
    rows = alignment_rows([dataclasses.replace(task, train=[(video, 0)])], VOCABULARY, 1)
    assert len(rows) == 4 and all(row == rows[0] for row in rows)  # each video caption is seen 4x per epoch
    assert [t for t in rows[0]["labels"] if t != -100] == VOCABULARY.encode("+11 -3<|im_end|>")


def test_video_examples_and_tower():
    task = data.Task("motion", "video", "Which way?", list(data.DIRECTIONS), "", [], [])
    frames = np.zeros((data.VIDEO_FRAMES, 28, 28), np.float32)
    row = example(task, frames, "left", VOCABULARY)
    assert row["input_ids"].count(VOCABULARY.video_id) == NUM_VIDEO_TOKENS
    video_positions = [i for i, t in enumerate(row["input_ids"]) if t == VOCABULARY.video_id]
    assert {row["modality_ids"][i] for i in video_positions} == {2}  # MODALITIES.index("video")
    assert sum(row["modality_ids"]) == 2 * NUM_VIDEO_TOKENS
    batch = collate([row, row], 0)
    assert batch["video_frames"].shape == (2, data.VIDEO_FRAMES, 28, 28) and float(batch["video_frames"].max()) == 0
    tower = VideoTower(hidden_size=16)
    tokens = tower(batch["video_frames"])
    assert tokens.shape == (2, NUM_VIDEO_TOKENS, 16)
    # motion reaches the tokens: the same frames in the opposite order give other tokens
    moving = torch.from_numpy(data.moving_digits(1, 1, 0).train[0][0])[None]
    assert not torch.allclose(tower(moving), tower(moving.flip(1)), atol=1e-4)


def test_team_facts_are_balanced_recall_tasks_that_differ_only_in_their_members():
    tasks, notes = data.load_tasks(train_size=64, test_size=30, seed=0, names=list(data.TEAM_MEMBERS))
    assert notes == [] and [t.modality for t in tasks] == ["text"] * 3
    for task, members in zip(tasks, data.TEAM_MEMBERS.values(), strict=True):
        assert task.train == task.test and len(task.train) == len(members) * len(data.TEAM_QUESTIONS)
        team_of = {}
        for member in members:  # every member asked in every phrasing (the phrasings all tasks share)
            for question in data.TEAM_QUESTIONS:
                team = next(t for q, t in task.train if q == question.format(member))
                assert team_of.setdefault(member, team) == team  # one team per member, in every phrasing
        assert sorted(team_of.values()) == [0, 0, 1, 1, 2, 2, 3, 3]  # 2 members per team: no majority answer
    again, _ = data.load_tasks(train_size=1, test_size=1, seed=0, names=["fruit_teams"])
    other_seed, _ = data.load_tasks(train_size=1, test_size=1, seed=1, names=["fruit_teams"])
    assert again[0].train == tasks[1].train and other_seed[0].train != tasks[1].train


def test_text_examples_have_no_placeholders_and_take_the_input_ids_path():
    from benchmarks.continual.model import model_inputs
    from benchmarks.continual.runner import towers_path

    task = data.Task("facts", "text", "", ["red", "blue"], "", [], [])
    row = example(task, "Which team does the cat play for?", "red", VOCABULARY)
    prompt = VOCABULARY.encode("<|im_start|>user\nWhich team does the cat play for?<|im_end|>\n<|im_start|>assistant\n")
    answer = VOCABULARY.encode("red<|im_end|>")
    assert row["input_ids"] == prompt + answer and row["labels"] == [-100] * len(prompt) + answer
    assert set(row["modality_ids"]) == {0}
    batch = collate([row], 0)
    assert "pixel_values" not in batch and "audio_features" not in batch
    model = torch.nn.Linear(1, 1)  # neither a PeftModel nor one of our methods: no modality_ids
    inputs = model_inputs(model, None, batch, VOCABULARY)
    assert set(inputs) == {"input_ids", "attention_mask", "labels"}
    assert torch.equal(inputs["input_ids"], torch.tensor([row["input_ids"]]))
    image = data.Task("digits", "image", "?", ["0"], "", [], [])
    settings = {"train_size": 4, "align_per_task": 4, "align_epochs": 1, "seed": 0, "tasks": ["facts"]}
    assert towers_path([task], settings) is None
    assert towers_path([task, image], settings) is not None


def test_alignment_captions_do_not_depend_on_the_label():
    image = np.random.default_rng(0).random((28, 28)).astype(np.float32)
    task = data.Task("digits", "image", "?", ["0", "1"], "", [(image, 0), (image, 1)], [])
    first, second = alignment_rows([task], VOCABULARY, 2)
    assert first["labels"] == second["labels"]
    facts = data.Task("facts", "text", "?", ["red"], "", [("Which team?", 0)], [])
    with_text = alignment_rows([facts, task], VOCABULARY, 2)  # a text task (modality track) has nothing to align
    assert [r["input_ids"] for r in with_text] == [first["input_ids"], second["input_ids"]]
    cells = image.reshape(4, 7, 4, 7).mean(axis=(1, 3)).ravel()
    levels = np.clip(cells / cells.max() * 9.99, 0, 9).astype(int)
    assert [t for t in first["labels"] if t != -100] == VOCABULARY.encode(" ".join(map(str, levels)) + "<|im_end|>")


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_reader(tmp_path, monkeypatch):
    images = np.arange(5 * 28 * 28).reshape(5, 28, 28) % 256
    labels = np.array([3, 1, 4, 1, 5])
    for split in ("train", "t10k"):
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", images)
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", labels)
    monkeypatch.setattr(data, "FASHION_DIR", tmp_path)
    task = data.fashion_mnist(train_size=4, test_size=2, seed=0)
    assert (len(task.train), len(task.test)) == (4, 2)
    for inputs, label in task.train + task.test:
        index = next(i for i in range(5) if np.allclose(images[i] / 255.0, inputs))
        assert label == labels[index]


def test_missing_packages_are_reported_with_install_command_and_skipped(monkeypatch, tmp_path):
    real_find_spec = data.importlib.util.find_spec
    monkeypatch.setattr(
        data.importlib.util,
        "find_spec",
        lambda name: None if name in ("animal_mnist", "espeakng_loader") else real_find_spec(name),
    )
    monkeypatch.setattr(data, "FASHION_DIR", tmp_path / "absent")
    tasks, notes = data.load_tasks(train_size=10, test_size=10, seed=0)
    assert [t.name for t in tasks] == ["digits", "letters"]
    assert any("pip install --no-deps animal-mnist" in n and n.startswith("SKIPPED") for n in notes)
    assert any("pip install espeakng-loader" in n and n.startswith("SKIPPED") for n in notes)
    assert any("sudo apt-get install dataset-fashion-mnist" in n and "substitute" in n for n in notes)
    letters = tasks[1]
    assert len(letters.train) == 10 and {label for _, label in letters.train} <= set(range(10))
    assert letters.train[0][0].shape == (28, 28) and 0.5 < letters.train[0][0].max() <= 1.0


def test_tasks_are_chosen_by_name_in_order():
    tasks, notes = data.load_tasks(train_size=4, test_size=2, seed=0, names=["letters", "digits"])
    assert [t.name for t in tasks] == ["letters", "digits"] and notes == []
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['mnist'\]; the tasks are"):
        data.load_tasks(train_size=4, test_size=2, seed=0, names=["digits", "mnist"])


def test_parity_task_asks_another_question_about_the_digits_images():
    (digits,), _ = data.load_tasks(train_size=8, test_size=4, seed=0, names=["digits"])
    (parity,), _ = data.load_tasks(train_size=8, test_size=4, seed=0, names=["parity"])
    assert parity.classes == ["even", "odd"] and parity.question != digits.question
    from sklearn.datasets import load_digits

    pool = load_digits()
    images = data._resize(pool.images / 16.0)
    for x, label in parity.train:
        index = next(i for i, image in enumerate(images) if np.array_equal(image, x))
        assert label == pool.target[index] % 2


def test_locator_benchmark_scores_accuracy_rejection_and_text():
    """benchmarks/cmoe_locator.py's evaluation on synthetic features: three separated task clusters and text far
    from all of them."""
    from benchmarks.cmoe_locator import evaluate

    generator = torch.Generator().manual_seed(0)
    centres = {"a": 0.0, "b": 4.0, "c": 8.0}

    def cluster(centre: float, n: int) -> torch.Tensor:
        return centre + torch.randn(n, 6, generator=generator) * 0.3

    features = {
        "train": {name: cluster(c, 64) for name, c in centres.items()},
        "test": {name: cluster(c, 32) for name, c in centres.items()},
        "text": cluster(-10.0, 16),
    }
    for kind in ("gaussian", "mahalanobis"):
        result = evaluate(kind, features, latent=4, epochs=10, quantile=0.01)
        assert result["accuracy"] == {"a": 1.0, "b": 1.0, "c": 1.0}
        assert max(result["rejected"].values()) <= 1 / 32
        assert result["text_claimed"] == 0.0
    features["text"] = cluster(4.0, 16)  # text that looks like task b is claimed by it
    assert evaluate("mahalanobis", features, latent=4, epochs=10, quantile=0.01)["text_claimed"] == 1.0


def _results(tmp_path: Path) -> dict:
    """A results.json of two methods over two tasks, as the runner writes it."""
    base = {"fact_accuracy": 0.5, "perplexity": 20.0, "replies": ["Paris.", "Blue.", "Seven.", "Mars."]}
    stages = [
        {"task": "digits", "seconds": 10.0, "trainable": 100, "extended_modules": 30, "extended_layers": [15, 16, 17]},
        {"task": "letters", "seconds": 11.0, "trainable": 200, "extended_modules": 2, "extended_layers": [20]},
    ]
    methods = {
        "sequential_lora": {
            "label": "LoRA",
            "accuracy": [[0.8], [0.1, 0.7]],
            "text_probe": {"fact_accuracy": 0.25, "perplexity": 30.0, "replies": ["Paris.", "A", "B", "C"]},
            "stages": [{k: s[k] for k in ("task", "seconds", "trainable")} for s in stages],
            "peak_memory_mib": 1000.0,
        },
        "cmoe": {
            "label": "CMoE",
            "accuracy": [[0.8], [0.8, 0.7]],
            "text_probe": dict(base),
            "stages": stages,
            "peak_memory_mib": 1000.0,
            "locator_accuracy": {"digits": 0.99, "letters": 0.98},
            "locator_rejected": {"digits": 0.01, "letters": 0.0},
        },
    }
    for result in methods.values():
        result["summary"] = summary(result["accuracy"])
    return {
        "date": "2026-11-29",
        "machine": "test",
        "settings": {"seed": 0, "threads": 2, "quick": True, "train_size": 4, "epochs": 1, "test_size": 2},
        "notes": [],
        "tasks": [
            {"name": name, "modality": "image", "classes": list("0123456789"), "source": "", "train": 4, "test": 2}
            for name in ("digits", "letters")
        ],
        "alignment": {
            "cached": True,
            "path": "towers.pt",
            "base_accuracy": {"digits": 0.0, "letters": 0.0},
            "text_probe": base,
        },
        "methods": methods,
        "total_seconds": 60.0,
    }


def test_report_shows_text_change_locator_rejections_and_extended_layers(tmp_path):
    results = _results(tmp_path)
    change = text_change(results["methods"]["sequential_lora"]["text_probe"], results["alignment"]["text_probe"])
    assert change == pytest.approx({"identical_replies": 0.25, "fact_change": -0.25, "perplexity_change": 0.5})
    text = markdown(results, ["digits", "letters"], {"first_task": "a.png", "accuracy": "b.png", "forgetting": "c.png"})
    rows = {line.split(" | ")[0]: line for line in text.splitlines() if line.startswith(("| LoRA", "| CMoE"))}
    assert "| 25% | 25.0% (-25.0 pt) | 30.00 (+50.0%) |" in rows["| LoRA"]
    assert "| 100% | 50.0% (+0.0 pt) | 20.00 (+0.0%) |" in rows["| CMoE"]
    assert "inputs no task claimed (base path): digits 1.0%, letters 0.0%." in text
    assert "digits 30 modules in layers 15-17; letters 2 modules in layers 20." in text
    assert "Tasks in order: digits (image, 4 train / 2 test), letters (image, 4 train / 2 test); 1 epoch(s)" in text
    plot_first_task(results, ["digits", "letters"], tmp_path / "first_task.png")
    assert (tmp_path / "first_task.png").stat().st_size > 10_000


def output_state() -> list:
    """What a benchmark process would print: bitsandbytes' import-time warning, transformers' progress bars, a
    transformers-style FutureWarning, this package's warnings, DeepSpeed's warnings (its logger resets its level when
    created, so a filter has to drop them) and its errors (run in a spawned process by the test below)."""
    import logging
    import warnings

    import transformers

    with warnings.catch_warnings(record=True) as caught:
        warnings.warn("`x` is deprecated and will be removed in v6", FutureWarning, stacklevel=2)
    deepspeed = logging.getLogger("DeepSpeed")
    deepspeed.setLevel(logging.INFO)  # what DeepSpeed's logger factory does when deepspeed is imported

    def passes(level: int) -> bool:
        record = logging.LogRecord("DeepSpeed", level, "", 0, "", (), None)
        return deepspeed.isEnabledFor(level) and bool(deepspeed.filter(record))

    return [
        logging.getLogger("bitsandbytes.backends.cpu.ops").isEnabledFor(logging.WARNING),
        transformers.utils.logging.is_progress_bar_enabled(),
        len(caught),
        logging.getLogger("peft_moextend").isEnabledFor(logging.WARNING),
        passes(logging.WARNING),
        passes(logging.ERROR),
    ]


def test_benchmark_processes_are_quiet():
    """The alignment and method processes hide transformers' progress bars and deprecation notices and
    bitsandbytes' missing-`kernels` note (AVX512-BF16 CPUs; quieted before the target's module is imported), and
    keep this package's warnings."""
    from benchmarks.common import in_subprocess

    assert in_subprocess(output_state, quiet=True) == [False, False, 0, True, False, True]


def test_gguf_conversion_bar_follows_the_progress_bar_switch():
    from benchmarks.smollm2 import _gguf_progress_bar

    reader = importlib.import_module("transformers.modeling_gguf_pytorch_utils")
    original = reader.tqdm
    with _gguf_progress_bar(False):
        assert reader.tqdm(range(2)).disable
    assert reader.tqdm is original
    with _gguf_progress_bar(True):
        assert reader.tqdm is original


def test_spoken_digit_features():
    pytest.importorskip("espeakng_loader")
    speech = data._Espeak().say("seven", "en+m3", 160, 50)
    assert speech.shape[0] > 2000 and np.abs(speech).max() > 1000
    features = data._log_mel(speech, 22050)
    assert features.shape == (data.NUM_MEL_BINS, data.NUM_FRAMES)
    assert abs(features.mean()) < 1e-4 and features.std() == pytest.approx(1.0, abs=1e-3)
    silence_then_tone = np.concatenate([np.zeros(4000), np.sin(np.arange(4000) * 0.3)]).astype(np.float32)
    # the clip is centred on the voiced part: the tone fills the middle frames, not the edges
    energy = data._log_mel(silence_then_tone, data.SAMPLE_RATE).mean(axis=0)
    assert energy[40:60].mean() > energy[:5].mean() + 0.5 and energy[:5].std() < 1e-4


def test_resume_keeps_only_finished_methods_of_the_same_settings(tmp_path):
    settings = {"train_size": 64, "seed": 0, "quick": True}
    methods = {"sequential_lora": {"accuracy": [[0.5]]}, "cmoe": {"error": "RuntimeError: x", "traceback": ""}}
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"settings": settings, "methods": methods, "total_seconds": 12.5}))
    assert finished_methods(path, settings) == ({"sequential_lora": {"accuracy": [[0.5]]}}, 12.5)
    assert finished_methods(path, settings | {"seed": 1}) == ({}, 0.0)
    assert finished_methods(tmp_path / "absent.json", settings) == ({}, 0.0)


def test_results_are_saved_after_each_method_and_resume_runs_only_the_rest(tmp_path, monkeypatch):
    """A run cut off during its second method keeps the first in results.json; --resume then runs only the rest."""
    from benchmarks.continual import __main__ as cli

    task = data.Task("digits", "image", "Which digit is this?", ["0", "1"], "test", [], [])
    monkeypatch.setattr(cli, "load_tasks", lambda *args: ([task], []))
    monkeypatch.setattr(cli, "write_outputs", lambda results, output: None)
    calls = []

    def fake_in_subprocess(target, *args, quiet=False):
        if target is cli.align:
            return {
                "cached": True,
                "path": "towers.pt",
                "base_accuracy": {"digits": 0.0},
                "text_probe": {"fact_accuracy": 0.5, "perplexity": 18.0},
            }
        calls.append(args[0])
        if args[0] == "oracle_lora" and len(calls) == 2:
            raise KeyboardInterrupt  # the run is cut off during its second method
        return {"accuracy": [[0.5]], "text_probe": {"fact_accuracy": 0.5, "perplexity": 18.0}}

    monkeypatch.setattr(cli, "in_subprocess", fake_in_subprocess)
    argv = ["continual", "--quick", "--methods", "sequential_lora", "oracle_lora", "--output-dir", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(KeyboardInterrupt):
        cli.main()
    saved = json.loads((tmp_path / "results.json").read_text())
    assert list(saved["methods"]) == ["sequential_lora"]
    monkeypatch.setattr(sys, "argv", [*argv, "--resume"])
    cli.main()
    assert calls == ["sequential_lora", "oracle_lora", "oracle_lora"]
    assert list(json.loads((tmp_path / "results.json").read_text())["methods"]) == ["sequential_lora", "oracle_lora"]


@pytest.mark.slow
def test_quick_benchmark_end_to_end(tmp_path):
    """Real weights and data: two methods, tiny sizes; the report, JSON and plots are written."""
    output = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "benchmarks.continual",
        "--quick",
        "--methods",
        "sequential_lora",
        "cmoe",
        "--train-size",
        "16",
        "--test-size",
        "10",
        "--align-per-task",
        "8",
        "--epochs",
        "1",
        "--output-dir",
        str(output),
    ]
    run_command(command, cwd=ROOT, timeout=1800)

    results = json.loads((output / "results.json").read_text())
    assert set(results["methods"]) == {"sequential_lora", "cmoe"}
    for result in results["methods"].values():
        assert [len(row) for row in result["accuracy"]] == list(range(1, len(results["tasks"]) + 1))
    assert {"accuracy_matrices.png", "forgetting.png", "report.md"} <= {p.name for p in output.iterdir()}


def test_synthetic_mode_oracle_keeps_earlier_tasks_exactly_and_sequential_lora_forgets():
    from benchmarks.continual import synthetic

    tasks = synthetic.make_tasks()
    batch = synthetic.make_batch(tasks["A"], size=4, seed=0)
    assert torch.equal(batch["labels"][:, 1::2], batch["input_ids"][:, 1::2])  # only the answers are scored
    assert (batch["labels"][:, ::2] == -100).all()
    oracle = synthetic.run("oracle_lora", tasks, steps=60)
    sequential = synthetic.run("sequential_lora", tasks, steps=60)
    # each task keeps its own adapter: what it learned is never overwritten, so its accuracy never changes
    assert [row[0] for row in oracle["matrix"]] == [oracle["matrix"][0][0]] * 3 and oracle["backward_transfer"] == 0
    assert oracle["average_accuracy"] == 1.0 and oracle["trainable_per_task"] == [16_384] * 3
    # one shared adapter: the later tasks overwrite the first one
    assert sequential["matrix"][0][0] == 1.0 and sequential["matrix"][2][0] < 0.5
    assert sequential["backward_transfer"] == summary(sequential["matrix"])["backward_transfer"] < -0.5


def _running(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie (an exited child nobody reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_killed_benchmark_leaves_no_process_behind(tmp_path):
    """SIGTERM gives the benchmark's main process no chance to stop its spawned method process: the child notices
    that its parent is gone and exits (it would otherwise compute on for the rest of its method)."""
    import signal
    import subprocess
    import time

    (tmp_path / "sleeper.py").write_text(
        "import os, time\n"
        "def sleep(path):\n"
        "    open(path, 'w').write(str(os.getpid()))\n"
        "    time.sleep(300)\n"
        "    return {}\n"
    )
    pid_file = tmp_path / "child.pid"
    script = tmp_path / "main.py"
    script.write_text(
        f"import sys\nsys.path[:0] = [{str(ROOT)!r}, {str(tmp_path)!r}]\n"
        "from benchmarks.common import in_subprocess\nimport sleeper\n"
        f"if __name__ == '__main__':\n    in_subprocess(sleeper.sleep, {str(pid_file)!r})\n"
    )
    main = subprocess.Popen([sys.executable, str(script)])
    try:
        deadline = time.monotonic() + 120
        while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
            time.sleep(0.2)
        child = int(pid_file.read_text())
        assert _running(child)
        main.send_signal(signal.SIGTERM)
        main.wait(timeout=30)
        deadline = time.monotonic() + 15
        while _running(child) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _running(child)
    finally:
        main.kill()


def test_tracks_have_their_own_tasks_methods_and_protocol_and_overrides_apply_within_a_track():
    from benchmarks.continual.__main__ import parse_arguments
    from benchmarks.continual.methods import METHODS
    from benchmarks.continual.tracks import TRACKS, track_plan

    assert list(TRACKS) == ["task", "modality", "multitask"]  # the full run's order
    task, modality, multitask = (track_plan(TRACKS[name]) for name in TRACKS)
    assert task == {
        "track": "task",
        "tasks": ["digits", "animals", "fashion"],
        "methods": ["sequential_lora", "oracle_lora", "cmoe", "moextend_tasks"],
        "protocol": "sequential",
    }
    assert modality["tasks"] == ["digits", "spoken", "motion"]
    assert modality["methods"] == ["sequential_lora", "pathweave", "moextend"]
    assert multitask["protocol"] == "joint" and multitask["methods"] == [
        "smola",
        "lora_as_smola",
        "modex",
        "lora_as_modex",
    ]
    assert set(multitask["methods"]) | set(task["methods"]) | set(modality["methods"]) <= set(METHODS)
    overridden = track_plan(TRACKS["modality"], ["digits", "spoken"], ["pathweave"])
    assert overridden == {
        "track": "modality",
        "tasks": ["digits", "spoken"],
        "methods": ["pathweave"],
        "protocol": "sequential",
    }
    assert parse_arguments([]).track is None  # all three
    assert parse_arguments(["--track", "multitask", "task"]).track == ["multitask", "task"]
    with pytest.raises(SystemExit):
        parse_arguments(["--track", "task", "--no-grid", "--epochs", "2"])  # --no-grid needs the learning rate too


def _candidate(lr, epochs, scores):
    return {"learning_rate": lr, "epochs": epochs, "methods": scores}


def test_grid_choice_is_the_best_mean_validation_accuracy_within_the_perplexity_bound():
    from benchmarks.continual.tracks import choose_candidate

    def score(accuracy, perplexity=0.0):
        return {"validation_accuracy": accuracy, "perplexity_change": perplexity}

    grid = [
        _candidate(1e-3, 1, {"a": score(0.2), "b": score(0.4)}),  # mean 0.3
        _candidate(1e-3, 2, {"a": score(0.5), "b": score(0.3, 0.9)}),  # mean 0.4, +90%: admissible
        _candidate(3e-3, 1, {"a": score(0.9), "b": score(0.9, 1.5)}),  # best mean, but b's perplexity +150%
        _candidate(3e-3, 2, {"a": score(0.95), "b": {"error": "RuntimeError: x"}}),  # a failed method rejects
    ]
    choice = choose_candidate(grid)
    assert (choice["index"], choice["learning_rate"], choice["epochs"]) == (1, 1e-3, 2)
    assert choice["mean_validation_accuracy"] == pytest.approx(0.4) and choice["rejected"] == [2, 3]
    assert choice["within_bound"]
    assert choose_candidate(grid, perplexity_bound=2.0)["index"] == 2  # a looser bound admits the best mean
    tied = [_candidate(1e-3, 1, {"a": score(0.5)}), _candidate(3e-3, 1, {"a": score(0.5)})]
    assert choose_candidate(tied)["index"] == 0  # ties: the earlier candidate
    none = [_candidate(1e-3, 1, {"a": score(0.9, 3.0)}), _candidate(3e-3, 1, {"a": score(0.1, 2.0)})]
    assert (choose_candidate(none)["index"], choose_candidate(none)["within_bound"]) == (1, False)
    with pytest.raises(ValueError, match="grid is empty"):
        choose_candidate([])


def test_joint_mixture_has_every_row_once_per_epoch_in_single_modality_batches():
    from benchmarks.continual.tracks import mixture_plan

    modalities = ["image"] * 37 + ["audio"] * 21 + ["text"] * 5
    for epochs in (1, 2, 3):
        plan = mixture_plan(modalities, epochs, batch_size=8, seed=4)
        counts = np.bincount([i for batch in plan for i in batch], minlength=len(modalities))
        assert counts.tolist() == [epochs] * len(modalities)
        assert all(len({modalities[i] for i in batch}) == 1 for batch in plan)
    sequence = [modalities[batch[0]] for batch in mixture_plan(modalities, 1, batch_size=8, seed=4)]
    assert sequence != sorted(sequence, key=["image", "audio", "text"].index)  # a mixture, not modality blocks


def test_lora_rank_matching_gives_parameter_counts_within_a_few_percent():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from benchmarks.continual.methods import lora_parameters_per_rank
    from benchmarks.continual.tracks import matched_lora_rank

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=80,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    pattern = r"model\.layers\.(1|2)\.(self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj"
    per_rank = lora_parameters_per_rank(LlamaForCausalLM(config), pattern)
    # q, o: 32+32; k, v: 32+16; gate, up: 32+80; down: 80+32 -- per layer, two layers
    assert per_rank == 2 * (2 * 64 + 2 * 48 + 3 * 112)
    for target in (3_000, 10_001, 25_000):
        rank = matched_lora_rank(target, per_rank)
        lora = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=rank, target_modules=pattern))
        count = sum(p.numel() for p in lora.parameters() if p.requires_grad)
        assert count == rank * per_rank  # the count the matching assumed is peft's own
        assert abs(count - target) <= per_rank / 2  # the closest rank
    # the benchmark's own counts (SmolLM2 layers 15-29, all 7 projections: 152,640 per rank)
    for target in (8_225_280, 1_487_232):  # SMoLA, ModeX (full run of 2026-11-24)
        rank = matched_lora_rank(target, 152_640)
        assert abs(rank * 152_640 / target - 1) < 0.03
    assert matched_lora_rank(10, 1000) == 1
    with pytest.raises(ValueError, match="parameters_per_rank must be positive"):
        matched_lora_rank(10, 0)


def test_synthetic_voice_test_split_shares_no_voice_variant_with_training():
    train = data.voice_plan(400, seed=0, held_out=False)
    test = data.voice_plan(200, seed=0, held_out=True)

    def variants(plan):
        return {voice.split("+")[1] for voice, *_ in plan}

    assert variants(train).isdisjoint(variants(test))
    assert variants(test) == set(data.HELD_OUT_VARIANTS) and variants(train) == set(data.TRAIN_VARIANTS)
    assert {voice for voice, *_ in test}.isdisjoint({voice for voice, *_ in train})
    assert {voice.split("+")[0] for voice, *_ in test} == set(data.VOICES)  # every accent is tested
    assert [label for *_, label in test[:20]] == list(range(10)) * 2  # balanced classes


def test_validation_is_carved_out_of_the_training_data():
    (digits, teams), notes = data.load_tasks(40, 10, 0, ["digits", "animal_teams"], validation_size=12)
    assert notes == [] and (len(digits.train), len(digits.validation), len(digits.test)) == (40, 12, 10)
    (whole,), _ = data.load_tasks(52, 10, 0, ["digits"])
    assert [y for _, y in digits.train + digits.validation] == [y for _, y in whole.train]  # the same pool, split
    seen = {x.tobytes() for x, _ in digits.train + digits.test}
    assert not any(x.tobytes() in seen for x, _ in digits.validation)
    assert teams.validation == teams.train == teams.test  # a recall task is validated on its taught facts
    with pytest.raises(ValueError, match="validation size 40 must be between 1 and 39"):
        data.carve_validation(data.Task("t", "image", "?", ["a"], "", [(0, 0)] * 40, []), 40)


def _fake_method_result(tasks, joint, label, perplexity=18.0):
    probe = {"fact_accuracy": 0.5, "perplexity": perplexity, "replies": ["Paris.", "Blue."]}
    rows = [[0.6] * len(tasks)] if joint else [[0.6] * (i + 1) for i in range(len(tasks))]
    stages = [
        {"task": "mixture" if joint else t.name, "seconds": 1.0, "stage_seconds": 2.0, "trainable": 10} for t in tasks
    ]
    return {
        "label": label,
        "accuracy": rows,
        "stages": stages[:1] if joint else stages,
        "text_probe": probe,
        "peak_memory_mib": 100.0,
    }


def test_tracks_run_in_order_with_the_grid_choice_and_write_their_outputs_in_their_folders(tmp_path, monkeypatch):
    """Each track: the grid on reduced training data, then every method with the one chosen setting; outputs in
    <output>/<track>/ and a summary at the top."""
    from benchmarks.continual import __main__ as cli

    def fake_load(train_size, test_size, seed, names, validation_size):
        image = np.zeros((28, 28), np.float32)
        return [
            data.Task(
                n,
                "image",
                "?",
                list("0123456789"),
                "test",
                [(image, 0)] * train_size,
                [(image, 0)] * 2,
                validation=[(image, 0)] * validation_size,
            )
            for n in names
        ], []

    base = {"fact_accuracy": 0.5, "perplexity": 18.0, "replies": ["Paris.", "Blue."]}
    grid_sizes, grid_tasks, method_settings = [], [], []

    def fake_in_subprocess(target, *args, quiet=False):
        if target is cli.align:
            return {"cached": True, "path": "t.pt", "base_accuracy": {t.name: 0.0 for t in args[0]}, "text_probe": base}
        if target is cli.run_grid:
            name, tasks, settings, candidates = args
            grid_sizes.append(len(tasks[0].train))
            grid_tasks.append([t.name for t in tasks])
            # the best mean (lr 3e-3) blows up one method's perplexity: the choice is lr 1e-3
            return {
                "candidates": [
                    {
                        "validation_accuracy": {t.name: c["learning_rate"] * 100 + c["epochs"] / 10 for t in tasks},
                        "text_probe": base
                        | {
                            "perplexity": 100.0
                            if c["learning_rate"] == 3e-3 and name in ("sequential_lora", "smola")
                            else 18.0
                        },
                        "seconds": 1.0,
                    }
                    for c in candidates
                ]
            }
        name, tasks, settings = args
        method_settings.append((name, settings["learning_rate"], settings["epochs"], settings.get("protocol")))
        return _fake_method_result(tasks, settings.get("protocol") == "joint", name)

    monkeypatch.setattr(cli, "load_tasks", fake_load)
    monkeypatch.setattr(cli, "in_subprocess", fake_in_subprocess)
    cli.main(["--output-dir", str(tmp_path), "--train-size", "20", "--validation-size", "5", "--grid-train-size", "8"])
    assert grid_sizes == [8] * (4 + 3 + 4)  # every method of every track, on the reduced training data
    # a sequential track's grid runs its first task only, the joint track's every task
    assert grid_tasks == [["digits"]] * 4 + [["digits"]] * 3 + [["digits", "fashion", "spoken"]] * 4
    expected = [(m, 1e-3, 2, t.protocol) for t in cli.TRACKS.values() for m in t.methods]
    assert method_settings == expected
    for name in cli.TRACKS:
        files = {p.name for p in (tmp_path / name).iterdir()}
        assert {"results.json", "report.md", "track.png"} <= files
        assert ("forgetting.png" in files) == (name != "multitask")
        results = json.loads((tmp_path / name / "results.json").read_text())
        assert results["grid"]["choice"]["rejected"] == [1] and results["chosen"] == {
            "learning_rate": 1e-3,
            "epochs": 2,
        }
        assert results["grid"]["tasks"] == grid_tasks[{"task": 0, "modality": 4, "multitask": 7}[name]]
        report_text = (tmp_path / name / "report.md").read_text()
        assert "| 0.001 | 2 |" in report_text and f"per task of {', '.join(results['grid']['tasks'])} (" in report_text
    summary = (tmp_path / "summary.md").read_text()
    assert [line for line in summary.splitlines() if line.startswith("## ")] == [
        "## task track ([report](task/report.md))",
        "## modality track ([report](modality/report.md))",
        "## multitask track ([report](multitask/report.md))",
    ]
    assert set(json.loads((tmp_path / "summary.json").read_text())) == {"task", "modality", "multitask"}
    # one track alone: its results replace its old ones, the summary keeps the other tracks' from their folders
    (tmp_path / "summary.json").unlink()
    arguments = [
        "--output-dir",
        str(tmp_path),
        "--train-size",
        "20",
        "--validation-size",
        "5",
        "--grid-train-size",
        "8",
    ]
    cli.main([*arguments, "--track", "modality", "--methods", "pathweave"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert list(summary) == ["task", "modality", "multitask"] and list(summary["modality"]["methods"]) == ["pathweave"]


def test_gates_of_the_task_track_and_the_multitask_verdict(tmp_path):
    from benchmarks.continual.report import gates, stage_lines

    results = _results(tmp_path)
    results["settings"]["track"] = "task"
    oracle = dict(results["methods"]["sequential_lora"], label="oracle", accuracy=[[0.8], [0.8, 0.7]])
    oracle["summary"] = summary(oracle["accuracy"])
    results["methods"]["oracle_lora"] = oracle
    measured = {g["gate"]: (g["value"], g["passed"]) for g in gates(results) if g["method"] == "cmoe"}
    assert measured["BWT >= -1 pt"] == (0.0, True)
    assert measured["average >= oracle - 2 pt"] == (0.0, True)
    assert measured["text replies identical >= 95%"] == (1.0, True)
    assert measured["perplexity change <= +1%"] == (0.0, True)
    assert measured["locator digits >= 98%"] == (0.99, True) and measured["locator letters >= 98%"] == (0.98, True)
    assert measured["false rejects digits < 2%"] == (0.01, True)
    results["methods"]["cmoe"]["locator_accuracy"]["letters"] = 0.97
    assert not dict((g["gate"], g["passed"]) for g in gates(results))["locator letters >= 98%"]

    smola = dict(results["methods"]["cmoe"], label="SMoLA", accuracy=[[0.5, 0.7]])
    lora = dict(results["methods"]["cmoe"], label="LoRA", accuracy=[[0.6, 0.7]])
    for result in (smola, lora):
        result["summary"] = summary(result["accuracy"])
    assert smola["summary"]["backward_transfer"] is None  # joint training: one stage, no BWT
    results["methods"] = {"smola": smola, "lora_as_smola": lora}
    verdict = [line for line in stage_lines(results) if line.startswith("**")]
    assert verdict == [
        "**SMoLA does not beat LoRA with its parameter count and steps**: average accuracy 60.0% vs 65.0%."
    ]


def test_track_plot_measures_forgetting_not_the_mean_of_a_growing_set():
    """A method that keeps every task exactly stays at 0 even when a weaker task joins the earlier ones (the former
    plot's mean accuracy fell from 68% to 60% there); a forgetting method shows its drops, ending at its BWT."""
    kept = [[0.68], [0.68, 0.52], [0.68, 0.52, 1.0]]
    assert earlier_tasks_change(kept) == [0.0, 0.0, 0.0]
    forgot = [[0.27], [0.09, 0.22], [0.0, 0.0, 1.0]]
    assert earlier_tasks_change(forgot) == pytest.approx([0.0, -18.0, -24.5])
