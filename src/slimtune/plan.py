"""Memory and time arithmetic for a run, from the model's `config.json` alone, and the method guide.

`slimtune plan` runs the *check* stage (or, with `--model` only, builds the same weightless skeleton),
attaches the method to the meta-device model and counts. Every figure is bytes on the device that
trains (CPU RSS or GPU memory), for the run's own settings:

    peak = runtime + frozen weights + kept copies + trainable (param + grad + optimizer states)
         + saved activations + loss chunk + transients, with the allocator's overhead on the dynamic part

- Frozen weights: 16-bit (bf16/fp16) or fp32 as the run stores them; with an NF4 base every linear layer
  but the LM head holds 0.5 byte/param of codes + its absmax: one fp32 per block of 64 (0.5625 B/param),
  or with double quantization one 8-bit code per block of 64 and one fp32 per 256 such codes
  (0.5 + 1/64 + 4/16384 = 0.5159 B/param). Embeddings, LM head and norms stay 16-bit.
- Trainable parameters are fp32 (adapters are created fp32; trained base tensors are upcast), so 4 B
  each, their gradients 4 B, AdamW 8 B (two fp32 moments), 8-bit AdamW 2 B + one fp32 absmax per 256
  per moment, offloaded 8-bit AdamW 0 B on a GPU (the moments live in CPU memory).
- Saved activations per token and decoder layer, for a Llama-style layer (hidden h, key/value width
  kv = kv_heads * head_dim, MLP width i, gated) computed in `a` bytes (2 under bf16 autocast):
      a * (6h + 2kv + 3i) + 8 + 4 * heads
  = the two norms' inputs (2h) and outputs (2h: the q/k/v and gate/up input), q (h), k and v (2kv, GQA:
  only kv heads), the attention output (h, also o_proj's input), gate and up outputs and their SwiGLU
  product (3i, down_proj's input), two fp32 inverse RMS values and the attention's fp32 log-sum-exp per
  head. slimtune's attention keeps no (seq x seq) probabilities (flash-style), so nothing is quadratic
  in the length. DoRA also keeps each adapted layer's output (a * sum of their out_features). Only layers
  at or after the first one with a trainable parameter save anything (freeze of the last layers).
  LoRA-style dropout keeps each adapter's mask, a byte per input element, where it has at
  most `lowrank.KEEP_MASK_ELEMENTS` elements (larger ones are redrawn in backward).
  A checkpointed layer keeps only its input (a * h) and recomputes one layer at a time in backward.
  Methods whose fp32 base tensors train under autocast also keep a 16-bit copy of each such weight.
- Loss: the LM head runs on labelled positions only, `train.loss_chunk` rows at a time: one (chunk x
  vocab) block of 16-bit logits, its fp32 copy and the fp32 softmax; plus dL/dlogits (labelled rows x
  vocab, a bytes each) when that fits in `chunked_ce.KEEP_GRAD_BYTES`.

The constants that are measurements, not arithmetic (the runtime's own RSS, the CPU heap's overhead,
slimtune's step efficiency) are named below with the command that measured them; `bench/plan_check.py`
prints the prediction next to the measured peak for every method.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from slimtune.errors import ConfigError
from slimtune.methods.lowrank import keeps_mask
from slimtune.train.chunked_ce import keeps_grad

# -- measured here (2-core AMD EPYC VM, torch 2.13 CPU; `python bench/plan_check.py`) -----------------
# RSS of the training process before the model loads: Python, torch, transformers, tokenizer, data
# (394 MiB after the check stage on the bundled model and the demo data).
CPU_RUNTIME_BYTES = 394 * 2**20
# What a process gains once it trains, whatever the model: the libraries' kernels and workspaces, the
# threads' heaps. Measured: the bundled model's LoRA peak (bench/plan_check.py) minus every other line.
CPU_TRAINING_FIXED_BYTES = 72 * 2**20
# glibc's heap keeps freed activation memory resident and fragments it: measured peak RSS minus the
# arithmetic's live bytes, as a share of the step's dynamic memory (activations, loss chunk).
CPU_HEAP_OVERHEAD = 0.45
# A QLoRA step on the CPU holds more than its arithmetic, in proportion to the NF4 weights: measured peak
# minus prediction over the quantized parameters, 0.21 B/param on the random Llama 1B and 0.20 on the 3B
# (`python bench/plan_check.py --llama 1b|3b --methods lora,qlora`; the load's own peak is lower, so it
# is the step's). Not yet explained (dequantization temporaries left in the heap is the suspect).
CPU_NF4_STEP_BYTES_PER_PARAM = 0.2
# CUDA's caching allocator rounds blocks up and keeps freed ones; `max_memory_allocated` does not see
# the CUDA context itself. Not measured here (no GPU): a common rule of thumb, said as such.
GPU_ALLOCATOR_OVERHEAD = 0.05
# slimtune's LoRA step on the bundled model reached 47% of the measured bf16 matmul peak on this CPU
# (README, "Training speed and memory vs the peer": 387 tok/s at 538 MFLOP/token, peak 441 GFLOP/s).
STEP_EFFICIENCY = 0.47

NF4_BYTES = 0.5 + 4 / 64                      # codes + fp32 absmax per block of 64
NF4_DOUBLE_QUANT_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # codes + 8-bit absmax + fp32 scale per 256 blocks
ADAMW_BYTES = {"adamw": 8.0, "adamw8bit": 2.0 + 2 * 4 / 256}

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_memory(text: str) -> int:
    """'24GB' -> 24e9 bytes, '24GiB' -> 24 * 2**30, '512MB', '1.5TB'; a `ConfigError` otherwise."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS or float(match.group(1)) <= 0:
        raise ConfigError(f"--memory '{text}' is not a memory size: write a number and a unit, e.g. 24GB, "
                          "24GiB or 512MB (GB = 10^9 bytes, GiB = 2^30)")
    return int(float(match.group(1)) * _UNITS[unit])


