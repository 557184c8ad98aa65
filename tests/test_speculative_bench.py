"""`sparrow-bench speculative` end to end on the default architecture with random weights (tiny run)."""

from __future__ import annotations

import json

import pytest
import torch

from sparrow_core.bench.speculative import main, random_default_target
from sparrow_core.decoding.drafter import DrafterConfig, TextAnchoredDrafter

LENGTHS = "40,80"
METHODS = "ar,ngram,sparrow,msd"


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


EXTRA = "ivsb-span"  # a drafter from a directory, run as a method of its own (--drafter NAME=DIR)


def test_bench_rows_and_plot(tmp_path, capsys):
    out = tmp_path / "spec.json"
    torch.manual_seed(0)
    TextAnchoredDrafter(random_default_target(), DrafterConfig(visual_span="mid_hidden")).save_pretrained(tmp_path / EXTRA)
    assert main(["--random-target", "--visual-tokens", LENGTHS, "--methods", METHODS, "--captions", "1",
                 "--drafter", f"{EXTRA}={tmp_path / EXTRA}",
                 "--max-tokens", "4", "--trees", "6/2/3", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert {(r["method"], r["visual_tokens"]) for r in rows} == {
        (m, int(n)) for m in METHODS.split(",") + [EXTRA] for n in LENGTHS.split(",")
    }
    for r in rows:
        assert set(r) >= {"method", "visual_tokens", "tau", "decode_tokens_per_s", "dsr", "esr", "identical_to_ar"}
        assert r["identical_to_ar"] is True and r["tau"] >= 1.0  # greedy: lossless for every method
    assert out.with_suffix(".png").stat().st_size > 0
    assert "dsr" in capsys.readouterr().out
