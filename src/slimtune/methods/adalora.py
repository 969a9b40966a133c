"""AdaLoRA: adaptive rank allocation for low-rank updates (Zhang et al., 2023, arXiv:2303.10512).

Each adapted weight W (d_out, d_in) gets an update in SVD form,

    Delta W = s * P Lambda Q,     P (d_out, r), Lambda = diag(lambda) (r,), Q (r, d_in),   s = alpha / r0,

with P, Q Gaussian (std 0.02) and lambda = 0, so training starts from the base model exactly. The
paper's names map onto PEFT's file keys: P = `lora_B`, Q = `lora_A`, lambda = `lora_E` (stored (r, 1)).
s uses the initial rank r0 for every layer and stays fixed when triplets are pruned.

A global budget of kept triplets (P_:,i, lambda_i, Q_i,:) moves to the matrices that matter:
- sensitivity of every entry, I = |theta * grad|, smoothed Ibar <- b1 Ibar + (1 - b1) I, with the
  uncertainty Ubar <- b2 Ubar + (1 - b2) |I - Ibar|, and the score s = Ibar * Ubar (eq. 8-10);
- triplet importance S_i = s(lambda_i) + mean_j s(P_ji) + mean_j s(Q_ij) (eq. 11);
- the budget b(t) (eq. 12, `budget_at`): b0 = r0 * n for the first t_init steps, then cubic decay to
  b_T = target_r * n at step T - t_final, fixed afterwards;
- every `delta_t` steps the lambdas of the triplets outside the top b(t) are set to zero; from step
  T - t_final on the final allocation is frozen and re-applied after every step.
The orthogonality regulariser R = ||P^T P - I||_F^2 + ||Q Q^T - I||_F^2 (eq. 4) keeps P and Q close to
orthonormal, so that zeroing lambda_i removes one direction; its mean over the adapted layers, times
`orth_reg`, is the extra loss the training loop adds and logs.

Everything runs from the method interface: the loop adds `extra_loss()` and calls `on_step_end()` after
each optimizer step (gradients still present), so there is nothing for the user to call. Scores and
masking follow PEFT's `RankAllocator` exactly (tested against it); the step count is 1-based, so the
last step of a run with t_final = 0 applies the target budget.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from pydantic import Field, model_validator
from torch import nn

from slimtune.errors import AdapterError
from slimtune.methods.adalora_report import BUDGET_PLOT, RANK_HEATMAP
from slimtune.methods.base import AttachedMethod, Method, load_base
from slimtune.methods.lora import (
    CONFIG_NAME, WEIGHTS_NAME, AdapterLayer, LoRAMethod, _set_submodule, adapters_disabled, freeze_layer, lora_layers,
)
from slimtune.methods.lowrank import dropped_low_rank
from slimtune.methods.targets import linear_layers, resolve_targets
from slimtune.section import Section

if TYPE_CHECKING:
    from rich.console import Console

    from slimtune.config import Config


class AdaLoraSettings(Section):
    """AdaLoRA (Zhang et al., 2023): SVD-form updates s P diag(lambda) Q whose rank moves to the matrices
    that matter. Uses lora.targets, lora.alpha (s = alpha / init_r) and lora.dropout."""

    init_r: int = Field(12, gt=0, description="Initial rank of every adapted matrix.")
    target_r: int = Field(8, gt=0, description="Average rank per matrix after allocation: the final budget is "
                          "target_r x the number of adapted matrices.")
    tinit: int | None = Field(None, ge=0, description="Steps at the initial budget before ranks are pruned; "
                              "null = 10% of the steps.")
    tfinal: int | None = Field(None, ge=0, description="Final steps with the allocation frozen at the target budget; "
                               "null = 20% of the steps.")
    delta_t: int = Field(1, gt=0, description="Reallocate ranks every delta_t steps during the budget decay.")
    beta1: float = Field(0.85, gt=0, lt=1, description="EMA factor of the sensitivity |theta * grad|.")
    beta2: float = Field(0.85, gt=0, lt=1, description="EMA factor of the sensitivity's uncertainty.")
    orth_reg: float = Field(0.1, ge=0, description="Weight of the orthogonality penalty ||P^T P - I||^2 + "
                            "||Q Q^T - I||^2 (mean over adapted matrices), added to the loss and logged as extra_loss.")

    @model_validator(mode="after")
    def _target_within_initial(self) -> "AdaLoraSettings":
        if self.target_r > self.init_r:
            raise ValueError(f"adalora.target_r={self.target_r} exceeds adalora.init_r={self.init_r}: ranks are only "
                             "pruned, so use target_r <= init_r")
        return self


class SVDLinear(AdapterLayer):
    """A frozen linear layer plus `s * P diag(lambda) Q` (PEFT's `lora_B`, `lora_E`, `lora_A`)."""

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__(base_layer)
        if r < 1 or alpha <= 0 or not 0.0 <= dropout < 1.0:
            raise AdapterError(f"AdaLoRA needs r >= 1, alpha > 0 and 0 <= dropout < 1; got r={r}, alpha={alpha}, "
                               f"dropout={dropout}")
        if r > min(base_layer.in_features, base_layer.out_features):
            raise AdapterError(
                f"AdaLoRA rank {r} exceeds the layer size ({base_layer.out_features} x {base_layer.in_features}): "
                f"use adalora.init_r <= {min(base_layer.in_features, base_layer.out_features)}"
            )
        self.alpha = alpha
        # s = alpha / r0 with the initial rank: pruning zeroes lambdas but never changes the shapes or s.
        self.scaling = alpha / r
        self.dropout = dropout
        factory = {"device": base_layer.weight.device, "dtype": torch.float32}
        self.lora_A = nn.Parameter(torch.empty(r, base_layer.in_features, **factory))  # Q (r, d_in)
        self.lora_E = nn.Parameter(torch.empty(r, 1, **factory))  # lambda (r, 1)
        self.lora_B = nn.Parameter(torch.empty(base_layer.out_features, r, **factory))  # P (d_out, r)
        # Triplets kept by the latest rank allocation (all until the first); the saved adapter holds these.
        self.register_buffer("kept", torch.ones(r, dtype=torch.bool, device=factory["device"]), persistent=False)
        self.reset_parameters()

    @property
    def r(self) -> int:
        return self.lora_E.shape[0]

    def reset_parameters(self) -> None:
        nn.init.normal_(self.lora_A, std=0.02)
        nn.init.zeros_(self.lora_E)
        nn.init.normal_(self.lora_B, std=0.02)

    def delta_weight(self) -> torch.Tensor:
        """s P diag(lambda) Q, shape (d_out, d_in), fp32."""
        return (self.lora_B @ (self.lora_A * self.lora_E)) * self.scaling

    def update(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """s P diag(lambda) Q x in `out`'s dtype; (lambda * Q) is r x d_in, formed once per call."""
        if self.training and self.dropout > 0:
            return dropped_low_rank(x, self.lora_A * self.lora_E, self.lora_B, self.dropout, self.scaling).to(out.dtype)
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.lora_A.dtype)
        update = nn.functional.linear(nn.functional.linear(x, self.lora_A * self.lora_E), self.lora_B)
        return (update * self.scaling).to(out.dtype)

    def orthogonality(self) -> torch.Tensor:
        """||P^T P - I||_F^2 + ||Q Q^T - I||_F^2 (eq. 4), fp32 scalar."""
        eye = torch.eye(self.r, device=self.lora_A.device)
        return ((self.lora_B.T @ self.lora_B - eye).pow(2).sum()
                + (self.lora_A @ self.lora_A.T - eye).pow(2).sum())

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, kept={int(self.kept.sum())}, merged={self.merged}"


def svd_layers(model: nn.Module) -> dict[str, SVDLinear]:
    return {path: layer for path, layer in lora_layers(model).items() if isinstance(layer, SVDLinear)}


def attach_adalora(model: nn.Module, targets: str | Sequence[str], init_r: int, alpha: float,
                   dropout: float = 0.0) -> list[str]:
    """Freeze `model` and wrap the targeted linear layers in `SVDLinear` of rank `init_r`; returns their paths."""
    if lora_layers(model):
        raise AdapterError("the model already has adapter layers; load a fresh base model to attach AdaLoRA")
    paths = resolve_targets(model, targets)
    layers = linear_layers(model)
    for param in model.parameters():
        param.requires_grad_(False)
    for path in paths:
        freeze_layer(layers[path])
        _set_submodule(model, path, SVDLinear(layers[path], init_r, alpha, dropout))
    return paths


def budget_at(step: int, initial: int, target: int, tinit: int, tfinal: int, total: int) -> tuple[int, bool]:
    """The rank budget b(t) after optimizer step `step` (1-based) and whether this step is in the
    cubic-decay phase (where masking happens every delta_t steps).

        b(t) = b0                                                  t <= t_init
             = b_T + (b0 - b_T) (1 - (t - t_init) / (T - t_init - t_final))^3,   rounded down
             = b_T                                                 t > T - t_final
    """
    if step <= tinit:
        return initial, False
    if step > total - tfinal:
        return target, False
    progress = 1 - (step - tinit) / (total - tfinal - tinit)
    return int((initial - target) * progress ** 3 + target), True


@dataclass
class RankAllocator:
    """Importance scores and masking (see the module docstring); keyed by `<layer path>.lora_A` etc."""

    beta1: float
    beta2: float
    sensitivity: dict[str, torch.Tensor] = field(default_factory=dict)  # Ibar
    uncertainty: dict[str, torch.Tensor] = field(default_factory=dict)  # Ubar

    @torch.no_grad()
    def update(self, named: Mapping[str, nn.Parameter]) -> None:
        """One EMA step of Ibar and Ubar from the parameters and their current gradients."""
        for name, param in named.items():
            if param.grad is None:
                continue
            ipt = (param * param.grad).abs()
            if name not in self.sensitivity:
                self.sensitivity[name] = torch.zeros_like(param)
                self.uncertainty[name] = torch.zeros_like(param)
            ibar = self.sensitivity[name].mul_(self.beta1).add_(ipt, alpha=1 - self.beta1)
            self.uncertainty[name].mul_(self.beta2).add_((ipt - ibar).abs_(), alpha=1 - self.beta2)

    def score(self, name: str) -> torch.Tensor:
        return self.sensitivity[name] * self.uncertainty[name]

    def triplet_importance(self, paths: Sequence[str]) -> dict[str, torch.Tensor]:
        """S_i per layer, shape (r,): s(lambda_i) + mean over Q's row i + mean over P's column i."""
        # Summed in PEFT's order, E + (Q part + P part), so masking decisions agree with it exactly.
        return {path: (self.score(f"{path}.lora_E").view(-1)
                       + (self.score(f"{path}.lora_A").mean(dim=1) + self.score(f"{path}.lora_B").mean(dim=0)))
                for path in paths}

    def reset(self) -> None:
        self.sensitivity.clear()
        self.uncertainty.clear()


def keep_masks(importance: Mapping[str, torch.Tensor], budget: int) -> dict[str, torch.Tensor]:
    """Which triplets to keep so that `budget` remain: the ones scoring above the (total - budget)-th
    smallest importance (ties at the threshold are dropped, as in PEFT)."""
    scores = torch.cat([value.view(-1) for value in importance.values()])
    drop = scores.numel() - budget
    if drop <= 0:
        return {path: torch.ones_like(value, dtype=torch.bool) for path, value in importance.items()}
    threshold = torch.kthvalue(scores, drop).values
    return {path: value > threshold for path, value in importance.items()}


@dataclass
class AdaLoRASchedule:
    """The resolved step numbers of a run: t_init, t_final, T, delta_t."""

    tinit: int
    tfinal: int
    total: int
    delta_t: int

    @classmethod
    def resolve(cls, total: int, tinit: int | None, tfinal: int | None, delta_t: int) -> "AdaLoRASchedule":
        """Defaults: t_init = 10% and t_final = 20% of the steps. The budget phase must keep >= 1 step."""
        tinit = int(0.1 * total) if tinit is None else tinit
        tfinal = int(0.2 * total) if tfinal is None else tfinal
        if tinit >= total - tfinal:
            raise AdapterError(
                f"adalora.tinit={tinit} and adalora.tfinal={tfinal} leave no budget phase in a run of {total} steps "
                f"(need tinit < steps - tfinal): lower them or train for more steps"
            )
        return cls(tinit, tfinal, total, delta_t)


class AdaLoRAMethod(AttachedMethod):
    """AdaLoRA attached to a model: trains P, lambda, Q; regularises and reallocates rank by itself."""

    def __init__(self, model: nn.Module, init_r: int, target_r: int, tinit: int | None, tfinal: int | None,
                 delta_t: int, beta1: float, beta2: float, orth_reg: float) -> None:
        super().__init__("adalora", model)
        self.layers = svd_layers(model)
        if not self.layers:
            raise AdapterError("AdaLoRA found no SVD layers: call attach_adalora(model, ...) first")
        self.init_r, self.target_r = init_r, target_r
        self.tinit, self.tfinal, self.delta_t = tinit, tfinal, delta_t
        self.orth_reg = orth_reg
        self.allocator = RankAllocator(beta1, beta2)
        self.initial_budget = sum(layer.r for layer in self.layers.values())
        self.target_budget = target_r * len(self.layers)
        self.named = {f"{path}.{key}": getattr(layer, key)
                      for path, layer in self.layers.items() for key in ("lora_A", "lora_E", "lora_B")}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.named.values())

    @contextmanager
    def base_view(self) -> Iterator[nn.Module]:
        with adapters_disabled(self.model):
            yield self.model

    def extra_loss(self) -> torch.Tensor | None:
        """orth_reg * mean over layers of ||P^T P - I||_F^2 + ||Q Q^T - I||_F^2."""
        if self.orth_reg == 0:
            return None
        total = sum(layer.orthogonality() for layer in self.layers.values())
        return self.orth_reg * total / len(self.layers)

    def schedule(self, total_steps: int) -> AdaLoRASchedule:
        return AdaLoRASchedule.resolve(total_steps, self.tinit, self.tfinal, self.delta_t)

    @torch.no_grad()
    def on_step_end(self, step: int, total_steps: int) -> dict[str, float]:
        """After optimizer step `step` (gradients still set): update scores, then mask to the budget."""
        plan = self.schedule(total_steps)
        end_of_budget_phase = plan.total - plan.tfinal
        if step < end_of_budget_phase:
            self.allocator.update(self.named)
            budget, decaying = budget_at(step, self.initial_budget, self.target_budget, plan.tinit, plan.tfinal,
                                         plan.total)
            if decaying and step % plan.delta_t == 0:
                self._mask(budget)
        elif step == end_of_budget_phase:
            budget = self.target_budget
            if not self.allocator.sensitivity:
                # A budget phase that ends at step 1 (a one-step run) saw no earlier step to score; this
                # step's gradients are the only evidence (PEFT fails here on an empty score table).
                self.allocator.update(self.named)
            self._mask(budget)
            self.allocator.reset()
        else:
            budget = self.target_budget
            self._apply_masks()
        return {"budget": budget, "rank": self.kept_rank()}

    def _mask(self, budget: int) -> None:
        masks = keep_masks(self.allocator.triplet_importance(list(self.layers)), budget)
        for path, keep in masks.items():
            self.layers[path].kept.copy_(keep)
        self._apply_masks()

    def _apply_masks(self) -> None:
        for layer in self.layers.values():
            layer.lora_E.masked_fill_(~layer.kept.view(-1, 1), 0.0)

    def kept_rank(self) -> int:
        """Triplets kept by the latest allocation (the initial budget before the first one)."""
        return sum(int(layer.kept.sum()) for layer in self.layers.values())

    def final_ranks(self) -> dict[str, int]:
        """Kept rank per adapted layer path."""
        return {path: int(layer.kept.sum()) for path, layer in self.layers.items()}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        state = {f"kept.{path}": layer.kept for path, layer in self.layers.items()}
        state.update({f"sensitivity.{name}": value for name, value in self.allocator.sensitivity.items()})
        state.update({f"uncertainty.{name}": value for name, value in self.allocator.uncertainty.items()})
        return state

    def load_state_tensors(self, state: Mapping[str, torch.Tensor]) -> None:
        self.allocator.reset()
        for key, value in state.items():
            kind, _, name = key.partition(".")
            if kind == "kept":
                self.layers[name].kept.copy_(value)
            elif kind in ("sensitivity", "uncertainty"):
                getattr(self.allocator, kind)[name] = value.to(self.layers[name.rsplit(".", 1)[0]].kept.device).clone()


