"""What every config of this package shares: strict options, safe loading, and the model card.

- Unknown options (e.g. from an adapter_config.json written by a newer version) raise a clear error instead of
  being dropped with a warning, which PEFT does for its own configs: an ignored option would silently change what
  the adapter computes.
- Loading from a local folder checks the weights before PEFT reads them: a missing, truncated or corrupted
  `adapter_model.safetensors` gets an error naming the file, and pickle weights (`adapter_model.bin`) are refused.
- `save_pretrained` (called by `PeftModel.save_pretrained` and `push_to_hub`) adds to PEFT's model card the tags
  `peft-moextend` and the method, and a usage snippet that imports `peft_moextend` first.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import warnings
from pathlib import Path
from typing import ClassVar

from huggingface_hub import ModelCard
from peft.config import PeftConfig

WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_WEIGHTS_FILE = "adapter_model.bin"
PACKAGE_TAG = "peft-moextend"


def strict_options(cls):
    """Class decorator (above `@dataclass`): unknown keyword options raise a ValueError naming them."""
    init = cls.__init__
    known = {f.name for f in dataclasses.fields(cls)}

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(
                f"{cls.__name__} got unknown options {unknown}. If they come from an adapter_config.json saved by "
                "a newer version of peft-moextend, upgrade it (`pip install -U peft-moextend`); otherwise remove "
                f"them. Known options: {sorted(known)}."
            )
        init(self, *args, **kwargs)

    cls.__init__ = __init__
    return cls


def check_adapter_folder(folder: str | os.PathLike, subfolder: str | None = None) -> None:
    """Refuse a local adapter folder whose weights are missing, pickled, truncated or corrupted."""
    path = Path(folder, subfolder) if subfolder else Path(folder)
    if not path.is_dir():
        return  # a Hub repo id: PEFT downloads it (no network here)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        if (path / PICKLE_WEIGHTS_FILE).is_file():
            raise ValueError(
                f"{path} holds pickle weights ({PICKLE_WEIGHTS_FILE}); peft-moextend only loads safetensors. Convert "
                f"them in a trusted environment and save as {WEIGHTS_FILE}."
            )
        raise ValueError(f"{path} has no {WEIGHTS_FILE}: it is not a complete adapter folder.")
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(weights, framework="pt") as file:
            for key in file.keys():
                file.get_slice(key)
    except (SafetensorError, OSError) as error:
        raise ValueError(
            f"{weights} is truncated or corrupted ({error}); save or download the adapter again."
        ) from error


def replace_pickle_weights(folder: str | os.PathLike) -> None:
    """`PeftModel.save_pretrained(..., safe_serialization=False)` writes pickle weights, which our loading refuses
    (a user could save a file they cannot load). The config is saved right after the weights: convert the pickle
    file written by this save (newer than any safetensors file there) to safetensors, with a warning."""
    pickled, safe = Path(folder, PICKLE_WEIGHTS_FILE), Path(folder, WEIGHTS_FILE)
    if not pickled.is_file() or (safe.is_file() and safe.stat().st_mtime_ns > pickled.stat().st_mtime_ns):
        return
    import torch
    from safetensors.torch import save_file

    save_file(torch.load(pickled, weights_only=True), safe, metadata={"format": "pt"})
    pickled.unlink()
    warnings.warn(
        f"peft-moextend adapters are saved as safetensors only (pickle weights are never loaded): wrote {safe} "
        f"instead of {pickled.name}. Drop `safe_serialization=False` to avoid this message.",
        stacklevel=3,
    )


def update_model_card(folder: str | os.PathLike, method: str, config_class: str, base_model: str | None) -> None:
    """Add our tags and a usage snippet to the README.md (model card) PEFT wrote into `folder`."""
    readme = Path(folder, "README.md")
    if not readme.is_file():
        return
    card = ModelCard.load(readme)
    card.data.tags = sorted(set(card.data.tags or []) | {PACKAGE_TAG, method.lower()})
    card.data.library_name = "peft"
    if base_model and not card.data.base_model:
        card.data.base_model = base_model
    heading = "## Usage with peft-moextend"
    if heading not in card.text:
        snippet = (
            f"{heading}\n\nThis adapter was trained with [peft-moextend](https://pypi.org/project/peft-moextend/) "
            f"({method}, `{config_class}`). Import `peft_moextend` before loading it: the import registers the "
            "method with PEFT.\n\n```python\nimport peft_moextend  # registers the method with PEFT\n"
            "from peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n\n"
            f'base = AutoModelForCausalLM.from_pretrained("{base_model or "<base model>"}")\n'
            'model = PeftModel.from_pretrained(base, "<this repo id or folder>")\n```\n'
        )
        card.text = f"{snippet}\n{card.text}"
    card.save(readme)


@dataclasses.dataclass
class ExpertConfig(PeftConfig):
    """Base of our `PeftConfig` dataclasses: safe loading, the model card (`method_name` names the method on it)
    and what every PEFT method offers besides its adapters.

    Args:
        modules_to_save: Modules (names or name suffixes) that train fully next to the adapter and are saved with
            it, as in PEFT's LoRA: a classification head, LLaVA's `multi_modal_projector`, a task head. With
            `task_type="SEQ_CLS"` PEFT adds the classifier (`classifier` / `score`) itself.
    """

    method_name: ClassVar[str] = ""

    modules_to_save: list[str] | None = dataclasses.field(
        default=None,
        metadata={"help": "Modules trained fully and saved with the adapter (e.g. a head or a projector)."},
    )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs):
        check_adapter_folder(pretrained_model_name_or_path, subfolder)
        return super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        super().save_pretrained(save_directory, **kwargs)
        replace_pickle_weights(save_directory)
        update_model_card(save_directory, self.method_name, type(self).__name__, self.base_model_name_or_path)
