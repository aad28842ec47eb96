"""Run under TRITON_INTERPRET=1 (tests/test_liger_triton.py starts it): SFT and DPO with use_liger_loss=True
against the standard path on one tiny model, and prints the differences as JSON on its last line.

Triton reads TRITON_INTERPRET when a kernel is defined, so this must be a fresh process: in the test process the
kernels may already be defined for a GPU.
"""

from __future__ import annotations

import json
import sys

import torch

from agilerl_llm import DPO, SFT
from agilerl_llm.envs.preference import PreferenceBatch
from agilerl_llm.envs.sft import SupervisedBatch


def batch(vocab: int, seed: int) -> SupervisedBatch:
    generator = torch.Generator().manual_seed(seed)
    lengths = [10, 7, 9, 5]
    ids = torch.zeros(len(lengths), 10, dtype=torch.long)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    for row, length in enumerate(lengths):
        ids[row, :length] = torch.randint(3, vocab, (length,), generator=generator)
        mask[row, :length] = True
    loss_mask = mask[:, 1:].clone()
    loss_mask[:, :3] = False  # the first tokens are the prompt
    return SupervisedBatch(ids, mask, loss_mask)


def build(cls, model_dir: str, liger: bool, **kwargs):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    agent = cls(tokenizer.pad_token_id, tokenizer.pad_token, model_name=model_dir, gradient_checkpointing=False,
                use_liger_loss=liger, lr=1e-2, batch_size=4, seed=3, **kwargs)  # fmt: skip
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in agent.actor.named_parameters():
            if "lora_B" in name and ".actor." in name:
                parameter.normal_(0, 0.05)
    return agent, len(tokenizer)


def gradient_difference(agents, loss_fn) -> float:
    grads = []
    for agent in agents:
        agent.actor.zero_grad(set_to_none=True)
        loss_fn(agent).backward()
        grads.append({n: p.grad for n, p in agent.actor.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    return max(float((grads[1][n] - g).abs().max() / g.abs().max().clamp(min=1e-12)) for n, g in grads[0].items())


def main(model_dir: str) -> None:
    torch.set_num_threads(1)
    report = {}
    sft = [build(SFT, model_dir, liger)[0] for liger in (False, True)]
    vocab = build(SFT, model_dir, False)[1]
    data = batch(vocab, 0)
    logprobs = [agent.get_logprobs(data.input_ids, data.attention_mask) for agent in sft]
    valid = data.loss_mask
    report["sft_logprob_max_abs"] = float((logprobs[1] - logprobs[0])[valid].abs().max())
    report["sft_grad_max_rel"] = gradient_difference(
        sft, lambda a: -(a.get_logprobs(data.input_ids, data.attention_mask, requires_grad=True) * valid).sum()
    )
    metrics = [agent.learn(data) for agent in sft]
    report["sft_loss"] = [metrics[0]["loss/sft"], metrics[1]["loss/sft"]]
    report["sft_grad_norm"] = [metrics[0]["grad_norm"], metrics[1]["grad_norm"]]

    dpo = [build(DPO, model_dir, liger, beta=0.5, use_separate_reference_adapter=True)[0] for liger in (False, True)]
    pairs = PreferenceBatch(batch(vocab, 1), batch(vocab, 2))
    metrics = [agent.learn(pairs) for agent in dpo]
    for key in ("loss/dpo", "rewards/margin", "logps/chosen", "grad_norm"):
        report[f"dpo_{key}"] = [metrics[0][key], metrics[1][key]]
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1])
