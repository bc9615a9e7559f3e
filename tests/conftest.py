import os
import sys
from pathlib import Path

# Tests never touch the network: everything is built from configs.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    """Tests of a model family that the installed transformers breaks upstream (see `peft_moextend.compat`) are
    skipped with the reason; the package raises that error for the family (tests/test_compat.py checks it)."""
    from tiny_models import MOE_FAMILIES, make_tiny_moe
    from tiny_vlms import VLM_FAMILIES, make_tiny_vlm

    from peft_moextend.compat import known_upstream_break

    reasons: dict[str, str | None] = {}
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        for family in {v for v in params.values() if isinstance(v, str) and v in (*MOE_FAMILIES, *VLM_FAMILIES)}:
            if family not in reasons:
                model = make_tiny_moe(family) if family in MOE_FAMILIES else make_tiny_vlm(family)
                reasons[family] = known_upstream_break(model)
            if reasons[family] is not None:
                item.add_marker(pytest.mark.skip(reason=reasons[family]))
