"""Run checkpoints on cloud storage through fsspec: a real S3 endpoint (moto's server on loopback) and memory://.

Same layout as a local run, exact resume from S3, interrupted uploads ignored and cleaned, async uploads, the
resume="none" guard, clear errors for unusable URLs; plus the export settings and the state a resume hands back.
"""

from __future__ import annotations

import importlib
import json
import sys
import uuid
from pathlib import Path

import fsspec
import pytest
import torch
from helpers import arithmetic_env, tiny_grpo
from pydantic import ValidationError

from agilerl_llm.checkpoint import CheckpointConfig, CheckpointManager
from agilerl_llm.checkpoint.run import POINTER_FILE, TRAINER_STATE_FILE
from agilerl_llm.checkpoint.storage import local_work_dir
from agilerl_llm.training.logging import MetricsLogger
from agilerl_llm.training.reasoning import finetune_llm_reasoning

BUCKET = "ckpt-bucket"


def make_agent(model_dir, tokenizer, seed=1):
    return tiny_grpo(model_dir, tokenizer, seed=seed, lr=5e-2)


def make_env(tokenizer):
    return arithmetic_env(tokenizer)


def lora_weights(agent) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in agent.actor.named_parameters() if "lora_" in n}


def train(model_dir, tokenizer, config: CheckpointConfig, max_steps: int, pop=None, env=None):
    torch.manual_seed(0)
    pop = pop or [make_agent(model_dir, tokenizer)]
    pop, history = finetune_llm_reasoning(
        pop,
        env or make_env(tokenizer),
        max_steps=max_steps,
        evaluation_interval=100,
        evaluate_at_start=False,
        logger=MetricsLogger(print_every=0),
        progress=False,
        checkpoint=config,
    )
    return pop, history


# ---------------------------------------------------------------------------------------------- a real S3
@pytest.fixture(scope="module")
def s3(s3_server):
    """The storage_options that reach the session's S3 server (conftest.py)."""
    return s3_server["storage_options"]


@pytest.fixture()
def s3_run(s3):
    """A fresh prefix in the bucket: (url, storage_options, filesystem)."""
    fs = fsspec.filesystem("s3", **s3)
    return f"s3://{BUCKET}/{uuid.uuid4().hex[:10]}", s3, fs


def remote_files(fs, url: str) -> list[str]:
    fs.invalidate_cache()
    _, root = fsspec.core.url_to_fs(url)
    root = root.rstrip("/")
    return sorted(path[len(root) + 1 :] for path in fs.find(root))


def local_files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


# ---------------------------------------------------------------------------------------------- layout
def test_s3_run_writes_the_local_layout(tmp_path, tiny_model_dir, tokenizer, s3_run):
    url, options, fs = s3_run
    train(tiny_model_dir, tokenizer, CheckpointConfig(path=tmp_path / "local", interval=1, keep=2), 3)
    train(tiny_model_dir, tokenizer, CheckpointConfig(path=url, interval=1, keep=2, storage_options=options), 3)
    keys = remote_files(fs, url)
    assert keys == local_files(tmp_path / "local")  # the same files at the same places
    assert {key.split("/")[0] for key in keys} == {"global_step_2", "global_step_3", POINTER_FILE}  # keep=2
    assert "global_step_3/agent_0/actor/adapter_model.safetensors" in keys
    assert "global_step_3/rng_state.safetensors" in keys and f"global_step_3/{TRAINER_STATE_FILE}" in keys
    assert fs.cat_file(f"{url}/{POINTER_FILE}").decode().strip() == "3"
    state = json.loads(fs.cat_file(f"{url}/global_step_3/{TRAINER_STATE_FILE}"))
    local_state = json.loads((tmp_path / "local" / "global_step_3" / TRAINER_STATE_FILE).read_text())
    assert state["global_step"] == 3 and state["env_state"] == local_state["env_state"]
    assert (
        fs.cat_file(f"{url}/global_step_3/agent_0/actor/adapter_model.safetensors")
        == (tmp_path / "local" / "global_step_3" / "agent_0" / "actor" / "adapter_model.safetensors").read_bytes()
    )  # the same training, the same bytes
    assert not local_work_dir(url).exists()  # the local staging is gone


def test_memory_run_writes_the_local_layout(tmp_path, tiny_model_dir, tokenizer):
    url = f"memory://run-{uuid.uuid4().hex[:8]}"
    train(tiny_model_dir, tokenizer, CheckpointConfig(path=tmp_path / "local", interval=1, keep=2), 3)
    train(tiny_model_dir, tokenizer, CheckpointConfig(path=url, interval=1, keep=2), 3)
    fs = fsspec.filesystem("memory")
    assert remote_files(fs, url) == local_files(tmp_path / "local")
    manager = CheckpointManager(CheckpointConfig(path=url))
    assert manager.complete_steps() == [2, 3] and manager.latest_step() == 3
    assert manager.resume_info().path == f"{url}/global_step_3"


