"""Every Python example in README.md runs as written, in order, in one namespace (as a reader would run them)."""

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.DOTALL)


def test_readme_has_the_seed_examples():
    code = "\n".join(python_blocks())
    for needle in ("PerceiverResampler(", "GatedCrossAttentionBlock(", "FlamingoPaLM(", "Extractor(vit"):
        assert needle in code


def test_readme_examples_run_and_give_the_stated_shapes():
    pytest.importorskip("vit_pytorch", reason="the FlamingoPaLM example uses vit-pytorch (pip install -e '.[vit]')")
    torch.manual_seed(0)
    namespace: dict = {}
    for index, block in enumerate(python_blocks()):
        try:
            exec(compile(block, f"README.md python block {index}", "exec"), namespace)
        except Exception as error:
            raise AssertionError(f"README python block {index} failed:\n{block}") from error
    assert namespace["perceived"].shape == (1, 2, 64, 1024)
    assert namespace["palm_logits"].shape == namespace["flamingo_logits"].shape == (2, 512, 20000)
    assert torch.equal(namespace["palm_logits"], namespace["flamingo_logits"])  # gates start closed
