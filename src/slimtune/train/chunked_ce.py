"""Cross-entropy through the LM head in chunks, without keeping (tokens x vocab) logits.

For hidden states h (n, d), head weight W (V, d) and targets y, the loss is
    L = sum_i [ logsumexp(W h_i) - (W h_i)_{y_i} ].
Forward computes it chunk by chunk, keeping only the per-token log-sum-exp (n,). Backward recomputes
each chunk's logits z = h W^T and uses dL/dz = softmax(z) - onehot(y), so dL/dh = (softmax(z) -
onehot(y)) W and, if the head trains, dL/dW = (softmax(z) - onehot(y))^T h. Peak extra memory is one
(chunk x V) block instead of (n x V) logits plus their softmax.
"""

from __future__ import annotations

import torch


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weight.T` against `targets`, computed in chunks."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
                compute_dtype: torch.dtype) -> torch.Tensor:
        lse = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        w = weight.to(compute_dtype)
        for start in range(0, hidden.shape[0], chunk):
            logits = (hidden[start: start + chunk].to(compute_dtype) @ w.T).float()  # (c, V)
            chunk_lse = torch.logsumexp(logits, dim=-1)
            lse[start: start + chunk] = chunk_lse
            picked = logits.gather(1, targets[start: start + chunk, None]).squeeze(1)
            total += (chunk_lse - picked).sum()
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk, ctx.compute_dtype = chunk, compute_dtype
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        hidden, weight, targets, lse = ctx.saved_tensors
        chunk, dtype = ctx.chunk, ctx.compute_dtype
        w = weight.to(dtype)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start: start + chunk].to(dtype)
            # In place on one (c, V) fp32 block: each fresh block of that size costs page faults too.
            probs = (h @ w.T).float().sub_(lse[start: start + chunk, None]).exp_()  # softmax, (c, V)
            rows = torch.arange(probs.shape[0], device=probs.device)
            probs[rows, targets[start: start + chunk]] -= 1.0
            grad_logits = probs.mul_(grad_output).to(dtype)
            if grad_hidden is not None:
                grad_hidden[start: start + chunk] = (grad_logits @ w).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += (grad_logits.T @ h).float()
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None


def chunked_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                              chunk: int = 1024, compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """sum_i CE(hidden_i @ weight.T, targets_i) with at most `chunk` rows of logits alive at a time.

    hidden (n, d), weight (V, d), targets (n,) int64; matmuls run in `compute_dtype` (default: the
    hidden states' dtype), log-softmax in fp32.
    """
    return ChunkedLinearCrossEntropy.apply(hidden, weight, targets, chunk, compute_dtype or hidden.dtype)
