"""Every example runs as a user runs it (short settings where the example offers them)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name: str, *args: str, timeout: float = 600) -> str:
    """Run ``examples/<name>`` as a user would (one thread); fail with its stderr; return its stdout."""
    completed = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        capture_output=True,
        text=True,
        env=os.environ | {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"},
        timeout=timeout,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed.stdout


def test_grpo_custom_reward_example_learns_and_saves(tmp_path):
    out = run_example("grpo_custom_reward.py", "--steps", "10", "--output-dir", str(tmp_path))
    line = next(line for line in out.splitlines() if line.startswith("held-out reward"))
    before, after = (float(part.split()[-1]) for part in line.split(":")[1].split(","))
    assert after > before + 0.3, line
    assert (tmp_path / "actor" / "adapter_model.safetensors").is_file()


def test_readme_python_snippet_runs(tmp_path):
    """The README's Python example, with its step count cut to 2 and its model folder in tmp_path."""
    readme = (EXAMPLES.parent / "README.md").read_text()
    snippet = readme.split("```python\n", 1)[1].split("```", 1)[0]
    assert '"/tmp/tiny"' in snippet and "max_steps=50" in snippet and "evaluation_interval=25" in snippet
    snippet = snippet.replace('"/tmp/tiny"', repr(str(tmp_path / "tiny")))
    snippet = snippet.replace("max_steps=50", "max_steps=2").replace("evaluation_interval=25", "evaluation_interval=2")
    namespace: dict = {}
    exec(compile(snippet, "README.md", "exec"), namespace)
    assert [row["step"] for row in namespace["history"] if "eval/reward" in row] == [0.0, 2.0]


def test_population_example_prints_generations_and_saves_the_plot(tmp_path):
    """The evolving population example, cut to 6 steps (3 generations) on a small held-out split."""
    overrides = [
        f"output_dir={tmp_path}",
        "training.max_steps=6",
        "training.evaluation_interval=2",
        "evolution.evo_steps=2",
        "task.num_train=64",
        "task.num_test=8",
        "warm_start.steps=4",
        "algorithm.params.cosine_lr_schedule_config.num_epochs=6",
    ]
    out = run_example("population_grpo.py", *overrides, timeout=900)
    # the loop prints each generation's fitness table (member, hyperparameters, fitness) ...
    assert out.count("generation at step") == 2 and "member" in out and "temperature" in out and "fitness" in out
    # ... and the script a fitness row per evaluation step: 0, 2, 4, 6
    rows = out.split("held-out reward of every member at every evaluation:")[1].strip().splitlines()[1:5]
    assert [int(row.split()[0]) for row in rows] == [0, 2, 4, 6]
    plot = tmp_path / "fitness.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_multiturn_example_plays_trains_and_reports(tmp_path):
    out = run_example("multiturn_guess_number.py", "--steps", "3", "--output-dir", str(tmp_path))
    line = next(line for line in out.splitlines() if line.startswith("success rate"))
    before, after = (float(value) for value in line.split()[-2:])
    assert 0.0 <= before <= 1.0 and 0.0 <= after <= 1.0
    assert (tmp_path / "base" / "config.json").is_file()


def test_multiturn_recall_example_plays_trains_and_reports(tmp_path):
    out = run_example("multiturn_recall.py", "--steps", "3", "--output-dir", str(tmp_path))
    success = [
        float(value) for value in next(line for line in out.splitlines() if line.startswith("success")).split()[2:]
    ]
    assert len(success) == 4 and all(0.0 <= value <= 1.0 for value in success)  # steps 0, 1, 2, 3
    assert (tmp_path / "base" / "config.json").is_file()
