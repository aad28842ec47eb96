"""Async run checkpoints: the same folders as a synchronous save, errors surface, the loop waits for the last write."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from helpers import arithmetic_env, tiny_grpo
from safetensors.torch import load_file

from agilerl_llm.checkpoint import CheckpointConfig, CheckpointManager
from agilerl_llm.checkpoint import agent as agent_checkpoint
from agilerl_llm.checkpoint import files as checkpoint_files
from agilerl_llm.checkpoint import snapshot as snapshots
from agilerl_llm.checkpoint import state as checkpoint_state
from agilerl_llm.checkpoint.run import POINTER_FILE, TRAINER_STATE_FILE
from agilerl_llm.training.logging import MetricsLogger
from agilerl_llm.training.reasoning import finetune_llm_reasoning


def make_agent(model_dir, tokenizer):
    return tiny_grpo(model_dir, tokenizer, lr=5e-2)


def make_env(tokenizer):
    return arithmetic_env(tokenizer)


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
    snapshot = agent.checkpoint_state(to_host=True)
    before = {k: v.clone() for k, v in snapshot.adapters["actor"].items()}
    with torch.no_grad():
        for name, p in agent.actor.named_parameters():
            if "lora_" in name:
                p.add_(1.0)
    assert all(torch.equal(before[k], v) for k, v in snapshot.adapters["actor"].items())
    snapshots.write_snapshot(snapshot, tmp_path / "a")
    agent_checkpoint.save_checkpoint(make_agent(tiny_model_dir, tokenizer), tmp_path / "b")
    assert files(tmp_path / "a") == files(tmp_path / "b")


def _optimizer_step(agent, scale: float) -> None:
    """A plain optimizer step on the actor's LoRA weights: moves the weights and fills the AdamW state."""
    for name, p in agent.actor.named_parameters():
        if "lora_" in name and p.requires_grad:
            p.grad = torch.full_like(p, scale)
    agent.optimizer.step()
    agent.optimizer.zero_grad()


def _folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_snapshot_reusing_an_earlier_one_writes_what_a_fresh_one_does(tmp_path, tiny_model_dir, tokenizer):
    agent = make_agent(tiny_model_dir, tokenizer)
    _optimizer_step(agent, 1.0)
    first = agent.checkpoint_state(to_host=True)
    first_actor = dict(first.adapters["actor"])
    first_moments = [s["exp_avg"] for s in first.payload["optimizer"]["state"].values()]
    _optimizer_step(agent, -2.0)

    reused = agent.checkpoint_state(to_host=True, reuse=first)
    fresh = agent.checkpoint_state(to_host=True)
    # the earlier host tensors were overwritten in place, not reallocated ...
    assert all(reused.adapters["actor"][k] is v for k, v in first_actor.items())
    assert all(
        s["exp_avg"] is m for s, m in zip(reused.payload["optimizer"]["state"].values(), first_moments, strict=True)
    )
    assert all(v is not fresh.adapters["actor"][k] for k, v in reused.adapters["actor"].items())
    # ... and hold exactly what a fresh snapshot holds: the same files, byte for byte
    snapshots.write_snapshot(reused, tmp_path / "reused")
    snapshots.write_snapshot(fresh, tmp_path / "fresh")
    agent_checkpoint.save_checkpoint(agent, tmp_path / "sync")
    assert _folder_bytes(tmp_path / "reused") == _folder_bytes(tmp_path / "fresh") == _folder_bytes(tmp_path / "sync")

    # still a copy: later training does not reach it
    before = {k: v.clone() for k, v in reused.adapters["actor"].items()}
    moments = [s["exp_avg"].clone() for s in reused.payload["optimizer"]["state"].values()]
    _optimizer_step(agent, 3.0)
    assert all(torch.equal(before[k], v) for k, v in reused.adapters["actor"].items())
    assert all(
        torch.equal(m, s["exp_avg"])
        for m, s in zip(moments, reused.payload["optimizer"]["state"].values(), strict=True)
    )


def test_a_reused_snapshot_of_another_layout_falls_back_to_fresh_copies(tiny_model_dir, tokenizer):
    agent = make_agent(tiny_model_dir, tokenizer)
    first = agent.checkpoint_state(to_host=True)  # no optimizer state yet
    key = next(iter(first.adapters["actor"]))
    first.adapters["actor"][key] = torch.zeros(1)  # a tensor that does not fit
    _optimizer_step(agent, 1.0)
    second = agent.checkpoint_state(to_host=True, reuse=first)
    fresh = agent.checkpoint_state(to_host=True)
    assert second.adapters["actor"][key].shape == fresh.adapters["actor"][key].shape
    assert all(torch.equal(v, fresh.adapters["actor"][k]) for k, v in second.adapters["actor"].items())
    assert str(second.payload) == str(fresh.payload)  # optimizer state copied fresh where the earlier had none


