"""Run checkpoints that survive what goes wrong: write order and fsync (an instrumented filesystem), one writer per
path (a real second process), and resume falling back past damaged step folders."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
from helpers import arithmetic_env, tiny_grpo

from agilerl_llm.checkpoint import CheckpointConfig, CheckpointError, CheckpointManager, list_checkpoints
from agilerl_llm.checkpoint import storage as checkpoint_storage
from agilerl_llm.checkpoint.run import POINTER_FILE, TRAINER_STATE_FILE
from agilerl_llm.checkpoint.storage import LOCK_FILE, CheckpointLockedError


@pytest.fixture()
def agent(tiny_model_dir, tokenizer):
    return tiny_grpo(tiny_model_dir, tokenizer)


def saved_run(path, agent, tokenizer, steps=(1, 2)):
    env = arithmetic_env(tokenizer)
    env.reset()
    manager = CheckpointManager(CheckpointConfig(path=path, interval=1))
    for step in steps:
        manager.save(step, [agent], env)
    manager.close()
    return env


# ---------------------------------------------------------------------------------------------- durability
def test_every_file_is_fsynced_before_the_marker_and_the_marker_before_the_rename(
    tmp_path, agent, tokenizer, monkeypatch
):
    """Record every fsync, rename and replace the save makes; the order is the crash-safety contract."""
    events: list[tuple[str, str]] = []
    real_fsync, real_rename, real_replace = os.fsync, os.rename, os.replace

    def fsync(descriptor):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{descriptor}")))
        return real_fsync(descriptor)

    def rename(source, target):
        events.append(("rename", f"{source} -> {target}"))
        return real_rename(source, target)

    def replace(source, target):
        events.append(("replace", f"{source} -> {target}"))
        return real_replace(source, target)

    env = arithmetic_env(tokenizer)
    env.reset()
    manager = CheckpointManager(CheckpointConfig(path=tmp_path / "ck", interval=1, keep=1))
    manager.save(1, [agent], env)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(os, "replace", replace)
    manager.save(2, [agent], env)
    monkeypatch.undo()
    manager.close()

    final = tmp_path / "ck" / "global_step_2"
    staging = str(tmp_path / "ck" / ".global_step_2.incomplete")
    files = sorted(str(p.relative_to(final)) for p in final.rglob("*") if p.is_file())
    assert "agent_0/actor/adapter_model.safetensors" in files and TRAINER_STATE_FILE in files
    synced = [path for kind, path in events if kind == "fsync"]
    marker_sync = synced.index(f"{staging}/{TRAINER_STATE_FILE}")
    for relative in files:  # every file of the folder (ours, PEFT's config, the RNG state) reached the disk ...
        first = next(
            (i for i, path in enumerate(synced) if path.endswith(f"/{relative}") and "global_step_2" in path), None
        )
        assert first is not None, f"{relative} was never fsynced"
        if relative != TRAINER_STATE_FILE:  # ... before the marker was written
            assert first < marker_sync, f"{relative} fsynced after the marker"
    order = [kind + ":" + path for kind, path in events]
    rename_index = order.index(f"rename:{staging} -> {final}")
    pointer_index = next(i for i, e in enumerate(order) if e.startswith("replace:") and e.endswith(POINTER_FILE))
    marker_index = order.index(f"fsync:{staging}/{TRAINER_STATE_FILE}")
    assert marker_index < rename_index < pointer_index  # marker, then the folder appears, then the pointer names it
    assert not (tmp_path / "ck" / "global_step_1").exists()  # retention ran, after the pointer


# ---------------------------------------------------------------------------------------------- one writer
HOLDER = textwrap.dedent(
    """
    import sys, time
    from agilerl_llm.checkpoint import CheckpointConfig, CheckpointManager
    manager = CheckpointManager(CheckpointConfig(path=sys.argv[1]))
    print("locked", flush=True)
    time.sleep(120)
    """
)


def test_a_second_run_on_the_same_path_fails_at_start_naming_the_first(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path / "ck")], stdout=subprocess.PIPE, text=True, env=os.environ
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(CheckpointLockedError, match=rf"in use by another run \(pid {holder.pid} on host"):
            CheckpointManager(CheckpointConfig(path=tmp_path / "ck"))
        assert not list((tmp_path / "ck").glob(".global_step_*"))  # nothing of the first run was touched
    finally:
        holder.kill()
        holder.wait()
    # The holder died without releasing: its lock is stale (dead pid on this host) and is taken over.
    with pytest.warns(UserWarning, match=rf"taking over the lock .*pid {holder.pid}"):
        manager = CheckpointManager(CheckpointConfig(path=tmp_path / "ck"))
    assert json.loads((tmp_path / "ck" / LOCK_FILE).read_text())["pid"] == os.getpid()
    manager.close()
    assert not (tmp_path / "ck" / LOCK_FILE).exists()


def test_a_lock_from_another_host_is_never_taken_over(tmp_path):
    (tmp_path / "ck").mkdir()
    lock = {"pid": 1, "host": f"not-{socket.gethostname()}", "started": "2026-12-01T00:00:00", "run_id": "abc"}
    (tmp_path / "ck" / LOCK_FILE).write_text(json.dumps(lock))
    with pytest.raises(CheckpointLockedError, match=rf"host not-.*delete .*{LOCK_FILE}"):
        CheckpointManager(CheckpointConfig(path=tmp_path / "ck"))


def test_a_second_run_on_one_s3_path_fails_too(s3_server, monkeypatch):
    url = f"s3://{s3_server['bucket']}/locked-run"
    options = s3_server["storage_options"]
    first = CheckpointManager(CheckpointConfig(path=url, storage_options=options))
    # Another process: same host, a live pid that is not ours (our parent).
    held = json.loads(checkpoint_storage.Store(url, options).read_text(LOCK_FILE))
    held["pid"], held["process_start"] = os.getppid(), None
    checkpoint_storage.Store(url, options).write_text(LOCK_FILE, json.dumps(held))
    with pytest.raises(CheckpointLockedError, match=f"pid {os.getppid()}"):
        CheckpointManager(CheckpointConfig(path=url, storage_options=options))
    checkpoint_storage.Store(url, options).rm(LOCK_FILE)
    first.close()


# ---------------------------------------------------------------------------------------------- fallback
def _damage(folder, how):
    if how == "trainer_state":
        (folder / TRAINER_STATE_FILE).write_text("{not json")
    elif how == "rng":
        file = folder / "rng_state.safetensors"
        file.write_bytes(file.read_bytes()[:20])
    elif how == "adapter":
        file = folder / "agent_0" / "actor" / "adapter_model.safetensors"
        file.write_bytes(file.read_bytes()[:100])


@pytest.mark.parametrize("how", ["trainer_state", "rng", "adapter"])
def test_resume_skips_a_damaged_newest_step_and_says_why(tmp_path, agent, tokenizer, tiny_model_dir, how):
    saved_run(tmp_path / "ck", agent, tokenizer)
    _damage(tmp_path / "ck" / "global_step_2", how)
    fresh = tiny_grpo(tiny_model_dir, tokenizer, seed=3)
    manager = CheckpointManager(CheckpointConfig(path=tmp_path / "ck"))
    with pytest.warns(
        UserWarning, match=r"skipping damaged checkpoint\(s\) step 2: .*global_step_2.*resuming from step 1"
    ):
        state = manager.restore([fresh], arithmetic_env(tokenizer))
    assert state.global_step == 1
    assert manager.resume_info().global_step == 1  # the W&B lookup agrees with what was loaded
    manager.close()

    infos = {info.step: info for info in list_checkpoints(tmp_path / "ck")}
    assert infos[2].problem and not infos[2].is_latest and infos[1].is_latest

    step_two = tmp_path / "ck" / "global_step_2"
    with pytest.raises((CheckpointError, FileNotFoundError), match="global_step_2"):
        bad = CheckpointConfig(path=tmp_path / "other", resume="from_path", resume_path=step_two)
        CheckpointManager(bad).restore([fresh])
    with pytest.raises(CheckpointError, match=r"resume_step: .*global_step_2 is damaged"):
        CheckpointManager(CheckpointConfig(path=tmp_path / "ck", resume_step=2)).restore([fresh])


def test_resume_refuses_when_every_step_is_damaged(tmp_path, agent, tokenizer):
    saved_run(tmp_path / "ck", agent, tokenizer)
    for step in (1, 2):
        _damage(tmp_path / "ck" / f"global_step_{step}", "adapter")
    with pytest.raises(CheckpointError, match=r"every complete checkpoint .* is damaged.*step 2: .*step 1: "):
        CheckpointManager(CheckpointConfig(path=tmp_path / "ck")).restore([agent])


def test_the_cli_lists_a_damaged_step(tmp_path, agent, tokenizer, capsys):
    from agilerl_llm.cli import main

    saved_run(tmp_path / "ck", agent, tokenizer)
    _damage(tmp_path / "ck" / "global_step_2", "trainer_state")
    assert main(["checkpoints", "list", str(tmp_path / "ck")]) == 0
    printed = capsys.readouterr().out
    assert "damaged" in printed and "step 2 is damaged (a resume skips it)" in printed
    latest = [line for line in printed.splitlines() if "*" in line]
    assert len(latest) == 1 and "global_step_1" in latest[0]


def test_a_look_only_manager_takes_no_lock_and_cannot_save(tmp_path, agent, tokenizer):
    saved_run(tmp_path / "ck", agent, tokenizer)
    writer = CheckpointManager(CheckpointConfig(path=tmp_path / "ck"))
    looker = CheckpointManager(CheckpointConfig(path=tmp_path / "ck"), writer=False)
    assert looker.resume_info().global_step == 2
    assert json.loads((tmp_path / "ck" / LOCK_FILE).read_text())["run_id"] == writer.run_id
    with pytest.raises(RuntimeError, match="writer=False"):
        looker.save(3, [agent], None)
    writer.close()
