"""Smoke test of benchmarks/algorithms_step.py: the --quick run prints one table row per algorithm."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "benchmarks" / "algorithms_step.py"
ALGORITHMS = ("SFT", "DPO", "LLMReinforce", "LLMPPO", "GRPO")


def test_quick_run_prints_a_row_per_algorithm(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--json", str(out), "--model-dir", str(tmp_path / "m")],
        capture_output=True,
        text=True,
        timeout=120,  # the run takes ~7 s on a quiet machine; the margin is for load from other processes
        check=False,
        env=os.environ | {"TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error"},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    lines = result.stdout.splitlines()
    header = next(line for line in lines if line.startswith("algorithm"))
    assert "s/iter" in header and "tokens/s" in header
    for name in ALGORITHMS:
        row = next(line for line in lines if line.split("|")[0].strip() == name)
        seconds, tokens_per_s = float(row.split("|")[1]), float(row.split("|")[-1])
        assert seconds > 0 and tokens_per_s > 0, row

    results = json.loads(out.read_text())
    assert list(results) == list(ALGORITHMS)
    # --quick: 4 sequences x 4 trained tokens per iteration for every algorithm; 2 measured iterations.
    for name, summary in results.items():
        assert summary["tokens_per_iteration"] == 16, name
        assert len(summary["iterations"]) == 2, name
    for name in ("LLMReinforce", "LLMPPO", "GRPO"):
        assert 0 < results[name]["generate_s"] < results[name]["iteration_s"] + 1e-9
    assert results["SFT"]["generate_s"] == 0.0 and results["DPO"]["generate_s"] == 0.0
