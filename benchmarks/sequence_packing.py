"""Training forward + backward of a padded vs a packed batch (``use_sequence_packing``) on the CPU.

Usage::

    python benchmarks/sequence_packing.py                      # 30m model, 16 rows of 32-256 tokens (~1-2 min)
    python benchmarks/sequence_packing.py --model-size nano --repeats 1     # smoke run

The batch is shaped like a GRPO step: left-padded prompts and completions of very different lengths, padded to
the longest row. Both agents hold the same weights; the table gives the tokens each forward runs the decoder on,
the mean wall time of ``get_logprobs(requires_grad=True)`` + backward, and the largest log-prob difference
between the two (they must agree: the parity tests hold them to 1e-5). One thread, as the tests use.

On SDPA / eager attention the packed mask is still a dense (width x width) block-diagonal matrix, so the CPU
saving is the decoder's linear layers over padding; FlexAttention and FlashAttention-2 also skip the masked
attention blocks.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch


def ragged_batch(rows: int, shortest: int, longest: int, vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, longest) ids and mask: a left-padded prompt of 8-24 tokens and a completion filling a random length."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(shortest, longest + 1, (rows,), generator=generator)
    prompt_width = 24
    width = prompt_width + int(lengths.max())
    mask = torch.zeros(rows, width, dtype=torch.long)
    for row, length in enumerate(lengths.tolist()):
        prompt = int(torch.randint(8, prompt_width + 1, (1,), generator=generator))
        mask[row, prompt_width - prompt : prompt_width + length] = 1
    ids = torch.randint(3, vocab, mask.shape, generator=generator)
    return torch.where(mask.bool(), ids, 0), mask


def timed_step(agent, ids: torch.Tensor, mask: torch.Tensor) -> tuple[float, torch.Tensor]:
    agent.actor.zero_grad(set_to_none=True)
    start = time.perf_counter()
    logprobs = agent.get_logprobs(ids, mask, requires_grad=True)
    (logprobs * mask[:, 1:]).sum().backward()
    return time.perf_counter() - start, logprobs.detach()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-size", default="30m", help="nano | tiny | small | 30m")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--shortest", type=int, default=32)
    parser.add_argument("--longest", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from agilerl_llm import GRPO
    from agilerl_llm.model.packing import plan_packing
    from agilerl_llm.testing import save_tiny_model

    with tempfile.TemporaryDirectory() as folder:
        model_dir = save_tiny_model(folder, args.model_size)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        ids, mask = ragged_batch(args.rows, args.shortest, args.longest, len(tokenizer), seed=0)
        layout = plan_packing(mask)
        agents = {
            packing: GRPO(
                tokenizer.pad_token_id,
                tokenizer.pad_token,
                model_name=str(model_dir),
                batch_size=args.rows,
                gradient_checkpointing=False,
                use_sequence_packing=packing,
            )  # fmt: skip
            for packing in (False, True)
        }
        results = {}
        for packing, agent in agents.items():
            timed_step(agent, ids, mask)  # warm-up
            times, logprobs = [], None
            for _ in range(args.repeats):
                seconds, logprobs = timed_step(agent, ids, mask)
                times.append(seconds)
            results[packing] = (sum(times) / len(times), logprobs)
    valid = (mask[:, :-1] * mask[:, 1:]).bool()
    difference = float((results[True][1] - results[False][1])[valid].abs().max())
    padded_tokens, packed_tokens = mask.numel(), layout.num_bins * layout.width
    print(f"\n{args.model_size} model, {args.rows} rows, real tokens {int(mask.sum())}, threads {args.threads}\n")
    print("| batch | decoder tokens | fwd+bwd s | vs padded |")
    print("|---|---|---|---|")
    print(f"| padded | {padded_tokens} ({args.rows} x {mask.shape[1]}) | {results[False][0]:.3f} | 1.00x |")
    print(
        f"| packed | {packed_tokens} ({layout.num_bins} x {layout.width}) | {results[True][0]:.3f} | "
        f"{results[True][0] / results[False][0]:.2f}x |"
    )
    print(f"\nlargest log-prob difference packed vs padded: {difference:.2e}")


if __name__ == "__main__":
    main()
