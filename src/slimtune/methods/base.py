"""How the rest of slimtune knows a fine-tuning method: two small interfaces.

`Method` is the plugin, one per method (`methods/registry.py` maps names to them). It owns everything
about the method outside the training loop: which config keys it reads, its validation against the
model (run on a weightless skeleton in the *check* stage) and the run length, attaching it, the files
it writes and saving them, recognising and loading a finished run, and its reports.

`AttachedMethod` is the method on one model, as the loop and the finish stage see it. The loop never
imports a method module: it asks for the trainable parameters, calls `on_step_end` after each
optimizer step, before the gradients are cleared (AdaLoRA's rank allocation lives there), adds
`extra_loss()` explicitly (AdaLoRA's orthogonality penalty), logged as its own metric, and keeps
`state_tensors()` in every checkpoint so a resumed run continues the method's own state too.
`base_view()` gives the model as it was before tuning, for the "base" row of an evaluation, and
`merged()` the model with the method folded into plain layers.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from slimtune.errors import SlimtuneError

if TYPE_CHECKING:  # the config imports the methods' sections, so only for type hints
    from rich.console import Console

    from slimtune.config import Config


class AttachedMethod:
    """A method attached to a model. Subclasses override the hooks they need."""

    def __init__(self, name: str, model: nn.Module) -> None:
        self.name, self.model = name, model

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def extra_loss(self) -> torch.Tensor | None:
        """A regulariser the loop adds to the task loss; None when the method has none."""
        return None

    def on_step_end(self, step: int, total_steps: int) -> dict[str, float]:
        """Called after every optimizer step (gradients still set); returns extra metrics to log."""
        return {}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The method's own training state (besides parameters and optimizer), saved in checkpoints."""
        return {}

    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what `state_tensors` returned (on resume)."""

    @contextmanager
    def training_patches(self) -> Iterator[None]:
        """Model changes that hold only while the loop trains (LongLoRA's S2-Attn), undone however the
        block ends; evaluation, generation and saving never see them."""
        yield

    @contextmanager
    def base_view(self) -> Iterator[nn.Module]:
        """The base model inside the block: adapters off and every trained base tensor restored."""
        raise NotImplementedError(f"{type(self).__name__} has no base view")
        yield self.model  # pragma: no cover

    def merged(self) -> nn.Module:
        """The tuned model as plain layers (a no-op where the weights already hold the result)."""
        return self.model

    def parameter_counts(self) -> tuple[int, int]:
        """(trainable, total) parameter counts; tied weights counted once, 4-bit weights (buffers) counted."""
        from slimtune.quant.linear4bit import Linear4bit

        seen: set[int] = set()
        trainable = total = 0
        for param in self.model.parameters():
            if id(param) in seen:
                continue
            seen.add(id(param))
            total += param.numel()
            trainable += param.numel() if param.requires_grad else 0
        total += sum(m.in_features * m.out_features for m in self.model.modules() if isinstance(m, Linear4bit))
        return trainable, total


class Method:
    """A fine-tuning method as a plugin: a name, the config keys it reads and what it does with them."""

    name: ClassVar[str]
    summary: ClassVar[str]
    # Config keys the method reads: {section: keys}, None = every key of the section. A key the user set
    # in a section (or part of one) the method does not read is a config error naming the keys that apply.
    sections: ClassVar[dict[str, tuple[str, ...] | None]] = {}
    # Keys of other methods that users reach for, and what this method calls them ("lora.r" -> ...).
    equivalents: ClassVar[dict[str, str]] = {}
    quantized_base: ClassVar[bool] = False        # the base is frozen in NF4 (QLoRA)
    accepts_quantized_base: ClassVar[bool] = False  # `quantize: nf4` may be combined with it
    trains_base_weights: ClassVar[bool] = False
    shards_with_fsdp: ClassVar[bool] = True      # train.distributed=fsdp may shard its parameters
    # For `slimtune plan` (plan.py): memory the method holds beyond its trainable parameters.
    saves_layer_outputs: ClassVar[bool] = False  # each adapted layer keeps its output for backward (DoRA)
    keeps_base_copies: ClassVar[bool] = False    # keeps the trained base tensors' original values (base view)
    run_files: ClassVar[tuple[str, ...]] = ()     # every file a finished run holds (cleared by overwrite)
    weights_files: ClassVar[tuple[str, ...]] = ()  # written last: their presence marks a finished run

    # -- check: no weights -------------------------------------------------------------------------
    def config_problems(self, cfg: Config) -> list[str]:
        """Problems across the method's settings and the rest of the config, one line each (no model)."""
        return []

    def apply_defaults(self, cfg: Config) -> None:
        """Fill keys the user left unset with this method's own defaults (LongLoRA: data.max_length = its
        context, the paper's LoRA rank). Runs while the config is validated, so the saved config.yaml holds
        the values the run used and reads back as the same config."""

    def check(self, cfg: Config, skeleton: nn.Module, steps: int, console: Console) -> list[str]:
        """Problems with this method on `skeleton` (the model on the meta device) for a run of `steps`
        optimizer steps, one line each. The default attaches the method to the skeleton."""
        try:
            self.attach(skeleton, cfg, console, quiet=True)
        except SlimtuneError as exc:
            return [str(exc)]
        return []

    # -- build -------------------------------------------------------------------------------------
    def attention_length(self, cfg: Config, row_length: int) -> int:
        """How many tokens attention spans in a training row of `row_length` tokens (all of them, unless
        the method cuts rows into groups); on CPU the faster attention maths depends on it."""
        return row_length

    def attach(self, model: nn.Module, cfg: Config, console: Console, quiet: bool = False) -> AttachedMethod:
        raise NotImplementedError

    # -- finish ------------------------------------------------------------------------------------
    def save(self, attached: AttachedMethod, tokenizer: Any, cfg: Config, out: Path, base_model: str,
             steps: int) -> str:
        """Write the trained result into `out`, its weights last; returns what was written, for the log."""
        raise NotImplementedError

    def write_reports(self, attached: AttachedMethod, rows: list[dict], cfg: Config, out: Path) -> list[str]:
        """Method-specific pictures and tables in `out`; returns the file names."""
        return []

    # -- a finished run ----------------------------------------------------------------------------
    def recognises(self, run_dir: Path) -> bool:
        """True when `run_dir` holds this method's finished files (used without a config.yaml)."""
        return False

    def recorded_base(self, run_dir: Path) -> str | None:
        """The base model the run's own files name, if they name one."""
        return None

    def load(self, run_dir: Path, base_name: str | None, quantized: bool) -> tuple[nn.Module, Any, AttachedMethod]:
        """(model, tokenizer, attached) of a finished run, for inference: the base (NF4 when `quantized`)
        with the run's result on it."""
        raise NotImplementedError


def load_base(base_name: str, quantized: bool):
    """(model, tokenizer) of a base for inference in fp32; NF4-quantized (streamed) when `quantized`."""
    from slimtune.models import load_model
    from slimtune.models.streaming import load_quantized_model

    if quantized:  # an adapter trained on the 4-bit base: rebuild that base
        model, tokenizer, _, _, _ = load_quantized_model(base_name, torch.float32, torch.device("cpu"), torch.float32)
        return model, tokenizer
    model, tokenizer, _ = load_model(base_name)
    return model, tokenizer
