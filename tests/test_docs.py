"""Every Python block in docs/ runs as written, or says that it does not.

A block runs in a namespace of its own file (the blocks of one page run in order, sharing names),
from a temporary working folder. A block that cannot run as written is marked on the line before:
``<!-- excerpt -->`` (a fragment, with the rest elided) or ``<!-- stand-ins: <test> ... -->`` (it
downloads models; the named test runs it with tiny local ones).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_readme import all_blocks

DOCS = sorted((Path(__file__).resolve().parents[1] / "docs").glob("*.md"))
EXCERPT, STAND_INS = "<!-- excerpt", "<!-- stand-ins:"


def runnable(path: Path) -> list[str]:
    return [code for mark, code in all_blocks(path) if not mark.startswith((EXCERPT, STAND_INS))]


def test_every_docs_block_is_runnable_or_marked():
    pages = [path.name for path in DOCS if runnable(path)]
    assert pages, "no page of docs/ has a runnable python block: the test below would check nothing"


@pytest.mark.parametrize("path", [path for path in DOCS if runnable(path)], ids=lambda path: path.name)
def test_docs_python_blocks_run(path: Path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    namespace: dict = {}
    for index, code in enumerate(runnable(path)):
        try:
            exec(compile(code, f"{path.name} python block {index}", "exec"), namespace)
        except Exception as error:
            raise AssertionError(
                f"{path.name} python block {index} failed; make it run or mark it <!-- excerpt -->:\n{code}"
            ) from error
