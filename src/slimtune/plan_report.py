"""`slimtune plan`: the arithmetic of `plan.py` for a config (through the check stage) or a bare model,
every method against a budget, the recommendation, time per epoch, and the published figures for
7B / 13B / 70B Llama shapes. Text for people, `to_json` for scripts."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from rich.console import Console
from torch import nn

from slimtune.config import Config, build_config
from slimtune.methods.registry import METHODS
from slimtune.plan import (
    LONG_TEXT_TOKENS, NF4_BYTES, NF4_DOUBLE_QUANT_BYTES, Counts, Estimate, Fit, Settings, Shape, TimeEstimate,
    count, estimate, estimate_time, fit_budget, flops_per_token, gb, matmul_peak_flops, recommend, train_rate_name,
)
from slimtune.train.tuning import record, recorded


def attached_skeleton(cfg: Config, resolved: str | None = None) -> nn.Module:
    """The model of `cfg` on the meta device with its method attached (what the check stage builds)."""
    from slimtune.models.loader import resolve_model
    from slimtune.models.skeleton import build_skeleton

    skeleton = build_skeleton(resolved or resolve_model(cfg.model))
    cfg.plugin.attach(skeleton, cfg, Console(quiet=True), quiet=True)
    return skeleton


def settings_of(cfg: Config, device: str, dataset=None, seq_len: int | None = None) -> Settings:
    """The arithmetic's settings for `cfg`: the longest micro-batch of `dataset` (length-grouped
    batches put the longest examples together), else `seq_len` tokens per example, all labelled."""
    from slimtune.train.precision import resolve_precision

    batch = cfg.train.batch_size
    if dataset is not None and len(dataset):
        longest = sorted(dataset.examples, key=lambda e: len(e.input_ids), reverse=True)[:batch]
        multiple = cfg.train.pad_to_multiple_of
        width = -(-len(longest[0].input_ids) // multiple) * multiple
        labels = sum(e.num_labelled for e in longest)
    else:
        width = seq_len or cfg.data.max_length
        labels = batch * width
    precision = resolve_precision(cfg.train.precision, torch.device(device)) if device == "cpu" else (
        "fp32" if cfg.train.precision == "fp32" else "bf16")
    return Settings(batch_size=batch, seq_len=width, label_tokens=labels, precision=precision,
                    optimizer=cfg.train.optimizer, offload_optimizer=cfg.train.offload_optimizer,
                    grad_checkpointing=cfg.train.grad_checkpointing, checkpoint_fraction=cfg.train.checkpoint_fraction,
                    loss_chunk=cfg.train.loss_chunk, device=device)


def device_name(device: str) -> str:
    """The device a training rate belongs to: 'cpu', or the GPU's name (the tuning cache is keyed by CPU)."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return device


# Shorter runs are not recorded: start-up and compilation would stand for the whole rate.
RATE_MIN_STEPS = 10


def record_train_rate(cfg: Config, dataset, device: str, precision: str, tokens: int, seconds: float,
                      steps: int) -> dict | None:
    """Store what a finished single-process run achieved, as the plan counts it: the plan's FLOPs per
    token for this config and dataset x trained tokens / training seconds (compilation and evaluation
    between steps included), so that `slimtune plan` of the same config on this machine predicts the time
    this run took, and similar ones by the same rate (`plan.estimate_time`). Returns the entry."""
    if steps < RATE_MIN_STEPS or seconds <= 0 or tokens <= 0:
        return None
    from datetime import date

    from slimtune.models.loader import resolve_model

    counts, shape = _counts_of(cfg, resolve_model(cfg.model))
    settings = settings_of(cfg, device, dataset)
    examples = len(dataset) if dataset is not None else 0
    entry = {"flops_per_s": flops_per_token(counts, shape, settings) * tokens / seconds, "params": counts.base,
             "model": cfg.model, "tokens_per_example": dataset.num_tokens / examples if examples else 0.0,
             "tokens": tokens, "seconds": round(seconds, 3), "compile": cfg.train.compile,
             "date": date.today().isoformat()}
    record(train_rate_name(device_name(device), precision, cfg.method_name), entry)
    return entry


def method_config(cfg: Config, method: str) -> Config:
    """`cfg` with another method and that method's defaults (the sections a method does not read dropped)."""
    data = cfg.model_dump(mode="json", exclude_unset=True)
    data["method"] = method
    data.pop("quantize", None)
    plugin = METHODS[method]
    for section in ("lora", "adalora", "freeze"):
        keys = plugin.sections.get(section, ())
        if section not in plugin.sections:
            data.pop(section, None)
        elif keys is not None and isinstance(data.get(section), dict):
            data[section] = {k: v for k, v in data[section].items() if k in keys}
    return build_config(data)


