"""`agilerl-llm checkpoints list|verify|export` on a run folder written by a real (tiny) training run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import arithmetic_env, tiny_grpo
from transformers import AutoModelForCausalLM, AutoTokenizer

from agilerl_llm.checkpoint import CheckpointConfig
from agilerl_llm.checkpoint.catalog import list_checkpoints, verify_checkpoint
from agilerl_llm.checkpoint.run import POINTER_FILE
from agilerl_llm.cli import main
from agilerl_llm.training.logging import MetricsLogger
from agilerl_llm.training.reasoning import finetune_llm_reasoning

STEPS = 3


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A run folder with global_step_1..3 written by finetune_llm_reasoning (agent built from a model path)."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    agent = tiny_grpo(tiny_model_dir, tokenizer, by_name=True, lr=5e-2)
    env = arithmetic_env(tokenizer)
    path = tmp_path_factory.mktemp("run") / "ckpt"
    finetune_llm_reasoning(
        [agent],
        env,
        max_steps=STEPS,
        evaluation_interval=100,
        evaluate_at_start=False,
        logger=MetricsLogger(print_every=0),
        progress=False,
        checkpoint=CheckpointConfig(path=path, interval=1),
    )
    return path


@pytest.fixture()
def run_copy(run_dir, tmp_path) -> Path:
    """A private copy of the run, to damage."""
    return Path(shutil.copytree(run_dir, tmp_path / "ckpt"))


def test_list_shows_steps_sizes_and_latest(run_dir, capsys):
    infos = list_checkpoints(run_dir)
    assert [(i.step, i.complete, i.is_latest) for i in infos] == [(1, True, False), (2, True, False), (3, True, True)]
    assert all(i.size > 10_000 for i in infos)
    assert main(["checkpoints", "list", str(run_dir)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split()[:3] == ["step", "size", "(MB)"]
    assert [line.split()[0] for line in lines[1:]] == ["1", "2", "3"]
    assert all("complete" in line for line in lines[1:])
    assert lines[-1].split()[3] == "*" and "*" not in lines[1] and "*" not in lines[2]
    assert f"{infos[0].size / 1e6:.2f}" in lines[1]


def test_list_shows_leftover_and_unfinished_folders_as_incomplete(run_copy, capsys):
    (run_copy / ".global_step_9.incomplete" / "agent_0").mkdir(parents=True)
    (run_copy / "global_step_7").mkdir()  # no trainer_state.json
    infos = {(i.step, i.folder.name): i for i in list_checkpoints(run_copy)}
    assert not infos[(9, ".global_step_9.incomplete")].complete
    assert not infos[(7, "global_step_7")].complete and not infos[(7, "global_step_7")].is_latest
    assert infos[(3, "global_step_3")].is_latest
    assert main(["checkpoints", "list", str(run_copy)]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.split()[0] == "9")
    assert "incomplete" in row and ".global_step_9.incomplete" in row and "*" not in row
    assert verify_checkpoint(run_copy) == []  # verify checks complete folders only


def test_verify_passes_on_a_good_run(run_dir, capsys):
    assert verify_checkpoint(run_dir) == []
    assert verify_checkpoint(run_dir / "global_step_2") == []
    assert main(["checkpoints", "verify", str(run_dir)]) == 0
    assert capsys.readouterr().out.strip() == "OK"
    assert main(["checkpoints", "verify", str(run_dir), "--step", "1"]) == 0


def test_verify_reports_a_truncated_adapter(run_copy, capsys):
    file = run_copy / "global_step_2" / "agent_0" / "actor" / "adapter_model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    problems = verify_checkpoint(run_copy)
    assert len(problems) == 1 and str(file) in problems[0] and "truncated" in problems[0]
    assert main(["checkpoints", "verify", str(run_copy)]) == 1
    out = capsys.readouterr().out
    assert str(file) in out and "1 problem(s)" in out
    assert main(["checkpoints", "verify", str(run_copy), "--step", "3"]) == 0  # the other steps are fine


def test_verify_reports_a_deleted_agent_folder(run_copy, capsys):
    shutil.rmtree(run_copy / "global_step_3" / "agent_0")
    assert main(["checkpoints", "verify", str(run_copy)]) == 1
    out = capsys.readouterr().out
    assert f"{run_copy / 'global_step_3' / 'agent_0'}: missing" in out


def test_verify_reports_a_corrupted_attributes_file(run_copy, capsys):
    file = run_copy / "global_step_1" / "agent_0" / "attributes.pt"
    file.write_bytes(b"not a torch archive" + file.read_bytes()[100:])
    assert main(["checkpoints", "verify", str(run_copy / "global_step_1")]) == 1
    out = capsys.readouterr().out
    assert str(file) in out and "weights_only=True" in out


def test_verify_reports_bad_pointer_and_json(run_copy):
    (run_copy / POINTER_FILE).write_text("8\n")
    (run_copy / "global_step_1" / "agent_0" / "reference" / "adapter_config.json").write_text("{broken")
    problems = verify_checkpoint(run_copy)
    assert len(problems) == 2
    assert "adapter_config.json" in problems[0] and "not valid JSON" in problems[0]
    assert POINTER_FILE in problems[1] and "step 8" in problems[1]


def test_usage_errors_exit_2(run_dir, tmp_path, capsys):
    assert main(["checkpoints", "verify", str(tmp_path / "missing")]) == 2
    assert main(["checkpoints", "list", str(tmp_path / "missing")]) == 2
    assert main(["checkpoints", "export", str(run_dir), "--step", "5", "--out", str(tmp_path / "o")]) == 2
    assert main(["checkpoints", "export", str(run_dir), "--agent", "3", "--out", str(tmp_path / "o")]) == 2
    assert main(["checkpoints", "list", "nosuchprotocol://bucket/run"]) == 2  # URLs: tests/test_cli_checkpoints_s3.py
    assert main(["checkpoints", "verify", "memory://no-such-run"]) == 2
    err = capsys.readouterr().err
    assert "--step 5" in err and "--agent 3" in err and "nosuchprotocol" in err
    with pytest.raises(SystemExit) as exit_info:  # argparse: --out is required
        main(["checkpoints", "export", str(run_dir)])
    assert exit_info.value.code == 2


def test_export_via_cli_is_loadable_by_from_pretrained(run_dir, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "hf"
    assert main(["checkpoints", "export", str(run_dir), "--out", str(out)]) == 0  # latest step, saved base model
    assert "global_step_3" in capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = tokenizer(["12+3=15"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, base(ids).logits)  # the trained adapter is merged in
    step1 = tmp_path / "hf1"
    argv = ["checkpoints", "export", str(run_dir), "--step", "1", "--out", str(step1)]
    assert main([*argv, "--base-model", str(tiny_model_dir), "--tokenizer", str(tiny_model_dir)]) == 0
    assert (step1 / "model.safetensors").is_file() and (step1 / "tokenizer.json").is_file()


def test_export_without_a_recorded_base_model_asks_for_one(run_copy, tiny_model_dir, tmp_path, capsys):
    file = run_copy / "global_step_3" / "agent_0" / "attributes.pt"
    saved = torch.load(file, weights_only=True)
    saved["attributes"]["model_name"] = None  # as for an agent built from actor_network
    torch.save(saved, file)
    assert main(["checkpoints", "export", str(run_copy), "--out", str(tmp_path / "o")]) == 2
    assert "--base-model" in capsys.readouterr().err
    argv = ["checkpoints", "export", str(run_copy / "global_step_3"), "--out", str(tmp_path / "o")]
    assert main([*argv, "--base-model", str(tiny_model_dir)]) == 0


def test_cli_runs_as_a_subprocess(run_dir):
    env = os.environ | {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(
        [sys.executable, "-m", "agilerl_llm.cli", "checkpoints", "list", str(run_dir)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "global_step_3" in result.stdout and "*" in result.stdout
