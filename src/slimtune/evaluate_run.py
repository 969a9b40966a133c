"""`slimtune eval`: a finished run's base view vs the tuned model on held-out data, as a report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from slimtune.atomic import reported_write_failures
from slimtune.config import EvalSettings
from slimtune.data import load_dataset
from slimtune.errors import AdapterError, DataError, SlimtuneError
from slimtune.data.images import message_text
from slimtune.evaluate import evaluate_model, format_eval_report
from slimtune.models.vision import run_processor
from slimtune.runs import EVAL_METRICS, EVAL_REPORT, RUN_CONFIG, open_run, run_config
from slimtune.train.precision import resolve_device


def evaluate_run(run_dir: str | Path, data: str | Path | None = None, generations: int | None = None,
                 max_new_tokens: int | None = None, batch_size: int | None = None,
                 console: Console | None = None) -> dict[str, Any]:
    """Evaluate a run's base model (its method's base view: adapters off, trained base tensors restored)
    and tuned model on `data`.

    Both get the response-token loss and perplexity on every example, and greedy replies on the first
    `generations` examples scored by exact match, mean ROUGE-L F1 and corpus BLEU. `data` defaults to the
    run's `data.eval`; the other settings default to the run's `eval` section. Writes `eval_report.md`
    (metrics table, then each example with both replies) and `eval_metrics.json` into `run_dir`, and
    returns what the JSON holds. The models run in fp32, so figures do not depend on the hardware's
    bf16 path.
    """
    console = console or Console(stderr=True)
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise AdapterError(f"run directory '{run_dir}' does not exist: pass the `output` directory of a training run")
    cfg = run_config(run_dir)
    if data is None:
        if cfg is None or cfg.data.eval is None:
            missing = f"its {RUN_CONFIG} sets no data.eval" if cfg else f"it has no {RUN_CONFIG}"
            raise SlimtuneError(f"no evaluation data for '{run_dir}': {missing}; pass --data FILE (JSON or JSONL)")
        data, source = cfg.data.eval, f"data.eval in {run_dir / RUN_CONFIG}"
    else:
        source = "--data"
    data = Path(data)
    if not data.is_file():
        raise DataError(f"data file '{data}' ({source}) does not exist: pass an existing JSON or JSONL file with --data")
    settings = cfg.eval if cfg else EvalSettings()
    generations = settings.generations if generations is None else generations
    max_new_tokens = settings.max_new_tokens if max_new_tokens is None else max_new_tokens
    batch_size = settings.batch_size if batch_size is None else batch_size
    for name, value, least in (("generations", generations, 0), ("max_new_tokens", max_new_tokens, 1),
                               ("batch_size", batch_size, 1)):
        if value < least:
            raise SlimtuneError(f"{name} must be at least {least}, got {value}")

    model, tokenizer, attached = open_run(run_dir)
    model.to(resolve_device("auto"))
    dataset = load_dataset(data, tokenizer, cfg.data.format if cfg else "auto", cfg.data.max_length if cfg else 1024,
                           run_processor(run_dir), cfg.data.image_max_pixels if cfg else None)
    shown = min(generations, len(dataset))
    console.print(f"evaluating {escape(str(run_dir))} on {escape(str(data))}: {len(dataset)} examples, "
                  f"{shown} generations of up to {max_new_tokens} tokens")
    console.print("evaluating the base model ...")
    with attached.base_view() as base_model:
        base, base_replies = evaluate_model(base_model, tokenizer, dataset, shown, max_new_tokens, batch_size)
    console.print("evaluating the tuned model ...")
    tuned, tuned_replies = evaluate_model(model, tokenizer, dataset, shown, max_new_tokens, batch_size)

    outputs = [
        {"prompt": conversation[:-1], "reference": message_text(conversation[-1]), "base": b, "tuned": t}
        for conversation, b, t in zip(dataset.conversations, base_replies, tuned_replies)
    ]
    result: dict[str, Any] = {
        "run": str(run_dir), "data": str(data), "examples": len(dataset), "generations": shown,
        "max_new_tokens": max_new_tokens, "base": base, "tuned": tuned, "outputs": outputs,
    }
    summary = (f"Data: `{data}`, {len(dataset)} examples ({base['tokens']:,} response tokens). Loss and perplexity "
               f"over all examples; exact match, ROUGE-L and BLEU on greedy replies to the first {shown} "
               f"(at most {max_new_tokens} new tokens).")
    report = format_eval_report(f"Evaluation of `{run_dir}`", summary, base, tuned, outputs)
    with reported_write_failures(f"the evaluation report to '{run_dir}'", "run the evaluation again"):
        (run_dir / EVAL_REPORT).write_text(report, encoding="utf-8")
        (run_dir / EVAL_METRICS).write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return result