def gb(n: float) -> str:
    """Bytes as GB (10^9) with a sensible number of digits."""
    value = n / 1e9
    return f"{value:.3f} GB" if value < 1 else f"{value:.2f} GB" if value < 100 else f"{value:.0f} GB"


# -- the model's shapes and counts -----------------------------------------------------------------

@dataclass
class Shape:
    """What the activation arithmetic needs from `config.json`."""

    hidden: int
    layers: int
    heads: int
    kv_width: int        # kv_heads * head_dim: k and v are stored at this width (GQA)
    intermediate: int
    vocab: int
    gated_mlp: bool

    @classmethod
    def of(cls, model: nn.Module) -> "Shape":
        config = model.config
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        gated = any(name.endswith(("gate_proj", "w1", "w3")) for name, _ in model.named_modules())
        return cls(config.hidden_size, config.num_hidden_layers, heads, kv_heads * head_dim,
                   getattr(config, "intermediate_size", None) or 4 * config.hidden_size, config.vocab_size, gated)

    def layer_bytes_per_token(self, act_bytes: int) -> int:
        """Saved activations of one decoder layer per token (see the module docstring)."""
        mlp = 3 * self.intermediate if self.gated_mlp else 2 * self.intermediate
        return act_bytes * (6 * self.hidden + 2 * self.kv_width + mlp) + 8 + 4 * self.heads


