"""liger-kernel's Triton kernels: SFT and DPO through its fused linear cross-entropy (parity with the standard
path, run under Triton's interpreter in a fresh process), refused where Triton cannot run, and the model patches
never applied on a CPU. Skipped where liger-kernel or triton is absent (the optional extra ``liger``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP, Qwen2RMSNorm

from agilerl_llm import DPO, GRPO, SFT

pytest.importorskip("liger_kernel")
pytest.importorskip("triton")

SCRIPT = Path(__file__).parent / "scripts" / "liger_interpret_check.py"


def test_sft_and_dpo_through_liger_cross_entropy_equal_the_standard_path(tiny_model_dir):
    env = os.environ | {"TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.run([sys.executable, str(SCRIPT), str(tiny_model_dir)], env=env, capture_output=True, text=True,
                         timeout=300, check=False)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["sft_logprob_max_abs"] < 1e-5
    assert report["sft_grad_max_rel"] < 1e-5
    for key in ("sft_loss", "sft_grad_norm", "dpo_loss/dpo", "dpo_rewards/margin", "dpo_logps/chosen", "dpo_grad_norm"):
        standard, liger = report[key]
        assert liger == pytest.approx(standard, rel=1e-5, abs=1e-5), key


@pytest.mark.parametrize("cls", [SFT, DPO])
def test_liger_cross_entropy_is_refused_where_triton_cannot_run(tiny_model_dir, tokenizer, monkeypatch, cls):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match=rf"use_liger_loss=True for {cls.__name__}: .*Triton does not run on a 'cpu'"):
        cls(tokenizer.pad_token_id, tokenizer.pad_token, model_name=str(tiny_model_dir), gradient_checkpointing=False,
            use_liger_loss=True)  # fmt: skip


def test_the_model_patches_are_never_applied_on_a_cpu(tiny_model_dir, tokenizer, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # not even under the interpreter: its kernels fail there
    agent = GRPO(tokenizer.pad_token_id, tokenizer.pad_token, model_name=str(tiny_model_dir),
                 gradient_checkpointing=False)  # fmt: skip
    assert agent.liger_model_patches is False
    decoder = agent.policy_forward_module.backbone
    assert type(decoder.norm) is Qwen2RMSNorm and decoder.norm.forward.__qualname__ == "Qwen2RMSNorm.forward"
    assert decoder.layers[0].mlp.forward.__qualname__ == Qwen2MLP.forward.__qualname__
