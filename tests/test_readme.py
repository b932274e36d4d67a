"""Every Python example in README.md runs as written, in order, in one namespace (as a reader would run them).

The default suite runs the README's full-size FlamingoPaLM + ViT example (the block after the
``<!-- full-size example`` comment) with its sizes made small; ``pytest -m slow`` runs it as written.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
FULL_SIZE_MARK = "<!-- full-size example"
STAND_INS = "<!-- stand-ins:"
SMALL_VOCAB = 256

# (pattern, replacement, how many times it must occur in the full-size block)
SMALLER_SIZES = [
    (r"\bimage_size=256\b", "image_size=32", 1),
    (r"\bpatch_size=32\b", "patch_size=8", 1),
    (r"\bdim=1024\b", "dim=64", 2),  # the ViT's and FlamingoPaLM's
    (r"\bdepth=6\b", "depth=1", 1),
    (r"\bheads=16\b", "heads=2", 1),
    (r"\bmlp_dim=2048\b", "mlp_dim=128", 1),
    (r"\bdepth=12\b", "depth=4", 1),
    (r"\bheads=8\b", "heads=2", 1),
    (r"\bdim_head=64\b", "dim_head=16", 1),
    (r"\bperceiver_num_latents=64\b", "perceiver_num_latents=8", 1),
    (r"\bnum_tokens=20000\b", f"num_tokens={SMALL_VOCAB}", 1),
    (r"torch\.randint\(4, 20000,", f"torch.randint(4, {SMALL_VOCAB},", 1),
    (r"torch\.randn\(2, 2, 3, 256, 256\)", "torch.randn(2, 2, 3, 32, 32)", 1),
]


def readme_blocks() -> list[tuple[str, bool]]:
    """Each python block of the README that runs here as written, and whether it is the marked
    full-size example. Blocks marked ``<!-- stand-ins: ... -->`` download models; the test named in
    the mark runs them with tiny local stand-ins (see ``marked_block``)."""
    return [(code, mark.startswith(FULL_SIZE_MARK)) for mark, code in all_blocks() if not mark.startswith(STAND_INS)]


def all_blocks(path: Path = README) -> list[tuple[str, str]]:
    """(the HTML comment on the line before, or "", the code) of every python block in ``path``."""
    pattern = r"(<!--[^\n]*-->\n)?```python\n(.*?)```"
    return re.findall(pattern, path.read_text(encoding="utf-8"), flags=re.DOTALL)


def marked_block(mark: str, path: Path = README) -> str:
    """The one python block of ``path`` whose comment starts with ``mark``."""
    (code,) = [code for comment, code in all_blocks(path) if comment.startswith(mark)]
    return code


def made_small(code: str) -> str:
    for pattern, replacement, count in SMALLER_SIZES:
        code, done = re.subn(pattern, replacement, code)
        assert done == count, f"the full-size README example no longer matches {pattern!r} {count} time(s)"
    return code


def run_readme(*, full_size: bool) -> list[dict]:
    """Run every block in one namespace -> a snapshot of the namespace after each block."""
    torch.manual_seed(0)
    namespace: dict = {}
    snapshots = []
    for index, (code, is_full_size) in enumerate(readme_blocks()):
        if is_full_size and not full_size:
            code = made_small(code)
        try:
            exec(compile(code, f"README.md python block {index}", "exec"), namespace)
        except Exception as error:
            raise AssertionError(f"README python block {index} failed:\n{code}") from error
        snapshots.append(dict(namespace))
    return snapshots


def full_size_index() -> int:
    marked = [index for index, (_, is_full_size) in enumerate(readme_blocks()) if is_full_size]
    assert len(marked) == 1, f"expected one marked full-size block, found {len(marked)}"
    return marked[0]


def check_examples(snapshots: list[dict], *, vocab: int) -> None:
    """The properties the README states, checked after the block that states them."""
    blocks = [code for code, _ in readme_blocks()]
    perceiver = snapshots[next(i for i, code in enumerate(blocks) if "PerceiverResampler(" in code)]
    assert perceiver["perceived"].shape == (1, 2, 64, 1024)
    gated = snapshots[next(i for i, code in enumerate(blocks) if "GatedCrossAttentionBlock(" in code)]
    assert gated["text"].shape == (1, 512, 1024)

    palm = snapshots[full_size_index()]
    model, text, images = palm["flamingo_palm"], palm["text"], palm["images"]
    assert palm["palm_logits"].shape == palm["flamingo_logits"].shape == (2, 512, vocab)
    assert torch.equal(palm["palm_logits"], palm["flamingo_logits"])  # the gates start closed
    is_media = text == model.media_token_id
    assert is_media.sum(dim=1).tolist() == [images.shape[1]] * 2  # one media token per image, in every row
    assert is_media[:, 0].all() and is_media[:, 256].all()
    assert palm["loss"].ndim == 0 and torch.isfinite(palm["loss"])
    assert model.flamingo_mode and not any(p.requires_grad for p in model.palm.parameters())  # frozen by images

    generation = snapshots[next(i for i, code in enumerate(blocks) if ".generate_from(" in code)]
    assert generation["greedy"].shape == (2, 12)
    assert generation["conversation"].shape == (1, 3 + 5 + 3 + 5)  # two turns, two replies of 5 tokens

    saved = snapshots[next(i for i, code in enumerate(blocks) if "save_model(" in code)]
    weights, restored = saved["model"].state_dict(), saved["restored"].state_dict()  # two separate random inits
    assert weights.keys() == restored.keys() and all(torch.equal(weights[k], restored[k]) for k in weights)


def test_readme_has_the_seed_examples():
    code = "\n".join(code for code, _ in readme_blocks())
    for needle in ("PerceiverResampler(", "GatedCrossAttentionBlock(", "FlamingoPaLM(", "Extractor(vit"):
        assert needle in code
    full_size = readme_blocks()[full_size_index()][0]
    for call in ("flamingo_palm(text)", "flamingo_palm(text, images, time_mask=time_mask)", "Extractor(vit"):
        assert call in full_size


def test_readme_examples_run_with_the_full_size_example_made_small(tmp_path, monkeypatch):
    pytest.importorskip("vit_pytorch", reason="the FlamingoPaLM example uses vit-pytorch (pip install -e '.[vit]')")
    pytest.importorskip("safetensors", reason="the save/load example uses safetensors (pip install -e '.[examples]')")
    pytest.importorskip("transformers", reason="the Flamingo example uses transformers (pip install -e '.[hf]')")
    monkeypatch.chdir(tmp_path)  # the save/load example writes into the working folder
    snapshots = run_readme(full_size=False)
    check_examples(snapshots, vocab=SMALL_VOCAB)

    # The media tokens really read the images: with the gates open, changing image 2 changes
    # the logits from its media token (position 256) on, and nothing before it.
    palm = snapshots[full_size_index()]
    model, text, images, time_mask = palm["flamingo_palm"], palm["text"], palm["images"], palm["time_mask"]
    other_images = images.clone()
    other_images[:, 1] = torch.randn_like(images[:, 1])
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("attn_gate", "ff_gate")):
                param.fill_(1.0)
        logits = model(text, images, time_mask=time_mask)
        other_logits = model(text, other_images, time_mask=time_mask)
    torch.testing.assert_close(logits[:, :256], other_logits[:, :256])
    assert not torch.allclose(logits[:, 256:], other_logits[:, 256:])


@pytest.mark.slow
def test_readme_examples_run_as_written(tmp_path, monkeypatch):
    pytest.importorskip("vit_pytorch", reason="the FlamingoPaLM example uses vit-pytorch (pip install -e '.[vit]')")
    pytest.importorskip("safetensors", reason="the save/load example uses safetensors (pip install -e '.[examples]')")
    pytest.importorskip("transformers", reason="the Flamingo example uses transformers (pip install -e '.[hf]')")
    monkeypatch.chdir(tmp_path)  # the save/load example writes into the working folder
    check_examples(run_readme(full_size=True), vocab=20000)


def test_the_original_readme_training_call_runs(recwarn):
    """The original (0.1.x) README trains FlamingoPaLM on random token ids beside two images per row and a
    time_mask, without placing any media token: that call still runs (the images no token reads only
    warn), with the gates closed giving the language model's logits."""
    vit_pytorch = pytest.importorskip("vit_pytorch", reason="pip install -e '.[vit]'")
    from vit_pytorch.extractor import Extractor

    from flamingo_pytorch import FlamingoPaLM

    vit = vit_pytorch.ViT(image_size=32, patch_size=8, num_classes=10, dim=64, depth=1, heads=2, mlp_dim=128)
    encoder = Extractor(vit, return_embeddings_only=True)
    model = FlamingoPaLM(
        num_tokens=SMALL_VOCAB, dim=64, depth=3, heads=2, dim_head=16, img_encoder=encoder,
        media_token_id=3, cross_attn_every=3, perceiver_num_latents=8, perceiver_depth=2,
    )  # fmt: skip
    text = torch.randint(0, SMALL_VOCAB, (2, 64))
    text[text == 3] = 4  # as the original README's text almost always is: no media token
    palm_logits = model(text)
    images, time_mask = torch.randn(2, 2, 3, 32, 32), torch.ones((2, 2)).bool()
    flamingo_logits = model(text, images, time_mask=time_mask)
    assert torch.equal(palm_logits, flamingo_logits)
    assert any("read by no token" in str(warning.message) for warning in recwarn)
