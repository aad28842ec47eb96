"""Smoke test of benchmarks/distributed_step.py: the --quick run prints GRPO and SFT rows at 1 and 2 processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "distributed_step.py"


def test_quick_run_prints_both_algorithms_at_one_and_two_processes(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    env = os.environ | {"TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error"}
    env.pop("WORLD_SIZE", None)
    result = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--json", str(out)], capture_output=True,
                            text=True, timeout=300, check=False, env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    assert any(line.startswith("algorithm") and "tokens/s" in line for line in result.stdout.splitlines())
    table = json.loads(out.read_text())
    assert set(table) == {"GRPO/1", "GRPO/2", "SFT/1", "SFT/2"}
    for name in ("GRPO", "SFT"):  # weak scaling: 2 processes train twice the tokens of 1 per iteration
        assert table[f"{name}/2"]["tokens_per_iter"] == 2 * table[f"{name}/1"]["tokens_per_iter"]
        assert all(row["tokens_per_s"] > 0 for row in table.values())
