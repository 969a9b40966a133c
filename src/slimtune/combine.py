"""Several LoRA adapters of one base model -> one new adapter, with PEFT's `add_weighted_adapter` maths.

Adapter i, in a layer it targets, adds s_i B_i A_i (A_i: r_i x d_in, B_i: d_out x r_i, s_i = alpha_i / r_i,
or alpha_i / sqrt(r_i) with rsLoRA). With weights w_i, per layer and over the adapters that target it:

    cat          A = [w_1 s_1 A_1; w_2 s_2 A_2; ...] (sum r_i rows), B = [B_1 B_2 ...]
                 so B A = sum_i w_i s_i B_i A_i exactly; rank = sum of the ranks.
    svd          D = sum_i w_i s_i B_i A_i, D = U S V^T, B = U[:, :k] S[:k], A = V^T[:k]
                 (k = --svd-rank, default the largest input rank): the best rank-k approximation of D.
    linear       A = sum_i a_i A_i, B = sum_i b_i B_i with b_i = sqrt(|w_i s_i|), a_i = sign(w_i s_i) b_i.
                 Not sum_i w_i s_i B_i A_i (the cross terms B_i A_j remain): a cheap approximation that
                 needs equal ranks.
    ties         on A's and B's stacks separately (Yadav et al., 2023): keep each tensor's top `density`
                 fraction of entries by magnitude, elect a sign per entry (sign of the sum), then average the
                 weighted entries that agree with it.
    dare_linear  drop each entry with probability 1 - density, rescale survivors by 1 / density (Yu et al.,
                 2023), then the weighted sum as `linear`.
    dare_ties    DARE's drop and rescale, then TIES' sign election and disjoint mean.

The result is a plain LoRA adapter in PEFT's format with alpha = r in every layer (scaling 1: the
weights and scalings are inside the tensors) and rsLoRA off, so PEFT and slimtune load it as the sum
it stands for. PEFT's own in-memory result keeps the first adapter's `use_rslora`, which scales an
rsLoRA combination by an extra sqrt(r); its tensors equal ours.

Inputs: LoRA and rsLoRA adapters of any ranks and targets (a layer gets the adapters that target it),
and AdaLoRA adapters as the LoRA they equal (`adapters.adalora_as_lora`). DoRA adapters are refused: a
DoRA layer is m * (W + s B A) / ||W + s B A|| row by row, so its effect is not the low-rank term alone and
a weighted sum of two DoRA layers is no DoRA layer; PEFT keeps the combined directions and silently
resets the magnitudes to the base's row norms, which discards what the magnitudes learned. DARE is
random: its masks come from a generator seeded with `seed`, so a combination repeats exactly.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from slimtune.adapters import PEFT_PREFIX, lora_adapter_config, read_adapter_config, read_lora_adapter, target_modules_for
from slimtune.atomic import save_safetensors_atomically
from slimtune.errors import AdapterError, SlimtuneError
from slimtune.methods.lora import CONFIG_NAME, WEIGHTS_NAME, pattern_value
from slimtune.methods.targets import linear_layers

HOWS = ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties")
_SPARSIFYING = ("ties", "dare_linear", "dare_ties")
PROVENANCE = "combine.json"  # what was combined and how; beside the adapter files (PEFT reads neither)


@dataclass(frozen=True)
class LayerTerm:
    """One adapter's term in one layer: w s B A with A (r, d_in), B (d_out, r)."""

    weight: float
    scaling: float
    A: torch.Tensor
    B: torch.Tensor

    @property
    def rank(self) -> int:
        return self.A.shape[0]


