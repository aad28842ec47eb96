"""`agilerl-llm checkpoints list|verify|export URL` on a run written to a real S3 endpoint (moto's server on
loopback) by a tiny training run, and on memory://."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import fsspec
import pytest
import torch
from helpers import arithmetic_env, tiny_grpo
from transformers import AutoModelForCausalLM, AutoTokenizer

from agilerl_llm.checkpoint import CheckpointConfig
from agilerl_llm.checkpoint.catalog import list_checkpoints, verify_checkpoint
from agilerl_llm.checkpoint.run import POINTER_FILE
from agilerl_llm.cli import main, parse_storage_options
from agilerl_llm.training.logging import MetricsLogger
from agilerl_llm.training.reasoning import finetune_llm_reasoning

BUCKET = "ckpt-bucket"  # the session S3 server's bucket (conftest.py); every test uses its own prefix
STEPS = 3


@pytest.fixture(scope="module")
def s3(s3_server):
    """The endpoint of the session's S3 server (conftest.py)."""
    return s3_server["endpoint"]


@pytest.fixture(scope="module")
def s3_run(s3, tiny_model_dir):
    """(url, CLI --storage-option flags, s3fs filesystem) of a run with global_step_1..3 on S3."""
    options = {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"endpoint_url": s3, "region_name": "us-east-1"},
    }
    flags = [
        "--storage-option",
        "key=testing",
        "--storage-option",
        "secret=testing",
        "--storage-option",
        f"client_kwargs={json.dumps(options['client_kwargs'])}",
    ]
    assert parse_storage_options(flags[1::2]) == options
    url = f"s3://{BUCKET}/{uuid.uuid4().hex[:10]}/run"
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    agent = tiny_grpo(tiny_model_dir, tokenizer, by_name=True, lr=5e-2)
    env = arithmetic_env(tokenizer)
    torch.manual_seed(0)
    finetune_llm_reasoning(
        [agent],
        env,
        max_steps=STEPS,
        evaluation_interval=100,
        evaluate_at_start=False,
        logger=MetricsLogger(print_every=0),
        progress=False,
        checkpoint=CheckpointConfig(path=url, interval=1, storage_options=options),
    )
    fs = fsspec.filesystem("s3", **options)
    return url, flags, fs, options


def _rows(out: str) -> dict[str, list[str]]:
    """The list output's rows by folder name."""
    return {line.split()[-1]: line.split() for line in out.strip().splitlines()[1:]}


def test_storage_option_values_parse_as_json_when_they_can():
    assert parse_storage_options(["anon=true", "profile=dev", 'client_kwargs={"a": 1}', "x=a=b"]) == {
        "anon": True,
        "profile": "dev",
        "client_kwargs": {"a": 1},
        "x": "a=b",
    }
    assert main(["checkpoints", "list", "memory://x", "--storage-option", "novalue"]) == 2


def test_list_an_s3_run(s3_run, capsys):
    url, flags, fs, options = s3_run
    infos = list_checkpoints(url, options)
    assert [(i.step, i.complete, i.is_latest) for i in infos] == [(1, True, False), (2, True, False), (3, True, True)]
    assert [i.folder for i in infos] == [f"{url}/global_step_{s}" for s in (1, 2, 3)]
    assert all(i.size > 10_000 for i in infos)
    assert main(["checkpoints", "list", url, *flags]) == 0
    rows = _rows(capsys.readouterr().out)
    assert list(rows) == ["global_step_1", "global_step_2", "global_step_3"]
    assert rows["global_step_3"][3] == "*" and all(row[2] == "complete" for row in rows.values())
    assert rows["global_step_1"][1] == f"{infos[0].size / 1e6:.2f}"


def test_list_shows_an_unfinished_upload_as_incomplete_and_follows_the_pointer(s3_run, capsys):
    url, flags, fs, options = s3_run
    _, root = fsspec.core.url_to_fs(url)
    fs.pipe_file(f"{root}/global_step_9/agent_0/attributes.pt", b"partial")  # no trainer_state.json
    fs.pipe_file(f"{root}/.global_step_8.incomplete/agent_0/attributes.pt", b"partial")
    fs.pipe_file(f"{root}/{POINTER_FILE}", b"2\n")
    try:
        fs.invalidate_cache()
        assert main(["checkpoints", "list", url, *flags]) == 0
        rows = _rows(capsys.readouterr().out)
        assert rows["global_step_9"][2:] == ["incomplete", "global_step_9"]  # no latest mark
        assert rows[".global_step_8.incomplete"][2] == "incomplete"
        assert rows["global_step_2"][3] == "*" and "*" not in rows["global_step_3"]
        assert main(["checkpoints", "verify", url, *flags]) == 0  # complete folders only
        fs.pipe_file(f"{root}/{POINTER_FILE}", b"9\n")  # names an incomplete folder: the newest complete wins
        assert [i.step for i in list_checkpoints(url, options) if i.is_latest] == [3]
    finally:
        fs.rm(f"{root}/global_step_9", recursive=True)
        fs.rm(f"{root}/.global_step_8.incomplete", recursive=True)
        fs.pipe_file(f"{root}/{POINTER_FILE}", b"3\n")
        fs.invalidate_cache()