def test_the_manager_reuses_a_snapshot_only_after_its_write(tmp_path, tiny_model_dir, tokenizer, monkeypatch):
    real = checkpoint_files.save_torch

    def slow_save(payload, file):  # the write of step 1 is still running when step 2 is saved
        threading.Event().wait(0.3)
        real(payload, file)

    monkeypatch.setattr(checkpoint_files, "save_torch", slow_save)
    agent = make_agent(tiny_model_dir, tokenizer)
    manager = CheckpointManager(CheckpointConfig(path=tmp_path / "ck", interval=1, save_async=True))
    _optimizer_step(agent, 1.0)
    at_step_1 = {k: v.clone() for k, v in agent.adapters.state_dict("actor").items()}
    manager.save(1, [agent], None)
    buffers = dict(manager._snapshots[0].adapters["actor"])
    _optimizer_step(agent, -5.0)
    at_step_2 = {k: v.clone() for k, v in agent.adapters.state_dict("actor").items()}
    manager.save(2, [agent], None)  # waits for step 1's write before overwriting its host buffers
    assert all(manager._snapshots[0].adapters["actor"][k] is v for k, v in buffers.items())
    manager.close()
    assert manager._snapshots == {}
    step_1 = load_file(str(tmp_path / "ck" / "global_step_1" / "agent_0" / "actor" / "adapter_model.safetensors"))
    step_2 = load_file(str(tmp_path / "ck" / "global_step_2" / "agent_0" / "actor" / "adapter_model.safetensors"))
    assert all(torch.equal(step_1[k], at_step_1[k]) for k in at_step_1)
    assert all(torch.equal(step_2[k], at_step_2[k]) for k in at_step_2)
    assert any(not torch.equal(step_1[k], step_2[k]) for k in step_1)


def test_the_plain_lora_config_follows_changes_to_the_config():
    from peft import LoraConfig

    config = LoraConfig(r=8, target_modules=["q_proj"])
    first = checkpoint_state._plain_lora_config(config)
    assert first == checkpoint_files.plain_lora_config(config)
    first["r"] = 99  # a copy: the cache is not reachable through it
    assert checkpoint_state._plain_lora_config(config)["r"] == 8
    config.target_modules.add("v_proj")  # changed in place
    assert checkpoint_state._plain_lora_config(config)["target_modules"] == ["q_proj", "v_proj"]
    config.r = 4
    assert checkpoint_state._plain_lora_config(config) == checkpoint_files.plain_lora_config(config)


def _deferred_snapshot(agent):
    """A snapshot whose copies into an earlier snapshot's buffers are queued, not done (as the manager takes it)."""
    earlier = agent.checkpoint_state(to_host=True)
    copier = snapshots.HostCopier()
    snapshot = agent.checkpoint_state(to_host=True, reuse=earlier, copier=copier)
    return snapshot, snapshots.DeferredCopy(copier)


def _later(action, delay: float = 0.3) -> threading.Thread:
    thread = threading.Thread(target=lambda: (threading.Event().wait(delay), action()))
    thread.start()
    return thread


@pytest.mark.parametrize("write", ["optimizer step", "reference update"])
def test_writes_to_live_weights_wait_for_a_deferred_snapshot_copy(tmp_path, tiny_model_dir, tokenizer, write):
    agent = make_agent(tiny_model_dir, tokenizer)
    _optimizer_step(agent, 1.0)
    expected = agent.checkpoint_state(to_host=True)
    snapshot, deferred = _deferred_snapshot(agent)
    order = []
    copier_thread = _later(lambda: (deferred.run(), order.append("copied")))
    if write == "optimizer step":
        _optimizer_step(agent, -3.0)  # the step pre-hook waits for the copy
    else:
        agent.adapters.copy("actor", "reference")  # so does an adapter copy (set_reference_policy)
    order.append("written")
    copier_thread.join()
    assert order == ["copied", "written"]
    snapshots.write_snapshot(snapshot, tmp_path / "deferred")
    snapshots.write_snapshot(expected, tmp_path / "expected")
    assert _folder_bytes(tmp_path / "deferred") == _folder_bytes(tmp_path / "expected")  # the state before the write


def test_a_write_that_skips_the_fence_fails_the_snapshot_instead_of_mixing_two_states(tiny_model_dir, tokenizer):
    agent = make_agent(tiny_model_dir, tokenizer)
    _optimizer_step(agent, 1.0)
    _, deferred = _deferred_snapshot(agent)
    with torch.no_grad():
        agent.adapters.parameters("actor")[0].add_(1.0)  # in place, outside any optimizer step or agent method
    with pytest.raises(snapshots.TornSnapshotError, match="save_async=False"):
        deferred.run()
    assert deferred.done.is_set()
    _optimizer_step(agent, 1.0)  # the fence does not wait on a failed copy


def test_the_manager_publishes_no_checkpoint_from_a_torn_snapshot(tmp_path, tiny_model_dir, tokenizer, monkeypatch):
    release = threading.Event()
    real_run = snapshots.DeferredCopy.run

    def held_run(self):  # the writer's copy starts only once the loop has written past the fence
        release.wait(timeout=10)
        real_run(self)

    monkeypatch.setattr(snapshots.DeferredCopy, "run", held_run)
    agent = make_agent(tiny_model_dir, tokenizer)
    manager = CheckpointManager(CheckpointConfig(path=tmp_path / "ck", interval=1, save_async=True))
    _optimizer_step(agent, 1.0)
    manager.save(1, [agent], None)  # the first snapshot is copied fresh, at once
    manager.wait()
    _optimizer_step(agent, 1.0)
    manager.save(2, [agent], None)  # this one reuses step 1's buffers: its copies are deferred
    with torch.no_grad():
        agent.adapters.parameters("actor")[0].mul_(2.0)
    release.set()
    with pytest.raises(snapshots.TornSnapshotError):
        manager.wait()
    manager.close()
    assert manager.complete_steps() == [1]
    assert (tmp_path / "ck" / POINTER_FILE).read_text() == "1\n"