def _magnitude_prune(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """`tensor` with all but its int(density * numel) largest-magnitude entries set to 0."""
    keep = torch.zeros(tensor.numel(), dtype=tensor.dtype, device=tensor.device)
    keep[torch.topk(tensor.abs().flatten(), k=int(density * tensor.numel())).indices] = 1
    return tensor * keep.view(tensor.shape)


def _random_drop(tensor: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: each entry kept with probability `density` (Bernoulli), survivors divided by `density`."""
    keep = torch.bernoulli(torch.full_like(tensor, density), generator=generator)
    return tensor * keep / density


def _weighted(stack: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """stack (n, ...) times weights (n,) along the first axis."""
    return stack * weights.view(-1, *([1] * (stack.dim() - 1)))


def _elect_and_average(stack: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """TIES' sign election (sign of the sum of the unweighted entries, 0 counting as +) and disjoint mean
    of the weighted entries that carry the elected sign (a divisor of at least 1)."""
    elected = torch.where(stack.sum(dim=0) >= 0, 1.0, -1.0).to(stack.dtype)
    agrees = stack.sign() == elected
    return (_weighted(stack, weights) * agrees).sum(dim=0) / agrees.sum(dim=0).clamp(min=1.0)


def _merge_factors(how: str, tensors: list[torch.Tensor], weights: torch.Tensor, density: float | None,
                   generator: torch.Generator) -> torch.Tensor:
    """One factor (the A's or the B's of a layer) of the task-arithmetic family, per the module docstring."""
    if how in ("dare_linear", "dare_ties"):
        tensors = [_random_drop(t, density, generator) for t in tensors]
    elif how == "ties":
        tensors = [_magnitude_prune(t, density) for t in tensors]
    stack = torch.stack(tensors)
    if how in ("ties", "dare_ties"):
        return _elect_and_average(stack, weights)
    return _weighted(stack, weights).sum(dim=0)


def combine_layer(how: str, terms: list[LayerTerm], density: float | None = None, svd_rank: int | None = None,
                  generator: torch.Generator | None = None, path: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of the combined adapter in one layer, scaling 1; `terms` in the adapters' order."""
    if how == "cat":
        A = torch.cat([t.A * (t.weight * t.scaling) for t in terms])
        return A, torch.cat([t.B for t in terms], dim=1)
    if how == "svd":
        delta = _weighted(torch.stack([(t.B @ t.A) * t.scaling for t in terms]),
                          torch.tensor([t.weight for t in terms], dtype=terms[0].A.dtype)).sum(dim=0)
        U, S, Vh = torch.linalg.svd(delta, full_matrices=True)
        k = svd_rank or max(t.rank for t in terms)
        return Vh[:k], U[:, :k] @ torch.diag(S[:k])
    ranks = {t.rank for t in terms}
    if len(ranks) > 1:
        raise AdapterError(f"--how {how} adds the A and B matrices entry by entry, so the adapters need one rank per "
                           f"layer; '{path}' has ranks {sorted(ranks)}: use --how cat or --how svd")
    scaled = [t.weight * t.scaling for t in terms]
    b_weights = torch.tensor([math.sqrt(abs(v)) for v in scaled])
    a_weights = torch.tensor([math.copysign(math.sqrt(abs(v)), 1.0 if v >= 0 else -1.0) for v in scaled])
    generator = generator or torch.Generator().manual_seed(0)
    A = _merge_factors(how, [t.A for t in terms], a_weights.to(terms[0].A.dtype), density, generator)
    B = _merge_factors(how, [t.B for t in terms], b_weights.to(terms[0].B.dtype), density, generator)
    return A, B


def _recorded_base(adapter_dir: Path) -> str | None:
    """The base model a run's config or an adapter's files name, or None."""
    from slimtune.runs import run_config

    cfg = run_config(adapter_dir)
    base = (cfg.model if cfg else None) or read_adapter_config(adapter_dir).get("base_model_name_or_path")
    if not base:
        return None
    path = Path(base).expanduser()
    return str(path.resolve()) if path.exists() else base


def _quantized(adapter_dir: Path) -> bool:
    from slimtune.runs import run_config

    cfg = run_config(adapter_dir)
    return bool(cfg and cfg.quantized)


def check_combine(adapters: Sequence[Path], weights: Sequence[float], how: str, density: float | None,
                  svd_rank: int | None, out: Path, model: str | None) -> str:
    """Everything checkable before any tensor is read; returns the base model. Raises one clear line."""
    if how not in HOWS:
        raise SlimtuneError(f"--how {how!r} is not a combination: use one of {', '.join(HOWS)}")
    if not adapters:
        raise SlimtuneError("no adapters to combine: name at least one adapter directory")
    if len(weights) != len(adapters):
        raise SlimtuneError(f"--weights gives {len(weights)} value(s) for {len(adapters)} adapters: give one weight "
                            "per adapter, e.g. --weights 0.6,0.4")
    if not all(math.isfinite(w) for w in weights):
        raise SlimtuneError(f"--weights {','.join(map(str, weights))}: every weight must be a finite number")
    if how in _SPARSIFYING and (density is None or not 0.0 < density <= 1.0):
        raise SlimtuneError(f"--how {how} needs --density in (0, 1], the fraction of entries kept, e.g. --density 0.5"
                            + ("" if density is None else f" (got {density})"))
    if how not in _SPARSIFYING and density is not None:
        raise SlimtuneError(f"--density applies to {', '.join(_SPARSIFYING)} only, not --how {how}: leave it out")
    if svd_rank is not None and (how != "svd" or svd_rank < 1):
        raise SlimtuneError(f"--svd-rank {svd_rank}: a rank >= 1, used with --how svd only")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SlimtuneError(f"output '{out}' already exists and is not an empty directory: choose a new directory")
    recorded: dict[str, str] = {}
    for adapter_dir in adapters:
        if not adapter_dir.is_dir():
            raise AdapterError(f"adapter '{adapter_dir}' is not a directory: pass run or PEFT adapter directories")
        config = read_adapter_config(adapter_dir)
        if config.get("use_dora"):
            raise AdapterError(
                f"'{adapter_dir}' is a DoRA adapter: DoRA's magnitudes rescale whole rows of W + s B A, so a weighted "
                "sum of DoRA updates is no DoRA update and combining them would discard the magnitudes; combine LoRA "
                "adapters, or merge each DoRA run with `slimtune merge`")
        base = _recorded_base(adapter_dir)
        if _quantized(adapter_dir):
            base = f"{base} (NF4-quantized)"
        if base:
            recorded[str(adapter_dir)] = base
    if len(set(recorded.values())) > 1:
        listed = "; ".join(f"{path}: {base}" for path, base in recorded.items())
        raise AdapterError(f"cannot combine adapters of different base models ({listed}): combine adapters trained on "
                           "one base model")
    base = model or next(iter(recorded.values()), None)
    if not base:
        raise AdapterError("the adapters do not name their base model: pass --model NAME_OR_DIR")
    return base.removesuffix(" (NF4-quantized)")


def combine_adapters(adapters: Sequence[str | Path], out: str | Path, weights: Sequence[float] | None = None,
                     how: str = "cat", density: float | None = None, svd_rank: int | None = None, seed: int = 0,
                     model: str | None = None) -> Path:
    """Write the combination of `adapters` (run or PEFT adapter directories) to `out`; returns `out`.

    `weights` default to 1 each. See the module docstring for `how`; `density` is the fraction of entries
    ties / dare_* keep, `svd_rank` the rank of an svd combination, `seed` seeds DARE's masks, `model` names
    the base when the adapters do not (the skeleton of its config.json resolves targets; no weights load).
    """
    from slimtune.models import resolve_model
    from slimtune.models.skeleton import build_skeleton

    adapter_dirs = [Path(a) for a in adapters]
    weights = [1.0] * len(adapter_dirs) if weights is None else [float(w) for w in weights]
    out = Path(out)
    base = check_combine(adapter_dirs, weights, how, density, svd_rank, out, model)
    skeleton = build_skeleton(resolve_model(base))
    layers = linear_layers(skeleton)
    # Per layer, each adapter's term, in the adapters' order (which fixes DARE's draws).
    terms: dict[str, list[LayerTerm]] = {path: [] for path in layers}
    for adapter_dir, weight in zip(adapter_dirs, weights):
        config, paths, tensors = read_lora_adapter(skeleton, adapter_dir, layers)
        r, alpha = int(config["r"]), float(config["lora_alpha"])
        for path in paths:
            layer_r = int(pattern_value(config.get("rank_pattern") or {}, path, r))
            layer_alpha = float(pattern_value(config.get("alpha_pattern") or {}, path, alpha))
            scaling = layer_alpha / (math.sqrt(layer_r) if config.get("use_rslora") else layer_r)
            terms[path].append(LayerTerm(weight, scaling, tensors[f"{path}.lora_A.weight"].float(),
                                         tensors[f"{path}.lora_B.weight"].float()))
    terms = {path: t for path, t in terms.items() if t}
    if svd_rank is not None:
        small = {path: min(layers[path].in_features, layers[path].out_features) for path in terms}
        too_big = {path: size for path, size in small.items() if svd_rank > size}
        if too_big:
            path, size = next(iter(too_big.items()))
            raise SlimtuneError(f"--svd-rank {svd_rank} exceeds layer '{path}' ({size} is its largest rank): "
                                f"use --svd-rank <= {min(small.values())}")
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for path, layer_terms in terms.items():
        A, B = combine_layer(how, layer_terms, density, svd_rank, generator, path)
        tensors[f"{PEFT_PREFIX}{path}.lora_A.weight"] = A.contiguous()
        tensors[f"{PEFT_PREFIX}{path}.lora_B.weight"] = B.contiguous()
        ranks[path] = A.shape[0]
    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {re.escape(path): rank for path, rank in ranks.items() if rank != r}
    config = lora_adapter_config(r=r, alpha=float(r), dropout=0.0, target_modules=target_modules_for(skeleton, list(ranks)),
                                 base_model=base, rank_pattern=pattern, alpha_pattern={k: float(v) for k, v in pattern.items()})
    out.mkdir(parents=True, exist_ok=True)
    (out / PROVENANCE).write_text(json.dumps({
        "how": how, "adapters": [str(a) for a in adapter_dirs], "weights": weights, "density": density,
        "svd_rank": svd_rank, "seed": seed if how.startswith("dare") else None,
    }, indent=2) + "\n", encoding="utf-8")
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    save_safetensors_atomically(tensors, out / WEIGHTS_NAME, metadata={"format": "pt"})  # weights last
    return out


def parse_weights(text: str | None, count: int) -> list[float]:
    """`--weights 0.6,0.4` -> [0.6, 0.4]; absent: 1 each."""
    if text is None:
        return [1.0] * count
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise SlimtuneError(f"--weights {text!r}: give comma-separated numbers, e.g. --weights 0.6,0.4") from None


__all__ = ["HOWS", "LayerTerm", "combine_adapters", "combine_layer", "parse_weights"]
