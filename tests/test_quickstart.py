"""The README's main job, run as a user runs it, and the reproducibility of a seeded run."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from agilerl_llm.training.config import RunConfig
from agilerl_llm.training.job import run_reasoning_job

SHORT_RUN = [
    "model.size=nano",
    "task.num_train=200",
    "task.num_test=8",
    "warm_start.steps=5",
    "training.max_steps=3",
    "training.data_batch_size_per_gpu=4",
    "training.evaluation_interval=3",
    "algorithm.params.batch_size=32",
    "logging.progress=false",
]


@pytest.mark.slow
def test_quickstart_command_raises_held_out_reward(tmp_path):
    """`python -m agilerl_llm.quickstart`: held-out reward after RL >= 0.5 and >= 2x the reward before."""
    env = os.environ | {"TOKENIZERS_PARALLELISM": "false"}
    completed = subprocess.run(
        [sys.executable, "-m", "agilerl_llm.quickstart", f"output_dir={tmp_path}", "logging.progress=false"],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    match = re.search(r"held-out reward \(mean\)\s+([\d.]+)\s+([\d.]+)", completed.stdout)
    assert match, completed.stdout[-3000:]
    before, after = float(match.group(1)), float(match.group(2))
    assert after >= 0.5 and after >= 2 * before, completed.stdout[-3000:]
    assert (tmp_path / "base" / "config.json").is_file() and (tmp_path / "base" / "model.safetensors").is_file()


def test_seeded_runs_are_identical(tmp_path):
    """Same config, same seed: identical metrics history (warm start, sampling and learning all seeded)."""
    first = run_reasoning_job(RunConfig.from_dict({}, [*SHORT_RUN, f"output_dir={tmp_path / 'a'}"]))
    second = run_reasoning_job(RunConfig.from_dict({}, [*SHORT_RUN, f"output_dir={tmp_path / 'b'}"]))
    written = RunConfig.from_yaml(tmp_path / "a" / "config.yaml")
    assert written == RunConfig.from_dict({}, [*SHORT_RUN, f"output_dir={tmp_path / 'a'}"])
    strip = [{k: v for k, v in row.items() if not k.startswith("perf/")} for row in first.history]
    assert strip == [{k: v for k, v in row.items() if not k.startswith("perf/")} for row in second.history]
    assert any("eval/reward" in row for row in first.history[1:])


def test_job_saves_run_checkpoints_and_resumes(tmp_path):
    """A checkpointed job writes step folders; the same job with more steps continues after the last one."""
    checkpoint = [f"checkpoint={{path: {tmp_path / 'ckpt'}, interval: 2, keep: 1}}"]
    first = run_reasoning_job(RunConfig.from_dict({}, [*SHORT_RUN, *checkpoint, f"output_dir={tmp_path / 'a'}"]))
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["global_step_3", "latest_ckpt_global_step.txt"]
    more = ["training.max_steps=4", "training.evaluation_interval=4"]
    second = run_reasoning_job(
        RunConfig.from_dict({}, [*SHORT_RUN, *checkpoint, *more, f"output_dir={tmp_path / 'b'}"])
    )
    assert [row["step"] for row in first.history if "reward/mean" in row] == [1.0, 2.0, 3.0]
    assert [row["step"] for row in second.history if "reward/mean" in row] == [4.0]
