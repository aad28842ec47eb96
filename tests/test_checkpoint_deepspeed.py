"""Agent checkpoints under DeepSpeed ZeRO-2 / ZeRO-3 with two real processes on CPU (``DS_ACCELERATOR=cpu``).

``tests/distributed/checkpoint_worker.py`` runs under ``torch.distributed.run``: it trains an agent one step,
saves every grid cell, loads each into a fresh agent and checks weights and the next learning step there; this
test reads its results and checks the on-disk layout from outside.
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
from transformers import AutoModelForCausalLM

from agilerl_llm import GRPO

pytest.importorskip("deepspeed", reason="DeepSpeed is an optional extra: pip install 'agilerl-llm[deepspeed]'")

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

WORKER = Path(__file__).parent / "distributed" / "checkpoint_worker.py"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """Both ZeRO stages' worker outputs, run once for the module."""
    outputs = {}
    for stage in (2, 3):
        out = tmp_path_factory.mktemp(f"zero{stage}")
        env = os.environ | {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(_free_port()),
            str(WORKER),
            str(stage),
            str(tiny_model_dir),
            str(out),
        ]
        finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
        if finished.returncode != 0:
            pytest.fail(f"ZeRO-{stage} worker failed:\n{finished.stdout[-3000:]}\n{finished.stderr[-6000:]}")
        outputs[stage] = out
    return outputs


@pytest.mark.parametrize("stage", [2, 3])
def test_every_cell_round_trips_across_two_processes(runs, stage):
    result = json.loads((runs[stage] / "result.json").read_text())
    assert result["cell_11"]["files"] == ["actor", "attributes.pt", "reference", "save_checkpoint"]
    assert result["cell_10"]["files"] == ["actor", "attributes.pt", "reference"]
    assert result["cell_01"]["files"] == ["attributes.pt", "save_checkpoint"]
    assert result["cell_00"]["files"] == ["attributes.pt"]
    for cell in ("cell_11", "cell_10", "cell_01", "cell_00"):
        assert result[cell]["base_differs_before_load"] == [], cell  # a freshly built agent has the trained base
        assert result[cell]["weights_differ"] == [], cell
    for cell in ("cell_11", "cell_10"):  # a LoRA-only load never writes a base weight, on any rank
        assert result[cell]["base_changed_by_load"] == [], cell
    for cell in ("cell_11", "cell_01"):  # optimizer restored: the next step matches the uninterrupted run
        assert result[cell]["next_step_metrics_equal"], cell
        assert result[cell]["next_step_weights_differ"] == [], cell


@pytest.mark.parametrize("stage", [2, 3])
def test_engine_checkpoint_excludes_frozen_weights_when_lora_only(runs, stage):
    def model_states_size(cell: str) -> int:
        return sum(f.stat().st_size for f in (runs[stage] / cell / "save_checkpoint").rglob("*model_states.pt"))

    assert model_states_size("cell_11") * 2 < model_states_size("cell_01")
    saved = torch.load(runs[stage] / "cell_11" / "attributes.pt", weights_only=True)
    assert "optimizer" not in saved and saved["engine_checkpoint"]  # the engine holds the optimizer state


def test_layout_is_the_same_whatever_the_stage(runs):
    for cell in ("cell_10", "cell_11"):
        for adapter in ("actor", "reference"):
            zero2 = load_file(runs[2] / cell / adapter / "adapter_model.safetensors")
            zero3 = load_file(runs[3] / cell / adapter / "adapter_model.safetensors")
            assert {k: v.shape for k, v in zero2.items()} == {k: v.shape for k, v in zero3.items()}
            assert all(v.numel() > 0 for v in zero3.values())  # gathered, not ZeRO-3 placeholders
    zero2 = torch.load(runs[2] / "cell_00" / "attributes.pt", weights_only=True)["actor_state_dict"]
    zero3 = torch.load(runs[3] / "cell_00" / "attributes.pt", weights_only=True)["actor_state_dict"]
    assert {k: v.shape for k, v in zero2.items()} == {k: v.shape for k, v in zero3.items()}


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_checkpoints_without_optimizer_load_on_the_plain_path(runs, stage, tiny_model_dir, tokenizer):
    expected = torch.load(runs[stage] / "expected.pt", weights_only=True)
    for cell in ("cell_10", "cell_00"):
        agent = GRPO(
            tokenizer.pad_token_id,
            tokenizer.pad_token,
            actor_network=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
            group_size=4,
            seed=3,
            gradient_checkpointing=False,
        )
        agent.load_checkpoint(runs[stage] / cell, load_optimizer=False, overwrite_reference_adapter=True)
        for name, parameter in agent.actor.named_parameters():
            assert torch.equal(parameter, expected[name]), (cell, name)
