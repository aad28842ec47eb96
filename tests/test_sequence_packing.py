"""use_sequence_packing: the packing plan against a slow reference, packed against padded log-probs, values and
LoRA gradients on real tiny Qwen2 and Llama models (SDPA and eager attention), a GRPO update with and without
packing, and a model that does not keep packed sequences apart being detected and left padded."""

from __future__ import annotations

import pytest
import torch
from helpers import move_lora_b
from transformers import AutoModelForCausalLM
from transformers.models.qwen2.modeling_qwen2 import Qwen2Model

from agilerl_llm import GRPO, LLMPPO
from agilerl_llm.algorithms.experience import Experience
from agilerl_llm.model.packing import pack_tokens, packing_unsupported_reason, plan_packing
from agilerl_llm.utils import notices


def ragged_mask() -> torch.Tensor:
    """Left-padded prompts, right-padded completions of different lengths, one hole, one empty row."""
    mask = torch.zeros(6, 12, dtype=torch.long)
    mask[0, 2:12] = 1
    mask[1, 0:5] = 1
    mask[2, 3:6] = 1
    mask[3, 1:9] = 1
    mask[3, 5] = 0  # a hole: the token is skipped, its neighbours still attend to each other
    mask[5, 4:6] = 1  # row 4 attends to nothing
    return mask


def test_the_plan_places_every_real_token_once_in_order_in_bins_no_wider_than_the_longest_row():
    mask = ragged_mask()
    layout = plan_packing(mask)
    lengths = mask.sum(1).tolist()
    assert layout.width == max(lengths)
    assert layout.num_bins < int((mask.sum(1) > 0).sum())  # rows were really combined
    placed = list(zip(layout.bins.tolist(), layout.slots.tolist(), strict=True))
    assert len(set(placed)) == len(placed) == int(mask.sum())
    assert all(0 <= slot < layout.width for _, slot in placed)
    # slow reference: each row's attended columns, left to right, sit in consecutive slots of a single bin and
    # count their positions from 0
    for row in range(mask.shape[0]):
        columns = [c for c in range(mask.shape[1]) if mask[row, c]]
        mine = [i for i, r in enumerate(layout.rows.tolist()) if r == row]
        assert [int(layout.columns[i]) for i in mine] == columns
        if not columns:
            continue
        assert len({int(layout.bins[i]) for i in mine}) == 1
        slots = [int(layout.slots[i]) for i in mine]
        assert slots == list(range(slots[0], slots[0] + len(columns)))
        bin_index = int(layout.bins[mine[0]])
        assert layout.positions[bin_index, slots].tolist() == list(range(len(columns)))
    # every bin's sequences (real and filler) each start at position 0: nothing continues across rows
    for bin_row in layout.positions.tolist():
        starts = [i for i, p in enumerate(bin_row) if i == 0 or p != bin_row[i - 1] + 1]
        assert all(bin_row[i] == 0 for i in starts)
    ids = torch.arange(72).reshape(6, 12)
    packed = pack_tokens(ids, layout)
    assert sorted(packed[layout.bins, layout.slots].tolist()) == sorted(ids[mask.bool()].tolist())


def batch(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    mask = ragged_mask()[:4]
    mask[3, 5] = 1  # rollouts have no holes; the plan test covers them
    ids = torch.randint(3, vocab, mask.shape, generator=torch.Generator().manual_seed(0))
    return torch.where(mask.bool(), ids, 0), mask


def build(agent_cls, model_dir, tokenizer, attention, packing, **kwargs):
    network = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=attention)
    agent = agent_cls(tokenizer.pad_token_id, tokenizer.pad_token, actor_network=network, gradient_checkpointing=False,
                      use_sequence_packing=packing, seed=3, lr=1e-2, batch_size=4, **kwargs)  # fmt: skip
    move_lora_b(agent)
    return agent


def scored_positions(mask: torch.Tensor) -> torch.Tensor:
    """Positions t whose log-prob (of token t+1 from the prefix up to t) is defined: both tokens attended."""
    return (mask[:, :-1] * mask[:, 1:]).bool()


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("model_fixture", ["tiny_model_dir", "tiny_llama_tied_dir"])
def test_packed_log_probs_and_gradients_equal_the_padded_ones(request, tokenizer, model_fixture, attention):
    model_dir = request.getfixturevalue(model_fixture)
    padded, packed = (build(GRPO, model_dir, tokenizer, attention, packing) for packing in (False, True))
    assert packed.packs_sequences and packed.policy_forward_module.sequence_packing
    assert not padded.policy_forward_module.sequence_packing
    ids, mask = batch(len(tokenizer))
    valid = scored_positions(mask)
    results = []
    for agent in (padded, packed):
        logprobs = agent.get_logprobs(ids, mask, requires_grad=True)
        (logprobs * valid).sum().backward()
        grads = {n: p.grad for n, p in agent.actor.named_parameters() if p.grad is not None}
        results.append((logprobs.detach(), grads))
    (padded_lp, padded_grads), (packed_lp, packed_grads) = results
    torch.testing.assert_close(packed_lp[valid], padded_lp[valid], atol=1e-5, rtol=1e-5)
    assert packed_grads.keys() == padded_grads.keys() and len(padded_grads) > 0
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, atol=1e-6, rtol=1e-4, msg=name)
    # the scoring forward (no grad, micro-batched) packs too
    torch.testing.assert_close(packed.get_logprobs(ids, mask)[valid], padded_lp[valid], atol=1e-5, rtol=1e-5)


