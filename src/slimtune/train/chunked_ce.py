"""Cross-entropy through the LM head in chunks, without keeping (tokens x vocab) logits.

For hidden states h (n, d), head weight W (V, d) and targets y, the loss is
    L = sum_i [ logsumexp(W h_i) - (W h_i)_{y_i} ].
Forward computes it chunk by chunk, keeping the per-token log-sum-exp (n,). Backward uses
dL/dz = softmax(z) - onehot(y) for the logits z = h W^T, so dL/dh = (softmax(z) - onehot(y)) W and, if
the head trains, dL/dW = (softmax(z) - onehot(y))^T h. dL/dz is computed in forward and kept (in the
compute dtype) when it is small (`KEEP_GRAD_BYTES`); otherwise backward recomputes each chunk's logits.
Peak extra memory is one (chunk x V) fp32 block (plus the kept dL/dz) instead of (n x V) logits plus
their softmax.
"""

from __future__ import annotations

import torch


# Up to this many bytes of dL/dz (n x V in the compute dtype) are kept from forward for backward, which
# then skips recomputing the logits: one LM-head matmul and four (chunk x V) fp32 passes less per step
# (~5% of a LoRA step of the bundled model at batch 4 x 112 tokens, where dL/dz is 26 MB). Larger
# batches recompute, as the peak memory of a long-context step matters more than its speed.
KEEP_GRAD_BYTES = 64 * 2**20


def keeps_grad(rows: int, vocab: int, element_size: int, limit: int = KEEP_GRAD_BYTES) -> bool:
    """Whether dL/dz of `rows` x `vocab` elements of `element_size` bytes is kept from forward."""
    return rows * vocab * element_size <= limit


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weight.T` against `targets`, computed in chunks."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
                compute_dtype: torch.dtype, keep_grad_bytes: int) -> torch.Tensor:
        n, vocab = hidden.shape[0], weight.shape[0]
        keep = keeps_grad(n, vocab, torch.finfo(compute_dtype).bits // 8, keep_grad_bytes)
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        grad_logits = torch.empty((n, vocab), dtype=compute_dtype, device=hidden.device) if keep else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        w = weight.to(compute_dtype)
        for start in range(0, n, chunk):
            logits = (hidden[start: start + chunk].to(compute_dtype) @ w.T).float()  # (c, V)
            chunk_lse = torch.logsumexp(logits, dim=-1)
            lse[start: start + chunk] = chunk_lse
            chunk_targets = targets[start: start + chunk]
            picked = logits.gather(1, chunk_targets[:, None]).squeeze(1)
            total += (chunk_lse - picked).sum()
            if keep:
                grad_logits[start: start + chunk] = _softmax_minus_onehot(logits, chunk_lse, chunk_targets)
        ctx.save_for_backward(hidden, weight, targets, lse, grad_logits)
        ctx.chunk, ctx.compute_dtype = chunk, compute_dtype
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        hidden, weight, targets, lse, kept = ctx.saved_tensors
        chunk, dtype = ctx.chunk, ctx.compute_dtype
        w = weight.to(dtype)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start: start + chunk].to(dtype)
            if kept is not None:
                grad_logits = kept[start: start + chunk]
            else:
                logits = (h @ w.T).float()
                grad_logits = _softmax_minus_onehot(logits, lse[start: start + chunk],
                                                     targets[start: start + chunk]).to(dtype)
            # The scalar dL/dloss goes onto the (c, d) products, not onto a (c, V) block.
            if grad_hidden is not None:
                grad_hidden[start: start + chunk] = ((grad_logits @ w) * grad_output).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += (grad_logits.T @ h).float() * grad_output
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None


def _softmax_minus_onehot(logits: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """dL/dz = softmax(z) - onehot(y) for one (c, V) fp32 block of logits, computed in place on it (each
    fresh block of that size costs page faults too); fp32."""
    probs = logits.sub_(lse[:, None]).exp_()
    probs[torch.arange(probs.shape[0], device=probs.device), targets] -= 1.0
    return probs


def chunked_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                              chunk: int = 1024, compute_dtype: torch.dtype | None = None,
                              keep_grad_bytes: int = KEEP_GRAD_BYTES) -> torch.Tensor:
    """sum_i CE(hidden_i @ weight.T, targets_i) with at most `chunk` rows of logits alive at a time.

    hidden (n, d), weight (V, d), targets (n,) int64; matmuls run in `compute_dtype` (default: the
    hidden states' dtype), log-softmax in fp32. dL/dz is kept from forward when it fits in
    `keep_grad_bytes`, else backward recomputes the logits.
    """
    return ChunkedLinearCrossEntropy.apply(hidden, weight, targets, chunk, compute_dtype or hidden.dtype,
                                           keep_grad_bytes)