@dataclass
class MethodPlan:
    estimate: Estimate
    fit: Fit | None = None


@dataclass
class Plan:
    model: str
    shape: Shape
    chosen: str
    methods: dict[str, MethodPlan]
    budget: float | None
    device: str
    recommendation: tuple[str, str] | None
    time: TimeEstimate | None
    data_tokens: int | None
    examples: int | None
    merged_bytes: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model, "shape": asdict(self.shape), "method": self.chosen, "device": self.device,
            "budget_bytes": self.budget, "data_tokens": self.data_tokens, "examples": self.examples,
            "methods": {name: {**mp.estimate.to_json(), **({"fit": asdict(mp.fit)} if mp.fit else {})}
                        for name, mp in self.methods.items()},
            "recommendation": ({"method": self.recommendation[0], "reason": self.recommendation[1]}
                               if self.recommendation else None),
            "time_per_epoch": asdict(self.time) if self.time else None,
            "merged_model_bytes": self.merged_bytes,
        }


def _counts_of(cfg: Config, resolved: str) -> tuple[Counts, Shape]:
    skeleton = attached_skeleton(cfg, resolved)
    return count(skeleton, cfg.quantized), Shape.of(skeleton)


def make_plan(cfg: Config, budget: float | None, device: str, dataset=None, seq_len: int | None = None,
              measure_time: bool = True) -> Plan:
    """The plan for `cfg` (its method in full; with a budget every method, and what makes each fit)."""
    from slimtune.models.loader import resolve_model

    resolved = resolve_model(cfg.model)
    settings = settings_of(cfg, device, dataset, seq_len)
    counts, shape = _counts_of(cfg, resolved)
    methods = {cfg.method_name: MethodPlan(estimate(cfg.method_name, cfg.plugin, counts, shape, settings,
                                                    cfg.quantized))}
    if budget is not None:
        qcfg = method_config(cfg, "qlora")
        qcounts = _counts_of(qcfg, resolved)[0]
        for name in METHODS:
            mcfg = cfg if name == cfg.method_name else method_config(cfg, name)
            mcounts = counts if mcfg is cfg else _counts_of(mcfg, resolved)[0]

            def evaluate(s: Settings, quantized: bool, mcfg=mcfg, mcounts=mcounts) -> float:
                if quantized:
                    return estimate("qlora", qcfg.plugin, qcounts, shape, s, True).peak
                return estimate(mcfg.method_name, mcfg.plugin, mcounts, shape, s, mcfg.quantized).peak

            can_quantize = METHODS[name].accepts_quantized_base and not mcfg.quantized
            methods[name] = MethodPlan(estimate(name, mcfg.plugin, mcounts, shape, settings, mcfg.quantized),
                                       fit_budget(name, evaluate, settings, budget, can_quantize))
    tokens = dataset.num_tokens if dataset is not None else None  # one epoch
    examples = len(dataset) if dataset is not None else None
    recommendation = None
    if budget is not None:
        # A method that fits after a change of settings (not of method) counts as fitting, with that change.
        fits = {name: mp.fit.fits or (mp.fit.fixed_peak is not None and not any(
            change.startswith("method=") for change in mp.fit.changes)) for name, mp in methods.items() if mp.fit}
        name, reason = recommend(fits, settings.seq_len >= LONG_TEXT_TOKENS, tokens, examples)
        fit = methods[name].fit if name in methods else None
        if fit is not None and not fit.fits and fit.fixed_peak is not None:
            reason += f"; {name} fits with " + ", ".join(fit.changes)
        recommendation = (name, reason)
    time_estimate = None
    if measure_time:
        peak = matmul_peak_flops(torch.bfloat16 if settings.precision == "bf16" else torch.float32)
        measured = recorded(train_rate_name(device_name(device), settings.precision, cfg.method_name))
        time_estimate = estimate_time(counts, shape, settings, tokens or 10**6, peak, measured)
    base, linear = counts.base, counts.linear_weights
    merged = {"16-bit": base * 2.0, "4-bit": linear * NF4_DOUBLE_QUANT_BYTES + (base - linear) * 2.0}
    return Plan(cfg.model, shape, cfg.method_name, methods, budget, device, recommendation, time_estimate,
                tokens, examples, merged)


# -- published figures -----------------------------------------------------------------------------

