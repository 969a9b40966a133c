"""GPU check: every method trains on CUDA and agrees with PEFT; speed and memory against the peers; serving.

One command, one GPU, about 5-8 minutes; writes `gpu_check.json` and `gpu_check.md` to `--out-dir`:

1. correctness, for every method in the registry (`slimtune.methods.registry.METHODS`): 5 optimizer
   steps on a randomly initialised Llama-shaped model of 1.1B parameters (`random_llama.py`, `1b`) in
   bf16 on the device, each method with its default settings and lr 1e-3, on one training example
   repeated (so every batch is the same batch); the losses must be finite and the last below the first. Then the finished run, loaded by `slimtune.load_run`, must give the
   logits of an independent load of the same files: PEFT (`PeftModel.from_pretrained`) for an
   adapter, transformers + the saved tensors for freeze, `AutoModelForCausalLM` for a full model.
   Both in fp32 with TF32 off; pass when max |difference| <= 1e-4 x (1 + max |logit|) and the tuned
   model differs from its base by at least 10x that difference (so the comparison sees the adapter).
   A QLoRA adapter is compared on the NF4-dequantized base.
2. NF4: `slimtune.quant.quantize_nf4` against bitsandbytes' quantizer on the device, on weights of the
   model: the packed 4-bit codes must be equal, and the block absmax without double quantization too;
   the 8-bit codes of double quantization are reported (bitsandbytes' CUDA kernel picks the exact
   nearest entry, its CPU kernel and ours a 65,536-point grid: ~0.2% may differ on CUDA).
3. speed and memory, in this process, one configuration after the other on the same model and data
   (LoRA r=16, alpha 32, dropout 0.05 on q/k/v/o; batch 8; lr 2e-4; one epoch, 256 examples of ~455
   tokens): slimtune (`slimtune_runner.py`) against PEFT + transformers `Trainer` with bf16 autocast
   (`peer_trainer.py`) for LoRA and DoRA, and against PEFT + bitsandbytes NF4 (double quantization,
   bf16 compute) for QLoRA. Reported: trained tokens/s and `torch.cuda.max_memory_allocated` (the
   peer from the start of `trainer.train()`, after its model loaded; slimtune from before its load),
   and slimtune / peer ratios.
4. serving: `slimtune serve` in its own process on the device with 4 random rank-16 adapters;
   64 concurrent streaming clients (the openai client) send 128 chat requests, each for a random
   adapter, 64 output tokens each (`serve_load.py`); output tokens/s and latencies.

    python bench/gpu_check.py --device cuda --out-dir OUT     # the check (README, "GPU check")
    python bench/gpu_check.py --device cpu --tiny             # the same steps on a tiny model: a dry run for CI

Exit status 0 when every correctness and NF4 row passes and no section failed; 1 otherwise. A section
that would not finish within `--budget-s` is skipped and says so.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import os
import platform
import random
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

CORRECTNESS_STEPS = 5
CORRECTNESS_LR = 1e-3
LOGIT_RTOL = 1e-4  # max |slimtune - reference| <= LOGIT_RTOL * (1 + max |reference logit|)
EFFECT_FACTOR = 10.0  # the tuned model must differ from its base by at least this times that difference
SECTIONS = ("correctness", "nf4", "speed", "serving")
WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
         "quebec romeo sierra tango uniform victor whiskey xray yankee zulu").split()


class Budget:
    """Seconds left of `--budget-s`; sections ask before they start what they expect to need."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.perf_counter() + seconds

    def left(self) -> float:
        return self.deadline - time.perf_counter()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    """Drop what earlier configurations left, so each peak is its own."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def environment(device: torch.device) -> dict[str, Any]:
    import transformers

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "transformers": transformers.__version__, "device": str(device)}
    for name in ("peft", "bitsandbytes", "accelerate"):
        try:
            info[name] = __import__(name).__version__
        except Exception as exc:  # noqa: BLE001 - a missing peer is reported, the rows that need it fail
            info[name] = f"unavailable ({type(exc).__name__}: {exc})"
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_memory_gb"] = round(torch.cuda.get_device_properties(device).total_memory / 1e9, 1)
        info["cuda"] = torch.version.cuda
    return info


# -- data ------------------------------------------------------------------------------------------

def write_data(path: Path, count: int, words: int, distinct: int | None = None, seed: int = 0) -> Path:
    """`count` chat rows: the user lists `words` random words, the assistant repeats them in reverse
    (every row about as long, ~13 tokens per word pair with the byte tokenizer). With `distinct`, only that
    many different rows, repeated: with one, every batch is the same batch, so the step losses of a
    short run compare like with like and fall whenever the optimizer makes progress."""
    rng = random.Random(seed)
    rows = [[rng.choice(WORDS) for _ in range(words)] for _ in range(distinct or count)]
    with path.open("w", encoding="utf-8") as handle:
        for index in range(count):
            chosen = rows[index % len(rows)]
            row = {"messages": [{"role": "user", "content": "Reverse: " + " ".join(chosen)},
                                {"role": "assistant", "content": " ".join(reversed(chosen))}]}
            handle.write(json.dumps(row) + "\n")
    return path


# -- 1. correctness ----------------------------------------------------------------------------------

def method_config(name: str, model_dir: Path, data: Path, out: Path, device: torch.device) -> dict:
    """The method with its defaults: the check must not need to know any method's own keys."""
    return {"model": str(model_dir), "method": name, "output": str(out), "overwrite": True,
            "data": {"train": str(data), "max_length": 512},
            "train": {"max_steps": CORRECTNESS_STEPS, "batch_size": 4, "lr": CORRECTNESS_LR, "warmup_ratio": 0.0,
                      "schedule": "constant", "precision": "bf16", "device": device.type, "save_every": None,
                      "log_every": 1, "seed": 0}}