@dataclass
class Counts:
    """Parameter counts of a skeleton with the method attached (tied weights once)."""

    total: int                 # every base parameter + adapter parameters
    trainable: int
    quantizable: int           # frozen linear weights an NF4 base stores in 4 bits (all but the LM head)
    linear_weights: int        # every base linear weight but the LM head's (what a merged NF4 model quantizes)
    embeddings: int            # input embeddings + LM head (once if tied): kept 16-bit
    lookup_only: int           # input embedding parameters not shared with the LM head (no matmul)
    other_frozen: int          # norms, biases, frozen linear weights outside NF4
    trained_linear: int        # trainable weights of linear layers (16-bit copies under autocast)
    trained_base: int          # trainable parameters that are base tensors (not adapter matrices)
    adapted_out_features: int  # per layer on average: sum of out_features of adapted linear layers
    dropout_in_features: tuple[int, ...]  # in_features of every adapted linear layer with input dropout
    grad_layers: int           # decoder layers at or after the first with a trainable parameter
    largest_linear: int        # parameters of the largest quantizable linear (dequantization scratch)

    @property
    def base(self) -> int:
        return self.total - (self.trainable - self.trained_base)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def count(model: nn.Module, quantized: bool) -> Counts:
    """Counts of `model` (a skeleton with the method attached); `quantized`: an NF4 base."""
    embedding_ids = {id(m.weight) for m in (model.get_input_embeddings(), model.get_output_embeddings())
                     if m is not None}
    head = model.get_output_embeddings()
    adapter_ids: set[int] = set()
    linear_of: dict[int, nn.Linear] = {}
    adapted_out = 0
    dropout_in: list[int] = []
    for module in model.modules():
        base_layer = getattr(module, "base_layer", None)
        if isinstance(base_layer, nn.Linear):  # an adapter around a linear layer (PEFT's convention too)
            adapted_out += base_layer.out_features
            if isinstance(getattr(module, "dropout", None), float) and module.dropout > 0:
                dropout_in.append(base_layer.in_features)
            adapter_ids |= {id(p) for n, p in module.named_parameters() if not n.startswith("base_layer.")}
        if isinstance(module, nn.Linear) and module is not head:
            linear_of[id(module.weight)] = module
    unique = {id(p): p for p in model.parameters()}
    input_weight = model.get_input_embeddings().weight
    lookup_only = 0 if head is not None and head.weight is input_weight else input_weight.numel()
    trainable = sum(p.numel() for p in unique.values() if p.requires_grad)
    trained_base = sum(p.numel() for i, p in unique.items() if p.requires_grad and i not in adapter_ids)
    trained_linear = sum(p.numel() for i, p in unique.items()
                         if p.requires_grad and i not in adapter_ids and (i in linear_of or i in embedding_ids))
    frozen_linear = [p for i, p in unique.items() if not p.requires_grad and i in linear_of and i not in adapter_ids]
    quantizable = sum(p.numel() for p in frozen_linear) if quantized else 0
    linear_weights = sum(p.numel() for i, p in unique.items() if i in linear_of and i not in adapter_ids)
    embeddings = sum(unique[i].numel() for i in embedding_ids if i in unique and not unique[i].requires_grad)
    frozen = sum(p.numel() for p in unique.values() if not p.requires_grad)
    layers = decoder_layers(model)
    first = len(layers)
    if any(unique[i].requires_grad for i in embedding_ids if i in unique):
        first = 0
    for index, layer in enumerate(layers):
        if any(p.requires_grad for p in layer.parameters()):
            first = min(first, index)
            break
    return Counts(
        total=sum(p.numel() for p in unique.values()), trainable=trainable, quantizable=quantizable,
        linear_weights=linear_weights,
        embeddings=embeddings, lookup_only=lookup_only, other_frozen=frozen - quantizable - embeddings, trained_linear=trained_linear,
        trained_base=trained_base, adapted_out_features=adapted_out // max(len(layers), 1),
        dropout_in_features=tuple(dropout_in),
        grad_layers=len(layers) - first,
        largest_linear=max((p.numel() for p in frozen_linear), default=0) if quantized else 0)


# -- the settings a plan is made for --------------------------------------------------------------

@dataclass
class Settings:
    """The run settings the arithmetic depends on."""

    batch_size: int
    seq_len: int               # padded width of the longest micro-batch
    label_tokens: int          # labelled positions of that micro-batch (the LM head's rows)
    precision: str             # bf16 | fp32
    optimizer: str             # adamw | adamw8bit
    offload_optimizer: bool
    grad_checkpointing: bool
    checkpoint_fraction: float
    loss_chunk: int
    device: str                # cpu | cuda
    double_quant: bool = True


@dataclass
class Line:
    name: str
    bytes: float
    note: str = ""


@dataclass
class Estimate:
    """The breakdown of one method's peak, plus the counts behind it."""

    method: str
    counts: Counts
    lines: list[Line]
    peak: float
    adapter_file: float
    settings: Settings

    def line(self, name: str) -> float:
        return sum(item.bytes for item in self.lines if item.name == name)

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, "peak_bytes": round(self.peak), "adapter_file_bytes": round(self.adapter_file),
                "counts": asdict(self.counts), "settings": asdict(self.settings),
                "breakdown": [{"name": item.name, "bytes": round(item.bytes), "note": item.note} for item in self.lines]}


