"""Response-token cross-entropy without materialising logits where there is no label.

A causal LM predicts token t+1 from position t. Only positions whose next token is labelled (the
assistant's reply) contribute to the loss, so we run the decoder, gather the hidden states of those
positions (n, hidden), and apply the LM head to them alone: the (batch, seq, vocab) logits tensor,
the largest activation of a small model, is never built for prompt or padding positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slimtune.data.render import IGNORE_INDEX


def _project(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """LM head + the logit post-processing some architectures apply (Cohere scale, Gemma soft-cap)."""
    logits = model.get_output_embeddings()(hidden).float()
    scale = getattr(model.config, "logit_scale", None)
    if scale is not None:
        logits = logits * scale
    softcap = getattr(model.config, "final_logit_softcapping", None)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def response_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Sum of cross-entropy over labelled next-token positions, and how many there are.

    `batch` holds input_ids, labels and attention_mask of shape (batch, seq). Dividing by the token
    count of the whole accumulated step (not per micro-batch) gives every labelled token equal weight.
    """
    outputs = model.base_model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    )
    hidden = outputs.last_hidden_state[:, :-1]  # (batch, seq-1, hidden)
    targets = batch["labels"][:, 1:]  # (batch, seq-1)
    mask = targets != IGNORE_INDEX
    count = int(mask.sum())
    if count == 0:
        return hidden.sum() * 0.0, 0
    logits = _project(model, hidden[mask])  # (n, vocab)
    return F.cross_entropy(logits, targets[mask], reduction="sum"), count
