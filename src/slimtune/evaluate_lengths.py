"""`slimtune eval RUN --lengths 2048,4096,...`: how well a run (any method) and its base model use long
contexts.

- Perplexity at each length L: the held-out documents are tokenized and joined (EOS between them) into
  one stream, cut into non-overlapping windows of L tokens (the first `windows` of them); the model reads
  each window whole and predicts every token after the first. ppl = exp(sum CE / tokens). Logits are
  never built for the whole window (`train/loss.py` applies the LM head in chunks), so a 16k window on
  the bundled model needs ~1 GB, not 3 GB of logits.
- Passkey retrieval (Mohtashami & Jaggi, 2023, arXiv:2305.16300, the test LongLoRA reports): a random
  five-digit number is stated once at some depth of L tokens of repeated filler text and asked for at the
  end; a trial passes when the greedy continuation contains the number.

Both rows: the base view (the run's method turns itself off, e.g. LongLoRA restores the native RoPE) and
the tuned model, in fp32. Writes `length_eval.json` and `length_eval.png` (perplexity against length).
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape
from torch import nn

from slimtune.errors import DataError, SlimtuneError

LENGTH_REPORT, LENGTH_PLOT = "length_eval.json", "length_eval.png"
TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst")
_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
_INTRO = "There is an important pass key hidden inside a lot of irrelevant text. Find it and memorize it.\n"
_QUESTION = "\nWhat is the pass key? The pass key is"


def parse_lengths(text: str) -> list[int]:
    """'2048,4096' -> [2048, 4096]; anything else is a one-line error."""
    try:
        lengths = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        lengths = []
    if not lengths or any(length < 16 for length in lengths):
        raise SlimtuneError(f"--lengths {text!r}: give comma-separated token counts of at least 16, e.g. 2048,4096,8192")
    return sorted(set(lengths))


def read_documents(path: str | Path) -> list[str]:
    """The documents in `path`: a text file (one document), a directory (every .txt/.md/.py/.rst file in
    it, recursively, sorted), or a JSONL file whose rows have a 'text' string."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise DataError(f"'{path}' holds no {'/'.join(TEXT_SUFFIXES)} files: pass a directory of long text files")
        return [f.read_text(encoding="utf-8", errors="replace") for f in files]
    if not path.is_file():
        raise DataError(f"documents '{path}' do not exist: pass a text file, a directory of text files or a JSONL "
                        "file of {\"text\": ...} rows with --data")
    if path.suffix == ".jsonl":
        documents = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise DataError(f"{path}:{number}: each row needs a 'text' string for long-context evaluation")
            documents.append(row["text"])
        return documents
    return [path.read_text(encoding="utf-8", errors="replace")]


