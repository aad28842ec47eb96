"""Every example runs as a user runs it (short settings where the example offers them)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_grpo_custom_reward_example_learns_and_saves(tmp_path):
    completed = subprocess.run(
        [sys.executable, str(EXAMPLES / "grpo_custom_reward.py"), "--steps", "10", "--output-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        env=os.environ | {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"},
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    line = next(line for line in completed.stdout.splitlines() if line.startswith("held-out reward"))
    before, after = (float(part.split()[-1]) for part in line.split(":")[1].split(","))
    assert after > before + 0.3, line
    assert (tmp_path / "actor" / "adapter_model.safetensors").is_file()
