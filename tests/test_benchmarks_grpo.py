"""Smoke test of benchmarks/grpo_step.py: the --quick run of our side (no trl needed) prints the table."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "benchmarks" / "grpo_step.py"


def _load_benchmark_module():
    spec = importlib.util.spec_from_file_location("grpo_step_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_run_prints_the_table_for_our_grpo(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--no-trl", "--json", str(out), "--model-dir", str(tmp_path / "m")],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    lines = result.stdout.splitlines()
    assert any(line.startswith("implementation") and "s/iter" in line and "tokens/s" in line for line in lines)
    row = next(line for line in lines if line.startswith("agilerl_llm GRPO"))
    assert row.rstrip().endswith("n/a")  # no TRL to compare with
    assert "TRL skipped (--no-trl)." in lines

    results = json.loads(out.read_text())
    ours = results["ours"]
    assert set(results) == {"ours"}
    # --quick: 2 prompts x 2 completions x exactly 4 new tokens (min_new_tokens = max_new_tokens).
    assert ours["tokens_per_iteration"] == 16
    assert len(ours["iterations"]) == 2 and all(it["threads"] == 2 for it in ours["iterations"])
    assert ours["iteration_s"] > 0 and 0 < ours["generate_s"] < ours["iteration_s"] + 1e-9


def test_trl_probe_and_table_without_running_trl() -> None:
    benchmark = _load_benchmark_module()
    assert not benchmark.trl_available(str(REPO_ROOT / "no-such-python"))
    fake = {"iteration_s": 2.0, "generate_s": 1.0, "learn_s": 1.0, "tokens_per_s": 512.0}
    table = benchmark.format_table({"ours": dict(fake, iteration_s=1.0), "trl": fake})
    assert "0.50x" in table and "1.00x" in table