def estimate(method: str, plugin, counts: Counts, shape: Shape, settings: Settings, quantized: bool) -> Estimate:
    """The peak memory of one method's training step (module docstring for the arithmetic)."""
    wbytes = 2 if settings.precision == "bf16" else 4
    abytes = wbytes
    tokens = settings.batch_size * settings.seq_len
    lines: list[Line] = []
    on_cpu = settings.device == "cpu"
    if on_cpu:
        lines.append(Line("runtime", CPU_RUNTIME_BYTES, "Python, torch, transformers, tokenizer, data (measured)"))
        lines.append(Line("training runtime", CPU_TRAINING_FIXED_BYTES,
                          "kernels' workspaces and threads' heaps once training runs (measured)"))
    nf4 = NF4_DOUBLE_QUANT_BYTES if settings.double_quant else NF4_BYTES
    if quantized:
        lines.append(Line("frozen weights", counts.quantizable * nf4,
                          f"{counts.quantizable:,} linear weights in NF4 at {nf4:.4f} B/param"
                          + (" (double quantization)" if settings.double_quant else "")))
        lines.append(Line("frozen weights", (counts.embeddings + counts.other_frozen) * wbytes,
                          f"embeddings/LM head and norms, {counts.embeddings + counts.other_frozen:,} at {wbytes} B"))
    else:
        frozen = counts.total - counts.trainable
        lines.append(Line("frozen weights", frozen * wbytes, f"{frozen:,} params at {wbytes} B"))
    if plugin.keeps_base_copies:
        lines.append(Line("kept copies", counts.trained_base * wbytes, "original values of the trained base tensors"))
    lines.append(Line("trainable", counts.trainable * 4, f"{counts.trainable:,} params in fp32"))
    lines.append(Line("gradients", counts.trainable * 4, "fp32"))
    opt = 0.0 if settings.offload_optimizer and not on_cpu else ADAMW_BYTES[settings.optimizer]
    lines.append(Line("optimizer states", counts.trainable * opt,
                      f"{settings.optimizer}{', offloaded to CPU memory' if settings.offload_optimizer else ''}"
                      f": {opt:.2f} B/param"))
    if settings.precision == "bf16" and counts.trained_linear:
        lines.append(Line("16-bit weight copies", counts.trained_linear * 2,
                          "autocast's bf16 copies of the trained fp32 weights, kept for backward"))
    per_layer = shape.layer_bytes_per_token(abytes) + abytes * counts.adapted_out_features * plugin.saves_layer_outputs
    # LoRA dropout keeps a small mask (a byte per input element) instead of redrawing it (methods/lowrank.py).
    kept_masks = sum(f for f in counts.dropout_in_features if keeps_mask(tokens * f))
    per_layer += kept_masks // max(shape.layers, 1)
    grad_layers = counts.grad_layers
    checkpointed = round(settings.checkpoint_fraction * grad_layers) if settings.grad_checkpointing else 0
    if checkpointed:
        checkpointed = max(1, checkpointed)
    saved = tokens * (per_layer * (grad_layers - checkpointed) + abytes * shape.hidden * checkpointed
                      + (per_layer if checkpointed else 0) + 2 * abytes * shape.hidden + 8)
    lines.append(Line("activations", saved,
                      f"{per_layer:,} B/token/layer x {grad_layers - checkpointed} layers x {tokens:,} tokens"
                      + (f"; {checkpointed} checkpointed layers keep their input" if checkpointed else "")))
    rows = min(settings.loss_chunk, max(settings.label_tokens, 1))
    loss_chunk = rows * shape.vocab * (abytes + 8)
    lines.append(Line("loss chunk", loss_chunk, f"{rows} rows x {shape.vocab:,} vocab"))
    label_rows = max(settings.label_tokens, 1)
    if keeps_grad(label_rows, shape.vocab, abytes):  # dL/dlogits kept from forward (train/chunked_ce.py)
        kept_grad = label_rows * shape.vocab * abytes
        loss_chunk += kept_grad
        lines.append(Line("loss gradient", kept_grad, f"{settings.label_tokens} rows x {shape.vocab:,} vocab, kept"))
    if quantized:
        lines.append(Line("dequantization scratch", counts.largest_linear * abytes, "one linear weight at a time"))
        if on_cpu:
            lines.append(Line("NF4 step heap", counts.quantizable * CPU_NF4_STEP_BYTES_PER_PARAM,
                              f"{CPU_NF4_STEP_BYTES_PER_PARAM} B per NF4 param, measured (not yet explained)"))
    # What each step allocates and frees again in blocks of varying size, which the heap fragments. The
    # gradients are left out: the same tensors of the same sizes every step (the large ones mmap'd), so
    # they reuse their blocks (full tuning of the bundled model: 1.12x measured with them, 1.04x without).
    dynamic = saved + loss_chunk
    overhead = dynamic * (CPU_HEAP_OVERHEAD if on_cpu else GPU_ALLOCATOR_OVERHEAD)
    lines.append(Line("allocator overhead", overhead,
                      f"{'CPU heap, measured' if on_cpu else 'CUDA caching allocator, assumed'}: "
                      f"{100 * (CPU_HEAP_OVERHEAD if on_cpu else GPU_ALLOCATOR_OVERHEAD):.0f}% of the dynamic part"))
    peak = sum(item.bytes for item in lines)
    adapter_file = counts.trainable * (wbytes if counts.trained_base == counts.trainable else 4)
    return Estimate(method, counts, lines, peak, adapter_file, settings)


