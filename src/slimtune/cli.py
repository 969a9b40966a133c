"""The `slimtune` command: a thin layer over the Python API.

User errors (`SlimtuneError`) print one clear message and exit with status 2, never a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from slimtune.errors import SlimtuneError

app = typer.Typer(
    name="slimtune", add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="Fine-tune language models on the hardware you have (LoRA, natively in PyTorch).",
)
console = Console(stderr=True)


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="YAML config file, e.g. examples/extract.yaml.")],
    overrides: Annotated[Optional[list[str]], typer.Argument(
        help="KEY=VALUE overrides that win over the file, e.g. train.lr=1e-4 lora.r=8.")] = None,
) -> None:
    """Fine-tune a model: data -> adapter files, metrics.jsonl, loss.png, eval.json in `output`.

    SIGTERM or Ctrl-C finishes the current step, saves a checkpoint and exits 0; `resume=true`
    continues from the newest complete checkpoint.
    """
    from slimtune.api import finetune
    from slimtune.config import load_config
    from slimtune.train.loop import TrainingInterrupted

    try:
        finetune(load_config(config, overrides or []), console)
    except TrainingInterrupted as stopped:
        # A requested stop is not an error: the checkpoint is complete and the run can continue.
        args = " ".join([str(config), *(o for o in overrides or [] if not o.startswith("resume="))])
        console.print(f"{escape(str(stopped))}\nresume with: slimtune train {escape(args)} resume=true",
                      highlight=False, soft_wrap=True)
        raise typer.Exit(0) from None


@app.command()
def merge(
    run_dir: Annotated[Path, typer.Argument(help="A training run's output directory (or a PEFT adapter).")],
    out_dir: Annotated[Path, typer.Argument(help="New directory for the merged model.")],
) -> None:
    """Merge the adapter into the base weights (W' = W + alpha/r B A): a plain HF model directory."""
    import json

    from slimtune.api import MERGE_REPORT, merge_run

    out = merge_run(run_dir, out_dir)
    console.print(f"wrote merged model to {escape(str(out))}/ (load it with AutoModelForCausalLM.from_pretrained)",
                  highlight=False, soft_wrap=True)
    if (out / MERGE_REPORT).is_file():  # QLoRA: the 4-bit base was dequantized for the merge
        diff = json.loads((out / MERGE_REPORT).read_text())["max_abs_prob_diff_vs_unmerged_nf4"]
        console.print(f"NF4 base dequantized for the merge; max |p_merged - p_unmerged 4-bit| = {diff:.2e}")


@app.command()
def generate(
    run_dir: Annotated[Path, typer.Argument(help="A training run's output directory.")],
    prompt: Annotated[str, typer.Argument(help="The user message.")],
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Token limit of the reply.")] = 128,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0)] = 1.0,
    system: Annotated[Optional[str], typer.Option(help="A system message to prepend.")] = None,
    seed: Annotated[int, typer.Option(help="Seed for sampling.")] = 0,
    image: Annotated[Optional[list[Path]], typer.Option(
        help="An image shown with the prompt (repeat for several); needs a vision-language model.")] = None,
) -> None:
    """Print the tuned model's reply to one prompt."""
    import torch

    from slimtune.api import generate as generate_reply
    from slimtune.api import load_run
    from slimtune.models.vision import run_processor

    torch.manual_seed(seed)
    model, tokenizer = load_run(run_dir)
    processor = run_processor(run_dir)  # None for a text-only model (then an --image is refused)
    print(generate_reply(model, tokenizer, prompt, max_new_tokens, temperature, top_p, system, images=image or (),
                         processor=processor))


@app.command("eval")
def evaluate(
    run_dir: Annotated[Path, typer.Argument(help="A training run's output directory.")],
    data: Annotated[Optional[Path], typer.Option(
        help="JSON/JSONL examples to evaluate on (default: the run's data.eval).")] = None,
    generations: Annotated[Optional[int], typer.Option(
        min=0, help="Greedy replies scored by exact match, ROUGE-L and BLEU (default: the run's eval.generations).")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option(
        min=1, help="Token limit of each reply (default: the run's eval.max_new_tokens).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(
        min=1, help="Examples per batch (default: the run's eval.batch_size).")] = None,
) -> None:
    """Base vs tuned on held-out data: loss, perplexity, exact match, ROUGE-L, BLEU.

    Prints the metrics table and writes eval_report.md and eval_metrics.json into RUN_DIR.
    """
    from slimtune.api import EVAL_METRICS, EVAL_REPORT, evaluate_run
    from slimtune.evaluate import format_metrics_table

    result = evaluate_run(run_dir, data, generations, max_new_tokens, batch_size, console)
    print(format_metrics_table(result["base"], result["tuned"]))
    console.print(f"wrote {escape(str(run_dir / EVAL_REPORT))} and {EVAL_METRICS}", highlight=False, soft_wrap=True)


@app.command()
def chat(
    run_dir: Annotated[Path, typer.Argument(help="A training run's output directory.")],
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 256,
    temperature: Annotated[float, typer.Option(min=0.0)] = 0.0,
    system: Annotated[Optional[str], typer.Option(help="A system message.")] = None,
    image: Annotated[Optional[list[Path]], typer.Option(
        help="An image shown with the first message (repeat for several); needs a vision-language model.")] = None,
) -> None:
    """Talk to the tuned model. Empty line or /exit (or Ctrl-D) ends; /reset clears the history."""
    from slimtune.api import generate as generate_reply
    from slimtune.api import load_run
    from slimtune.data.images import resolve_ref
    from slimtune.models.vision import run_processor

    model, tokenizer = load_run(run_dir)
    processor = run_processor(run_dir)
    images = [{"type": "image", "image": resolve_ref(str(path), "--image", "--image")} for path in image or ()]
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    console.print("chat with the tuned model; /reset clears the history, /exit or an empty line ends")
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if not line or line == "/exit":
            break
        if line == "/reset":
            history = history[:1] if system else []
            continue
        first = not any(m["role"] == "user" for m in history)
        content = [*images, {"type": "text", "text": line}] if images and first else line
        history.append({"role": "user", "content": content})
        reply = generate_reply(model, tokenizer, history, max_new_tokens, temperature, processor=processor)
        history.append({"role": "assistant", "content": reply})
        print(f"model> {reply}", flush=True)


@app.command()
def serve(
    adapter: Annotated[Optional[list[str]], typer.Option(
        "--adapter", help="NAME=RUN_DIR: serve a run's adapter as model NAME (repeatable); the directory must lie "
                          "inside --adapter-root.")] = None,
    model: Annotated[Optional[str], typer.Option(
        help="Base model: alias, HF directory, .gguf file or hub id (default: the one the adapters record).")] = None,
    host: Annotated[str, typer.Option(help="Address to listen on; 0.0.0.0 exposes the server to the network.")] =
        "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port (0: any free port).")] = 8000,
    api_key: Annotated[Optional[str], typer.Option(
        envvar="SLIMTUNE_API_KEY", show_envvar=True,
        help="Require 'Authorization: Bearer KEY' on every route but /health (prefer the environment variable: "
             "command lines are visible to other users).")] = None,
    adapter_root: Annotated[Optional[Path], typer.Option(
        help="Adapters (at startup and via /v1/load_lora_adapter) load only from inside this directory "
             "(default: the working directory).")] = None,
    max_tokens: Annotated[int, typer.Option(min=1, help="The largest max_tokens a request may ask for.")] = 1024,
    max_prompt_tokens: Annotated[int, typer.Option(min=1, help="Longer prompts are refused (400).")] = 4096,
    max_body_bytes: Annotated[int, typer.Option(min=1, help="Larger request bodies are refused (413).")] = 1 << 20,
    max_concurrent: Annotated[int, typer.Option(
        min=1, help="Prompts queued or generating at once; more are refused (429).")] = 256,
    max_batch: Annotated[int, typer.Option(min=1, help="Sequences decoded together in one forward pass.")] = 64,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1 ...")] = "auto",
    quantize: Annotated[str, typer.Option(
        help="nf4: freeze the base's linear layers in NF4, the base QLoRA adapters were trained on; none: keep "
             "them as loaded; auto: nf4 when every --adapter is a QLoRA run.")] = "auto",
    image_root: Annotated[Optional[Path], typer.Option(
        help="Vision-language models: the only directory local image paths in requests may name (default: none, "
             "only data: URLs).")] = None,
) -> None:
    """Serve the base model and adapters with an OpenAI-compatible API (chat and text completions,
    streaming, adapters loaded and unloaded at run time); requests for different adapters share batches."""
    from slimtune.errors import ConfigError
    from slimtune.serve import ServeLimits
    from slimtune.serve import serve as run_server

    adapters: dict[str, str] = {}
    for spec in adapter or []:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--adapter {spec!r} must be NAME=RUN_DIR, e.g. --adapter docs=runs/docstrings")
        if name in adapters:
            raise ConfigError(f"--adapter names '{name}' twice: give each adapter its own name")
        adapters[name] = path
    limits = ServeLimits(max_tokens=max_tokens, default_max_tokens=min(256, max_tokens),
                         max_prompt_tokens=max_prompt_tokens, max_body_bytes=max_body_bytes,
                         max_concurrent=max_concurrent, max_batch=max_batch)
    run_server(model, adapters, host, port, api_key, adapter_root, limits, device, console, quantize, image_root)


def main() -> None:
    """Entry point: run the app, turning user errors into one line on stderr and exit status 2."""
    try:
        # Standalone mode: typer prints usage errors itself (exit 2) and handles --help, typer.Exit and
        # Ctrl-C; catching click's classes here breaks with typer >= 0.22, which vendors its own click.
        app()
    except SlimtuneError as exc:
        # Escaped: messages hold brackets ('[q_proj, v_proj]') that are not markup. soft_wrap: no line
        # breaks inside paths when stderr is not a terminal.
        console.print(f"[bold red]error:[/bold red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
