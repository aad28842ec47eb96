"""One rank of a 2-process run with a colocated vLLM engine per rank (``external_launcher``): each rank samples its
own completions, learns one data-parallel step, and checks that its engine then serves the updated adapter.

Run by tests/test_vllm.py under torchrun; prints one ``@@vllm_rank`` JSON line per rank.
"""

from __future__ import annotations

import json
import os
import sys

import torch

os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
torch.set_num_threads(1)

from agilerl_llm import GRPO, VLLMConfig, make_accelerator  # noqa: E402
from agilerl_llm.rollout.hf import HFRolloutEngine  # noqa: E402
from agilerl_llm.testing import build_tiny_tokenizer  # noqa: E402


def main(model_dir: str) -> None:
    accelerator = make_accelerator()
    tok = build_tiny_tokenizer()
    agent = GRPO(tok.pad_token_id, tok.pad_token, model_name=model_dir, accelerator=accelerator, use_vllm=True,
                 vllm_config=VLLMConfig(max_num_seqs=16), group_size=4, batch_size=8, lr=5e-3, beta=0.0,
                 temperature=0.7, max_output_tokens=8, gradient_checkpointing=False, seed=1)  # fmt: skip
    encoded = tok(["abc", "hello"], return_tensors="pt", padding=True)
    obs = {"input_ids": encoded.input_ids, "attention_mask": encoded.attention_mask}
    result = agent.get_action(obs, training=True)
    rewards = torch.linspace(-1, 1, 8).reshape(2, 4) * (1 + agent.dist.rank)
    agent.learn((result.completion_ids, result.action_masks, rewards, result.attention_mask),
                sampling_logps=result.sampling_logprobs)  # fmt: skip
    greedy = agent.get_action(obs, training=False).completion_ids
    engine, agent.rollout_engine = agent.rollout_engine, HFRolloutEngine()
    expected = agent.get_action(obs, training=False).completion_ids
    agent.rollout_engine = engine
    adapter = torch.cat([p.detach().flatten() for p in agent.adapters.parameters("actor")])
    report = {
        "rank": agent.dist.rank,
        "sampled": result.completion_ids.tolist(),
        "greedy_matches_hf": bool(torch.equal(greedy, expected)),
        "adapter_sum": float(adapter.double().sum()),
    }
    print("@@vllm_rank " + json.dumps(report), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