# -- time -----------------------------------------------------------------------------------------

def matmul_peak_flops(dtype: torch.dtype, size: int = 1024, seconds: float = 1.0) -> float:
    """Best observed FLOP/s of a (size x size) @ (size x size) matmul in `dtype` on this machine's device."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    for _ in range(3):
        a @ b
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = max(best, 4 * 2 * size**3 / (time.perf_counter() - start))
    return best


def flops_per_token(counts: Counts, shape: Shape, settings: Settings) -> float:
    """Forward 2N, backward 2N (activation gradients) + 2 x trained base params (weight gradients), a
    second forward under checkpointing; N = matmul parameters (all but the input embeddings), plus the
    attention's q k^T and p v (4 x seq x hidden per layer forward, twice that backward)."""
    matmul = counts.base - counts.lookup_only
    forward = 2 * matmul + 4 * settings.seq_len * shape.hidden * shape.layers
    passes = 3 + (1 if settings.grad_checkpointing else 0)
    return forward * passes + 2 * counts.trained_base


@dataclass
class TimeEstimate:
    seconds_per_epoch: float
    tokens: int
    flops_per_token: float
    matmul_peak: float
    efficiency: float
    source: str  # where the efficiency comes from: a run on this machine, or the README's figure


# A run measured on this machine stands in for models within this factor of its parameter count: small
# models reach a lower share of the peak than large ones (smaller matmuls, more per-op overhead).
RATE_SIZE_RANGE = 4.0


def estimate_time(counts: Counts, shape: Shape, settings: Settings, tokens: int, peak: float,
                  measured: dict | None = None) -> TimeEstimate:
    """Seconds for `tokens` trained tokens: tokens x FLOPs/token / (peak x efficiency).

    The efficiency is `measured`'s (`train_rate_name`: what a finished run of the same method and
    precision on this machine achieved, in this function's FLOPs per token over its whole training
    time, compilation included) as a share of `peak`, when that run's model is within RATE_SIZE_RANGE of
    this one's size; else STEP_EFFICIENCY, measured on another machine, and said so."""
    per_token = flops_per_token(counts, shape, settings)
    efficiency, source = STEP_EFFICIENCY, "slimtune's step efficiency on the README's machine; no run of a similar size here yet"
    if measured and measured.get("flops_per_s", 0) > 0 and measured.get("params", 0) > 0:
        ratio = counts.base / measured["params"]
        if 1 / RATE_SIZE_RANGE <= ratio <= RATE_SIZE_RANGE:
            efficiency = min(1.0, measured["flops_per_s"] / peak)
            source = (f"what a run of {measured.get('model', 'a model')} ({measured['params'] / 1e6:,.0f}M params, "
                      f"{measured.get('tokens_per_example', 0):,.0f} tokens/example) reached on this machine "
                      f"{measured.get('date', '')}".rstrip())
    return TimeEstimate(tokens * per_token / (peak * efficiency), tokens, per_token, peak, efficiency, source)


