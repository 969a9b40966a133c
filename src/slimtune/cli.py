"""The `slimtune` command: a thin layer over the Python API.

User errors (`SlimtuneError`) print one clear message and exit with status 2, never a traceback.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from slimtune.atomic import WRITE_ERRORS, write_failure_reason
from slimtune.errors import SlimtuneError

app = typer.Typer(
    name="slimtune", add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="Fine-tune language models on the hardware you have (LoRA, natively in PyTorch).",
)
console = Console(stderr=True)


def _check_sampling(seed: int | None = None, temperature: float = 0.0, top_p: float = 1.0) -> None:
    """Option values typer's ranges let through (NaN compares false with every bound; torch takes no seed
    past 64 bits), as one `ConfigError` line before anything loads."""
    import math

    from slimtune.errors import ConfigError

    if seed is not None and not 0 <= seed < 2**64:
        raise ConfigError(f"--seed {seed} is out of range: use a whole number from 0 to 2**64-1")
    for name, value in (("--temperature", temperature), ("--top-p", top_p)):
        if not math.isfinite(value):
            raise ConfigError(f"{name} {value} is not a finite number: use e.g. {name} 0.7")


def _check_text(text: str, what: str) -> str:
    """Text from the command line or the terminal must be real characters: bytes that were not UTF-8
    arrive as lone surrogates (Python's surrogateescape), which no tokenizer takes."""
    from slimtune.errors import ConfigError

    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ConfigError(f"{what} is not UTF-8 text (at character {exc.start}); set the terminal or the input "
                          "file to UTF-8") from None
    return text


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="YAML config file, e.g. examples/extract.yaml.")],
    overrides: Annotated[Optional[list[str]], typer.Argument(
        help="KEY=VALUE overrides that win over the file, e.g. train.lr=1e-4 lora.r=8.")] = None,
    nproc: Annotated[int, typer.Option(
        min=1, help="Train with this many processes on this machine (starts torchrun; one per GPU, or a share "
                    "of the CPU cores each).")] = 1,
) -> None:
    """Fine-tune a model: data -> adapter files, metrics.jsonl, loss.png, eval.json in `output`.

    SIGTERM or Ctrl-C finishes the current step, saves a checkpoint and exits 0; `resume=true`
    continues from the newest complete checkpoint. Several processes: --nproc N, or
    `torchrun --nproc_per_node=N -m slimtune train CONFIG` (also across machines with --nnodes).
    """
    from slimtune.train.distributed import launched_world_size

    if nproc > 1 and launched_world_size() == 1:
        from slimtune.launch import launch

        raise typer.Exit(launch(nproc, [str(config), *(overrides or [])]))
    from slimtune.api import finetune
    from slimtune.config import load_config
    from slimtune.train.signals import StopRequested

    try:
        finetune(load_config(config, overrides or []), console)
    except StopRequested as stopped:
        # A requested stop is not an error: any checkpoint is complete and the run can continue.
        if not _prints_errors(None):
            raise typer.Exit(0) from None
        args = " ".join([str(config), *(o for o in overrides or [] if not o.startswith("resume="))])
        again = f"resume with: slimtune train {args} resume=true" if stopped.resumable else \
            f"start again with: slimtune train {args}"
        console.print(f"{escape(str(stopped))}\n{escape(again)}", highlight=False, soft_wrap=True)
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
def combine(
    adapters: Annotated[list[Path], typer.Argument(
        help="Two or more run / PEFT adapter directories of one base model, then the new directory OUT.")],
    weights: Annotated[Optional[str], typer.Option(help="One weight per adapter, e.g. 0.6,0.4 (default: 1 each).")] = None,
    how: Annotated[str, typer.Option(help="linear, cat, svd, ties, dare_linear or dare_ties (PEFT's definitions).")] = "cat",
    density: Annotated[Optional[float], typer.Option(help="ties / dare_*: the fraction of entries kept.")] = None,
    svd_rank: Annotated[Optional[int], typer.Option(help="svd: the new rank (default: the largest input rank).")] = None,
    seed: Annotated[int, typer.Option(help="dare_*: seed of the random drop masks.")] = 0,
    model: Annotated[Optional[str], typer.Option(help="The base model, when the adapters do not name it.")] = None,
) -> None:
    """Combine adapters into one new adapter (PEFT's format): slimtune combine A B --weights 0.6,0.4 --how cat OUT."""
    from slimtune.combine import combine_adapters, parse_weights

    if len(adapters) < 3:
        raise SlimtuneError("combine needs at least two adapter directories and the output directory: "
                            "slimtune combine A B OUT")
    *sources, out = adapters
    written = combine_adapters(sources, out, parse_weights(weights, len(sources)), how, density, svd_rank, seed, model)
    console.print(f"wrote the {escape(how)} combination of {len(sources)} adapters to {escape(str(written))}/",
                  highlight=False, soft_wrap=True)


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

    _check_sampling(seed, temperature, top_p)
    _check_text(prompt, "the prompt")
    _check_text(system or "", "--system")
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
    lengths: Annotated[Optional[str], typer.Option(
        help="Long-context evaluation instead: perplexity and passkey retrieval at these lengths, e.g. "
        "2048,4096,8192,16384, on the long documents in --data (a text file, a directory of text files, or "
        "JSONL rows with 'text').")] = None,
    windows: Annotated[int, typer.Option(min=1, help="With --lengths: windows of each length to score.")] = 1,
    passkeys: Annotated[int, typer.Option(min=0, help="With --lengths: passkey trials per length (0: none).")] = 1,
) -> None:
    """Base vs tuned on held-out data: loss, perplexity, exact match, ROUGE-L, BLEU.

    Prints the metrics table and writes eval_report.md and eval_metrics.json into RUN_DIR; with --lengths,
    length_eval.json and length_eval.png (perplexity against context length).
    """
    from slimtune.api import EVAL_METRICS, EVAL_REPORT, evaluate_run
    from slimtune.evaluate import format_metrics_table

    if lengths is not None:
        from slimtune.evaluate_lengths import (
            LENGTH_PLOT, LENGTH_REPORT, evaluate_run_lengths, format_length_table, parse_lengths,
        )

        result = evaluate_run_lengths(run_dir, parse_lengths(lengths), data, windows, passkeys, console)
        print(format_length_table(result))
        console.print(f"wrote {escape(str(run_dir / LENGTH_REPORT))} and {LENGTH_PLOT}", highlight=False, soft_wrap=True)
        return

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

    from slimtune.errors import ConfigError

    _check_sampling(temperature=temperature)
    _check_text(system or "", "--system")
    model, tokenizer = load_run(run_dir)
    processor = run_processor(run_dir)
    images = [{"type": "image", "image": resolve_ref(str(path), "--image", "--image")} for path in image or ()]
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    console.print("chat with the tuned model; /reset clears the history, /exit or an empty line ends")
    while True:
        try:
            line = _check_text(input("you> ").strip(), "the input line")
        except EOFError:
            break
        except UnicodeDecodeError as exc:
            raise ConfigError(f"the input line is not UTF-8 text (byte {exc.object[exc.start]:#04x}); set the "
                              "terminal or the input file to UTF-8") from None
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
    max_kv_tokens: Annotated[Optional[int], typer.Option(
        min=1, help="KV-cache budget in tokens: rows x (longest prompt + max_tokens) stays under it, requests wait "
                    "for room (default: half the memory free at start).")] = None,
    max_adapters: Annotated[int, typer.Option(min=1, help="Adapters loaded at once; more are refused (409).")] = 64,
    allow_host: Annotated[Optional[list[str]], typer.Option(
        help="On a loopback --host, also answer requests with this Host header (repeatable; default: only "
             "localhost, 127.0.0.1, [::1]).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1 ...")] = "auto",
    quantize: Annotated[str, typer.Option(
        help="nf4: freeze the base's linear layers in NF4, the base QLoRA adapters were trained on; none: keep "
             "them as loaded; auto: nf4 when every --adapter is a QLoRA run.")] = "auto",
    route_name: Annotated[str, typer.Option(
        help="Model name that routes each request to the adapter whose training prompts are closest (adapters "
             "with a routing signature); empty: no routing.")] = "auto",
    route_threshold: Annotated[Optional[float], typer.Option(
        help="Route to the base model below this similarity (default: each signature's own threshold).")] = None,
    image_root: Annotated[Optional[Path], typer.Option(
        help="Vision-language models: the only directory local image paths in requests may name (default: none, "
             "only data: URLs).")] = None,
    dtype: Annotated[str, typer.Option(
        help="Weights of the base model: auto keeps them as loaded (fp32); bfloat16 halves their memory, but "
             "greedy replies can differ from fp32's and whole loads may run slower (README, Serving).")] = "auto",
) -> None:
    """Serve the base model and adapters with an OpenAI-compatible API (chat and text completions,
    streaming, adapters loaded and unloaded at run time); requests for different adapters share batches."""
    from slimtune.errors import ConfigError
    from slimtune.serve import ServeLimits
    from slimtune.serve import serve as run_server

    if device not in ("auto", "cpu", "cuda") and not (device.startswith("cuda:") and device[5:].isdigit()):
        raise ConfigError(f"--device {device!r} is not a device: use auto, cpu, cuda or cuda:N (e.g. cuda:1)")
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
                         max_concurrent=max_concurrent, max_batch=max_batch, max_kv_tokens=max_kv_tokens,
                         max_adapters=max_adapters)
    run_server(model, adapters, host, port, api_key, adapter_root, limits, device, console, quantize,
               tuple(allow_host or ()), route_name or None, route_threshold, image_root, dtype=dtype)