LLAMA_SHAPES = {  # Llama 2 shapes (hidden, layers, heads, kv heads, MLP width); vocabulary 32,000
    "7B": (4096, 32, 32, 32, 11008), "13B": (5120, 40, 40, 40, 13824), "70B": (8192, 80, 64, 8, 28672),
}
PUBLISHED = (
    "QLoRA paper (Dettmers et al., 2023), as the issue cites it: a 7B model's 4-bit base is about 5 GB.",
    "Common tables: full fine-tuning with mixed precision and AdamW at ~16-18 bytes/param (7B: 112-126 GB).",
    "Common tables disagree on 7B LoRA: 16 GB in one, 19 GB in another (batch, length, checkpointing unstated).",
)


def llama_skeleton(size: str) -> nn.Module:
    """A Llama causal LM of the given size on the meta device (no weights, nothing downloaded)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from slimtune.models.skeleton import parameters_on_meta

    hidden, layers, heads, kv_heads, mlp = LLAMA_SHAPES[size]
    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, intermediate_size=mlp, vocab_size=32000,
                         max_position_embeddings=4096, tie_word_embeddings=False)
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config)
    model.config.use_cache = False
    return model


def published_rows(batch: int = 1, seq_len: int = 512) -> list[dict[str, Any]]:
    """Full / LoRA / QLoRA peaks on a GPU for the Llama shapes: batch x seq_len tokens, bf16,
    checkpointing on, AdamW fp32 states, LoRA r=16 on every linear layer."""
    rows = []
    settings = Settings(batch_size=batch, seq_len=seq_len, label_tokens=batch * seq_len, precision="bf16",
                        optimizer="adamw", offload_optimizer=False, grad_checkpointing=True, checkpoint_fraction=1.0,
                        loss_chunk=1024, device="cuda")
    for size in LLAMA_SHAPES:
        row: dict[str, Any] = {"model": f"Llama {size}"}
        for name in ("full", "lora", "qlora"):
            cfg = build_config({"model": "-", "method": name, "data": {"train": "-"},
                                **({"lora": {"r": 16, "targets": "all-linear"}} if name != "full" else {})})
            skeleton = llama_skeleton(size)
            cfg.plugin.attach(skeleton, cfg, Console(quiet=True), quiet=True)
            counts = count(skeleton, cfg.quantized)
            est = estimate(name, cfg.plugin, counts, Shape.of(skeleton), settings, cfg.quantized)
            row[name] = est.peak
            row[f"{name}_weights"] = est.line("frozen weights") + (est.line("trainable") if name == "full" else 0)
            row["params"] = counts.base
        row["bytes_per_param_full"] = row["full"] / row["params"]
        rows.append(row)
    return rows


# -- text ------------------------------------------------------------------------------------------

def render(plan: Plan, published: bool = False) -> str:
    chosen = plan.methods[plan.chosen].estimate
    s, c = chosen.settings, chosen.counts
    out = [f"plan: {plan.chosen} on {plan.model} ({c.base:,} base params; {plan.shape.layers} layers, hidden "
           f"{plan.shape.hidden}, kv width {plan.shape.kv_width}, MLP {plan.shape.intermediate}, vocab "
           f"{plan.shape.vocab:,})",
           f"  device {plan.device}, {s.precision}; batch {s.batch_size} x {s.seq_len} tokens ({s.label_tokens} "
           f"labelled); {s.optimizer}; checkpointing {'on' if s.grad_checkpointing else 'off'}; slimtune attention "
           "(no seq x seq probabilities kept)",
           f"  trainable: {c.trainable:,} of {c.total:,} ({100 * c.trainable / c.total:.2f}%)", ""]
    width = max(len(line.name) for line in chosen.lines)
    for line in chosen.lines:
        out.append(f"  {line.name:<{width}}  {gb(line.bytes):>10}  {line.note}")
    out.append(f"  {'peak':<{width}}  {gb(chosen.peak):>10}")
    out += ["", f"  frozen linear weights in 4 bits: {gb(c.linear_weights * NF4_DOUBLE_QUANT_BYTES)} with double "
            f"quantization, {gb(c.linear_weights * NF4_BYTES)} without (embeddings/LM head 16-bit: "
            f"{gb((c.base - c.linear_weights) * 2)})",
            f"  result on disk: {gb(chosen.adapter_file)}; merged model: {gb(plan.merged_bytes['16-bit'])} in 16 bits, "
            f"{gb(plan.merged_bytes['4-bit'])} in 4 bits (NF4 linear layers)"]
    if c.quantizable:
        saving = c.quantizable * (2 - NF4_DOUBLE_QUANT_BYTES)
        step = chosen.line("activations") + chosen.line("loss chunk") + chosen.line("allocator overhead")
        out.append(f"  NF4 saves {gb(saving)} of weights against a 16-bit base ({c.quantizable:,} params at "
                   f"{NF4_DOUBLE_QUANT_BYTES:.3f} instead of 2 B)" + (
                       f"; the step's own memory ({gb(step)}: activations, loss chunk, allocator) is larger, so "
                       "the peak falls by less than the weights do" + (
                           ", and on a CPU the heap keeps freed step memory resident: measured RSS may not show "
                           "the saving at all (README, QLoRA's memory)" if plan.device == "cpu" else "")
                       if step > saving else ""))
    if plan.time:
        t = plan.time
        what = f"an epoch ({t.tokens:,} tokens)" if plan.data_tokens else f"{t.tokens:,} tokens"
        took = f"{t.seconds_per_epoch:.0f} s" if t.seconds_per_epoch < 120 else f"{t.seconds_per_epoch / 60:.1f} min"
        out.append(f"  time for {what}: ~{took} = {t.flops_per_token / 1e9:.2f} GFLOP/token "
                   f"at {t.efficiency:.0%} of this machine's measured matmul peak, {t.matmul_peak / 1e9:.0f} GFLOP/s "
                   f"({t.source})")
    if plan.budget is not None:
        out += ["", f"budget {gb(plan.budget)} on {plan.device}:"]
        for name, mp in plan.methods.items():
            fit = mp.fit
            if fit.fits:
                out.append(f"  {name:<8} fits: {gb(fit.peak)}")
            elif fit.fixed_peak is not None:
                out.append(f"  {name:<8} needs {gb(fit.peak)}; fits at {gb(fit.fixed_peak)} with " + ", ".join(fit.changes))
            else:
                out.append(f"  {name:<8} needs {gb(fit.peak)}; " + ", ".join(fit.changes))
        if plan.recommendation:
            out += ["", f"recommended: {plan.recommendation[0]} - {plan.recommendation[1]}"]
    if published:
        out += ["", published_text()]
    return "\n".join(out)


def published_text() -> str:
    rows = published_rows()
    out = ["Llama shapes on a GPU (batch 1 x 512 tokens, bf16, checkpointing, AdamW fp32, LoRA r=16 all-linear):",
           f"  {'model':<10} {'params':>8} {'full':>10} {'B/param':>8} {'LoRA':>10} {'QLoRA':>10} {'4-bit base':>11}"]
    for row in rows:
        out.append(f"  {row['model']:<10} {row['params'] / 1e9:>7.2f}B {gb(row['full']):>10} "
                   f"{row['bytes_per_param_full']:>8.1f} {gb(row['lora']):>10} {gb(row['qlora']):>10} "
                   f"{gb(row['qlora_weights']):>11}")
    out += ["  published:"] + [f"    {line}" for line in PUBLISHED] + [
        "  assumptions behind the differences: full = fp32 weights (4) + fp32 gradients (4) + AdamW (8) + bf16 "
        "copies under autocast (2) = 18 B/param before activations; tables at 16 keep no separate 16-bit copy. "
        "The 4-bit base here counts NF4 codes with double-quantized absmax (0.516 B/param) and 16-bit "
        "embeddings and LM head; a ~5 GB figure for 7B is ~1 GB above that arithmetic, which fits a measured "
        "footprint that also holds the CUDA context and buffers (not checked here: no GPU). LoRA tables differ "
        "mostly by activations: batch, length and checkpointing, which they do not state."]
    return "\n".join(out)


def plan_command(config: str | None, overrides: list[str], model: str | None, method: str, length: int,
                 memory: str | None, gpu: str | None, console: Console) -> Plan:
    """`slimtune plan`: a config file through the check stage, or a bare model; every input checked first."""
    from slimtune.config import load_config, parse_overrides
    from slimtune.errors import ConfigError
    from slimtune.plan import parse_memory
    from slimtune.stages import check_run

    if memory is not None and gpu is not None:
        raise ConfigError("give --memory (this machine) or --gpu (a GPU), not both")
    budget = parse_memory(memory if memory is not None else gpu) if (memory or gpu) else None
    device = "cuda" if gpu is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    if model is None:
        cfg = load_config(config, overrides)
        # Planning reads the output directory of no run: a finished one there is no problem here.
        checked = check_run(cfg.model_copy(update={"overwrite": True, "resume": False}), console)
        return make_plan(cfg, budget, device, checked.train_set)
    from slimtune.config import _deep_merge

    items = ([config] if config else []) + overrides
    data = _deep_merge({"model": model, "method": method, "data": {"train": "-", "max_length": length}},
                       parse_overrides(items))
    return make_plan(build_config(data, source="--model"), budget, device, None, length)
