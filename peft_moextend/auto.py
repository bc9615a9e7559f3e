"""`AutoPeftModelForImageTextToText`: PEFT's `AutoPeftModel*` pattern for vision-language models.

PEFT ships `AutoPeftModelForCausalLM` & co. but no image-text-to-text class; this one loads the base model named in
`adapter_config.json` with `transformers.AutoModelForImageTextToText` and the adapter on top.
"""

from __future__ import annotations

from peft import PeftModel
from peft.auto import _BaseAutoPeftModel
from transformers import AutoModelForImageTextToText


class AutoPeftModelForImageTextToText(_BaseAutoPeftModel):
    """`AutoPeftModelForImageTextToText.from_pretrained(adapter_folder_or_repo)` -> base VLM + adapter."""

    _target_class = AutoModelForImageTextToText
    _target_peft_class = PeftModel