def train_rate_name(device: str, precision: str, method: str) -> str:
    """The `train/tuning.py` entry holding the training rate of `method` in `precision` on `device`."""
    return f"train_rate/{device}/{precision}/{method}"


# -- fitting a budget ------------------------------------------------------------------------------

# What makes a method fit, cheapest first: each step keeps the ones before it.
FIXES = ("grad_checkpointing", "smaller batch", "adamw8bit", "qlora")


@dataclass
class Fit:
    method: str
    peak: float
    fits: bool
    changes: list[str] = field(default_factory=list)  # what makes it fit ([] when it fits as it is)
    fixed_peak: float | None = None


def fit_budget(method: str, evaluate, settings: Settings, budget: float, can_quantize: bool) -> Fit:
    """Whether `method` fits in `budget`, else the cheapest sequence of FIXES that makes it fit.

    `evaluate(settings, quantized)` returns the peak for those settings."""
    peak = evaluate(settings, False)
    if peak <= budget:
        return Fit(method, peak, True)
    current, quantized, changes = settings, False, []
    current = _replace(current, grad_checkpointing=True, checkpoint_fraction=1.0)
    changes.append("train.grad_checkpointing=true")
    if (value := evaluate(current, quantized)) <= budget:
        return Fit(method, peak, False, changes, value)
    while current.batch_size > 1:
        current = _replace(current, batch_size=current.batch_size // 2,
                           label_tokens=max(1, current.label_tokens // 2))
        if (value := evaluate(current, quantized)) <= budget:
            return Fit(method, peak, False, changes + [f"train.batch_size={current.batch_size} (raise "
                                                       "train.grad_accum to keep the step size)"], value)
    changes.append("train.batch_size=1 with train.grad_accum")
    current = _replace(current, optimizer="adamw8bit")
    changes.append("train.optimizer=adamw8bit")
    if (value := evaluate(current, quantized)) <= budget:
        return Fit(method, peak, False, changes, value)
    if can_quantize:
        changes.append("method=qlora (an NF4 base)")
        if (value := evaluate(current, True)) <= budget:
            return Fit(method, peak, False, changes, value)
    return Fit(method, peak, False, changes + ["nothing on this list is enough: a larger device or a smaller model"],
               None)


def _replace(settings: Settings, **changes) -> Settings:
    return Settings(**{**asdict(settings), **changes})


# -- the method guide ------------------------------------------------------------------------------

LONG_TEXT_TOKENS = 8192
LARGE_DATA_TOKENS = 50_000_000
SMALL_DATA_EXAMPLES = 1000


def recommend(fits: dict[str, bool], long_texts: bool, data_tokens: int | None, examples: int | None) -> tuple[str, str]:
    """(method, reason) following the guide: LoRA first; QLoRA when memory is the wall; LongLoRA for long
    documents; AdaLoRA or DoRA for the last bit of quality; full fine-tuning only with lots of data and
    hardware; freeze when the task is close to pretraining and resources are small."""
    if long_texts and fits.get("longlora"):
        return "longlora", f"texts of {LONG_TEXT_TOKENS:,}+ tokens: LongLoRA's shifted sparse attention keeps them affordable"
    if data_tokens is not None and data_tokens >= LARGE_DATA_TOKENS and fits.get("full"):
        return "full", (f"{data_tokens:,} training tokens is enough data to move every weight, and full "
                        "fine-tuning fits the budget")
    extras = [name for name in ("dora", "adalora") if fits.get(name)]
    if fits.get("lora"):
        reason = "LoRA first: it fits, trains a small share of the weights and its adapter file is small"
        if long_texts:
            reason += "; long texts: train with train.grad_checkpointing=true" + (
                "" if "longlora" in fits else " (LongLoRA is not available in this version)")
        if extras:
            reason += f"; {' or '.join(extras)} fit too, for the last bit of quality"
        return "lora", reason
    if fits.get("qlora"):
        return "qlora", "memory is the wall: the 16-bit base does not fit with LoRA, the 4-bit NF4 base does"
    if fits.get("freeze") and (examples is None or examples < SMALL_DATA_EXAMPLES):
        return "freeze", "little memory and little data: training only the last layers fits"
    return "qlora", "nothing fits as configured; QLoRA needs the least, see what makes it fit"
