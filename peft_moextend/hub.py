"""`push_to_hub` for our adapters: the adapter files plus PEFT's model card, with our tags and usage snippet.

`PeftModel.push_to_hub` comes from transformers' `PushToHubMixin`, which replaces the README.md written by
`save_pretrained` with a generic transformers card (`library_name: transformers`, no base model, no usage). For
adapters of this package's methods, `install_push_to_hub()` (run at `import peft_moextend`) routes the call to
`push_adapter_to_hub`; adapters of PEFT's own methods keep the original behaviour.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi
from peft import PeftModel

from .registration import ExpertPeftType


def push_adapter_to_hub(
    model: PeftModel,
    repo_id: str,
    *,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: bool | str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    tags: list[str] | None = None,
    **save_kwargs,
):
    """Create `repo_id` if needed and upload exactly what `model.save_pretrained` writes (adapter config, adapter
    safetensors, model card) in one commit. Returns the commit info."""
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    if tags:
        model.get_base_model().add_model_tags(tags)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder, **save_kwargs)
        operations = [
            CommitOperationAdd(path_in_repo=path.relative_to(folder).as_posix(), path_or_fileobj=str(path))
            for path in sorted(Path(folder).rglob("*"))
            if path.is_file()
        ]
        return api.create_commit(
            repo_id=repo_id,
            operations=operations,
            commit_message=commit_message or "Upload peft-moextend adapter",
            commit_description=commit_description,
            token=token,
            revision=revision,
            create_pr=create_pr,
        )


def install_push_to_hub() -> None:
    """Route `PeftModel.push_to_hub` to `push_adapter_to_hub` for our methods' adapters (idempotent)."""
    original = PeftModel.push_to_hub
    if getattr(original, "_peft_moextend", False):
        return

    @functools.wraps(original)
    def push_to_hub(self, repo_id: str, *args, **kwargs):
        if self.peft_config[self.active_adapter].peft_type in tuple(ExpertPeftType):
            return push_adapter_to_hub(self, repo_id, *args, **kwargs)
        return original(self, repo_id, *args, **kwargs)

    push_to_hub._peft_moextend = True
    PeftModel.push_to_hub = push_to_hub
