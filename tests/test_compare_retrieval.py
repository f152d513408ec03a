"""benchmarks/compare_retrieval.py: two retrieval runs compared query by query, and refused when
they did not draw the same queries."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import compare_retrieval  # noqa: E402


def _run(shells_hard, *, seed=0, descriptor_hard=None):
    """A bench_retrieval JSON of 40 queries from 10 entries (4 maps each)."""
    entries = [f"entry{k}" for k in range(10) for _ in range(4)]
    descriptor_hard = [1] * 20 + [0] * 20 if descriptor_hard is None else descriptor_hard
    rows = [{"method": "3-D Zernike", "hard_top1": float(np.mean(descriptor_hard)), "hard_hits": descriptor_hard},
            {"method": "SWAN shells", "hard_top1": float(np.mean(shells_hard)), "hard_hits": list(shells_hard)}]
    return {"settings": {"corpus": "c", "splits": ["val", "test"], "seed": seed, "checkpoint": "x"},
            "checkpoint_id": "id", "maps": 40, "entries_of_queries": entries, "rows": rows}


def test_the_same_hits_differ_by_nothing_and_a_clear_gap_excludes_zero():
    everything, half = [1] * 40, [1, 1, 0, 0] * 10
    same = compare_retrieval.compare(_run(half), _run(half))
    assert [(c["method"], c["form"]) for c in same] == [("SWAN shells", "hard")]
    assert (same[0]["difference"], same[0]["low"], same[0]["high"]) == (0.0, 0.0, 0.0)
    gap = compare_retrieval.compare(_run(everything), _run(half))[0]
    assert gap["difference"] == pytest.approx(0.5) and gap["low"] > 0
    # one entry's four maps decide the gap: the interval, resampling entries, reaches zero
    one_entry = [1] * 4 + [0] * 36
    assert compare_retrieval.compare(_run(one_entry), _run([0] * 40))[0]["low"] == 0.0


def test_runs_that_drew_other_queries_are_refused():
    half = [1, 1, 0, 0] * 10
    with pytest.raises(ValueError, match="settings that differ: \\['seed'\\]"):
        compare_retrieval.compare(_run(half), _run(half, seed=1))
    with pytest.raises(ValueError, match="3-D Zernike found other hard hits"):
        compare_retrieval.compare(_run(half), _run(half, descriptor_hard=[0] * 20 + [1] * 20))


def test_the_command_prints_the_table_or_exits_2(tmp_path, capsys):
    import json

    a, b, other = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "other.json"
    a.write_text(json.dumps(_run([1] * 40)))
    b.write_text(json.dumps(_run([1, 1, 0, 0] * 10)))
    other.write_text(json.dumps(_run([1] * 40, seed=3)))
    assert compare_retrieval.main([str(a), str(b)]) == 0
    assert "| SWAN shells | hard | 1.00 | 0.50 | +0.500" in capsys.readouterr().out
    assert compare_retrieval.main([str(a), str(other)]) == 2
    assert "did not draw the same queries" in capsys.readouterr().err