def reference_model(run_dir: Path, model_dir: Path, quantized_base: bool):
    """(model, how) loaded from the run's files without slimtune's loaders, in fp32 on the CPU, or
    (None, reason) for files no independent loader reads."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    if (run_dir / "adapter_config.json").is_file():
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        how = "PEFT PeftModel.from_pretrained"
        if quantized_base:
            # the base the adapter was trained on; the quantizer itself is checked against bitsandbytes below
            from slimtune.quant import dequantize_model, quantize_model

            quantize_model(base, compute_dtype=torch.float32)
            dequantize_model(base, torch.float32)
            how += " on the NF4-dequantized base"
        return PeftModel.from_pretrained(base, str(run_dir)), how
    if (run_dir / "freeze_model.safetensors").is_file():
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        tensors = load_file(str(run_dir / "freeze_model.safetensors"))
        missing = set(tensors) - set(dict(base.named_parameters()))
        if missing:
            raise AssertionError(f"freeze tensors not in the base model: {sorted(missing)[:3]}")
        base.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=False)
        return base, "transformers base + freeze_model.safetensors (load_state_dict)"
    if (run_dir / "config.json").is_file():
        return AutoModelForCausalLM.from_pretrained(run_dir, dtype=torch.float32), "transformers from_pretrained"
    return None, "no PEFT, freeze or HF model files: no independent loader"


@torch.no_grad()
def logits_of(model, ids: torch.Tensor, device: torch.device) -> torch.Tensor:
    model.to(device).eval()
    return model(input_ids=ids.to(device)).logits.float().cpu()


def check_method(name: str, model_dir: Path, data: Path, work: Path, device: torch.device,
                 ids: torch.Tensor, base_logits: torch.Tensor) -> dict[str, Any]:
    import slimtune
    from rich.console import Console

    from slimtune.config import build_config
    from slimtune.methods.registry import METHODS

    row: dict[str, Any] = {"method": name}
    out = work / f"run-{name}"
    free_memory(device)
    started = time.perf_counter()
    result = slimtune.finetune(build_config(method_config(name, model_dir, data, out, device)),
                               Console(stderr=True, quiet=True))
    sync(device)
    row["train_s"] = round(time.perf_counter() - started, 1)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics]
    row["losses"] = losses
    row["max_memory_allocated_mb"] = metrics[-1].get("max_memory_allocated_mb")
    row["precision"] = result.precision
    row["losses_finite"] = all(math.isfinite(x) for x in losses) and len(losses) == CORRECTNESS_STEPS
    row["losses_fall"] = row["losses_finite"] and losses[-1] < losses[0]

    ours, _ = slimtune.load_run(out)
    our_logits = logits_of(ours, ids, device)
    del ours
    free_memory(device)
    reference, how = reference_model(out, model_dir, METHODS[name].quantized_base)
    row["reference"] = how
    if reference is None:
        row["logits_match"] = None
    else:
        ref_logits = logits_of(reference, ids, device)
        if hasattr(reference, "disable_adapter"):  # PEFT: the base the adapter sits on (NF4 for QLoRA)
            with reference.disable_adapter():
                base_logits = logits_of(reference, ids, device)
        del reference
        diff = (our_logits - ref_logits).abs().max().item()
        tolerance = LOGIT_RTOL * (1 + ref_logits.abs().max().item())
        effect = (ref_logits - base_logits).abs().max().item()
        row.update(max_abs_diff=diff, tolerance=tolerance, effect=effect,
                   logits_match=diff <= tolerance and effect >= EFFECT_FACTOR * diff)
    free_memory(device)
    row["pass"] = bool(row["losses_fall"] and row["logits_match"] is not False)
    return row


def correctness(model_dir: Path, data: Path, work: Path, device: torch.device, budget: Budget) -> list[dict]:
    from transformers import AutoModelForCausalLM

    from slimtune.methods.registry import METHODS
    from slimtune.models.byte_tokenizer import byte_level_tokenizer

    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 logits compared in fp32
    torch.backends.cudnn.allow_tf32 = False
    text = json.loads(data.read_text().splitlines()[0])["messages"][0]["content"]
    ids = torch.tensor([byte_level_tokenizer()(text)["input_ids"][:64]] * 2)
    base_logits = logits_of(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), ids, device)
    rows = []
    for name in METHODS:
        if budget.left() < 30:
            rows.append({"method": name, "pass": False, "error": "skipped: out of time"})
            continue
        print(f"[correctness] {name} ...", flush=True)
        try:
            rows.append(check_method(name, model_dir, data, work, device, ids, base_logits))
        except Exception as exc:  # noqa: BLE001 - one method's failure is a row, the others still run
            traceback.print_exc()
            rows.append({"method": name, "pass": False, "error": f"{type(exc).__name__}: {exc}"[:500]})
        print(f"[correctness] {name}: {json.dumps(rows[-1])[:400]}", flush=True)
    return rows


# -- 2. NF4 against bitsandbytes ------------------------------------------------------------------------

def sample_weights(model_dir: Path, count: int = 2) -> list[tuple[str, torch.Tensor]]:
    """The first `count` q_proj / down_proj weights of the saved model (bf16, on the CPU), from any shard."""
    from safetensors import safe_open

    found: list[tuple[str, torch.Tensor]] = []
    for shard in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as weights:
            for name in weights.keys():
                if name.endswith(("q_proj.weight", "down_proj.weight")) and len(found) < count:
                    found.append((name, weights.get_tensor(name)))
    return found


def nf4_against_bitsandbytes(model_dir: Path, device: torch.device) -> list[dict]:
    import bitsandbytes.functional as bnbf

    from slimtune.quant import quantize_nf4

    rows = []
    for name, weight in sample_weights(model_dir):
        weight = weight.to(device)  # bf16, as QLoRA quantizes it
        ours = quantize_nf4(weight, blocksize=64, double_quant=True)
        ours_plain = quantize_nf4(weight, blocksize=64, double_quant=False)
        packed, state = bnbf.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
        _, state_plain = bnbf.quantize_4bit(weight, blocksize=64, compress_statistics=False, quant_type="nf4")
        codes_equal = torch.equal(packed.reshape(-1).view(torch.uint8), ours.codes)
        absmax_equal = torch.equal(state_plain.absmax.float(), ours_plain.absmax)
        agree = (state.absmax.reshape(-1) == ours.absmax_codes).float().mean().item()
        rows.append({"tensor": name, "shape": list(weight.shape), "codes_equal": codes_equal,
                     "absmax_equal": absmax_equal, "double_quant_code_agreement": agree,
                     "offset_equal": bool(float(state.offset) == float(ours.offset)),
                     "pass": bool(codes_equal and absmax_equal and agree >= 0.99)})
    return rows


# -- 3. speed and memory ----------------------------------------------------------------------------------

def speed(model_dir: Path, data: Path, work: Path, device: torch.device, budget: Budget, tiny: bool) -> list[dict]:
    import slimtune_runner
    from peer_trainer import rows_from_jsonl, run_peer

    batch = "8"
    pairs = [("LoRA", [], {}), ("DoRA", ["--method", "dora"], {"dora": True}),
             ("QLoRA", ["--quantize", "nf4"], {"qlora": True})]
    rows = []
    for label, runner_flags, peer_flags in pairs:
        row: dict[str, Any] = {"method": label}
        for side in ("peer", "slimtune"):
            if budget.left() < (20 if tiny else 60):
                row[side] = {"error": "skipped: out of time"}
                continue
            print(f"[speed] {label} {side} ...", flush=True)
            free_memory(device)
            try:
                if side == "slimtune":
                    args = slimtune_runner.parse_args(["--model-dir", str(model_dir), "--train", str(data),
                                                       "--batch-size", batch, "--precision", "bf16",
                                                       "--work-dir", str(work / f"speed-{label}"), *runner_flags])
                    result = slimtune_runner.run(args)
                else:
                    result = run_peer(str(model_dir), rows_from_jsonl(str(data)), None, bf16=True,
                                      batch_size=int(batch), work_dir=str(work / f"peer-{label}"), **peer_flags)
                row[side] = {key: result.get(key) for key in ("name", "tokens", "steps", "train_s", "tokens_per_s",
                                                              "peak_gpu_mb")}
            except Exception as exc:  # noqa: BLE001 - reported in the row
                traceback.print_exc()
                row[side] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            print(f"[speed] {label} {side}: {json.dumps(row[side])}", flush=True)
        ours, peer = row.get("slimtune", {}), row.get("peer", {})
        if ours.get("tokens_per_s") and peer.get("tokens_per_s"):
            row["speed_ratio"] = ours["tokens_per_s"] / peer["tokens_per_s"]
        if ours.get("peak_gpu_mb") and peer.get("peak_gpu_mb"):
            row["memory_ratio"] = ours["peak_gpu_mb"] / peer["peak_gpu_mb"]
        rows.append(row)
    free_memory(device)
    return rows


# -- 4. serving -------------------------------------------------------------------------------------------

def serving(model_dir: Path, work: Path, device: torch.device, clients: int, requests: int, max_tokens: int,
            budget: Budget, seed: int = 0) -> dict:
    from serve_load import PROMPTS, Server, make_adapters, run_load

    root = work / "serve"
    root.mkdir(exist_ok=True)
    names = make_adapters(str(model_dir), root, 4, 16)
    rng = random.Random(seed)
    chosen = [(rng.choice(names), rng.choice(PROMPTS)) for _ in range(requests)]
    server = Server(["--model", str(model_dir), "--adapter-root", str(root), "--device", device.type,
                     *(f"--adapter={n}={n}" for n in names)], root, work / "serve.log",
                    startup_timeout=max(30.0, min(180.0, budget.left())))
    try:
        result = asyncio.run(run_load(server.url, chosen, clients, max_tokens, None))
    finally:
        server.stop()
    return {"adapters": len(names), "clients": clients, **result}


# -- report ------------------------------------------------------------------------------------------------

def _fmt(value: Any, pattern: str = "{:,.0f}") -> str:
    return "-" if value is None else pattern.format(value)


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"# slimtune GPU check ({'PASS' if report['pass'] else 'FAIL'})", "",
             f"{env.get('gpu', env['device'])}; torch {env['torch']}, transformers {env['transformers']}, "
             f"peft {env['peft']}, bitsandbytes {env['bitsandbytes']}; model {report['model']}; "
             f"{report['seconds']:.0f} s in all."
             + (f" Not passing: {'; '.join(report['failures'])[:1500]}." if report["failures"] else ""), "",
             f"## Correctness ({CORRECTNESS_STEPS} steps, lr {CORRECTNESS_LR:g}, bf16; logits in fp32, tolerance "
             f"{LOGIT_RTOL:g} x (1 + max |logit|), tuned-vs-base effect >= {EFFECT_FACTOR:g}x the difference)", "",
             "| method | losses | falling | max |diff| | tolerance | effect | loaded by | peak MB | pass |",
             "|---|---|---|---:|---:|---:|---|---:|---|"]
    correct = report["correctness"]
    for r in [{"method": "-", **correct}] if isinstance(correct, dict) else correct:
        if "error" in r:
            lines.append(f"| {r['method']} | error: {r['error'][:200]} | | | | | | | no |")
            continue
        losses = " ".join(f"{x:.3f}" for x in r["losses"])
        lines.append(f"| {r['method']} | {losses} | {'yes' if r['losses_fall'] else 'no'} | "
                     f"{_fmt(r.get('max_abs_diff'), '{:.1e}')} | {_fmt(r.get('tolerance'), '{:.1e}')} | "
                     f"{_fmt(r.get('effect'), '{:.1e}')} | {r['reference']} | {_fmt(r.get('max_memory_allocated_mb'))} | "
                     f"{'yes' if r['pass'] else 'no'} |")
    lines += ["", "## NF4 codes against bitsandbytes' quantizer on the same weights", "",
              "| tensor | shape | 4-bit codes equal | absmax equal (no double quant) | 8-bit absmax codes agreeing | pass |",
              "|---|---|---|---|---:|---|"]
    nf4 = report["nf4"]
    if isinstance(nf4, dict):
        lines.append(f"| error: {nf4['error'][:200]} | | | | | no |")
    else:
        for r in nf4:
            lines.append(f"| {r['tensor']} | {r['shape']} | {r['codes_equal']} | {r['absmax_equal']} | "
                         f"{100 * r['double_quant_code_agreement']:.2f}% | {'yes' if r['pass'] else 'no'} |")
    lines += ["", "## Speed and memory against the peers (same model, data, hyperparameters)", "",
              "| method | slimtune tokens/s | peer tokens/s | speed ratio | slimtune peak MB | peer peak MB | "
              "memory ratio | peer |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    speed_rows = report["speed"]
    if isinstance(speed_rows, dict):
        lines.append(f"| error: {speed_rows['error'][:200]} | | | | | | | |")
    else:
        for r in speed_rows:
            ours, peer = r.get("slimtune", {}), r.get("peer", {})
            lines.append(f"| {r['method']} | {_fmt(ours.get('tokens_per_s'))} | {_fmt(peer.get('tokens_per_s'))} | "
                         f"{_fmt(r.get('speed_ratio'), '{:.2f}x')} | {_fmt(ours.get('peak_gpu_mb'))} | "
                         f"{_fmt(peer.get('peak_gpu_mb'))} | {_fmt(r.get('memory_ratio'), '{:.2f}x')} | "
                         f"{peer.get('name') or peer.get('error', '-')} |")
            if ours.get("error"):
                lines.append(f"| {r['method']} slimtune error: {ours['error'][:200]} | | | | | | | |")
        qlora = next((r for r in speed_rows if r["method"] == "QLoRA"), {})
        if "speed_ratio" in qlora and "memory_ratio" in qlora:
            met = qlora["speed_ratio"] >= 2 and qlora["memory_ratio"] <= 0.5
            lines += ["", f"QLoRA target (at least 2x the peer's tokens/s at no more than 0.5x its peak memory): "
                          f"{'met' if met else 'not met'} ({qlora['speed_ratio']:.2f}x, {qlora['memory_ratio']:.2f}x)."]
    serve = report["serving"]
    lines += ["", "## Serving: `slimtune serve`, mixed-adapter batches", ""]
    if "error" in serve:
        lines.append(f"error: {serve['error'][:300]}")
    else:
        lines.append(f"{serve['clients']} concurrent clients, {serve['requests']} requests over {serve['adapters']} "
                     f"adapters, {serve['failures']} failures: {serve['output_tokens_per_s']:,.1f} output tokens/s; "
                     f"latency p50 / p95 {serve['latency_p50_s']:.2f} / {serve['latency_p95_s']:.2f} s, "
                     f"time to first token p50 / p95 {serve['ttft_p50_s']:.2f} / {serve['ttft_p95_s']:.2f} s.")
    return "\n".join(lines) + "\n"


def failures(report: dict, skip: set[str]) -> list[str]:
    """What did not pass: correctness or NF4 rows, and sections (not skipped on request) that failed."""
    found = []
    for section in ("correctness", "nf4"):
        rows = report[section]
        if not isinstance(rows, list) or not rows:
            found.append(f"{section}: {rows.get('error') if isinstance(rows, dict) else 'no rows'}")
        else:
            found += [f"{section}: {r.get('method', r.get('tensor'))}" for r in rows if not r["pass"]]
    if "speed" not in skip:
        rows = report["speed"]
        if isinstance(rows, dict):
            found.append(f"speed: {rows['error']}")
        else:
            found += [f"speed: {r['method']} {side}: {r[side]['error']}" for r in rows for side in ("slimtune", "peer")
                      if "error" in r.get(side, {})]
    if "serving" not in skip:
        serve = report["serving"]
        if "error" in serve or serve["failures"]:
            found.append(f"serving: {serve.get('error') or serve['errors']}")
    return found


def run_section(name: str, function, *args) -> Any:
    """A section's result, or {"error": ...} when it raised (the other sections still run)."""
    started = time.perf_counter()
    try:
        return function(*args)
    except Exception as exc:  # noqa: BLE001 - a failed section is reported, not fatal
        traceback.print_exc()
        return {"error": f"{type(exc).__name__}: {exc}"[:800]}
    finally:
        print(f"[{name}] {time.perf_counter() - started:.1f} s", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (the check) or cpu (a dry run, with --tiny)")
    parser.add_argument("--tiny", action="store_true", help="a tiny random model and few examples (CI dry run)")
    parser.add_argument("--out-dir", default=".", help="where gpu_check.json and gpu_check.md go")
    parser.add_argument("--work-dir", help="model, data and runs (default: a temporary directory)")
    parser.add_argument("--budget-s", type=float, help="skip what would not finish in time (default 480, tiny 120)")
    parser.add_argument("--skip", default="", help="comma-separated sections to leave out: speed, serving")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: this machine has no CUDA device (or torch has no CUDA): use --device cpu --tiny",
              file=sys.stderr)
        return 2
    budget = Budget(args.budget_s or (120 if args.tiny else 480))
    if args.tiny and device.type == "cpu":
        # a model of 100k parameters: a second thread only adds synchronisation (and spins on a busy machine)
        torch.set_num_threads(1)
        os.environ["OMP_NUM_THREADS"] = "1"
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    # `slimtune serve` runs in a child process: it must import this checkout's slimtune too
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE.parent / "src"), os.environ.get("PYTHONPATH")]))

    from random_llama import save_random_llama

    shape = "tiny" if args.tiny else "1b"
    model_dir = work / f"llama-{shape}"
    params = save_random_llama(model_dir, shape, device=args.device)
    # 34 words are 436-478 tokens a row with the byte tokenizer (under max_length 512: nothing is cut)
    words = 4 if args.tiny else 34
    data = write_data(work / "train.jsonl", 16 if args.tiny else 256, words)
    same = write_data(work / "same.jsonl", 4 * CORRECTNESS_STEPS, words, distinct=1)
    size = f"{params / 1e9:.2f}B" if params > 1e8 else f"{params:,}"
    report: dict[str, Any] = {"environment": environment(device), "model": f"random Llama {shape}, {size} parameters",
                              "tiny": args.tiny, **{name: {"error": "not run (yet)"} for name in SECTIONS}}
    print(json.dumps(report["environment"]), flush=True)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        # after every section: a run cut short by the device's time limit still leaves what it found
        report["failures"] = failures(report, skip)
        report["pass"] = not report["failures"]
        report["seconds"] = time.perf_counter() - started
        (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        (out / "gpu_check.md").write_text(markdown(report), encoding="utf-8")

    report["correctness"] = run_section("correctness", correctness, model_dir, same, work, device, budget)
    save()
    report["nf4"] = run_section("nf4", nf4_against_bitsandbytes, model_dir, device)
    save()
    report["speed"] = ({"error": "skipped (--skip)"} if "speed" in skip else
                       run_section("speed", speed, model_dir, data, work, device, budget, args.tiny))
    save()
    if "serving" in skip:
        report["serving"] = {"error": "skipped (--skip)"}
    elif budget.left() < (15 if args.tiny else 60):
        report["serving"] = {"error": "skipped: out of time"}
    else:
        report["serving"] = run_section("serving", serving, model_dir, work, device, 64,
                                        64 if args.tiny else 128, 4 if args.tiny else 64, budget)
    save()
    print(markdown(report), flush=True)
    return 0 if report["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
