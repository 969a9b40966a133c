"""Peer side of the slimtune training-speed benchmark: Hugging Face ``Trainer`` + PEFT LoRA.

This is the configuration most users run today, written out plainly so that
slimtune can be compared against it on equal terms:

* the base model is loaded in fp32 and wrapped with a PEFT LoRA adapter
  (r=16, alpha=32, dropout=0.05 on ``q_proj``/``k_proj``/``v_proj``/``o_proj``);
* every conversation is rendered with the tokenizer's chat template, tokenized
  and truncated to ``max_length``; the labels are the input ids, so the loss is
  taken on every non-padding token (the common "train on everything" recipe);
* batches are padded dynamically; only padding positions (found through the
  attention mask, *not* through the pad token id, which often equals eos) are
  masked out of the loss;
* ``bf16=True`` means bf16 autocast over fp32 master weights (``Trainer``'s
  ``bf16`` flag), not a bf16 model.

Measured:

* ``train_s``: wall time of ``trainer.train()`` only (model loading,
  tokenization and evaluation are excluded);
* ``tokens``/``examples``: the real (non-padding) tokens and the examples that
  actually went through ``training_step`` (counted there rather than in the
  collator, because accelerate's dataloader fetches one batch ahead, so the
  collator sees a batch that is never trained on when ``max_steps`` stops early);
* ``peak_rss_mb``: the process-wide peak resident set size read right after
  training (``ru_maxrss`` can only grow, so run each configuration in a fresh
  process), and ``peak_gpu_mb``: the peak allocated CUDA memory during training;
* ``eval_loss``: after training, the token-weighted mean cross-entropy over the
  response tokens of ``eval_rows`` (the final assistant message's content plus
  its end-of-turn token), from a plain fp32 forward pass under ``no_grad``.

Command line (one configuration per process)::

    python bench/peer_trainer.py --model-dir DIR --train train.jsonl --eval eval.jsonl \
        [--bf16] [--steps N] [--epochs E] [--batch-size B] [--lr LR] [--seed S] \
        [--max-length L] [--work-dir DIR] [--json-out result.json]

The JSONL rows are either ``{"messages": [...]}`` in OpenAI chat form or Alpaca
rows ``{"instruction", "input", "output"}``.  The result dict is printed to
stdout as one JSON line (and written to ``--json-out`` when given).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

Message = dict[str, str]
Conversation = list[Message]

LORA_TARGETS: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj"]


# --------------------------------------------------------------------------- data


def rows_from_jsonl(path: str) -> list[Conversation]:
    """Read a JSONL file of chat rows (``{"messages": [...]}``) or Alpaca rows."""
    conversations: list[Conversation] = []
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, 1):
            line = line.strip()
            if not line:
                continue
            record = json.loads(line)
            try:
                conversations.append(row_to_messages(record))
            except ValueError as exc:
                raise ValueError(f"{path}:{line_no}: {exc}") from None
    return conversations


def row_to_messages(record: dict[str, Any]) -> Conversation:
    """Turn one JSONL record into a list of chat messages."""
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError("'messages' must be a non-empty list")
        return [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]
    if "instruction" in record and "output" in record:
        prompt = str(record["instruction"])
        extra = record.get("input") or ""
        if extra:
            prompt = f"{prompt}\n{extra}"
        return [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": str(record["output"])},
        ]
    raise ValueError("row is neither {'messages': [...]} nor an Alpaca row")


class TokenizedConversations(torch.utils.data.Dataset):
    """A map-style dataset over pre-tokenized conversations."""

    def __init__(self, features: list[dict[str, list[int]]]) -> None:
        self.features = features

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.features[index]


def tokenize_for_training(
    tokenizer: Any, conversations: Iterable[Conversation], max_length: int
) -> list[dict[str, list[int]]]:
    """Render each conversation with the chat template and tokenize it (truncated).

    ``add_special_tokens=False`` because the rendered template already carries
    whatever special tokens the model expects (adding them again would, for
    example, double Llama 3's ``<|begin_of_text|>``).
    """
    features: list[dict[str, list[int]]] = []
    for messages in conversations:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        encoded = tokenizer(
            text, add_special_tokens=False, truncation=True, max_length=max_length
        )
        features.append(
            {
                "input_ids": list(encoded["input_ids"]),
                "attention_mask": list(encoded["attention_mask"]),
            }
        )
    return features


class PadAndMaskCollator:
    """Right-pad a batch to its longest row; labels are the ids with padding set to -100.

    Padding is identified through the attention mask, so real end-of-sequence
    tokens keep their labels even when ``pad_token_id == eos_token_id``.
    """

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, batch: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(row["input_ids"]) for row in batch)
        input_ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, row in enumerate(batch):
            n = len(row["input_ids"])
            input_ids[i, :n] = torch.tensor(row["input_ids"], dtype=torch.long)
            attention_mask[i, :n] = torch.tensor(row["attention_mask"], dtype=torch.long)
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# --------------------------------------------------------------------------- eval


def response_features(
    tokenizer: Any, conversations: Iterable[Conversation], max_length: int
) -> list[dict[str, list[int]]]:
    """Tokenize conversations for eval, marking the final assistant reply's tokens.

    A token is a response token when its character span starts at or after the
    end of the generation prompt (``messages[:-1]`` rendered with
    ``add_generation_prompt=True``) and before the end of the final assistant
    content plus the end-of-turn string that the template puts right after it
    (the tokenizer's eos token, e.g. ``<|im_end|>``).  Anything the template
    appends after that (such as a trailing newline) is not counted.
    """
    eos_text: str = tokenizer.eos_token or ""
    features: list[dict[str, list[int]]] = []
    for messages in conversations:
        if messages[-1]["role"] != "assistant":
            raise ValueError("eval conversations must end with an assistant message")
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        prompt = tokenizer.apply_chat_template(
            messages[:-1], tokenize=False, add_generation_prompt=True
        )
        if not full.startswith(prompt):
            # Some templates render earlier turns differently once a reply follows;
            # fall back to the longest common prefix.
            common = os.path.commonprefix([full, prompt])
            start = len(common)
        else:
            start = len(prompt)
        content = messages[-1]["content"]
        end = len(full)
        if full.startswith(content, start):
            end = start + len(content)
            if eos_text and full.startswith(eos_text, end):
                end += len(eos_text)
        encoded = tokenizer(
            full,
            add_special_tokens=False,
            truncation=True,
            max_length=max_length,
            return_offsets_mapping=True,
        )
        target = [
            1 if start <= char_start < end else 0
            for char_start, _ in encoded["offset_mapping"]
        ]
        features.append(
            {
                "input_ids": list(encoded["input_ids"]),
                "attention_mask": list(encoded["attention_mask"]),
                "target": target,
            }
        )
    return features


@torch.no_grad()
def response_eval_loss(
    model: nn.Module,
    features: Sequence[dict[str, list[int]]],
    pad_token_id: int,
    device: torch.device,
    batch_size: int,
) -> tuple[float, int]:
    """Token-weighted mean cross-entropy over response tokens, fp32, no autocast.

    Returns ``(mean_loss, number_of_response_tokens)``.
    """
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    collate = PadAndMaskCollator(pad_token_id)
    seen_dtypes: set[torch.dtype] = set()
    probe = next(m for m in model.modules() if isinstance(m, nn.Linear))
    handle = probe.register_forward_hook(lambda _m, _i, out: seen_dtypes.add(out.dtype))
    try:
        for first in range(0, len(features), batch_size):
            chunk = features[first : first + batch_size]
            batch = collate(chunk)
            width = batch["input_ids"].shape[1]
            target = torch.zeros((len(chunk), width), dtype=torch.bool)
            for i, row in enumerate(chunk):
                target[i, : len(row["target"])] = torch.tensor(row["target"], dtype=torch.bool)
            input_ids = batch["input_ids"].to(device)
            attention_mask = batch["attention_mask"].to(device)
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
            # Position t predicts token t+1.
            shifted_logits = logits[:, :-1, :].float()
            next_ids = input_ids[:, 1:]
            mask = target[:, 1:].to(device)
            if not bool(mask.any()):
                continue
            losses = nn.functional.cross_entropy(
                shifted_logits[mask], next_ids[mask], reduction="sum"
            )
            total += losses.double()
            count += int(mask.sum())
    finally:
        handle.remove()
    if seen_dtypes and seen_dtypes != {torch.float32}:
        raise RuntimeError(f"eval forward was not fp32 (saw {seen_dtypes})")
    return (float(total) / count if count else math.nan), count


# --------------------------------------------------------------------------- training


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kilobytes, macOS bytes.
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def load_qlora_base(model_dir: str, use_cuda: bool) -> nn.Module:
    """QLoRA's base as PEFT users build it: bitsandbytes NF4 with double quantization and bf16 compute,
    the other weights in bf16, then `prepare_model_for_kbit_training` (norms, embeddings and head in
    fp32; no gradient checkpointing, which slimtune's runs do not use either)."""
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quantization, dtype=torch.bfloat16,
                                                 device_map={"": 0} if use_cuda else None)
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def run_peer(
    model_dir: str,
    train_rows: list[list[dict]],
    eval_rows: list[list[dict]] | None,
    *,
    bf16: bool,
    dora: bool = False,
    qlora: bool = False,
    steps: int | None = None,
    epochs: int = 1,
    batch_size: int = 4,
    lr: float = 2e-4,
    seed: int = 0,
    max_length: int = 512,
    work_dir: str,
    clock: Any = None,
    warmup: int = 3,
) -> dict:
    """Fine-tune ``model_dir`` with ``Trainer`` + PEFT LoRA and measure speed, memory and eval loss.

    ``steps`` (when given) sets ``max_steps`` and overrides ``epochs``.  The
    returned dict has the keys ``name, tokens, examples, train_s, tokens_per_s,
    s_per_example, peak_rss_mb, peak_gpu_mb, eval_loss`` plus a few extras
    (``steps``, ``train_loss``, ``eval_tokens``, ``device``).
    """
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    use_cuda = torch.cuda.is_available()
    set_seed(seed)

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    pad_id: int = tokenizer.pad_token_id

    if qlora:
        model = load_qlora_base(model_dir, use_cuda)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    lora = LoraConfig(
        r=16,
        lora_alpha=32,
        lora_dropout=0.05,
        target_modules=LORA_TARGETS,
        task_type="CAUSAL_LM",
        use_dora=dora,
    )
    model = get_peft_model(model, lora)

    train_set = TokenizedConversations(tokenize_for_training(tokenizer, train_rows, max_length))
    # The eval forward must be fp32: a 4-bit base computes in bf16, so QLoRA runs are not evaluated here.
    eval_features = response_features(tokenizer, eval_rows, max_length) if eval_rows and not qlora else None

    args = TrainingArguments(
        output_dir=work_dir,
        per_device_train_batch_size=batch_size,
        learning_rate=lr,
        num_train_epochs=epochs,
        max_steps=steps if steps is not None else -1,
        bf16=bf16,
        use_cpu=not use_cuda,
        logging_steps=10,
        report_to=[],
        save_strategy="no",
        seed=seed,
        dataloader_num_workers=0,
        remove_unused_columns=False,
    )

    class CountingTrainer(Trainer):
        """``Trainer`` that tallies the real tokens and examples fed to each training step."""

        seen_tokens: torch.Tensor | None = None
        seen_examples: int = 0

        def training_step(self, model, inputs, num_items_in_batch=None):  # type: ignore[override]
            mask = inputs["attention_mask"]
            batch_tokens = mask.sum()  # stays on device: no per-step sync
            self.seen_tokens = batch_tokens if self.seen_tokens is None else self.seen_tokens + batch_tokens
            self.seen_examples += int(mask.shape[0])
            return super().training_step(model, inputs, num_items_in_batch)

    from transformers import TrainerCallback

    class Ticks(TrainerCallback):
        """Step boundaries (and the profiled steps) for bench/step_profile.py's `StepClock`."""

        def on_step_begin(self, *_args, **_kwargs):
            if clock is not None:
                clock.tick()

        def on_train_end(self, *_args, **_kwargs):
            if clock is not None:
                clock.finish()

    trainer = CountingTrainer(
        model=model,
        args=args,
        train_dataset=train_set,
        data_collator=PadAndMaskCollator(pad_id),
        callbacks=[Ticks()],
    )

    if use_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    output = trainer.train()
    if use_cuda:
        torch.cuda.synchronize()
    train_s = time.perf_counter() - start
    train_end = time.time()

    peak_rss_mb = _peak_rss_mb()
    peak_gpu_mb = torch.cuda.max_memory_allocated() / 2**20 if use_cuda else None
    tokens = int(trainer.seen_tokens) if trainer.seen_tokens is not None else 0
    examples = trainer.seen_examples

    # With bf16, accelerate wraps model.forward in autocast; take it off for the fp32 eval.
    eval_model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    eval_loss, eval_tokens = (None, 0) if eval_features is None else response_eval_loss(
        eval_model, eval_features, pad_id, trainer.args.device, batch_size
    )

    return {
        "name": f"peft+trainer {'bf16' if bf16 else 'fp32'}" + (" DoRA" if dora else "")
        + (" QLoRA (bitsandbytes nf4, double quant)" if qlora else ""),
        "tokens": tokens,
        "examples": examples,
        "train_s": train_s,
        "tokens_per_s": tokens / train_s if train_s > 0 else math.nan,
        "s_per_example": train_s / examples if examples else math.nan,
        "peak_rss_mb": peak_rss_mb,
        "peak_gpu_mb": peak_gpu_mb,
        "eval_loss": eval_loss,
        "steps": int(output.global_step),
        "train_loss": float(output.training_loss),
        "eval_tokens": eval_tokens,
        "device": str(trainer.args.device),
        "train_end_unix": train_end,
        **(clock.summary(tokens, warmup) if clock is not None else {}),
    }


# --------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> dict:
    """Run one configuration from the command line and print its result as JSON."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from step_profile import StepClock
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--train", required=True, help="JSONL of chat or Alpaca rows")
    parser.add_argument("--eval", help="JSONL of chat or Alpaca rows (without it no eval loss is measured)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (fp32 weights)")
    parser.add_argument("--dora", action="store_true", help="LoraConfig(use_dora=True)")
    parser.add_argument("--qlora", action="store_true", help="bitsandbytes NF4 base (double quant, bf16 compute)")
    parser.add_argument("--steps", type=int, default=None, help="max_steps; overrides --epochs")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--work-dir", default=None, help="Trainer output_dir (default: a temp dir)")
    parser.add_argument("--warmup-steps", type=int, default=3, help="steps left out of the steady-state figures")
    parser.add_argument("--profile-from", type=int, default=5, help="first profiled step")
    parser.add_argument("--profile-steps", type=int, default=3, help="profiled steps (0: no profile)")
    parser.add_argument("--json-out", default=None)
    opts = parser.parse_args(argv)

    train_rows = rows_from_jsonl(opts.train)
    eval_rows = rows_from_jsonl(opts.eval) if opts.eval else None
    # Trainer prints its log dicts to stdout; keep stdout for the result line only.
    with (
        tempfile.TemporaryDirectory(prefix="peer_trainer_") as scratch,
        contextlib.redirect_stdout(sys.stderr),
    ):
        result = run_peer(
            opts.model_dir,
            train_rows,
            eval_rows,
            bf16=opts.bf16,
            dora=opts.dora,
            qlora=opts.qlora,
            steps=opts.steps,
            epochs=opts.epochs,
            batch_size=opts.batch_size,
            lr=opts.lr,
            seed=opts.seed,
            max_length=opts.max_length,
            work_dir=opts.work_dir or scratch,
            clock=StepClock(opts.profile_from, opts.profile_steps),
            warmup=opts.warmup_steps,
        )
    text = json.dumps(result)
    print(text, flush=True)
    if opts.json_out:
        with open(opts.json_out, "w", encoding="utf-8") as handle:
            handle.write(text + "\n")
    return result


if __name__ == "__main__":
    main()
