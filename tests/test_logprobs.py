"""Parity of the fused chunked log-prob op with the naive full-logits reference, forward and backward.

Sizes are deliberately awkward (V = 37, H = 12, chunk 3, N = 10: N not divisible by the chunk) so off-by-one
chunk bounds, a wrong last tile or a dropped 1/temperature show up as value or gradient mismatches.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from agilerl_llm.model import logprobs as logprobs_module
from agilerl_llm.model.logprobs import _chunk_bounds, auto_chunk_rows, fused_logprobs, naive_logprobs

REPO_ROOT = Path(__file__).resolve().parents[1]
VOCAB, HIDDEN, ROWS, CHUNK = 37, 12, 10, 3


def _leaves(*shapes: tuple[int, ...], dtype: torch.dtype = torch.float32, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator, dtype=dtype).requires_grad_() for shape in shapes]


def _grads(loss: torch.Tensor, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, tensors))


def _naive_entropy(hidden, weight, bias=None, temperature=1.0) -> torch.Tensor:
    logits = hidden.double() @ weight.double().T
    if bias is not None:
        logits = logits + bias.double()
    log_probs = torch.log_softmax(logits / temperature, dim=-1)
    return -(log_probs.exp() * log_probs).sum(-1)


@pytest.mark.parametrize("temperature, with_bias", [(1.0, False), (0.7, True), (1.6, False), (1.0, True)])
def test_values_and_grads_match_naive_fp32(temperature: float, with_bias: bool) -> None:
    hidden, weight, bias, upstream = _leaves((ROWS, HIDDEN), (VOCAB, HIDDEN), (VOCAB,), (ROWS,))
    target_ids = torch.randint(0, VOCAB, (ROWS,), generator=torch.Generator().manual_seed(1))
    bias_arg = bias if with_bias else None
    inputs = [hidden, weight, bias] if with_bias else [hidden, weight]

    fused = fused_logprobs(hidden, weight, target_ids, bias=bias_arg, temperature=temperature, chunk_rows=CHUNK)
    naive = naive_logprobs(hidden, weight, target_ids, bias=bias_arg, temperature=temperature)
    torch.testing.assert_close(fused, naive, atol=1e-5, rtol=1e-5)
    # A random upstream gradient, not .sum(): a per-row scaling bug would cancel under a uniform one.
    fused_grads = _grads((fused * upstream.detach()).sum(), inputs)
    naive_grads = _grads((naive * upstream.detach()).sum(), inputs)
    for fused_grad, naive_grad in zip(fused_grads, naive_grads, strict=True):
        torch.testing.assert_close(fused_grad, naive_grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk_rows", [1, ROWS, 64, None])
def test_chunk_sizes_from_one_row_to_more_than_all_rows(chunk_rows: int | None) -> None:
    hidden, weight = _leaves((ROWS, HIDDEN), (VOCAB, HIDDEN), seed=2)
    target_ids = torch.randint(0, VOCAB, (ROWS,), generator=torch.Generator().manual_seed(3))
    fused = fused_logprobs(hidden, weight, target_ids, temperature=0.9, chunk_rows=chunk_rows)
    naive = naive_logprobs(hidden, weight, target_ids, temperature=0.9)
    torch.testing.assert_close(fused, naive, atol=1e-5, rtol=1e-5)
    for fused_grad, naive_grad in zip(
        _grads(fused.square().sum(), [hidden, weight]), _grads(naive.square().sum(), [hidden, weight]), strict=True
    ):
        torch.testing.assert_close(fused_grad, naive_grad, atol=1e-5, rtol=1e-5)


def test_leading_batch_and_time_dims() -> None:
    batch, time = 2, 5
    hidden, weight, upstream = _leaves((batch, time, HIDDEN), (VOCAB, HIDDEN), (batch, time), seed=4)
    target_ids = torch.randint(0, VOCAB, (batch, time), generator=torch.Generator().manual_seed(5))
    fused = fused_logprobs(hidden, weight, target_ids, chunk_rows=CHUNK)
    naive = naive_logprobs(hidden, weight, target_ids)
    assert fused.shape == (batch, time)
    torch.testing.assert_close(fused, naive, atol=1e-5, rtol=1e-5)
    fused_grads = _grads((fused * upstream.detach()).sum(), [hidden, weight])
    naive_grads = _grads((naive * upstream.detach()).sum(), [hidden, weight])
    assert fused_grads[0].shape == (batch, time, HIDDEN)
    for fused_grad, naive_grad in zip(fused_grads, naive_grads, strict=True):
        torch.testing.assert_close(fused_grad, naive_grad, atol=1e-5, rtol=1e-5)


def test_masked_padding_rows_get_zero_grad_and_rest_match_naive() -> None:
    batch, time = 3, 7
    hidden, weight = _leaves((batch, time, HIDDEN), (VOCAB, HIDDEN), seed=6)
    target_ids = torch.randint(0, VOCAB, (batch, time), generator=torch.Generator().manual_seed(7))
    lengths = torch.tensor([7, 4, 1])
    action_mask = (torch.arange(time)[None, :] < lengths[:, None]).float()
    target_ids = torch.where(action_mask.bool(), target_ids, torch.zeros_like(target_ids))  # pad id 0

    fused = fused_logprobs(hidden, weight, target_ids, chunk_rows=4)
    naive = naive_logprobs(hidden, weight, target_ids)
    torch.testing.assert_close(fused, naive, atol=1e-5, rtol=1e-5)  # padded positions are still computed
    fused_grads = _grads((fused * action_mask).sum(), [hidden, weight])
    naive_grads = _grads((naive * action_mask).sum(), [hidden, weight])
    for fused_grad, naive_grad in zip(fused_grads, naive_grads, strict=True):
        torch.testing.assert_close(fused_grad, naive_grad, atol=1e-5, rtol=1e-5)
    padded = ~action_mask.bool()
    assert torch.count_nonzero(fused_grads[0][padded]) == 0
    assert torch.count_nonzero(fused_grads[0][~padded]) > 0


def test_tied_embedding_accumulates_both_contributions() -> None:
    torch.manual_seed(8)
    embedding = torch.nn.Embedding(VOCAB, HIDDEN)
    mixer = torch.nn.Linear(HIDDEN, HIDDEN)
    input_ids = torch.randint(0, VOCAB, (2, 6))
    target_ids = torch.randint(0, VOCAB, (2, 6))

    def tied_loss(logprob_fn) -> torch.Tensor:
        hidden = torch.tanh(mixer(embedding(input_ids)))
        return -logprob_fn(hidden, embedding.weight, target_ids).mean()

    tied_loss(lambda h, w, y: fused_logprobs(h, w, y, chunk_rows=5)).backward()
    fused_grad = embedding.weight.grad.clone()
    embedding.weight.grad = None
    tied_loss(naive_logprobs).backward()
    torch.testing.assert_close(fused_grad, embedding.weight.grad, atol=1e-5, rtol=1e-5)

    # The lm_head half alone must differ, otherwise the comparison above could not catch a dropped embedding term.
    hidden = torch.tanh(mixer(embedding(input_ids))).detach()
    (lm_head_only,) = _grads(-fused_logprobs(hidden, embedding.weight, target_ids).mean(), [embedding.weight])
    assert (fused_grad - lm_head_only)[input_ids.unique()].abs().max() > 1e-4


@pytest.mark.parametrize("temperature, with_bias", [(2.0, False), (0.7, True)])
def test_bf16_inputs_match_fp32_reference(temperature: float, with_bias: bool) -> None:
    hidden, weight, bias = _leaves((ROWS, HIDDEN), (VOCAB, HIDDEN), (VOCAB,), dtype=torch.bfloat16, seed=9)
    hidden_fp32, weight_fp32, bias_fp32 = (t.detach().float().requires_grad_() for t in (hidden, weight, bias))
    target_ids = torch.randint(0, VOCAB, (ROWS,), generator=torch.Generator().manual_seed(10))
    inputs, inputs_fp32 = ([hidden, weight, bias], [hidden_fp32, weight_fp32, bias_fp32])
    if not with_bias:
        inputs, inputs_fp32 = inputs[:2], inputs_fp32[:2]
    bias_arg, bias_fp32_arg = (bias, bias_fp32) if with_bias else (None, None)

    fused = fused_logprobs(hidden, weight, target_ids, bias=bias_arg, temperature=temperature, chunk_rows=CHUNK)
    naive = naive_logprobs(hidden_fp32, weight_fp32, target_ids, bias=bias_fp32_arg, temperature=temperature)
    assert fused.dtype == torch.float32
    torch.testing.assert_close(fused, naive.detach(), atol=2e-2, rtol=2e-2)
    upstream = torch.linspace(-1.0, 2.0, ROWS)
    fused_grads = _grads((fused * upstream).sum(), inputs)
    naive_grads = _grads((naive * upstream).sum(), inputs_fp32)
    for fused_grad, naive_grad in zip(fused_grads, naive_grads, strict=True):
        assert fused_grad.dtype == torch.bfloat16
        torch.testing.assert_close(fused_grad.float(), naive_grad, atol=2e-2, rtol=2e-2)


def test_without_fp32_cast_outputs_keep_the_input_dtype() -> None:
    hidden, weight = _leaves((ROWS, HIDDEN), (VOCAB, HIDDEN), seed=11)
    target_ids = torch.randint(0, VOCAB, (ROWS,), generator=torch.Generator().manual_seed(12))
    naive = naive_logprobs(hidden, weight, target_ids)

    fused_fp32 = fused_logprobs(hidden, weight, target_ids, chunk_rows=CHUNK, cast_logprobs_to_fp32=False)
    torch.testing.assert_close(fused_fp32, naive, atol=1e-5, rtol=1e-5)

    hidden_bf16, weight_bf16 = (t.detach().bfloat16().requires_grad_() for t in (hidden, weight))
    fused_bf16, entropy_bf16 = fused_logprobs(
        hidden_bf16, weight_bf16, target_ids, chunk_rows=CHUNK, cast_logprobs_to_fp32=False, return_entropy=True
    )
    assert fused_bf16.dtype == entropy_bf16.dtype == torch.bfloat16
    # Log-probs here are ~ -4 to -20, where one bf16 ulp is up to 0.125: compare relatively.
    torch.testing.assert_close(fused_bf16.float(), naive.detach(), atol=5e-2, rtol=3e-2)
    (grad_hidden,) = _grads(fused_bf16.sum(), [hidden_bf16])
    (naive_grad_hidden,) = _grads(naive.sum(), [hidden])
    torch.testing.assert_close(grad_hidden.float(), naive_grad_hidden, atol=5e-2, rtol=3e-2)


@pytest.mark.parametrize("temperature, with_bias", [(1.0, False), (0.5, True)])
def test_entropy_matches_naive_and_is_detached(temperature: float, with_bias: bool) -> None:
    hidden, weight, bias = _leaves((ROWS, HIDDEN), (VOCAB, HIDDEN), (VOCAB,), seed=13)
    target_ids = torch.randint(0, VOCAB, (ROWS,), generator=torch.Generator().manual_seed(14))
    bias_arg = bias if with_bias else None
    logprobs, entropy = fused_logprobs(
        hidden, weight, target_ids, bias=bias_arg, temperature=temperature, chunk_rows=CHUNK, return_entropy=True
    )
    expected = _naive_entropy(hidden, weight, bias_arg, temperature).float()
    torch.testing.assert_close(entropy, expected.detach(), atol=1e-5, rtol=1e-5)
    assert not entropy.requires_grad and logprobs.requires_grad
    torch.testing.assert_close(
        logprobs, naive_logprobs(hidden, weight, target_ids, bias=bias_arg, temperature=temperature)
    )


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_entropy_path_keeps_grads_exact(monkeypatch, dtype: torch.dtype, tolerance: float) -> None:
    """With entropy the tile is processed in blocks of vocabulary rows through a scratch buffer and must still end up
    holding exp(z - max): the last chunk's tile is handed to backward, so a wrong restore would corrupt its grads."""
    # Room for 2 * VOCAB values: a 3-row chunk goes through its vocabulary in two blocks.
    monkeypatch.setattr(logprobs_module, "ENTROPY_BLOCK_BYTES", 2 * VOCAB * 4)
    hidden, weight, bias = _leaves((ROWS, HIDDEN), (VOCAB, HIDDEN), (VOCAB,), dtype=dtype, seed=22)
    reference = [t.detach().float().requires_grad_() for t in (hidden, weight, bias)]
    target_ids = torch.randint(0, VOCAB, (ROWS,), generator=torch.Generator().manual_seed(23))
    upstream = torch.randn(ROWS, generator=torch.Generator().manual_seed(24))

    logprobs, entropy = fused_logprobs(
        hidden, weight, target_ids, bias=bias, temperature=0.9, chunk_rows=CHUNK, return_entropy=True
    )
    naive = naive_logprobs(*reference[:2], target_ids, bias=reference[2], temperature=0.9)
    torch.testing.assert_close(logprobs, naive, atol=tolerance, rtol=tolerance)
    expected_entropy = _naive_entropy(*reference[:2], reference[2], 0.9).float().detach()
    torch.testing.assert_close(entropy, expected_entropy, atol=tolerance, rtol=tolerance)
    fused_grads = _grads((logprobs * upstream).sum(), [hidden, weight, bias])
    naive_grads = _grads((naive * upstream).sum(), reference)
    for fused_grad, naive_grad in zip(fused_grads, naive_grads, strict=True):
        torch.testing.assert_close(fused_grad.float(), naive_grad, atol=tolerance, rtol=tolerance)


