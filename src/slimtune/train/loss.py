"""Response-token cross-entropy without materialising logits where there is no label.

A causal LM predicts token t+1 from position t. Only positions whose next token is labelled (the
assistant's reply) contribute to the loss, so we run the decoder, gather the hidden states of those
positions (n, hidden), and apply the LM head to them alone, in chunks (see `chunked_ce`): the
(batch, seq, vocab) logits tensor, the largest activation of a small model, is never built.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slimtune.data.render import IGNORE_INDEX
from slimtune.train.chunked_ce import chunked_cross_entropy_sum

# Keyword arguments the decoder understands; packed batches add position ids and boundaries.
# Vision-language models also take their images (and Qwen-VL its per-token modality ids).
_MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k",
                 "max_length_q", "max_length_k", "pixel_values", "image_grid_thw", "mm_token_type_ids",
                 "pixel_attention_mask", "image_sizes")


def _plain_head(model: nn.Module) -> bool:
    """True if logits are just `hidden @ W.T` (no bias, scale or soft-cap), so chunking applies."""
    head = model.get_output_embeddings()
    config = model.config
    return (isinstance(head, nn.Linear) and head.bias is None
            and getattr(config, "logit_scale", None) is None
            and getattr(config, "final_logit_softcapping", None) is None)


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


def response_loss_sum(model: nn.Module, batch: dict, chunk: int = 1024) -> tuple[torch.Tensor, int]:
    """Sum of cross-entropy over labelled next-token positions, and how many there are.

    `batch` is padded (input_ids, labels, attention_mask of shape (batch, seq)) or packed (one row
    with position_ids and cu_seq_lens). Dividing by the token count of the whole accumulated step
    (not per micro-batch) gives every labelled token equal weight.
    """
    inputs = {key: batch[key] for key in _MODEL_INPUTS if batch.get(key) is not None}
    hidden = model.base_model(**inputs, use_cache=False).last_hidden_state[:, :-1]  # (batch, seq-1, hidden)
    targets = batch["labels"][:, 1:]  # (batch, seq-1)
    mask = targets != IGNORE_INDEX
    count = int(mask.sum())
    if count == 0:
        return hidden.sum() * 0.0, 0
    selected, chosen = hidden[mask], targets[mask]  # (n, hidden), (n,)
    if _plain_head(model):
        weight = model.get_output_embeddings().weight
        dtype = torch.get_autocast_dtype(selected.device.type) if torch.is_autocast_enabled(selected.device.type) else selected.dtype
        return chunked_cross_entropy_sum(selected, weight, chosen, chunk, dtype), count
    return F.cross_entropy(_project(model, selected), chosen, reduction="sum"), count