def _prints_errors(exc: SlimtuneError | None) -> bool:
    """Under torchrun only process 0 reports (a problem found by the check stage is found by all), except
    that every process reports a failed peer: the one that failed may be process 0."""
    from slimtune.train.distributed import PeerFailure, launched_rank

    if getattr(exc, "reported", False):
        return False
    return launched_rank() == 0 or isinstance(exc, PeerFailure)


@app.command()
def plan(
    config: Annotated[Optional[str], typer.Argument(help="YAML config file (or, with --model, a KEY=VALUE).")] = None,
    overrides: Annotated[Optional[list[str]], typer.Argument(help="KEY=VALUE overrides, e.g. train.batch_size=8.")] = None,
    model: Annotated[Optional[str], typer.Option(help="Plan for this model without a config file.")] = None,
    method: Annotated[str, typer.Option(help="With --model: the method to break down.")] = "lora",
    length: Annotated[int, typer.Option(min=2, help="With --model: tokens per example (data.max_length).")] = 1024,
    memory: Annotated[Optional[str], typer.Option(help="Budget on this machine's device, e.g. 24GB, 16GiB: "
                                                       "which methods fit, and what makes the others fit.")] = None,
    gpu: Annotated[Optional[str], typer.Option(help="Budget of a GPU (planned from any machine), e.g. 24GB.")] = None,
    published: Annotated[bool, typer.Option(help="Also print 7B / 13B / 70B Llama figures next to published ones.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
) -> None:
    """Memory and time arithmetic from the model's config.json alone: breakdown, budget, recommendation."""
    import json

    from slimtune.plan_report import plan_command, published_rows, render

    if (config is None) == (model is None):
        from slimtune.errors import ConfigError

        raise ConfigError("slimtune plan needs a config file or --model (not both), e.g. "
                          "slimtune plan examples/extract.yaml or slimtune plan --model smollm2-135m --memory 8GB")
    result = plan_command(config, overrides or [], model, method, length, memory, gpu, console)
    if as_json:
        print(json.dumps({**result.to_json(), **({"published": published_rows()} if published else {})}, indent=2))
    else:
        print(render(result, published))


@app.command()
def compare(
    spec: Annotated[Path, typer.Argument(help="Comparison file, e.g. examples/compare.yaml.")],
) -> None:
    """Train every listed method on the same data, one after another (a finished entry is not run again),
    then write compare.md, compare.json and plots (loss curves, quality against peak memory)."""
    from slimtune.compare import COMPARE_MD, run_compare

    out = run_compare(spec, console)
    print((out / COMPARE_MD).read_text(encoding="utf-8"))
    console.print(f"wrote {escape(str(out))}/ (compare.md, compare.json, compare_loss.png, compare_quality.png)",
                  highlight=False, soft_wrap=True)


@app.command()
def signature(
    run_dirs: Annotated[list[Path], typer.Argument(help="Run directories (training writes the signature itself).")],
    data: Annotated[Optional[Path], typer.Option(help="Training prompts (default: the run's data.train).")] = None,
    model: Annotated[Optional[str], typer.Option(help="The base model (default: the run's).")] = None,
) -> None:
    """Write each run's routing signature (its training prompts as the base model sees them), for `model: auto`
    in `slimtune serve` and `slimtune.route`; needs no training."""
    from slimtune.routing import compute_signature

    for run_dir in run_dirs:
        written = compute_signature(run_dir, data, model)
        console.print(f"wrote {escape(str(written))}", highlight=False, soft_wrap=True)


def main() -> None:
    """Entry point: run the app, turning user errors into one line on stderr and exit status 2."""
    try:
        # Standalone mode: typer prints usage errors itself (exit 2) and handles --help, typer.Exit and
        # Ctrl-C; catching click's classes here breaks with typer >= 0.22, which vendors its own click.
        app()
    except SlimtuneError as exc:
        if not _prints_errors(exc):
            # torchrun stops every process once one exits: leave process 0 time to print the report.
            time.sleep(2)
            sys.exit(2)
        # Escaped: messages hold brackets ('[q_proj, v_proj]') that are not markup. soft_wrap: no line
        # breaks inside paths when stderr is not a terminal.
        console.print(f"[bold red]error:[/bold red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)
    except WRITE_ERRORS as exc:
        # A file the commands read or write failed in a place no check foresaw (a full disk, a permission):
        # still one line naming the file, not a traceback.
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        console.print(f"[bold red]error:[/bold red] {escape(write_failure_reason(exc) + where)}; free disk space or "
                      "fix permissions, then run the command again", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