def token_stream(tokenizer, documents: list[str]) -> list[int]:
    """The documents tokenized and joined, EOS between them."""
    stream: list[int] = []
    for document in documents:
        stream += tokenizer(document, add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            stream.append(tokenizer.eos_token_id)
    return stream


@torch.no_grad()
def window_perplexity(model: nn.Module, stream: list[int], length: int, windows: int) -> dict[str, float]:
    """{'loss', 'perplexity', 'tokens', 'windows'} over the first `windows` windows of `length` tokens."""
    from slimtune.train.loss import response_loss_sum

    count = min(windows, len(stream) // length)
    if count == 0:
        raise DataError(f"the documents hold {len(stream):,} tokens, fewer than one window of {length:,}: pass longer "
                        "documents with --data or smaller --lengths")
    total, tokens = 0.0, 0
    device = next(model.parameters()).device
    for index in range(count):
        ids = torch.tensor([stream[index * length: (index + 1) * length]], device=device)
        loss_sum, n = response_loss_sum(model, {"input_ids": ids, "labels": ids})
        total, tokens = total + float(loss_sum), tokens + n
    loss = total / tokens
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": tokens, "windows": count}


def passkey_prompt(tokenizer, length: int, key: int, depth: float) -> list[int]:
    """About `length` tokens: intro, filler with the pass-key sentence at `depth` (0 = start, 1 = end), question."""
    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    needle = ids(f"The pass key is {key}. Remember it. {key} is the pass key.\n")
    intro, question, filler = ids(_INTRO), ids(_QUESTION), ids(_FILLER)
    repeats = max(1, (length - len(intro) - len(needle) - len(question)) // len(filler))
    before = round(depth * repeats)
    return intro + filler * before + needle + filler * (repeats - before) + question


@torch.no_grad()
def passkey_accuracy(model: nn.Module, tokenizer, length: int, trials: int, seed: int = 0) -> float:
    """Fraction of `trials` (keys drawn from `seed`, depths spread from 0 to 1) where greedy decoding of 8
    tokens after the question contains the key."""
    generator = random.Random(seed + length)
    device = next(model.parameters()).device
    passed = 0
    for trial in range(trials):
        key = generator.randint(10000, 99999)
        depth = trial / max(trials - 1, 1) if trials > 1 else 0.5
        prompt = torch.tensor([passkey_prompt(tokenizer, length, key, depth)], device=device)
        output = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8,
                                do_sample=False, temperature=None, top_p=None, top_k=None,
                                pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id, use_cache=True)
        passed += str(key) in tokenizer.decode(output[0, prompt.shape[1]:], skip_special_tokens=True)
    return passed / trials


def plot_lengths(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for row in ("base", "tuned"):
        points = result[row]
        axis.plot([p["length"] for p in points], [p["perplexity"] for p in points], marker="o", label=row)
    axis.set_xscale("log", base=2)
    axis.set_yscale("log")
    axis.set_xlabel("context length (tokens)")
    axis.set_ylabel("perplexity")
    axis.set_title(f"Perplexity by context length: {Path(result['run']).name}")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def evaluate_model_lengths(model: nn.Module, tokenizer, stream: list[int], lengths: list[int], windows: int,
                           passkeys: int, console: Console, name: str) -> list[dict[str, Any]]:
    """One row of the length evaluation (perplexity and passkey accuracy per length) for `model`."""
    was_training = model.training
    model.eval()
    points = []
    for length in lengths:
        point = {"length": length, **window_perplexity(model, stream, length, windows)}
        if passkeys:
            point["passkey"] = passkey_accuracy(model, tokenizer, length, passkeys)
        console.print(f"  {name} at {length:,} tokens: perplexity {point['perplexity']:.3f}"
                      + (f", passkey {point['passkey']:.0%}" if passkeys else ""), highlight=False)
        points.append(point)
    model.train(was_training)
    return points


def evaluate_run_lengths(run_dir: str | Path, lengths: list[int], data: str | Path, windows: int = 1,
                         passkeys: int = 1, console: Console | None = None) -> dict[str, Any]:
    """Base view vs tuned model of a finished run: perplexity and passkey accuracy at each length. Writes
    `length_eval.json` and `length_eval.png` into `run_dir` and returns what the JSON holds."""
    from slimtune.runs import open_run
    from slimtune.train.precision import resolve_device

    console = console or Console(stderr=True)
    run_dir = Path(run_dir)
    if windows < 1 or passkeys < 0:
        raise SlimtuneError(f"--windows must be at least 1 and --passkeys at least 0 (got {windows}, {passkeys})")
    if data is None:
        raise SlimtuneError("--lengths needs long held-out documents: pass --data FILE_OR_DIRECTORY (text files, or "
                            "JSONL rows with a 'text' key)")
    documents = read_documents(data)
    model, tokenizer, attached = open_run(run_dir)
    model.to(resolve_device("auto"))
    stream = token_stream(tokenizer, documents)
    if len(stream) < max(lengths):
        raise DataError(f"the documents in '{data}' hold {len(stream):,} tokens, fewer than the longest length "
                        f"{max(lengths):,}: pass longer documents or smaller --lengths")
    console.print(f"long-context evaluation of {escape(str(run_dir))}: {len(documents)} documents, "
                  f"{len(stream):,} tokens; lengths {', '.join(map(str, lengths))}")
    with attached.base_view() as base_model:
        base = evaluate_model_lengths(base_model, tokenizer, stream, lengths, windows, passkeys, console, "base")
    tuned = evaluate_model_lengths(model, tokenizer, stream, lengths, windows, passkeys, console, "tuned")
    result = {"run": str(run_dir), "data": str(data), "documents": len(documents), "windows": windows,
              "passkey_trials": passkeys, "base": base, "tuned": tuned}
    (run_dir / LENGTH_REPORT).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    plot_lengths(result, run_dir / LENGTH_PLOT)
    return result


def format_length_table(result: dict[str, Any]) -> str:
    """A plain-text table: one line per length, base and tuned perplexity (and passkey accuracy)."""
    with_keys = result["passkey_trials"] > 0
    header = f"{'length':>8}  {'base ppl':>10}  {'tuned ppl':>10}" + ("  base key  tuned key" if with_keys else "")
    lines = [header]
    for base, tuned in zip(result["base"], result["tuned"]):
        line = f"{base['length']:>8}  {base['perplexity']:>10.3f}  {tuned['perplexity']:>10.3f}"
        if with_keys:
            line += f"  {base['passkey']:>8.0%}  {tuned['passkey']:>9.0%}"
        lines.append(line)
    return "\n".join(lines)