# ---------------------------------------------------------------------------------------------- exact resume
def test_resume_from_s3_matches_an_uninterrupted_run(tmp_path, tiny_model_dir, tokenizer, s3_run):
    url, options, fs = s3_run
    straight_pop, straight = train(tiny_model_dir, tokenizer, CheckpointConfig(path=tmp_path / "full", interval=2), 4)
    config = CheckpointConfig(path=url, interval=2, storage_options=options)
    _, first = train(tiny_model_dir, tokenizer, config, 2)
    info = CheckpointManager(config).resume_info()
    assert info.global_step == 2 and info.path == f"{url}/global_step_2"
    resumed_pop, second = train(tiny_model_dir, tokenizer, config, 4)  # a new agent and env, resumed from S3

    keys = ("reward/mean", "loss/policy", "loss/kl")
    assert [row["step"] for row in second] == [3.0, 4.0]
    assert [[row[k] for k in keys] for row in first + second] == [[row[k] for k in keys] for row in straight]
    assert len({row["loss/policy"] for row in straight}) > 1  # it did learn something
    expected, actual = lora_weights(straight_pop[0]), lora_weights(resumed_pop[0])
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[name], actual[name]) for name in expected)
    assert fs.cat_file(f"{url}/{POINTER_FILE}").decode().strip() == "4"


# ---------------------------------------------------------------------------------------------- crash safety
def test_interrupted_upload_is_ignored_then_cleaned_and_a_missing_pointer_scans(tiny_model_dir, tokenizer, s3_run):
    url, options, fs = s3_run
    agent, env = make_agent(tiny_model_dir, tokenizer), make_env(tokenizer)
    env.reset()
    config = CheckpointConfig(path=url, interval=1, storage_options=options)
    manager = CheckpointManager(config)
    for step in (1, 2):
        assert manager.save(step, [agent], env) == f"{url}/global_step_{step}"
    # an upload killed before its trainer state: files of step 3, newer than the pointer (2)
    adapter = fs.cat_file(f"{url}/global_step_2/agent_0/actor/adapter_model.safetensors")
    fs.pipe_file(f"{url}/global_step_3/agent_0/actor/adapter_model.safetensors", adapter)
    fs.pipe_file(f"{url}/global_step_3/rng_state.safetensors", b"partial")
    fs.invalidate_cache()
    assert manager.complete_steps() == [1, 2] and manager.latest_step() == 2
    assert manager.resume_dir() == f"{url}/global_step_2"

    restarted = CheckpointManager(config)  # a new start removes the interrupted upload
    assert not any(key.startswith("global_step_3") for key in remote_files(fs, url))
    with pytest.raises(FileNotFoundError, match="resume_step: .* does not exist"):
        CheckpointManager(CheckpointConfig(path=url, resume_step=3, storage_options=options)).resume_dir()
    fs.rm(f"{url}/{POINTER_FILE}")
    fs.invalidate_cache()
    assert restarted.latest_step() == 2 and restarted.resume_dir() == f"{url}/global_step_2"
    fs.pipe_file(f"{url}/{POINTER_FILE}", b"1\n")  # the pointer wins when it names a complete folder
    assert restarted.latest_step() == 1

    # saving a step again replaces the complete folder of the abandoned future
    restarted.save(2, [agent], env, samples_seen=99)
    state = json.loads(fs.cat_file(f"{url}/global_step_2/{TRAINER_STATE_FILE}"))
    assert state["samples_seen"] == 99 and restarted.complete_steps() == [1, 2]


def test_async_save_to_s3_is_complete_and_loadable_after_close(tiny_model_dir, tokenizer, s3_run):
    url, options, fs = s3_run
    agent, env = make_agent(tiny_model_dir, tokenizer), make_env(tokenizer)
    env.reset()
    with torch.no_grad():
        for name, p in agent.actor.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn_like(p))
    saved = lora_weights(agent)
    config = CheckpointConfig(path=url, interval=1, save_async=True, storage_options=options)
    manager = CheckpointManager(config)
    manager.save(1, [agent], env, samples_seen=4, extra={"generation": 3})
    manager.close()
    keys = remote_files(fs, url)
    assert f"global_step_1/{TRAINER_STATE_FILE}" in keys and POINTER_FILE in keys
    assert "global_step_1/agent_0/actor/adapter_model.safetensors" in keys

    fresh = make_agent(tiny_model_dir, tokenizer, seed=9)
    fresh.index = 5
    resumed = CheckpointManager(CheckpointConfig(path=url, storage_options=options)).restore(
        [fresh], make_env(tokenizer)
    )
    assert resumed.global_step == 1 and resumed.samples_seen == 4 and resumed.extra == {"generation": 3}
    assert resumed.agent_indices == [agent.index] and fresh.index == agent.index
    restored = lora_weights(fresh)
    assert all(torch.equal(saved[n], restored[n]) for n in saved)


