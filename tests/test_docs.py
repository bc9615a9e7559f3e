"""Every ```python block of docs/*.md that is marked runnable (the "Runnable snippet" sections) runs, and the
asserts in it (what the page claims the snippet shows) hold."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
SNIPPETS = [
    (path.name, block)
    for path in sorted(DOCS.glob("*.md"))
    for section in re.split(r"^## ", path.read_text(), flags=re.M)
    if section.startswith("Runnable snippet")
    for block in re.findall(r"```python\n(.*?)```", section, flags=re.S)
]


def test_every_method_has_a_page_with_a_runnable_snippet():
    from peft_moextend import METHODS

    pages = {f"{method.prefix.removesuffix('_')}.md" for method in METHODS.values()}
    assert pages <= {name for name, _ in SNIPPETS}


def test_every_snippet_checks_what_it_claims():
    assert all("assert" in code for _, code in SNIPPETS)


@pytest.mark.parametrize(("page", "code"), SNIPPETS, ids=[name for name, _ in SNIPPETS])
def test_snippet_runs_and_its_claims_hold(page, code):
    exec(compile(code, page, "exec"), {})