def parse_rank_pattern(rank_pattern: Mapping[str, Sequence[bool]]) -> dict[str, list[bool]]:
    """PEFT's saved `rank_pattern` ({'<path>.lora_E': [kept, ...]}) as {path: [kept, ...]}."""
    parsed = {}
    for key, kept in rank_pattern.items():
        path = re.sub(r"\.lora_E(\.[^.]+)?$", "", key)
        if path == key or not isinstance(kept, list) or not all(isinstance(k, bool) for k in kept):
            raise AdapterError(f"rank_pattern entry {key!r}: expected '<module path>.lora_E' -> a list of true/false")
        parsed[path] = kept
    return parsed


class AdaLoRA(Method):
    """AdaLoRA: `adalora.*` plus lora.targets / alpha / dropout; PEFT's ADALORA files; rank pictures."""

    name = "adalora"
    summary = "SVD-form updates whose rank moves to the matrices that matter (adalora.*)"
    sections = {"lora": ("targets", "alpha", "dropout"), "adalora": None}
    equivalents = {"lora.r": "adalora.init_r / adalora.target_r",
                   "lora.rank_pattern": "adalora.init_r / adalora.target_r (ranks are allocated by importance)",
                   "lora.use_dora": "method: dora", "lora.rslora": "method: lora with lora.rslora"}
    accepts_quantized_base = True
    # Triplet importance averages whole rows and columns of P and Q and ranks every layer's triplets
    # together; on FSDP shards each process would see a part and choose different masks. DDP only.
    shards_with_fsdp = False
    run_files = (CONFIG_NAME, WEIGHTS_NAME, RANK_HEATMAP, BUDGET_PLOT)
    weights_files = (WEIGHTS_NAME,)

    def check(self, cfg: Config, skeleton: nn.Module, steps: int, console: Console) -> list[str]:
        problems = super().check(cfg, skeleton, steps, console)
        ada = cfg.adalora
        try:
            AdaLoRASchedule.resolve(steps, ada.tinit, ada.tfinal, ada.delta_t)
        except AdapterError as exc:
            problems.append(str(exc))
        return problems

    def attach(self, model: nn.Module, cfg: Config, console: Console, quiet: bool = False) -> AttachedMethod:
        ada = cfg.adalora
        attach_adalora(model, cfg.lora.targets, init_r=ada.init_r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout)
        return AdaLoRAMethod(model, init_r=ada.init_r, target_r=ada.target_r, tinit=ada.tinit, tfinal=ada.tfinal,
                             delta_t=ada.delta_t, beta1=ada.beta1, beta2=ada.beta2, orth_reg=ada.orth_reg)

    def save(self, attached: AttachedMethod, tokenizer: Any, cfg: Config, out: Path, base_model: str,
             steps: int) -> str:
        from slimtune.adapters import adalora_adapter_config, save_adalora_adapter, target_modules_for

        layers = svd_layers(attached.model)
        ada = cfg.adalora
        plan = AdaLoRASchedule.resolve(steps, ada.tinit, ada.tfinal, ada.delta_t)
        config = adalora_adapter_config(
            init_r=ada.init_r, target_r=ada.target_r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
            target_modules=target_modules_for(attached.model, list(layers)), base_model=base_model, tinit=plan.tinit,
            tfinal=plan.tfinal, delta_t=plan.delta_t, beta1=ada.beta1, beta2=ada.beta2, orth_reg=ada.orth_reg,
            total_step=plan.total, rank_pattern={path: layer.kept.tolist() for path, layer in layers.items()})
        save_adalora_adapter(attached.model, out, config)
        return f"{WEIGHTS_NAME}, {CONFIG_NAME}"

    def write_reports(self, attached: AttachedMethod, rows: list[dict], cfg: Config, out: Path) -> list[str]:
        from slimtune.methods.adalora_report import plot_budget, plot_rank_heatmap

        plot_rank_heatmap(attached.final_ranks(), cfg.adalora.init_r, out / RANK_HEATMAP)
        plot_budget(rows, out / BUDGET_PLOT)
        return [RANK_HEATMAP, BUDGET_PLOT]

    def recognises(self, run_dir: Path) -> bool:
        from slimtune.adapters import read_adapter_config

        return (run_dir / CONFIG_NAME).is_file() and read_adapter_config(run_dir)["peft_type"] == "ADALORA"

    def recorded_base(self, run_dir: Path) -> str | None:
        from slimtune.adapters import read_adapter_config

        return read_adapter_config(run_dir).get("base_model_name_or_path")

    def load(self, run_dir: Path, base_name: str | None, quantized: bool) -> tuple[nn.Module, Any, AttachedMethod]:
        from slimtune.adapters import load_lora_adapter, read_adapter_config

        read_adapter_config(run_dir)
        model, tokenizer = load_base(base_name, quantized)
        load_lora_adapter(model, run_dir)  # as the LoRA adapter it equals
        return model, tokenizer, LoRAMethod(self.name, model)
