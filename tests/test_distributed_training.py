"""Training under two real CPU processes (gloo): data parallel, DeepSpeed ZeRO-2 and ZeRO-3, against one process.

``tests/distributed/train_worker.py`` runs once per backend under ``torch.distributed.run`` (and once plainly, the
one-process reference); these tests read what it wrote. See the worker's docstring for what it trains.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

WORKER = Path(__file__).parent / "distributed" / "train_worker.py"
BACKENDS = ("ddp", "zero2", "zero3")
INVARIANCE_RUNS = ("grpo_micro2", "grpo_microall", "reinforce_micro2", "reinforce_microall")
ALGORITHMS = ("grpo", "ppo", "reinforce", "dpo", "sft")
# The invariance runs train a float64 model. Data parallel keeps float64 throughout; DeepSpeed keeps its master
# weights and reductions in float32 whatever the model dtype, so its results carry float32 rounding (which Adam's
# normalisation magnifies on near-zero gradients). Tolerances: sqrt(eps) of the dtype each backend computes in.
WORKING_DTYPE = {"ddp": torch.float64, "zero2": torch.float32, "zero3": torch.float32}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(backend: str, model_dir: Path, out: Path, timeout: float = 600) -> None:
    env = os.environ | {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("WORLD_SIZE", None)
    command = [sys.executable, str(WORKER), backend, str(model_dir), str(out)]
    if backend != "single":
        command[1:1] = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                        "--master_port", str(free_port())]  # fmt: skip
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    if finished.returncode != 0:
        pytest.fail(f"{backend} worker failed:\n{finished.stdout[-3000:]}\n{finished.stderr[-6000:]}")


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    outputs = {}
    for backend in ("single", *BACKENDS):
        outputs[backend] = tmp_path_factory.mktemp(backend)
        launch(backend, tiny_model_dir, outputs[backend])
    return outputs


def result(runs, backend: str) -> dict:
    return json.loads((runs[backend] / "result.json").read_text())


def tolerance(backend: str) -> float:
    return torch.finfo(WORKING_DTYPE[backend]).eps ** 0.5


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys() and a
    return max(float((a[name] - b[name]).abs().max()) for name in a)


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_ranks_with_half_the_rows_each_take_the_one_process_step(runs, backend):
    """2 ranks x 4 rows == 1 rank x 8 rows for 3 steps: the same losses, KL, gradient norms and learning rates,
    and the same adapters, with and without gradient accumulation (micro-batches of 2)."""
    single, multi = result(runs, "single")["invariance"], result(runs, backend)["invariance"]
    assert result(runs, backend)["world_size"] == 2
    tol = tolerance(backend)
    print(f"\n{backend}: 2 ranks x 4 rows vs 1 rank x 8 rows, 3 optimizer steps (tolerance {tol:.1e})")
    print(
        "run                  | step | loss (1 proc)      | loss (2 procs)     | grad norm (1)  | grad norm (2)  | lr"
    )
    for run in INVARIANCE_RUNS:
        assert multi[run]["ranks_agree"], f"{run}: the two ranks ended with different adapters"
        for step, (one, two) in enumerate(zip(single[run]["steps"], multi[run]["steps"], strict=True), start=1):
            print(f"{run:<20} | {step:>4} | {one['mean_loss']:>18.12f} | {two['mean_loss']:>18.12f} | "
                  f"{one['grad_norm']:>14.10f} | {two['grad_norm']:>14.10f} | {two['lr']:.6f}")  # fmt: skip
            assert two["lr"] == pytest.approx(one["lr"], rel=1e-12, abs=0), f"{run} step {step}: the LR schedule"
            for key in ("mean_loss", "mean_kl", "grad_norm"):
                assert two[key] == pytest.approx(one[key], rel=tol, abs=tol * 1e-3), f"{run} step {step}: {key}"
        difference = max_difference(
            load_file(str(runs["single"] / f"{run}.safetensors")), load_file(str(runs[backend] / f"{run}.safetensors"))
        )
        print(f"{run:<20} | final adapters: max |difference| {difference:.2e}")
        assert difference < tol, f"{run}: adapters differ by {difference}"
    assert len({round(step["lr"], 12) for step in single["grpo_micro2"]["steps"]}) == 3  # the schedule moved


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_accumulation_changes_nothing(runs, backend):
    """Micro-batches of 2 (two backward passes per optimizer step on each rank) == one micro-batch per rank."""
    tol = tolerance(backend)
    for algorithm in ("grpo", "reinforce"):
        accumulated = load_file(str(runs[backend] / f"{algorithm}_micro2.safetensors"))
        whole = load_file(str(runs[backend] / f"{algorithm}_microall.safetensors"))
        assert max_difference(accumulated, whole) < tol


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_algorithm_trains_through_its_loop_and_the_ranks_agree(runs, backend):
    """GRPO, PPO, REINFORCE (rollouts: generation under ZeRO-3 too), DPO and SFT: 3 steps and a held-out
    evaluation each; every rank ends with the same weights and the same held-out scores."""
    algorithms = result(runs, backend)["algorithms"]
    assert set(algorithms) == set(ALGORITHMS)
    for name in ALGORITHMS:
        run = algorithms[name]
        assert run["ranks_agree"], f"{name}: ranks ended with different weights"
        assert run["evals_agree"], f"{name}: ranks recorded different held-out scores"
        last = run["last"]
        assert last["step"] == 3.0
        assert all(torch.isfinite(torch.tensor(value)) for value in last.values()), last
        assert ("eval/reward" if name in ("grpo", "ppo", "reinforce") else "eval/loss") in last
    assert "loss/value" in algorithms["ppo"]["last"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_ranks_serve_disjoint_prompts_covering_the_global_batches(runs, backend):
    """Each rank learns from its own prompts: 2 per rank per batch (3 steps, plus the batch the loop fetches
    after the last one), never a prompt on both ranks, rank 0 the first half of every global batch of the one
    seeded order and rank 1 the second half."""
    from agilerl_llm.envs.sharding import training_order

    sys.path.insert(0, str(WORKER.parent))
    from train_worker import QUESTIONS

    order = [QUESTIONS[int(i)]["question"] for i in training_order(1, 0, 24)]
    expected = (
        ([order[4 * b], order[4 * b + 1]] for b in range(4)),
        ([order[4 * b + 2], order[4 * b + 3]] for b in range(4)),
    )
    expected = [sum(batches, []) for batches in expected]
    for name in ("grpo", "ppo", "reinforce"):
        first, second = result(runs, backend)["algorithms"][name]["served"]
        assert not set(first) & set(second), f"{name}: a prompt was served to both ranks"
        assert [first, second] == expected


def test_a_population_evolves_identically_on_both_ranks(runs):
    """Two GRPO members, two generations of tournament selection and lr mutation under data parallel: both ranks
    hold the same members, hyperparameters, fitness histories and weights."""
    members = result(runs, "ddp")["population"]["members"]
    assert len(members) == 2 and members[0] == members[1]
    indices = [member[0] for member in members[0]]
    assert max(indices) > 1  # selection made new members (clones get fresh indices)
