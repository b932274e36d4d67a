"""The benchmark harness's worker, in the mode a GPU run uses: several cases in one process.

GPU runs are rare and short, so the path they take is checked here, on the CPU, with tiny cases.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import common


def block_case(**overrides) -> dict:
    case = dict(kind="block", impl="ours", phase="train", device="cpu", autocast=None, warmup=1, reps=2)
    case.update(dim=16, dim_head=4, heads=2, batch=1, seq=12, latents=3, images=2, name="tiny")
    return {**case, **overrides}


def test_cases_of_one_implementation_share_a_process_and_keep_their_order():
    args = argparse.Namespace(ref_dir="/nonexistent", threads=1)
    cases = [block_case(images=1), block_case(images=-1), block_case(images=3, phase="forward")]
    results = common.run_by_impl(cases, args)
    assert [result["images"] for result in results] == [1, -1, 3]
    assert "negative dimension" in results[1]["error"]  # a failing case is reported, the others still run
    for result in (results[0], results[2]):
        assert "error" not in result
        assert len(result["seconds"]) == 2
        assert result["peak_mb"] >= 0
        assert result["package"].startswith(str(common.ROOT))  # this checkout, not 0.1.2
        assert result["aten_ops"] > 10  # the block's projections, attention, feed-forward: dozens of operators


def test_sizes_override_the_configuration():
    args = argparse.Namespace(batch=8, seq=None)
    assert common.sized({"batch": 2, "seq": 512, "dim": 64}, args) == {"batch": 8, "seq": 512, "dim": 64}


def test_the_openflamingo_generation_benchmark_runs_both_in_one_process_and_compares_tokens(tmp_path):
    """hf_generation.py, tiny: OpenFlamingo's generate and ours on the same weights give the same tokens."""
    import json

    import pytest

    pytest.importorskip("open_clip", reason="pip install -e '.[clip]'")
    pytest.importorskip("open_flamingo", reason="pip install --no-deps open-flamingo==2.0.1")
    import hf_generation

    out = tmp_path / "hf_generation.json"
    sizes = ["--layers=1", "--dim=64", "--prompt=24", "--new=3", "--reps=1", "--images", "8", f"--out={out}"]
    rows = hf_generation.main(sizes)
    assert [row["images"] for row in rows] == [8] and all(row["same_tokens"] == "3/3" for row in rows)
    assert all(row["openflamingo_speedup"] == row["openflamingo_s"] / row["once_s"] for row in rows)
    assert json.loads(out.read_text())["rows"] == rows


def test_the_conversation_benchmark_gives_all_three_routes_the_same_replies(tmp_path):
    """conversation.py, tiny: each turn's reply from our conversation equals generating it from scratch over
    the whole conversation so far, with our generate and with OpenFlamingo's, on the same weights."""
    import json

    import pytest

    pytest.importorskip("open_clip", reason="pip install -e '.[clip]'")
    pytest.importorskip("open_flamingo", reason="pip install --no-deps open-flamingo==2.0.1")
    import conversation

    out = tmp_path / "conversation.json"
    sizes = ["--layers=1", "--dim=64", "--turns=3", "--turn=8", "--reply=3", "--reps=1", f"--out={out}"]
    rows = conversation.main(sizes)
    assert [row["images"] for row in rows] == [1, 2, 3] and all(row["same_replies"] for row in rows)
    assert json.loads(out.read_text())["rows"] == rows
