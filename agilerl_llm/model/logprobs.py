"""Per-token log-probabilities of target ids, fused with the lm_head and computed in row chunks.

Policy-gradient losses (GRPO, PPO, DPO) need ``log pi(y_n | context_n)`` for one token per position, but the
textbook recipe ``log_softmax(hidden @ W.T).gather(...)`` materialises an (N, V) logits tensor, an (N, V)
log-softmax and, in backward, two more (N, V) gradients. At N = 8k tokens and V = 150k one such tensor is
~5 GB in fp32, more than a small policy. ``fused_logprobs`` gives the same values and gradients while only
ever holding one (C, V) tile: the forward keeps O(N) statistics (the log-normaliser), and the backward
recomputes each chunk's logits from the saved hidden states and weight.

Math, per row n with temperature tau and optional bias b::

    z_n       = (W h_n + b) / tau                             (V,)
    lse_n     = log sum_v exp(z_nv)
    logp_n    = z_n[y_n] - lse_n
    entropy_n = lse_n - sum_v softmax(z_n)_v z_nv             (returned detached: a metric)

Backward, for the upstream gradient g_n = dL/dlogp_n::

    dL/dz_n = g_n (onehot(y_n) - softmax(z_n))                (V,)
    dL/dh_n = (dL/dz_n / tau) W                               (H,)
    dL/dW   = sum_n (dL/dz_n / tau)^T h_n                     (V, H)
    dL/db   = sum_n dL/dz_n / tau                             (V,)

Cost, in (N, H) x (H, V) matmuls: forward alone is one, like the naive path. Forward + backward with a trainable
lm_head is 4 - L/N instead of 3: each chunk's logits are computed again in backward, except the last chunk's (L
rows), whose softmax tile is still in memory when the forward ends and is handed to the backward as its working
tile. That chunk is made 1.5x larger (L = 1.5 C where N allows), which saves recomputing those rows for a tile 1.5x
the size. That recompute is the price of never holding (N, V); the (N, V)
allocations and passes it saves pay most of it back. With a frozen lm_head (LoRA: only ``hidden`` needs grad) the
forward, which holds each chunk's softmax anyway, also writes d logp / d hidden (N, H), so backward is one multiply
and the total is two matmuls, as in the naive path.

Dtypes: with ``cast_logprobs_to_fp32=True`` (the default) the log-softmax, the returned log-probs and the
entropy are float32 (float64 inputs stay float64) whatever the input dtype, because the policy-gradient ratio
``exp(logp - old_logp)`` is too coarse in bf16. Matmuls always run in the input dtype; grad_weight is
accumulated in float32 across chunks and cast back to the weight's dtype once.

Notation::

    N  token rows: every leading dim of ``hidden`` flattened (e.g. N = B * T)
    H  hidden size
    V  vocabulary size
    C  rows per chunk (``chunk_rows``); K = ceil(N / C) chunks of near-equal size (see ``_chunk_bounds``)

The tile is stored vocab-major, (V, c) for a chunk of c <= C rows (see ``_Tiles``); sizes below say (C, V) for its
extent only.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

DEFAULT_TILE_BUDGET_BYTES = 128 * 2**20
"""One fp32 (C, V) logits tile is kept near this size. 128 MiB keeps each matmul large enough to run at full
speed on CPU and GPU (C = 1024 rows at V = 32k) while the tile stays under 1/8 of the naive path's memory."""

HANDED_OVER_ROWS_FACTOR = 1.5
"""When a backward with recomputation will follow, the last chunk gets up to this many times C rows. Its tile is
handed from the forward to the backward, so every extra row there is one row the backward does not recompute; the
price is a tile this much larger. 1.5 keeps the forward+backward peak (this tile plus the weight and hidden
gradients) under 1/8 of the naive path's at N = 8192, V = 32768 while saving a sixteenth of the recomputation."""

ROW_ALIGNMENT = 16
"""Chunk sizes are rounded to a multiple of this many rows. A tile's row count is the leading dimension of every
matmul on it, and on the CPU an odd one is slow: at V = 32768, H = 1024, 2 threads, the forward matmul of a
951-row chunk ran at 161 GFLOP/s, of a 960-row one at 197 and of a 1024-row one at 207."""

