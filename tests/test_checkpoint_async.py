"""Async run checkpoints: the same folders as a synchronous save, errors surface, the loop waits for the last write."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from agilerl_llm import GRPO
from agilerl_llm.checkpoint import CheckpointConfig, CheckpointManager
from agilerl_llm.checkpoint import agent as agent_checkpoint
from agilerl_llm.checkpoint import files as checkpoint_files
from agilerl_llm.checkpoint.run import POINTER_FILE, TRAINER_STATE_FILE
from agilerl_llm.envs.reasoning import ReasoningGym
from agilerl_llm.training.logging import MetricsLogger
from agilerl_llm.training.reasoning import finetune_llm_reasoning

DATA = [{"question": f"{a}+{b}=", "answer": str(a + b)} for a in range(0, 50, 10) for b in range(3)]


def make_agent(model_dir, tokenizer):
    return GRPO(
        tokenizer.pad_token_id,
        tokenizer.pad_token,
        actor_network=AutoModelForCausalLM.from_pretrained(model_dir),
        group_size=2,
        batch_size=2,
        max_output_tokens=3,
        lr=5e-2,
        seed=1,
        gradient_checkpointing=False,
    )


def make_env(tokenizer):
    reward = lambda completion, answer, prompt: sum(map(ord, completion)) % 7 / 7  # noqa: E731
    return ReasoningGym(DATA[:10], DATA[10:], tokenizer, reward, data_batch_size_per_gpu=2, seed=5)


def run(model_dir, tokenizer, path: Path, save_async: bool, max_steps: int = 4):
    torch.manual_seed(0)
    pop = [make_agent(model_dir, tokenizer)]
    config = CheckpointConfig(path=path, interval=2, keep=2, save_async=save_async)
    pop, _ = finetune_llm_reasoning(
        pop,
        make_env(tokenizer),
        max_steps=max_steps,
        evaluation_interval=100,
        evaluate_at_start=False,
        logger=MetricsLogger(print_every=0),
        progress=False,
        checkpoint=config,
    )
    return pop[0]


def files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_async_and_sync_runs_write_identical_checkpoints(tmp_path, tiny_model_dir, tokenizer):
    sync_agent = run(tiny_model_dir, tokenizer, tmp_path / "sync", save_async=False)
    async_agent = run(tiny_model_dir, tokenizer, tmp_path / "async", save_async=True)

    for name, p in sync_agent.actor.named_parameters():
        assert torch.equal(p, dict(async_agent.actor.named_parameters())[name]), name
    assert files(tmp_path / "sync") == files(tmp_path / "async")
    assert (tmp_path / "async" / POINTER_FILE).read_text() == (tmp_path / "sync" / POINTER_FILE).read_text() == "4\n"
    assert sorted(p.name for p in (tmp_path / "async").iterdir()) == ["global_step_2", "global_step_4", POINTER_FILE]
    checked = 0
    for sync_file in sorted((tmp_path / "sync").rglob("*")):
        async_file = tmp_path / "async" / sync_file.relative_to(tmp_path / "sync")
        if sync_file.suffix == ".safetensors":
            expected, actual = load_file(str(sync_file)), load_file(str(async_file))
            assert expected.keys() == actual.keys()
            assert all(torch.equal(expected[k], actual[k]) and expected[k].dtype == actual[k].dtype for k in expected)
            assert sync_file.read_bytes() == async_file.read_bytes(), sync_file
            checked += 1
        elif sync_file.suffix == ".pt":
            expected = torch.load(sync_file, weights_only=True)
            actual = torch.load(async_file, weights_only=True)
            assert str(expected) == str(actual)  # optimizer moments, LR schedule, hyperparameters
            torch.testing.assert_close(actual["optimizer"]["state"], expected["optimizer"]["state"], rtol=0, atol=0)
            assert sync_file.read_bytes() == async_file.read_bytes(), sync_file
        elif sync_file.is_file():
            assert sync_file.read_bytes() == async_file.read_bytes(), sync_file  # JSON: trainer state, LoRA config
    assert checked >= 6  # 2 steps x (actor, reference, rng)
    step_2 = load_file(str(tmp_path / "async" / "global_step_2" / "agent_0" / "actor" / "adapter_model.safetensors"))
    step_4 = load_file(str(tmp_path / "async" / "global_step_4" / "agent_0" / "actor" / "adapter_model.safetensors"))
    assert any(not torch.equal(step_2[k], step_4[k]) for k in step_2)  # training moved on between the two saves


def test_a_failed_background_write_raises_from_the_loop(tmp_path, tiny_model_dir, tokenizer, monkeypatch):
    calls = []

    def broken_write(folder, weights, lora_config):
        calls.append(threading.current_thread().name)
        raise OSError("disk full (injected)")

    monkeypatch.setattr(checkpoint_files, "write_adapter", broken_write)
    with pytest.raises(OSError, match="injected"):
        run(tiny_model_dir, tokenizer, tmp_path / "ck", save_async=True, max_steps=4)
    assert calls and calls[0].startswith("checkpoint-writer")  # it failed in the writer thread ...
    assert len(calls) == 1  # ... and surfaced at the next save (step 4), which never started writing
    assert not (tmp_path / "ck" / POINTER_FILE).exists()
    assert CheckpointManager(CheckpointConfig(path=tmp_path / "ck")).complete_steps() == []


def test_a_failed_final_write_raises_at_close(tmp_path, tiny_model_dir, tokenizer, monkeypatch):
    monkeypatch.setattr(checkpoint_files, "save_torch", lambda payload, file: (_ for _ in ()).throw(OSError("boom")))
    with pytest.raises(OSError, match="boom"):
        run(tiny_model_dir, tokenizer, tmp_path / "ck", save_async=True, max_steps=1)


def test_the_loop_returns_after_the_last_write(tmp_path, tiny_model_dir, tokenizer, monkeypatch):
    real = checkpoint_files.save_torch
    release = threading.Event()

    def slow_save(payload, file):  # the writer stays busy until the training thread has moved on
        release.wait(timeout=0.5)
        real(payload, file)

    monkeypatch.setattr(checkpoint_files, "save_torch", slow_save)
    run(tiny_model_dir, tokenizer, tmp_path / "ck", save_async=True, max_steps=3)
    assert (tmp_path / "ck" / POINTER_FILE).read_text() == "3\n"
    assert json.loads((tmp_path / "ck" / "global_step_3" / TRAINER_STATE_FILE).read_text())["global_step"] == 3
    assert not [p for p in (tmp_path / "ck").iterdir() if p.name.startswith(".")]
    assert not any(t.name.startswith("checkpoint-writer") for t in threading.enumerate())  # close() stopped it


def test_snapshot_does_not_follow_later_training(tmp_path, tiny_model_dir, tokenizer):
    agent = make_agent(tiny_model_dir, tokenizer)
    snapshot = agent_checkpoint.snapshot_checkpoint(agent, to_host=True)
    before = {k: v.clone() for k, v in snapshot.adapters["actor"].items()}
    with torch.no_grad():
        for name, p in agent.actor.named_parameters():
            if "lora_" in name:
                p.add_(1.0)
    assert all(torch.equal(before[k], v) for k, v in snapshot.adapters["actor"].items())
    agent_checkpoint.write_snapshot(snapshot, tmp_path / "a")
    agent_checkpoint.save_checkpoint(make_agent(tiny_model_dir, tokenizer), tmp_path / "b")
    assert files(tmp_path / "a") == files(tmp_path / "b")