def test_second_backward_recomputes_every_chunk() -> None:
    """The forward hands its last tile to the first backward, which overwrites it; a second backward through the
    same graph (retain_graph=True) must not reuse it, and the first must release it."""
    hidden, weight, bias = _leaves((ROWS, HIDDEN), (VOCAB, HIDDEN), (VOCAB,), seed=25)
    target_ids = torch.randint(0, VOCAB, (ROWS,), generator=torch.Generator().manual_seed(26))
    fused = fused_logprobs(hidden, weight, target_ids, bias=bias, temperature=1.3, chunk_rows=CHUNK)
    node = fused.grad_fn.next_functions[0][0]  # the op's backward node, which is also its ctx
    assert node.last_tile is not None
    naive = naive_logprobs(hidden, weight, target_ids, bias=bias, temperature=1.3)
    expected = _grads(naive.sum(), [hidden, weight, bias])

    first = list(torch.autograd.grad(fused.sum(), [hidden, weight, bias], retain_graph=True))
    assert node.last_tile is None
    second = _grads(fused.sum(), [hidden, weight, bias])
    for first_grad, second_grad, naive_grad in zip(first, second, expected, strict=True):
        torch.testing.assert_close(first_grad, naive_grad, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(second_grad, naive_grad, atol=1e-5, rtol=1e-5)


class _OpRecorder(TorchDispatchMode):
    """Records (op name, output shapes) of every aten op run under it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, list[tuple[int, ...]]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        shapes = [tuple(t.shape) for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        self.calls.append((func.overloadpacket.__name__, shapes))
        return out

    def matmuls(self) -> int:
        return sum(name in {"mm", "addmm", "addmm_"} for name, _ in self.calls)


@pytest.mark.parametrize("trainable", ["weight", "bias", "none"])
def test_matmuls_and_weight_sized_work_in_backward(trainable: str) -> None:
    """Frozen lm_head: backward is one multiply, no matmul and no (V, H) tensor. A trainable bias alone still takes
    the recompute path but computes no weight gradient. Trainable weight: 3 matmuls per chunk less the one
    recompute saved by the forward's last tile."""
    rows, chunk = 11, 3  # 4 chunks: 3, 3, 3, 2
    hidden, weight, bias = _leaves((rows, HIDDEN), (VOCAB, HIDDEN), (VOCAB,), seed=27)
    weight.requires_grad_(trainable == "weight")
    bias.requires_grad_(trainable == "bias")
    target_ids = torch.randint(0, VOCAB, (rows,), generator=torch.Generator().manual_seed(28))
    with _OpRecorder() as forward_ops:
        fused = fused_logprobs(hidden, weight, target_ids, bias=bias, chunk_rows=chunk)
    with _OpRecorder() as backward_ops:
        fused.sum().backward()

    num_chunks = 4
    expected_backward = {"weight": 3 * num_chunks - 1, "bias": 2 * num_chunks - 1, "none": 0}[trainable]
    assert forward_ops.matmuls() == (2 if trainable == "none" else 1) * num_chunks
    assert backward_ops.matmuls() == expected_backward
    weight_sized = [name for name, shapes in backward_ops.calls if (VOCAB, HIDDEN) in shapes]
    assert bool(weight_sized) == (trainable == "weight"), weight_sized
    assert (weight.grad is not None) == (trainable == "weight")
    assert hidden.grad is not None
    naive_hidden = hidden.detach().requires_grad_()
    (expected,) = _grads(
        naive_logprobs(naive_hidden, weight.detach(), target_ids, bias=bias.detach()).sum(), [naive_hidden]
    )
    torch.testing.assert_close(hidden.grad, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num_rows, chunk_rows", [(10, 3), (5, 7), (1, 1), (7, 1), (100, 63)])
def test_small_chunks_are_contiguous_and_balanced(num_rows: int, chunk_rows: int) -> None:
    bounds = _chunk_bounds(num_rows, chunk_rows)
    sizes = [end - start for start, end in bounds]
    assert bounds[0][0] == 0 and bounds[-1][1] == num_rows
    assert all(prev[1] == nxt[0] for prev, nxt in zip(bounds[:-1], bounds[1:], strict=True))
    assert len(bounds) == -(-num_rows // chunk_rows)
    assert max(sizes) <= chunk_rows and max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    assert _chunk_bounds(0, chunk_rows) == []


@pytest.mark.parametrize(
    "num_rows, chunk_rows, expected_sizes",
    [
        (8192, 1024, [1024] * 8),
        (8200, 1024, [912] * 8 + [904]),  # not nine chunks of 911-912: odd row counts slow the matmuls
        (1025, 1024, [528, 497]),
        (500, 100, [100] * 5),  # rounding up would pass C, so C it is
        (130, 64, [48, 48, 34]),
        (64, 64, [64]),
    ],
)
def test_large_chunks_are_aligned_and_near_equal(num_rows: int, chunk_rows: int, expected_sizes: list[int]) -> None:
    bounds = _chunk_bounds(num_rows, chunk_rows)
    assert [end - start for start, end in bounds] == expected_sizes
    assert bounds[0][0] == 0 and bounds[-1][1] == num_rows
    assert all(prev[1] == nxt[0] for prev, nxt in zip(bounds[:-1], bounds[1:], strict=True))


@pytest.mark.parametrize(
    "num_rows, chunk_rows, last_rows, expected_sizes",
    [(8192, 1024, 1536, [960] * 6 + [896, 1536]), (10, 3, 4, [3, 3, 4]), (11, 3, 4, [3, 2, 2, 4]), (3, 3, 4, [3])],
)
def test_chunk_bounds_with_a_larger_last_chunk(
    num_rows: int, chunk_rows: int, last_rows: int, expected_sizes: list[int]
) -> None:
    bounds = _chunk_bounds(num_rows, chunk_rows, last_rows)
    assert [end - start for start, end in bounds] == expected_sizes
    assert bounds[0][0] == 0 and bounds[-1][1] == num_rows
    assert all(prev[1] == nxt[0] for prev, nxt in zip(bounds[:-1], bounds[1:], strict=True))
    assert _chunk_bounds(0, chunk_rows, last_rows) == []


@pytest.mark.parametrize("case", ["weight grad", "no_grad", "frozen head"])
def test_last_chunk_grows_only_when_its_tile_saves_a_recompute(case: str) -> None:
    """With a recompute backward ahead the last chunk gets 1.5 C rows, so the backward recomputes N - 1.5 C rows
    and gets the same grads; without one (no_grad, or the frozen-head path) every tile stays at C rows."""
    rows, hidden_size, vocab, chunk = 64, 8, 200, 4  # a (4, V) tile outsizes every (N, H) tensor
    hidden, weight = _leaves((rows, hidden_size), (vocab, hidden_size), seed=29)
    weight.requires_grad_(case == "weight grad")
    target_ids = torch.randint(0, vocab, (rows,), generator=torch.Generator().manual_seed(30))
    with _LargestTensorMode() as forward_mode, torch.set_grad_enabled(case != "no_grad"):
        fused = fused_logprobs(hidden, weight, target_ids, chunk_rows=chunk)
    grown_rows = 6  # 1.5 C
    tile_rows = grown_rows if case == "weight grad" else chunk
    assert forward_mode.max_numel == tile_rows * vocab  # the flat tile buffer is the largest tensor made
    if case == "no_grad":
        return
    with _OpRecorder() as backward_ops:
        fused.sum().backward()
    # Recomputed tiles are the (V, c) matmul outputs other than the (V, H) weight gradient.
    recomputed = [shapes[0] for name, shapes in backward_ops.calls if name == "addmm_" and shapes[0][0] == vocab]
    recomputed_rows = sum(cols for _, cols in recomputed if cols != hidden_size)
    assert recomputed_rows == (rows - grown_rows if case == "weight grad" else 0)
    naive_hidden, naive_weight = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
    naive_grads = _grads(naive_logprobs(naive_hidden, naive_weight, target_ids).sum(), [naive_hidden, naive_weight])
    torch.testing.assert_close(hidden.grad, naive_grads[0], atol=1e-5, rtol=1e-5)
    if case == "weight grad":
        torch.testing.assert_close(weight.grad, naive_grads[1], atol=1e-5, rtol=1e-5)


def test_grad_only_for_inputs_that_require_it() -> None:
    hidden, weight = _leaves((ROWS, HIDDEN), (VOCAB, HIDDEN), seed=15)
    target_ids = torch.randint(0, VOCAB, (ROWS,), generator=torch.Generator().manual_seed(16))
    frozen_weight, frozen_hidden = weight.detach(), hidden.detach()

    (grad_hidden,) = _grads(fused_logprobs(hidden, frozen_weight, target_ids, chunk_rows=CHUNK).sum(), [hidden])
    (expected_hidden,) = _grads(naive_logprobs(hidden, frozen_weight, target_ids).sum(), [hidden])
    torch.testing.assert_close(grad_hidden, expected_hidden, atol=1e-5, rtol=1e-5)

    (grad_weight,) = _grads(fused_logprobs(frozen_hidden, weight, target_ids, chunk_rows=CHUNK).sum(), [weight])
    (expected_weight,) = _grads(naive_logprobs(frozen_hidden, weight, target_ids).sum(), [weight])
    torch.testing.assert_close(grad_weight, expected_weight, atol=1e-5, rtol=1e-5)

    with torch.no_grad():
        assert not fused_logprobs(hidden, weight, target_ids).requires_grad


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("return_entropy", [False, True])
def test_frozen_head_path_matches_naive(dtype: torch.dtype, tolerance: float, return_entropy: bool) -> None:
    hidden, weight, bias, upstream = _leaves((ROWS, HIDDEN), (VOCAB, HIDDEN), (VOCAB,), (ROWS,), dtype=dtype, seed=20)
    frozen_weight, frozen_bias = weight.detach(), bias.detach()
    hidden_fp32 = hidden.detach().float().requires_grad_()
    target_ids = torch.randint(0, VOCAB, (ROWS,), generator=torch.Generator().manual_seed(21))
    kwargs = {"bias": frozen_bias, "temperature": 0.8}

    outputs = fused_logprobs(
        hidden, frozen_weight, target_ids, chunk_rows=CHUNK, return_entropy=return_entropy, **kwargs
    )
    fused = outputs[0] if return_entropy else outputs
    op_node = fused.grad_fn.next_functions[0][0]  # under the reshape back to the leading shape
    (saved,) = op_node.saved_tensors  # only d logp / d hidden: the frozen-head strategy was taken
    assert saved.shape == (ROWS, HIDDEN)
    naive = naive_logprobs(hidden_fp32, frozen_weight.float(), target_ids, bias=frozen_bias.float(), temperature=0.8)
    torch.testing.assert_close(fused, naive, atol=tolerance, rtol=tolerance)
    if return_entropy:
        expected = _naive_entropy(hidden_fp32, frozen_weight, frozen_bias, 0.8).float()
        torch.testing.assert_close(outputs[1], expected.detach(), atol=tolerance, rtol=tolerance)
    (grad_hidden,) = _grads((fused * upstream.detach().float()).sum(), [hidden])
    (expected_grad,) = _grads((naive * upstream.detach().float()).sum(), [hidden_fp32])
    assert grad_hidden.dtype == dtype
    torch.testing.assert_close(grad_hidden.float(), expected_grad, atol=tolerance, rtol=tolerance)


def test_zero_rows_forward_and_backward() -> None:
    hidden, weight = _leaves((0, 4, HIDDEN), (VOCAB, HIDDEN), seed=17)
    target_ids = torch.zeros(0, 4, dtype=torch.long)
    logprobs, entropy = fused_logprobs(hidden, weight, target_ids, chunk_rows=CHUNK, return_entropy=True)
    assert logprobs.shape == entropy.shape == (0, 4)
    grad_hidden, grad_weight = _grads(logprobs.sum(), [hidden, weight])
    assert grad_hidden.shape == hidden.shape
    assert torch.equal(grad_weight, torch.zeros_like(weight))


class _LargestTensorMode(TorchDispatchMode):
    """Records the largest tensor any aten op returns, in forward and backward, temporaries included."""

    def __init__(self) -> None:
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in torch.utils._pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self.max_numel = max(self.max_numel, tensor.numel())
        return out


def _largest_tensor_and_saved(logprob_fn, hidden, weight, target_ids) -> tuple[int, int]:
    largest_saved = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal largest_saved
        largest_saved = max(largest_saved, tensor.numel())
        return tensor

    with _LargestTensorMode() as mode, torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        logprob_fn(hidden, weight, target_ids).sum().backward()
    return mode.max_numel, largest_saved


@pytest.mark.parametrize("frozen_head", [False, True])
def test_full_logits_are_never_materialised(frozen_head: bool) -> None:
    rows, hidden_size, vocab, chunk = 64, 8, 50, 4
    hidden, weight = _leaves((rows, hidden_size), (vocab, hidden_size), seed=18)
    weight.requires_grad_(not frozen_head)
    target_ids = torch.randint(0, vocab, (rows,))
    # Every legitimate tensor (a tile, the grads, the inputs) is far smaller than one full (N, V) logits tensor.
    allowed = max(chunk * vocab, vocab * hidden_size, rows * hidden_size)
    assert allowed < rows * vocab // 4

    naive_largest, naive_saved = _largest_tensor_and_saved(naive_logprobs, hidden, weight, target_ids)
    assert naive_largest >= rows * vocab and naive_saved >= rows * vocab  # the probe does see full logits

    def fused(h, w, y):
        return fused_logprobs(h, w, y, chunk_rows=chunk, return_entropy=True)[0]

    fused_largest, fused_saved = _largest_tensor_and_saved(fused, hidden, weight, target_ids)
    assert fused_largest <= allowed
    assert fused_saved <= allowed


def test_gradcheck_float64() -> None:
    hidden, weight, bias = _leaves((5, 3), (7, 3), (7,), dtype=torch.float64, seed=19)
    target_ids = torch.tensor([0, 6, 3, 3, 1])

    def fn(h, w, b):
        return fused_logprobs(h, w, target_ids, bias=b, temperature=0.8, chunk_rows=2)

    assert torch.autograd.gradcheck(fn, (hidden, weight, bias))
    frozen_weight, frozen_bias = weight.detach(), bias.detach()
    assert torch.autograd.gradcheck(lambda h: fn(h, frozen_weight, frozen_bias), (hidden,))


def test_auto_chunk_rows() -> None:
    assert auto_chunk_rows(32768) * 32768 * 4 == 128 * 2**20
    assert auto_chunk_rows(32768, budget_bytes=256 * 2**20) == 2048
    assert auto_chunk_rows(37, budget_bytes=4 * 37 * 3 + 5) == 3
    assert auto_chunk_rows(10**9) == 1
    with pytest.raises(ValueError, match="vocab_size"):
        auto_chunk_rows(0)


def test_bad_inputs_name_the_argument() -> None:
    hidden, weight = torch.randn(4, HIDDEN), torch.randn(VOCAB, HIDDEN)
    target_ids = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="share H"):
        fused_logprobs(hidden, weight.T, target_ids)
    with pytest.raises(ValueError, match="target_ids"):
        fused_logprobs(hidden, weight, target_ids[:3])
    with pytest.raises(ValueError, match="int64"):
        fused_logprobs(hidden, weight, target_ids.int())
    with pytest.raises(ValueError, match="temperature"):
        fused_logprobs(hidden, weight, target_ids, temperature=0.0)
    with pytest.raises(ValueError, match="chunk_rows"):
        fused_logprobs(hidden, weight, target_ids, chunk_rows=0)
    with pytest.raises(ValueError, match="dtype"):
        fused_logprobs(hidden.bfloat16(), weight, target_ids)


def test_benchmark_quick_run_prints_table() -> None:
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "logprobs.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert "variant" in result.stdout and "peak extra MB" in result.stdout
    assert "fused" in result.stdout and "naive" in result.stdout
    assert "target" in result.stdout