# ---------------------------------------------------------------------------------------------- resume modes
def test_resume_none_on_s3_refuses_then_overwrite_deletes_only_checkpoints(tiny_model_dir, tokenizer, s3_run):
    url, options, fs = s3_run
    agent, env = make_agent(tiny_model_dir, tokenizer), make_env(tokenizer)
    env.reset()
    manager = CheckpointManager(CheckpointConfig(path=url, interval=1, storage_options=options))
    for step in (1, 2):
        manager.save(step, [agent], env)
    fs.pipe_file(f"{url}/notes.txt", b"mine")
    with pytest.raises(FileExistsError, match="overwrite"):
        CheckpointManager(CheckpointConfig(path=url, resume="none", storage_options=options)).restore([agent], env)
    from_path = CheckpointConfig(
        path=f"{url}-other", resume="from_path", resume_path=f"{url}/global_step_1/", storage_options=options
    )
    assert CheckpointManager(from_path).restore([agent], env).global_step == 1

    fresh = CheckpointManager(CheckpointConfig(path=url, resume="none", overwrite=True, storage_options=options))
    assert fresh.restore([agent], env) is None
    fresh.close()  # releases the writer lock
    assert remote_files(fs, url) == ["notes.txt"]


# ---------------------------------------------------------------------------------------------- config
def test_unusable_urls_fail_at_the_config_naming_field_and_extra(monkeypatch):
    with pytest.raises(ValidationError, match=r"path.*nosuchfs"):
        CheckpointConfig(path="nosuchfs://bucket/run")
    with pytest.raises(ValidationError, match=r"resume_path.*nosuchfs"):
        CheckpointConfig(path="memory://x", resume="from_path", resume_path="nosuchfs://b/global_step_1")
    registry = importlib.import_module("fsspec.registry")._registry
    monkeypatch.delitem(registry, "s3", raising=False)  # forget an s3fs imported earlier
    monkeypatch.setitem(sys.modules, "s3fs", None)  # and make it unimportable
    with pytest.raises(ValidationError, match=r'path: .*pip install "agilerl-llm\[s3\]"'):
        CheckpointConfig(path="s3://bucket/run")
    with pytest.raises(ValidationError, match=r"export_path: .*agilerl-llm\[s3\]"):
        CheckpointConfig(path="memory://x", hf_save_interval=2, export_path="s3://bucket/export")
    try:
        import gcsfs  # noqa: F401
    except ImportError:
        with pytest.raises(ValidationError, match=r'path: .*pip install "agilerl-llm\[gcs\]"'):
            CheckpointConfig(path="gs://bucket/run")


def test_local_paths_and_file_urls_stay_paths(tmp_path):
    assert CheckpointConfig(path=str(tmp_path)).path == tmp_path
    assert CheckpointConfig(path=f"file://{tmp_path}").path == tmp_path
    assert CheckpointConfig(path="memory://run/").path == "memory://run"


def test_export_settings_go_together_and_should_export(tmp_path):
    with pytest.raises(ValidationError, match=r"hf_save_interval.*export_path"):
        CheckpointConfig(path=tmp_path, hf_save_interval=2)
    with pytest.raises(ValidationError, match=r"hf_save_interval.*export_path"):
        CheckpointConfig(path=tmp_path, export_path=tmp_path / "hf")
    with pytest.raises(ValidationError, match="hf_save_interval"):
        CheckpointConfig(path=tmp_path, hf_save_interval=0, export_path=tmp_path / "hf")
    config = CheckpointConfig(path=tmp_path, hf_save_interval=3, export_path="memory://exports")
    manager = CheckpointManager(config)
    assert [manager.should_export(s, 7) for s in range(1, 8)] == [False, False, True, False, False, True, True]
    assert not any(CheckpointManager(CheckpointConfig(path=tmp_path)).should_export(s, 7) for s in range(1, 8))


def test_local_load_restores_indices_and_extra(tmp_path, tiny_model_dir, tokenizer):
    pop = [make_agent(tiny_model_dir, tokenizer, seed=s) for s in (1, 2)]
    pop[0].index, pop[1].index = 7, 3
    env = make_env(tokenizer)
    env.reset()
    manager = CheckpointManager(CheckpointConfig(path=tmp_path, interval=1))
    manager.save(1, pop, env, extra={"evolution": {"generation": 2}})
    fresh = [make_agent(tiny_model_dir, tokenizer, seed=s) for s in (1, 2)]
    state = CheckpointManager(CheckpointConfig(path=tmp_path)).restore(fresh, make_env(tokenizer))
    assert state.agent_indices == [7, 3] and [agent.index for agent in fresh] == [7, 3]
    assert state.extra == {"evolution": {"generation": 2}}
    assert CheckpointManager(CheckpointConfig(path=tmp_path)).resume_info().extra == state.extra