ALIGNED_FROM_CHUNK_ROWS = 4 * ROW_ALIGNMENT
"""Below this C, rounding would unbalance the chunks more than alignment is worth."""

ENTROPY_BLOCK_BYTES = 2 * 2**20
"""Entropy needs z - max and exp(z - max) side by side; it works through each tile in row blocks of about this
size (cache-sized) with one small scratch buffer, instead of a second full tile."""


def auto_chunk_rows(vocab_size: int, budget_bytes: int = DEFAULT_TILE_BUDGET_BYTES) -> int:
    """Rows per chunk so that one fp32 (rows, V) logits tile takes about ``budget_bytes``.

    Args:
        vocab_size: V, the number of lm_head output rows.
        budget_bytes: memory for one fp32 logits tile.

    Returns:
        C >= 1. With bf16 inputs and the fp32 cast, the op also holds one half-size (C, V) bf16 buffer.
    """
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}; pass weight.shape[0] of the lm_head.")
    if budget_bytes < 1:
        raise ValueError(f"budget_bytes must be >= 1, got {budget_bytes}; it is the size of one fp32 (C, V) tile.")
    return max(1, budget_bytes // (4 * vocab_size))


def naive_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target_ids: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Obviously-correct reference: full fp32 logits, ``log_softmax``, ``gather``. Used by tests and benchmarks.

    Args:
        hidden: (..., H) final hidden states.
        weight: (V, H) lm_head weight.
        target_ids: (...) int64 ids in [0, V).
        bias: (V,) optional lm_head bias.
        temperature: logits are divided by it before the softmax.

    Returns:
        (...) float32 log-probabilities (float64 for float64 inputs).
    """
    compute_dtype = torch.promote_types(hidden.dtype, torch.float32)
    logits = hidden.to(compute_dtype) @ weight.to(compute_dtype).T
    if bias is not None:
        logits = logits + bias.to(compute_dtype)
    if temperature != 1.0:
        logits = logits / temperature
    return torch.log_softmax(logits, dim=-1).gather(-1, target_ids.unsqueeze(-1)).squeeze(-1)


def fused_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target_ids: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_rows: int | None = None,
    cast_logprobs_to_fp32: bool = True,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of ``target_ids`` under ``softmax((hidden @ weight.T + bias) / temperature)``.

    Never materialises the (N, V) logits, in forward or backward; see the module docstring for the math.
    Gradients flow to ``hidden``, ``weight`` and ``bias``, each only if it requires grad, so a frozen
    (or tied) lm_head costs no grad_weight work. Padding positions are computed like any other row (their
    id must still be in [0, V)); mask them out of the loss afterwards.

    Memory: one (C, V) tile (plus a half-size one for bf16 inputs with the fp32 cast) while it runs. When a
    backward with recomputation will follow (a trainable lm_head or bias), the last chunk has up to 1.5 C rows and
    the tile is sized for it; that tile stays alive until the backward (which reuses it instead of recomputing that
    chunk) or until the graph is freed. With a frozen lm_head an (N, H) gradient is kept instead.

    Args:
        hidden: (..., H) final hidden states (after the final norm).
        weight: (V, H) lm_head weight, same dtype and device as ``hidden``; may be tied to the input embedding.
        target_ids: (...) int64 ids in [0, V), same leading shape as ``hidden``.
        bias: (V,) optional lm_head bias.
        temperature: > 0; logits are divided by it, as in sampling.
        chunk_rows: C, the most rows per chunk; None -> ``auto_chunk_rows(V)``. The N rows are split into
            ceil(N / C) chunks of near-equal size, so no chunk is a sliver. When a backward with
            recomputation follows, the last chunk gets up to 1.5 C rows (see ``HANDED_OVER_ROWS_FACTOR``).
        cast_logprobs_to_fp32: True -> softmax statistics and outputs in float32 (float64 stays float64);
            False -> everything in the input dtype (cheaper, coarse in bf16).
        return_entropy: also return the per-row entropy of the tempered distribution, detached.

    Returns:
        logprobs (...), and entropy (...) when ``return_entropy``; float32 when ``cast_logprobs_to_fp32``,
        else ``hidden.dtype``.
    """
    _check_inputs(hidden, weight, target_ids, bias, temperature, chunk_rows)
    hidden_size = hidden.shape[-1]
    rows = chunk_rows if chunk_rows is not None else auto_chunk_rows(weight.shape[0])
    backward = _backward_path(hidden, weight, bias)
    outputs = _FusedLogprobs.apply(
        hidden.reshape(-1, hidden_size),
        weight,
        bias,
        target_ids.reshape(-1),
        float(temperature),
        rows,
        int(rows * HANDED_OVER_ROWS_FACTOR) if backward == "recompute" else None,
        cast_logprobs_to_fp32,
        return_entropy,
        backward == "frozen_head",
    )
    if return_entropy:
        logprobs, entropy = outputs
        return logprobs.view(target_ids.shape), entropy.view(target_ids.shape)
    return outputs.view(target_ids.shape)


def _backward_path(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> str | None:
    """The backward the op must prepare for: None when autograd will not record it (``torch.no_grad()``, or no
    input requires grad), "frozen_head" when only ``hidden`` needs a grad (LoRA under a frozen lm_head), else
    "recompute". Decided here because inside the autograd function grad mode is always off and
    ``needs_input_grad`` ignores ``torch.no_grad()``."""
    head_needs_grad = weight.requires_grad or (bias is not None and bias.requires_grad)
    if not torch.is_grad_enabled() or not (hidden.requires_grad or head_needs_grad):
        return None
    return "recompute" if head_needs_grad else "frozen_head"


def _check_inputs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target_ids: torch.Tensor,
    bias: torch.Tensor | None,
    temperature: float,
    chunk_rows: int | None,
) -> None:
    """Raise at the boundary with the argument name and the fix; the hot loop assumes all of this."""
    if hidden.dim() < 1 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden (..., H) and weight (V, H) must share H; got hidden {tuple(hidden.shape)} and weight "
            f"{tuple(weight.shape)}. Pass the lm_head weight, not its transpose."
        )
    if target_ids.shape != hidden.shape[:-1]:
        raise ValueError(
            f"target_ids must have hidden's leading shape {tuple(hidden.shape[:-1])}, got {tuple(target_ids.shape)}."
        )
    if target_ids.dtype != torch.int64:
        raise ValueError(f"target_ids must be int64 (torch.long), got {target_ids.dtype}; use target_ids.long().")
    if hidden.dtype != weight.dtype or hidden.device != weight.device:
        raise ValueError(
            f"hidden ({hidden.dtype}, {hidden.device}) and weight ({weight.dtype}, {weight.device}) must share dtype "
            "and device; cast hidden to the lm_head's dtype first."
        )
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must have shape (V,) = {tuple(weight.shape[:1])}, got {tuple(bias.shape)}.")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}; use 1.0 for the untempered distribution.")
    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1 or None (auto), got {chunk_rows}.")


