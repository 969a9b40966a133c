"""Evaluation: response-token loss and perplexity, greedy generations and exact match.

Loss is the mean cross-entropy over assistant tokens only (the same tokens training learns), summed
over the whole set and divided by their count; perplexity is exp(loss).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from slimtune.data import ChatRenderer, Dataset, Message, pad_batch
from slimtune.train.loss import response_loss_sum
from slimtune.train.precision import autocast


@torch.no_grad()
def evaluate_loss(model: nn.Module, dataset: Dataset, pad_token_id: int, batch_size: int = 8,
                  precision: str = "fp32") -> dict[str, float]:
    """{'loss', 'perplexity', 'tokens'} over the labelled tokens of `dataset`."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(dataset), batch_size):
        batch = pad_batch(dataset.examples[start: start + batch_size], pad_token_id)
        batch = {key: value.to(model.device) for key, value in batch.items()}
        with autocast(precision, model.device):
            loss_sum, n = response_loss_sum(model, batch)
        total += float(loss_sum)
        count += n
    model.train(was_training)
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count}


@torch.no_grad()
def generate_replies(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[list[Message]],
    max_new_tokens: int = 64,
    batch_size: int = 8,
    temperature: float = 0.0,
    top_p: float = 1.0,
    precision: str = "fp32",
) -> list[str]:
    """Replies to each prompt conversation (greedy when temperature == 0), batched with left padding."""
    renderer = ChatRenderer(tokenizer)
    was_training = model.training
    model.eval()
    replies: list[str] = []
    pad_id = tokenizer.pad_token_id
    for start in range(0, len(prompts), batch_size):
        encoded = [renderer.encode_prompt(list(p)) for p in prompts[start: start + batch_size]]
        width = max(len(ids) for ids in encoded)
        input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, ids in enumerate(encoded):
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            attention_mask[row, width - len(ids):] = 1
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {
            "do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        with autocast(precision, model.device):
            output = model.generate(
                input_ids=input_ids.to(model.device), attention_mask=attention_mask.to(model.device),
                max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id,
                use_cache=True, **sampling,
            )
        for row in output[:, width:]:
            replies.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    model.train(was_training)
    return replies


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of predictions equal to their reference after stripping surrounding whitespace."""
    if not references:
        return 0.0
    return sum(p.strip() == r.strip() for p, r in zip(predictions, references)) / len(references)


def evaluate_model(model: nn.Module, tokenizer, dataset: Dataset, generations: int, max_new_tokens: int,
                   batch_size: int, precision: str = "fp32") -> tuple[dict[str, float], list[str]]:
    """Loss/perplexity on the whole set, plus greedy replies and exact match on the first `generations`."""
    metrics = evaluate_loss(model, dataset, tokenizer.pad_token_id, batch_size, precision)
    replies: list[str] = []
    if generations > 0:
        conversations = dataset.conversations[:generations]
        replies = generate_replies(model, tokenizer, [c[:-1] for c in conversations], max_new_tokens, batch_size,
                                   precision=precision)
        metrics["exact_match"] = exact_match(replies, [c[-1]["content"] for c in conversations])
    return metrics, replies
