"""Run checkpoints: config checks, step folders, pointer, retention, crash safety, and an exact resume after SIGKILL."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import arithmetic_env, tiny_grpo
from pydantic import ValidationError
from safetensors.torch import load_file

from agilerl_llm.checkpoint import CheckpointConfig, CheckpointManager
from agilerl_llm.checkpoint.run import POINTER_FILE, TRAINER_STATE_FILE
from agilerl_llm.checkpoint.storage import LOCK_FILE

WORKER = Path(__file__).parent / "distributed" / "resume_worker.py"


def make_agent(model_dir, tokenizer, seed=1):
    return tiny_grpo(model_dir, tokenizer, seed=seed)


def make_env(tokenizer):
    return arithmetic_env(tokenizer, lambda c, a, p: 0.0, batch_size=3)


def lora_weights(agent) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in agent.actor.named_parameters() if "lora_" in n}


@pytest.fixture()
def agent(tiny_model_dir, tokenizer):
    return make_agent(tiny_model_dir, tokenizer)


# ---------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"interval": 0}, "interval"),
        ({"keep": 0}, "keep"),
        ({"resume": "sometimes"}, "resume"),
        ({"resume": "from_path"}, "resume_path"),
        ({"resume_path": "x"}, "resume_path"),
        ({"resume": "none", "resume_step": 3}, "resume_step"),
        ({"overwrite": True}, "overwrite"),
        ({"intervl": 3}, "intervl"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(tmp_path, kwargs, field):
    with pytest.raises(ValidationError, match=field):
        CheckpointConfig(path=tmp_path, **kwargs)


# ---------------------------------------------------------------------------------------------- layout
def test_save_writes_step_folders_pointer_and_trainer_state(tmp_path, tiny_model_dir, tokenizer):
    pop = [make_agent(tiny_model_dir, tokenizer, seed=s) for s in (1, 2)]
    env = make_env(tokenizer)
    env.reset()
    manager = CheckpointManager(CheckpointConfig(path=tmp_path / "ck", interval=2))
    assert [manager.should_save(s, 5) for s in range(1, 6)] == [False, True, False, True, True]
    folder = manager.save(4, pop, env, samples_seen=12, wandb_run_id="abc")
    assert folder == tmp_path / "ck" / "global_step_4"
    assert sorted(p.name for p in folder.iterdir()) == [
        "agent_0",
        "agent_1",
        "rng_state.safetensors",
        TRAINER_STATE_FILE,
    ]
    assert (folder / "agent_0" / "actor" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "ck" / POINTER_FILE).read_text().strip() == "4"
    state = json.loads((folder / TRAINER_STATE_FILE).read_text())
    assert state["global_step"] == 4 and state["samples_seen"] == 12 and state["wandb_run_id"] == "abc"
    assert state["env_state"] == env.state_dict()
    hidden = [p.name for p in (tmp_path / "ck").iterdir() if p.name.startswith(".")]
    assert hidden == [LOCK_FILE]  # no staging leftovers; the writer lock while the manager is open
    manager.close()
    assert not [p for p in (tmp_path / "ck").iterdir() if p.name.startswith(".")]


def test_load_restores_reference_optimizer_env_position_and_rng(tmp_path, tiny_model_dir, tokenizer, agent):
    env = make_env(tokenizer)
    env.reset()
    env.advance()
    with torch.no_grad():  # make actor and reference differ, so a load that copies actor -> reference would show
        for name, p in agent.actor.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn_like(p))
    saved = lora_weights(agent)
    manager = CheckpointManager(CheckpointConfig(path=tmp_path, interval=1))
    random.seed(11), np.random.seed(12), torch.manual_seed(13)
    manager.save(1, [agent], env, samples_seen=6)
    expected_rng = (random.random(), float(np.random.rand()), torch.rand(3))
    expected_batch = env.advance().texts

    fresh, fresh_env = make_agent(tiny_model_dir, tokenizer, seed=99), make_env(tokenizer)
    assert any(not torch.equal(saved[n], w) for n, w in lora_weights(fresh).items())
    resumed = manager.restore([fresh], fresh_env)
    assert resumed.global_step == 1 and resumed.samples_seen == 6 and resumed.path == tmp_path / "global_step_1"
    restored = lora_weights(fresh)
    assert all(torch.equal(saved[n], restored[n]) for n in saved)  # reference included: the KL anchor did not move
    assert (random.random(), float(np.random.rand())) == expected_rng[:2]
    assert torch.equal(torch.rand(3), expected_rng[2])
    assert fresh_env.advance().texts == expected_batch


# ---------------------------------------------------------------------------------------------- crash safety
def test_leftover_temp_folder_is_ignored_and_cleaned(tmp_path, tokenizer, agent):
    env = make_env(tokenizer)
    env.reset()
    manager = CheckpointManager(CheckpointConfig(path=tmp_path, interval=1))
    manager.save(2, [agent], env)
    (tmp_path / ".global_step_3.incomplete" / "agent_0").mkdir(parents=True)  # a save killed mid-way
    (tmp_path / ".latest_ckpt_global_step.txt.tmp").write_text("3")
    (tmp_path / "global_step_7").mkdir()  # a folder without trainer state is not a checkpoint
    (tmp_path / POINTER_FILE).unlink()
    restarted = CheckpointManager(CheckpointConfig(path=tmp_path, interval=1))
    assert not (tmp_path / ".global_step_3.incomplete").exists()
    assert not (tmp_path / ".latest_ckpt_global_step.txt.tmp").exists()
    assert restarted.complete_steps() == [2]
    assert restarted.latest_step() == 2 and restarted.resume_dir() == tmp_path / "global_step_2"


def test_pointer_to_missing_or_incomplete_folder_falls_back_to_scanning(tmp_path, tokenizer, agent):
    env = make_env(tokenizer)
    env.reset()
    manager = CheckpointManager(CheckpointConfig(path=tmp_path, interval=1))
    for step in (1, 2):
        manager.save(step, [agent], env)
    (tmp_path / POINTER_FILE).write_text("5\n")
    assert manager.latest_step() == 2
    (tmp_path / "global_step_5").mkdir()
    assert manager.latest_step() == 2
    (tmp_path / POINTER_FILE).write_text("1\n")  # the pointer wins when it names a complete folder
    assert manager.latest_step() == 1
    (tmp_path / POINTER_FILE).write_text("garbage")
    assert manager.latest_step() == 2


def test_retention_keeps_the_newest_complete_folders(tmp_path, tokenizer, agent):
    env = make_env(tokenizer)
    env.reset()
    manager = CheckpointManager(CheckpointConfig(path=tmp_path, interval=1, keep=2))
    for step in (1, 2, 3, 4):
        manager.save(step, [agent], env)
        assert manager.complete_steps() == list(range(max(1, step - 1), step + 1))
    (tmp_path / "global_step_0").mkdir()  # incomplete: retention leaves what it does not own alone
    manager.save(5, [agent], env)
    assert manager.complete_steps() == [4, 5] and (tmp_path / "global_step_0").is_dir()
    assert (tmp_path / POINTER_FILE).read_text().strip() == "5"
    keep_one = CheckpointManager(CheckpointConfig(path=tmp_path, interval=1, keep=1))
    keep_one.save(6, [agent], env)
    assert keep_one.complete_steps() == [6]


# ---------------------------------------------------------------------------------------------- resume modes
def test_resume_modes(tmp_path, tokenizer, agent):
    env = make_env(tokenizer)
    env.reset()
    assert CheckpointManager(CheckpointConfig(path=tmp_path / "new")).restore([agent], env) is None  # latest, empty
    manager = CheckpointManager(CheckpointConfig(path=tmp_path / "ck", interval=1))
    for step in (1, 2):
        manager.save(step, [agent], env)
    (tmp_path / "ck" / "notes.txt").write_text("mine")
    info = CheckpointManager(CheckpointConfig(path=tmp_path / "ck")).resume_info()
    assert info.global_step == 2 and info.path.name == "global_step_2" and info.wandb_run_id is None

    with pytest.raises(FileExistsError, match="overwrite"):
        CheckpointManager(CheckpointConfig(path=tmp_path / "ck", resume="none")).restore([agent], env)
    assert CheckpointManager(CheckpointConfig(path=tmp_path / "ck", resume_step=1)).resume_dir().name == "global_step_1"
    with pytest.raises(FileNotFoundError, match="resume_step"):
        CheckpointManager(CheckpointConfig(path=tmp_path / "ck", resume_step=9)).resume_dir()
    (tmp_path / "ck" / "global_step_3").mkdir()
    with pytest.raises(FileNotFoundError, match="not a complete"):
        CheckpointManager(CheckpointConfig(path=tmp_path / "ck", resume_step=3)).resume_dir()
    from_path = CheckpointConfig(
        path=tmp_path / "other", resume="from_path", resume_path=tmp_path / "ck" / "global_step_2"
    )
    assert CheckpointManager(from_path).restore([agent], env).global_step == 2
    with pytest.raises(FileNotFoundError, match="resume_path"):
        bad = CheckpointConfig(path=tmp_path / "o", resume="from_path", resume_path=tmp_path / "ck" / "global_step_8")
        CheckpointManager(bad).restore([agent], env)

    fresh = CheckpointManager(CheckpointConfig(path=tmp_path / "ck", resume="none", overwrite=True))
    assert fresh.restore([agent], env) is None
    fresh.close()  # releases the writer lock
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["notes.txt"]  # only our checkpoints are deleted


# ---------------------------------------------------------------------------------------------- the headline
def _worker(
    mode: str, model_dir: Path, ckpt: Path, out: Path, total: int, interval: int, algorithm="grpo", save="sync"
) -> subprocess.Popen:
    env = os.environ | {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    args = [sys.executable, str(WORKER), mode, str(model_dir), str(ckpt), str(out), str(total), str(interval)]
    args += [algorithm, save]
    return subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _finish(process: subprocess.Popen, timeout: float = 120) -> None:
    _, stderr = process.communicate(timeout=timeout)
    assert process.returncode == 0, stderr[-3000:]


@pytest.mark.parametrize(
    ("algorithm", "save"), [("grpo", "sync"), ("ppo", "sync"), ("ppo", "async")], ids=["grpo", "ppo", "ppo-async"]
)
def test_sigkill_after_a_checkpoint_then_resume_matches_an_uninterrupted_run(tmp_path, tiny_model_dir, algorithm, save):
    """Kill -9 inside step n+1, resume in a fresh process: the same per-step metrics as an uninterrupted run and
    bitwise-equal adapters (actor, reference, critic) and extra modules (PPO's value head)."""
    n = 3
    run = {"algorithm": algorithm, "save": save}
    full = _worker("full", tiny_model_dir, tmp_path / "ck_full", tmp_path / "full", 2 * n, n, **run)
    crash = _worker("crash", tiny_model_dir, tmp_path / "ck", tmp_path / "crash", 2 * n, n, **run)
    deadline = time.monotonic() + 120
    while not (tmp_path / "crash" / "ready").exists():  # the worker is inside step n+1, step n is on disk
        assert crash.poll() is None, crash.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "the crash worker never reached step n+1"
        time.sleep(0.1)
    crash.send_signal(signal.SIGKILL)
    crash.wait(timeout=30)
    assert crash.returncode == -signal.SIGKILL
    assert (tmp_path / "ck" / POINTER_FILE).read_text().strip() == str(n)
    assert not (tmp_path / "ck" / f"global_step_{n + 1}").exists()
    _finish(full)
    _finish(_worker("resume", tiny_model_dir, tmp_path / "ck", tmp_path / "resume", 2 * n, n, **run))

    uninterrupted = json.loads((tmp_path / "full" / "history.json").read_text())
    resumed = json.loads((tmp_path / "resume" / "history.json").read_text())
    assert [row["step"] for row in resumed] == [float(s) for s in range(n + 1, 2 * n + 1)]
    assert resumed == uninterrupted[n:]  # rewards, losses, KL, grad norms: exactly equal floats
    assert len({row["loss/policy"] for row in uninterrupted}) > 2  # the run really learned something
    expected = load_file(str(tmp_path / "full" / "adapters.safetensors"))
    actual = load_file(str(tmp_path / "resume" / "adapters.safetensors"))
    assert expected.keys() == actual.keys() and any(".reference." in k for k in expected)
    if algorithm == "ppo":
        assert any(".critic." in k for k in expected) and "module.value_head.linear.weight" in expected
        assert "loss/value" in resumed[0]
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype and torch.equal(actual[name], tensor), name
    assert (tmp_path / "ck" / POINTER_FILE).read_text().strip() == str(2 * n)
    # What the closing notes quote (visible with `pytest -s`): per step, the uninterrupted and resumed numbers.
    print(f"\n{algorithm} ({save} saves): SIGKILL inside step {n + 1} after step {n}'s checkpoint, resumed afresh:")
    print("step | reward/mean uninterrupted | reward/mean resumed | loss/policy uninterrupted | loss/policy resumed")
    for before, after in zip(uninterrupted[n:], resumed, strict=True):
        print(
            f"{int(after['step']):>4} | {before['reward/mean']:>25.6f} | {after['reward/mean']:>19.6f} | "
            f"{before['loss/policy']:>25.8f} | {after['loss/policy']:>19.8f}"
        )
    print(f"final adapter tensors bitwise equal: {len(expected)}/{len(expected)}")