def _compute_dtype(input_dtype: torch.dtype, cast_logprobs_to_fp32: bool) -> torch.dtype:
    """Dtype of the logits tile and of the softmax statistics."""
    return torch.promote_types(input_dtype, torch.float32) if cast_logprobs_to_fp32 else input_dtype


def _chunk_bounds(num_rows: int, chunk_rows: int, last_rows: int | None = None) -> list[tuple[int, int]]:
    """[start, end) of ceil(N / C) chunks of near-equal size, largest first.

    Near-equal chunks instead of C, C, ..., remainder, so that no chunk is a sliver whose matmul runs far below
    speed. From C >= ``ALIGNED_FROM_CHUNK_ROWS`` every chunk but the last also has a multiple of ``ROW_ALIGNMENT``
    rows (unless that would exceed C): N = 8200 at C = 1024 gives eight chunks of 912 rows and one of 904, not
    nine of 911-912. Below that the sizes differ by at most one row.

    ``last_rows``: the last chunk takes min(N, last_rows) rows and the rest is split as above (the recompute
    path's handed-over tile; see ``HANDED_OVER_ROWS_FACTOR``).
    """
    if num_rows == 0:
        return []
    if last_rows is not None:
        tail = min(num_rows, last_rows)
        return [*_chunk_bounds(num_rows - tail, chunk_rows), (num_rows - tail, num_rows)]
    num_chunks = -(-num_rows // chunk_rows)
    if chunk_rows >= ALIGNED_FROM_CHUNK_ROWS:
        even_rows = -(-num_rows // num_chunks)
        size = min(chunk_rows, -(-even_rows // ROW_ALIGNMENT) * ROW_ALIGNMENT)
        return [(start, min(start + size, num_rows)) for start in range(0, num_rows, size)]
    base, extra = divmod(num_rows, num_chunks)
    bounds, start = [], 0
    for index in range(num_chunks):
        end = start + base + (1 if index < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


def _largest_chunk(bounds: list[tuple[int, int]]) -> int:
    """Rows of the largest chunk (0 for no chunks): the tile buffers are sized to it."""
    return max((end - start for start, end in bounds), default=0)


class _Tiles:
    """Reused flat buffers that hold one chunk's logits as a vocab-major (V, c) tile, for chunks of up to
    ``max_rows`` rows (the largest chunk).

    Vocab-major, because ``weight @ hidden_chunk.T`` writes a (V, c) product 8-17% faster on the CPU than
    ``hidden_chunk @ weight.T`` writes the (c, V) one, and every later matmul reads the tile at full speed in
    either orientation. Flat buffers, so that a chunk of c < C rows still gets a contiguous (V, c) view (a
    ``[:, :c]`` slice of a (V, C) tile would not be a valid ``out=``). Reusing them matters on the CPU: a fresh
    multi-hundred-MB allocation per chunk is page-faulted in again every time.

    ``low_precision``: CPU has no mixed-dtype matmul, so for inputs narrower than the softmax dtype (bf16 with the
    fp32 cast) a second, half-size buffer in the matmul dtype takes the products and the cast-down gradients.
    """

    def __init__(self, vocab_size: int, max_rows: int, dtype: torch.dtype, matmul_dtype: torch.dtype, device) -> None:
        self.vocab_size = vocab_size
        self.buffer = torch.empty(vocab_size * max_rows, dtype=dtype, device=device)
        self.low_precision_buffer = (
            None if matmul_dtype == dtype else torch.empty(vocab_size * max_rows, dtype=matmul_dtype, device=device)
        )

    def tile(self, rows: int) -> torch.Tensor:
        """The (V, rows) softmax-dtype tile."""
        return self.buffer[: self.vocab_size * rows].view(self.vocab_size, rows)

    def low_precision(self, rows: int) -> torch.Tensor | None:
        """The (V, rows) matmul-dtype tile, or None when the matmuls run in the softmax dtype."""
        if self.low_precision_buffer is None:
            return None
        return self.low_precision_buffer[: self.vocab_size * rows].view(self.vocab_size, rows)


def _scaled_logits_into(
    tiles: _Tiles,
    hidden_chunk: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    temperature: float,
    shift: torch.Tensor | None = None,
) -> torch.Tensor:
    """The (V, c) tile holding z^T = (weight @ hidden_chunk.T + bias) / temperature, less ``shift[None, :]`` if given.

    Bias and 1/temperature ride in the matmul's beta/alpha, so they cost no extra pass over the tile. The backward
    knows each row's log-normaliser before it recomputes the logits, so it passes it as ``shift``: the tile is first
    filled with bias / tau - shift (a write-only pass) and the matmul accumulates onto it, instead of a matmul
    followed by a read-modify-write pass.
    """
    rows = hidden_chunk.shape[0]
    tile, low_precision = tiles.tile(rows), tiles.low_precision(rows)
    inverse_temperature = 1.0 / temperature
    if low_precision is None:
        if shift is not None:
            if bias is None:
                tile.copy_(shift[None, :].neg().expand(tile.shape))
            else:
                torch.sub(bias.to(tile.dtype)[:, None] * inverse_temperature, shift[None, :], out=tile)
            tile.addmm_(weight, hidden_chunk.T, alpha=inverse_temperature)
        elif bias is not None:
            column = bias.to(tile.dtype)[:, None]  # (V, 1): a no-op cast unless the bias has its own dtype
            torch.addmm(column, weight, hidden_chunk.T, beta=inverse_temperature, alpha=inverse_temperature, out=tile)
        elif temperature != 1.0:
            torch.addmm(tile, weight, hidden_chunk.T, beta=0.0, alpha=inverse_temperature, out=tile)
        else:
            torch.mm(weight, hidden_chunk.T, out=tile)
        return tile
    # The low-precision product is upcast before any softmax work.
    tile.copy_(torch.mm(weight, hidden_chunk.T, out=low_precision))
    if bias is not None:
        tile.add_(bias[:, None])
    if temperature != 1.0:
        tile.mul_(inverse_temperature)
    if shift is not None:
        tile.sub_(shift[None, :])
    return tile


def _exp_and_entropy_(shifted: torch.Tensor, scratch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Overwrite ``shifted`` (V, c), holding s = z^T - max, with e = exp(s); return (sum_v e, entropy), each (c,).

    entropy = lse - E_p[z] = log(sum e) - sum(e * s) / sum(e). The two factors are needed at once, so the tile is
    processed in blocks of vocabulary rows through ``scratch`` (a flat buffer): each block stays in cache and no
    second tile exists.
    """
    vocab_size, num_rows = shifted.shape
    block_vocab = max(1, scratch.numel() // max(num_rows, 1))
    sum_exp = torch.zeros(num_rows, dtype=shifted.dtype, device=shifted.device)
    weighted = torch.zeros_like(sum_exp)
    for start in range(0, vocab_size, block_vocab):
        end = min(start + block_vocab, vocab_size)
        block = shifted[start:end]
        exp_block = torch.exp(block, out=scratch[: block.numel()].view(block.shape))
        sum_exp += exp_block.sum(dim=0)
        weighted += block.mul_(exp_block).sum(dim=0)
        block.copy_(exp_block)
    return sum_exp, sum_exp.log() - weighted / sum_exp


def _unit_grad_hidden_into(
    out: torch.Tensor,
    exp_shifted: torch.Tensor,
    low_precision: torch.Tensor | None,
    sum_exp: torch.Tensor,
    target_ids: torch.Tensor,
    weight: torch.Tensor,
    temperature: float,
) -> None:
    """Write d logp_n / d h_n = (onehot(y_n) - softmax(z_n)) W / tau for a chunk into ``out`` (c, H).

    ``exp_shifted`` (V, c) holds e = exp(z^T - max) and is overwritten. With S = sum_v e, the row is
    (onehot - e / S) W / tau = -(e - S onehot) W / (S tau): the one-hot goes into the tile as -S at y (c values)
    and the row scale is applied to the (c, H) product, so no pass over the tile scales it. The upstream gradient
    g_n only scales this row, so with a frozen lm_head the whole backward becomes ``g[:, None] * out``.
    """
    exp_shifted.scatter_add_(0, target_ids[None, :], sum_exp[None, :].neg())
    row_scale = -1.0 / (temperature * sum_exp)
    if low_precision is None:
        torch.mm(exp_shifted.T, weight, out=out).mul_(row_scale[:, None])
    else:  # the cast down to the matmul dtype is a pass anyway; the row scale rides in it
        torch.mm(torch.mul(exp_shifted, row_scale[None, :], out=low_precision).T, weight, out=out)


class _FusedLogprobs(torch.autograd.Function):
    """Autograd op on flattened inputs: hidden (N, H), weight (V, H), bias (V,) | None, target_ids (N,).

    Two backward strategies, picked in forward by ``frozen_head``:
      * recompute (default): save hidden, weight and lse (N,); backward recomputes each tile except the last
        chunk's, which the forward leaves on ``ctx`` as softmax numerators. Matmuls: 1 forward + up to 3 backward,
        less one recompute.
      * frozen head (only hidden needs grad, e.g. LoRA under a frozen lm_head): forward, which holds the softmax
        anyway, also writes d logp / d hidden (N, H); backward is one multiply. Matmuls: 2 forward + 0 backward.
    """

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        target_ids: torch.Tensor,
        temperature: float,
        chunk_rows: int,
        last_rows: int | None,
        cast_logprobs_to_fp32: bool,
        return_entropy: bool,
        frozen_head: bool,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        num_rows, vocab_size = hidden.shape[0], weight.shape[0]
        bounds = _chunk_bounds(num_rows, chunk_rows, last_rows)
        tile_rows = _largest_chunk(bounds)
        compute_dtype = _compute_dtype(hidden.dtype, cast_logprobs_to_fp32)
        logprobs = torch.empty(num_rows, dtype=compute_dtype, device=hidden.device)
        log_normaliser = torch.empty_like(logprobs)
        entropy = torch.empty_like(logprobs) if return_entropy else None
        unit_grad_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if frozen_head else None
        tiles = _Tiles(vocab_size, tile_rows, compute_dtype, hidden.dtype, hidden.device)
        scratch = None
        if entropy is not None:
            scratch_size = min(ENTROPY_BLOCK_BYTES // tiles.buffer.element_size(), tiles.buffer.numel())
            scratch = torch.empty(max(scratch_size, tile_rows, 1), dtype=compute_dtype, device=hidden.device)
        sum_exp = None
        for start, end in bounds:
            targets = target_ids[None, start:end]
            logits = _scaled_logits_into(tiles, hidden[start:end], weight, bias, temperature)  # (V, c)
            target_logits = logits.gather(0, targets).squeeze(0)
            max_logits = logits.amax(dim=0, keepdim=True)
            exp_shifted = logits.sub_(max_logits)  # in place: z - max <= 0, so exp cannot overflow
            if entropy is None:
                sum_exp = exp_shifted.exp_().sum(dim=0)
            else:
                sum_exp, entropy[start:end] = _exp_and_entropy_(exp_shifted, scratch)
            log_normaliser[start:end] = max_logits.squeeze(0) + sum_exp.log()
            logprobs[start:end] = target_logits - log_normaliser[start:end]
            if unit_grad_hidden is not None:
                _unit_grad_hidden_into(
                    unit_grad_hidden[start:end],
                    exp_shifted,
                    tiles.low_precision(end - start),
                    sum_exp,
                    target_ids[start:end],
                    weight,
                    temperature,
                )
        del scratch

        ctx.frozen_head = frozen_head
        ctx.temperature = temperature
        ctx.bounds = bounds
        ctx.last_tile = None
        if frozen_head:
            ctx.save_for_backward(unit_grad_hidden)
        else:
            ctx.save_for_backward(hidden, weight, bias, target_ids, log_normaliser)
            if bounds:
                # The tile now holds exp(z - max) of the last chunk: softmax = that / sum_exp. Kept as a plain
                # attribute, not a saved tensor, because backward reuses (overwrites) it as its working tile.
                # Autograd drops ctx, and with it the tile, as soon as no graph needs it (e.g. under no_grad).
                ctx.last_tile = (tiles, sum_exp)
        if entropy is None:
            return logprobs
        ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logprobs: torch.Tensor, *_grad_entropy: torch.Tensor):
        if ctx.frozen_head:
            (unit_grad_hidden,) = ctx.saved_tensors
            grad_hidden = (grad_logprobs[:, None] * unit_grad_hidden).to(unit_grad_hidden.dtype)
            return grad_hidden, None, None, None, None, None, None, None, None, None
        # Taken off ctx so it is freed with this backward, and so a second backward (retain_graph=True), which
        # would find it overwritten, recomputes every chunk instead.
        last_tile, ctx.last_tile = ctx.last_tile, None
        grad_hidden, grad_weight, grad_bias = _recompute_backward(
            *ctx.saved_tensors,
            grad_logprobs,
            ctx.temperature,
            ctx.bounds,
            ctx.needs_input_grad[:3],
            last_tile,
        )
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None, None


def _recompute_backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target_ids: torch.Tensor,
    log_normaliser: torch.Tensor,
    grad_logprobs: torch.Tensor,
    temperature: float,
    bounds: list[tuple[int, int]],
    needs_grad: tuple[bool, bool, bool],
    last_tile: tuple[_Tiles, torch.Tensor] | None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Grads for (hidden, weight, bias), each None unless needed, recomputing one (V, c) tile at a time.

    Chunks run last to first, so the first one can use ``last_tile`` = (the forward's buffers, whose tile holds
    exp(z - max) for the last chunk; sum_v exp(z - max) per row) without a recompute.
    """
    needs_hidden, needs_weight, needs_bias = needs_grad
    vocab_size = weight.shape[0]
    compute_dtype = log_normaliser.dtype
    accumulate_dtype = torch.promote_types(weight.dtype, torch.float32)
    # Contiguous by construction, so each chunk's rows are a contiguous `out=` target for the matmul.
    grad_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if needs_hidden else None
    grad_bias = torch.zeros(vocab_size, dtype=accumulate_dtype, device=weight.device) if needs_bias else None
    grad_weight = weight_product = None
    if needs_weight:
        # Same dtype: the first chunk's matmul writes the buffer (no zero fill), later ones addmm_ into it.
        # bf16: each chunk's product lands in one reused bf16 buffer and is summed into an fp32 buffer.
        same_dtype = accumulate_dtype == weight.dtype and bool(bounds)
        grad_weight = (torch.empty if same_dtype else torch.zeros)(
            weight.shape, dtype=accumulate_dtype, device=weight.device
        )
        if not same_dtype and bounds:
            weight_product = torch.empty_like(weight)

    # dL/dz / tau = (g / tau) (onehot - softmax). The tile is brought to A = softmax - onehot (or, for the handed-over
    # tile, exp(z - max) - sum_exp onehot, which is A times sum_exp) and the per-row factor s, with dL/dz / tau =
    # s A, is applied to the (c, H) sides of the matmuls instead: s (A W) for grad_hidden, A^T (s h) for grad_weight
    # (the vocab-major tile holds A^T, hence ``grad_tile.T @ weight`` and ``grad_tile @ scaled_chunk`` below).
    # That leaves one elementwise pass (exp) over each recomputed tile, and none over the handed-over one.
    minus_coefs = grad_logprobs.to(compute_dtype) / -temperature
    tile_rows = _largest_chunk(bounds)
    if last_tile is not None:
        tiles, last_sum_exp = last_tile
    else:
        tiles = _Tiles(vocab_size, tile_rows, compute_dtype, weight.dtype, hidden.device)
    scaled_hidden = None
    if grad_weight is not None and bounds and tiles.low_precision_buffer is None:
        scaled_hidden = torch.empty(tile_rows, hidden.shape[1], dtype=hidden.dtype, device=hidden.device)
    for index, (start, end) in enumerate(reversed(bounds)):
        hidden_chunk, targets = hidden[start:end], target_ids[None, start:end]
        if index == 0 and last_tile is not None:
            # Holds e = exp(z - max); softmax - onehot = (e - sum_exp onehot) / sum_exp.
            grad_tile = tiles.tile(end - start).scatter_add_(0, targets, last_sum_exp[None, :].neg())
            row_scale = minus_coefs[start:end] / last_sum_exp
        else:
            shift = log_normaliser[start:end]
            grad_tile = _scaled_logits_into(tiles, hidden_chunk, weight, bias, temperature, shift).exp_()
            grad_tile.scatter_add_(0, targets, torch.full_like(shift[None, :], -1.0))
            row_scale = minus_coefs[start:end]
        if grad_bias is not None:
            grad_bias += grad_tile @ row_scale
        low_precision = tiles.low_precision(end - start)
        if low_precision is not None:
            # Matmuls in the input dtype (e.g. bf16): the tile must be cast down anyway, so the row scale rides in
            # that same pass, and the low-precision operands are rounded once, as in the naive path.
            grad_tile = torch.mul(grad_tile, row_scale[None, :], out=low_precision)
            row_scale = None
        if grad_hidden is not None:
            product = torch.mm(grad_tile.T, weight, out=grad_hidden[start:end])
            if row_scale is not None:
                product.mul_(row_scale[:, None])
        if grad_weight is None:
            continue
        scaled_chunk = hidden_chunk
        if row_scale is not None:
            scaled_chunk = torch.mul(hidden_chunk, row_scale[:, None], out=scaled_hidden[: end - start])
        if weight_product is not None:
            grad_weight += torch.mm(grad_tile, scaled_chunk, out=weight_product)
        elif index == 0:
            torch.mm(grad_tile, scaled_chunk, out=grad_weight)
        else:
            grad_weight.addmm_(grad_tile, scaled_chunk)
    del tiles, scaled_hidden

    if grad_weight is not None:
        grad_weight = grad_weight.to(weight.dtype)
    if grad_bias is not None:
        grad_bias = grad_bias.to(bias.dtype)
    return grad_hidden, grad_weight, grad_bias