def test_verify_an_s3_run_then_a_corrupted_attributes_file(s3_run, capsys):
    url, flags, fs, options = s3_run
    assert main(["checkpoints", "verify", url, *flags]) == 0
    assert capsys.readouterr().out.strip() == "OK"
    assert main(["checkpoints", "verify", url, "--step", "2", *flags]) == 0
    assert main(["checkpoints", "verify", f"{url}/global_step_1", *flags]) == 0
    _, root = fsspec.core.url_to_fs(url)
    key = f"{root}/global_step_2/agent_0/attributes.pt"
    original = fs.cat_file(key)
    fs.pipe_file(key, b"not a torch archive" + original[100:])
    try:
        fs.invalidate_cache()
        assert main(["checkpoints", "verify", url, *flags]) == 1
        out = capsys.readouterr().out
        remote = f"{url}/global_step_2/agent_0/attributes.pt"
        assert f"PROBLEM: {remote}: cannot be loaded" in out and "1 problem(s)" in out
        assert "agilerl_llm_ckpt_" not in out  # no temporary path leaks into the report
        assert main(["checkpoints", "verify", url, "--step", "2", *flags]) == 1
        assert remote in capsys.readouterr().out
        assert main(["checkpoints", "verify", url, "--step", "3", *flags]) == 0
        problems = verify_checkpoint(f"{url}/global_step_2", storage_options=options)
        assert len(problems) == 1 and problems[0].startswith(remote)
    finally:
        fs.pipe_file(key, original)
        fs.invalidate_cache()
    capsys.readouterr()
    assert main(["checkpoints", "verify", url, "--step", "7", *flags]) == 1
    assert f"{url}/global_step_7: no such step folder" in capsys.readouterr().out
    assert main(["checkpoints", "verify", f"{url}-missing", *flags]) == 2


def test_export_from_s3_is_loadable_by_from_pretrained(s3_run, tiny_model_dir, tmp_path, capsys):
    url, flags, fs, options = s3_run
    out = tmp_path / "hf"
    argv = ["checkpoints", "export", url, "--out", str(out), "--base-model", str(tiny_model_dir), *flags]
    assert main(argv) == 0
    assert f"exported {url}/global_step_3/agent_0" in capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer(["12+3=15"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, base(ids).logits)  # the trained adapter is merged in
    step1 = tmp_path / "hf1"
    assert main(["checkpoints", "export", url, "--step", "1", "--out", str(step1), *flags]) == 0  # saved base
    assert "global_step_1/agent_0" in capsys.readouterr().out and (step1 / "model.safetensors").is_file()
    assert main(["checkpoints", "export", url, "--step", "5", "--out", str(tmp_path / "o"), *flags]) == 2
    assert main(["checkpoints", "export", url, "--agent", "2", "--out", str(tmp_path / "o"), *flags]) == 2
    err = capsys.readouterr().err
    assert "--step 5" in err and f"{url}/global_step_3/agent_2 does not exist" in err


def test_memory_run(s3_run, tmp_path, capsys):
    """The same commands on memory:// (a copy of the S3 run), no storage options."""
    url, flags, fs, options = s3_run
    _, root = fsspec.core.url_to_fs(url)
    memory = fsspec.filesystem("memory")
    target = f"memory://cli-{uuid.uuid4().hex[:8]}/run"
    fs.invalidate_cache()
    for key in fs.find(root):
        memory.pipe_file(f"{target}/{key[len(root) + 1 :]}", fs.cat_file(key))
    assert [(i.step, i.is_latest) for i in list_checkpoints(target)] == [(1, False), (2, False), (3, True)]
    assert main(["checkpoints", "list", target]) == 0
    assert "global_step_3" in capsys.readouterr().out
    assert main(["checkpoints", "verify", target]) == 0
    memory.pipe_file(f"{target}/global_step_1/rng_state.safetensors", b"junk")
    assert main(["checkpoints", "verify", target]) == 1
    assert f"{target}/global_step_1/rng_state.safetensors: truncated or corrupt" in capsys.readouterr().out
    assert main(["checkpoints", "export", f"{target}/global_step_2", "--out", str(tmp_path / "m")]) == 0
    assert Path(tmp_path / "m" / "config.json").is_file()
