"""`sparrow-bench device-check --device cpu --quick`: every check runs and passes, and the JSON has each
figure the GPU run reports."""

from __future__ import annotations

import json

import pytest

from sparrow_core.bench.device_check import QUICK, main

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_device_check_quick_on_cpu(tmp_path):
    out = tmp_path / "check.json"
    assert main(["--device", "cpu", "--quick", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["passed"] and report["quick"] and report["device"] == "cpu"
    assert set(report["lossless"]) == {"default_model", "tiny_qwen2_5_vl"}
    assert all(row["passed"] and row["tokens"] == QUICK.lossless_tokens for row in report["lossless"].values())
    sampling = report["sampling"]
    assert sampling["seeds"] == QUICK.seeds and 0.0 <= sampling["tv_sparrow_vs_ar"] <= 1.0
    assert report["kernels"]["passed"] and {r["method"] for r in report["kernels"]["report"]["results"]} >= {"split", "single"}
    speed = report["speed"]
    for length in QUICK.visual_tokens:
        row = speed["visual_tokens"][str(length)]
        assert row["ar_ms_per_token"] > 0 and row["sparrow_verify_ms"] > 0 and row["sparrow_dsr"] > 0
        assert row["identical_to_ar"] is True  # greedy, fp32 on CPU
        assert set(speed["verify_ms_by_tree_nodes"][str(length)]) == {str(n) for n in QUICK.tree_sizes}