def test_ppo_values_are_the_same_packed(tiny_model_dir, tokenizer):
    padded, packed = (build(LLMPPO, tiny_model_dir, tokenizer, "sdpa", packing) for packing in (False, True))
    packed.value_head.load_state_dict(padded.value_head.state_dict())
    ids, mask = batch(len(tokenizer))
    with torch.no_grad():
        values = [agent.policy_forward(ids, mask, values=True) for agent in (padded, packed)]
    attended = mask[:, :-1].bool()
    torch.testing.assert_close(values[1][attended], values[0][attended], atol=1e-5, rtol=1e-5)


def test_a_grpo_update_is_the_same_packed(tiny_model_dir, tokenizer):
    ids, mask = batch(len(tokenizer))
    action_mask = scored_positions(mask) & (torch.arange(ids.shape[1] - 1) >= 5)
    action_mask[1, 1:4] = True  # row 1 is short; give it actions too
    torch.manual_seed(7)
    advantages = torch.where(action_mask, torch.randn(4, 1), 0.0)
    outcome = []
    for packing in (False, True):
        agent = build(GRPO, tiny_model_dir, tokenizer, "sdpa", packing, group_size=2, beta=0.05)
        current = agent.get_logprobs(ids, mask)
        experience = Experience(
            completion_ids=ids,
            attention_mask=mask.bool(),
            action_mask=action_mask,
            rewards=torch.zeros(4),
            advantages=advantages,
            old_logprobs=torch.where(action_mask, current + 0.2, 0.0),
            ref_logprobs=torch.where(action_mask, current - 0.1, 0.0),
        )
        metrics = agent.learn(experience)
        weights = {n: p.detach().clone() for n, p in agent.actor.named_parameters() if p.requires_grad}
        outcome.append((metrics, weights))
    (padded_metrics, padded_weights), (packed_metrics, packed_weights) = outcome
    for key in ("mean_loss", "grad_norm", "mean_kl"):
        assert packed_metrics[key] == pytest.approx(padded_metrics[key], rel=1e-4, abs=1e-7), key
    # Adam's first step is about lr * sign(grad), so fp32 noise in a near-zero gradient shows up at ~1e-6: the
    # weights must agree to 1% of one step (lr=1e-2; a wrong gradient moves them by up to 2e-2)
    for name, weight in padded_weights.items():
        torch.testing.assert_close(packed_weights[name], weight, atol=1e-4, rtol=0, msg=lambda m, n=name: f"{n}: {m}")


class _PositionBlindQwen2(Qwen2Model):
    """A decoder that ignores the position ids it is given (as a model computing its own positions would)."""

    def forward(self, *args, position_ids=None, **kwargs):
        return super().forward(*args, position_ids=None, **kwargs)


def test_a_model_that_does_not_keep_packed_sequences_apart_is_detected_and_stays_padded(tiny_model_dir, tokenizer):
    network = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    network.model.__class__ = _PositionBlindQwen2
    reason = packing_unsupported_reason(network.model)
    assert reason is not None and "does not keep packed sequences apart" in reason
    assert packing_unsupported_reason(AutoModelForCausalLM.from_pretrained(tiny_model_dir).model) is None
    notices._warned.discard("use_sequence_packing")
    with pytest.warns(UserWarning, match="use_sequence_packing=True has no effect: _PositionBlindQwen2"):
        agent = GRPO(tokenizer.pad_token_id, tokenizer.pad_token, actor_network=network, gradient_checkpointing=False,
                     use_sequence_packing=True)  # fmt: skip
    assert agent.use_sequence_packing and not agent.packs_sequences
    assert not agent.policy_forward_module.sequence_packing


def test_packing_without_mask_derived_positions_is_refused(tiny_model_dir, tokenizer):
    with pytest.raises(ValueError, match="use_sequence_packing=True needs calc_position_embeddings=True"):
        GRPO(tokenizer.pad_token_id, tokenizer.pad_token, model_name=str(tiny_model_dir), gradient_checkpointing=False,
             use_sequence_packing=True, calc_position_embeddings=False)  # fmt: skip


def test_clones_and_reloaded_agents_keep_packing(tiny_model_dir, tokenizer, tmp_path):
    agent = GRPO(tokenizer.pad_token_id, tokenizer.pad_token, model_name=str(tiny_model_dir),
                 gradient_checkpointing=False, use_sequence_packing=True)  # fmt: skip
    assert agent.clone().policy_forward_module.sequence_packing
    agent.save_checkpoint(str(tmp_path / "ckpt"))
    reloaded = GRPO.load(str(tmp_path / "ckpt"))
    assert reloaded.packs_sequences and reloaded.policy_forward_module.sequence_packing
