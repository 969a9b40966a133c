"""Evaluation: response-token loss and perplexity, greedy generations, and text metrics on them.

Loss is the mean cross-entropy over assistant tokens only (the same tokens training learns), summed
over the whole set and divided by their count; perplexity is exp(loss).

Text metrics compare each generated reply with the reference reply:
- exact match: the fraction of replies equal to their reference (surrounding whitespace stripped);
- ROUGE-L (Lin, 2004): F1 of the longest common subsequence of whitespace tokens, averaged over replies;
- BLEU (Papineni et al., 2002): corpus BLEU from sacrebleu (13a tokenizer, 0-100).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from slimtune.data import ChatRenderer, Dataset, Message, pad_batch
from slimtune.data.images import message_text
from slimtune.train.loss import response_loss_sum
from slimtune.train.precision import autocast
from slimtune.train.signals import stop_point


@torch.no_grad()
def evaluate_loss(model: nn.Module, dataset: Dataset, pad_token_id: int, batch_size: int = 8,
                  precision: str = "fp32") -> dict[str, float]:
    """{'loss', 'perplexity', 'tokens'} over the labelled tokens of `dataset`."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(dataset), batch_size):
        stop_point("during evaluation", resumable=True)  # a safe point while training runs' signals are routed
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
    renderer=None,
) -> list[str]:
    """Replies to each prompt conversation (greedy when temperature == 0), batched with left padding.

    `renderer` renders the prompts (default: `ChatRenderer(tokenizer)`); a `VisionRenderer` (prompts with
    images) generates one prompt at a time, with the processor's image tensors."""
    renderer = renderer or ChatRenderer(tokenizer)
    was_training = model.training
    model.eval()
    replies: list[str] = []
    pad_id = tokenizer.pad_token_id
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {
        "do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    images = hasattr(renderer, "prompt_inputs")
    for start in range(0, len(prompts), 1 if images else batch_size):
        stop_point("during evaluation", resumable=True)
        chunk = prompts[start: start + (1 if images else batch_size)]
        if images:
            inputs = renderer.prompt_inputs(list(chunk[0]))
        else:
            encoded = [renderer.encode_prompt(list(p)) for p in chunk]
            width = max(len(ids) for ids in encoded)
            input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
            for row, ids in enumerate(encoded):
                input_ids[row, width - len(ids):] = torch.tensor(ids)
                attention_mask[row, width - len(ids):] = 1
            inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        width = inputs["input_ids"].shape[1]
        with autocast(precision, model.device):
            output = model.generate(
                **{key: value.to(model.device) for key, value in inputs.items()},
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


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 on whitespace tokens (case-sensitive): with L = LCS length, P = L / len(prediction),
    R = L / len(reference), F1 = 2 P R / (P + R). 0.0 when either side is empty, as in `rouge-score`."""
    pred, ref = prediction.split(), reference.split()
    if not pred or not ref:
        return 0.0
    # One row of the LCS table at a time: previous[j] = LCS(pred tokens before `token`, ref[:j]).
    previous = [0] * (len(ref) + 1)
    for token in pred:
        current = [0]
        for j, ref_token in enumerate(ref):
            current.append(previous[j] + 1 if token == ref_token else max(previous[j + 1], current[j]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (0-100) of predictions against one reference each, computed by sacrebleu.

    Effective order: n-gram orders that the whole corpus has none of are left out of the geometric mean,
    so a set of short replies (fewer than 4 tokens) that match exactly scores 100, not 0. On corpora
    with 4-grams this is sacrebleu's standard corpus BLEU.
    """
    if len(predictions) != len(references):
        raise ValueError(f"bleu needs one reference per prediction, got {len(predictions)} and {len(references)}")
    if not references:
        return 0.0
    from sacrebleu.metrics import BLEU

    return float(BLEU(effective_order=True).corpus_score(list(predictions), [list(references)]).score)


def evaluate_model(model: nn.Module, tokenizer, dataset: Dataset, generations: int, max_new_tokens: int,
                   batch_size: int, precision: str = "fp32") -> tuple[dict[str, float], list[str]]:
    """Loss/perplexity on the whole set, plus greedy replies with exact match, ROUGE-L and BLEU on the
    first `generations` examples."""
    metrics = evaluate_loss(model, dataset, tokenizer.pad_token_id, batch_size, precision)
    replies: list[str] = []
    if generations > 0:
        conversations = dataset.conversations[:generations]
        replies = generate_replies(model, tokenizer, [c[:-1] for c in conversations], max_new_tokens, batch_size,
                                   precision=precision, renderer=dataset.renderer)
        references = [message_text(c[-1]) for c in conversations]
        metrics["exact_match"] = exact_match(replies, references)
        metrics["rouge_l"] = sum(map(rouge_l, replies, references)) / len(references)
        metrics["bleu"] = bleu(replies, references)
    return metrics, replies


# (key, label, format) of each metric row in the tables; rows a report lacks are left out.
METRIC_ROWS = [
    ("loss", "response-token loss", ".4f"),
    ("perplexity", "perplexity", ".3f"),
    ("exact_match", "exact match", ".3f"),
    ("rouge_l", "ROUGE-L F1 (mean)", ".3f"),
    ("bleu", "BLEU (0-100)", ".2f"),
]


def format_metrics_table(base: dict[str, float], tuned: dict[str, float]) -> str:
    """A Markdown table of base vs tuned metrics (readable as plain text too)."""
    lines = ["| metric | base | tuned |", "|---|---:|---:|"]
    for key, label, spec in METRIC_ROWS:
        if key in base and key in tuned:
            lines.append(f"| {label} | {base[key]:{spec}} | {tuned[key]:{spec}} |")
    return "\n".join(lines)


def _shown(content: str | list[dict]) -> str:
    """A message's content as text; an image part shows as `[image: path]` (a data: URL cut short)."""
    if isinstance(content, str):
        return content
    return "".join(p["text"] if p["type"] == "text" else f"[image: {p['image'][:60]}]" for p in content)


def _fenced(text: str) -> str:
    """`text` verbatim in a Markdown code block whose fence is longer than any backtick run inside it."""
    if not text:
        return "*(empty)*"
    longest, run = 0, 0
    for char in text:
        run = run + 1 if char == "`" else 0
        longest = max(longest, run)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text}\n{fence}"


def format_eval_report(title: str, summary: str, base: dict[str, float], tuned: dict[str, float],
                       outputs: Sequence[dict]) -> str:
    """The Markdown evaluation report: the metrics table, then each example's prompt messages,
    reference, base output and tuned output. `outputs` rows hold 'prompt' (messages), 'reference',
    'base' and 'tuned'."""
    parts = [f"# {title}", summary, "## Metrics", format_metrics_table(base, tuned)]
    if outputs:
        parts.append("## Generations")
    for number, row in enumerate(outputs, 1):
        parts.append(f"### Example {number}")
        for message in row["prompt"]:
            parts.append(f"**Prompt ({message['role']})**\n\n{_fenced(_shown(message['content']))}")
        parts.append(f"**Reference**\n\n{_fenced(row['reference'])}")
        parts.append(f"**Base output**\n\n{_fenced(row['base'])}")
        parts.append(f"**Tuned output**\n\n{_fenced(row['tuned'])}")
    return "\n\n".join(parts) + "\n"
