"""The method registry: names -> plugins. Nothing outside it branches on a method's name.

Adding a method: one module under `methods/` with its config section (a `Section`), its layers, an
`AttachedMethod` and a `Method` plugin, registered here; its section goes into `Config` (config.py).
"""

from __future__ import annotations

from pathlib import Path

from slimtune.errors import AdapterError, ConfigError
from slimtune.methods.adalora import AdaLoRA
from slimtune.methods.base import Method
from slimtune.methods.freeze import Freeze, Full
from slimtune.methods.longlora import LongLoRA
from slimtune.methods.lora import DoRA, LoRA, QLoRA

METHODS: dict[str, Method] = {method.name: method for method in (LoRA(), QLoRA(), DoRA(), AdaLoRA(), Freeze(), Full(),
                                                       LongLoRA())}


def get_method(name: str) -> Method:
    """The plugin called `name`; an unknown name is a `ConfigError` that lists the known ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown method '{name}': choose one of {', '.join(METHODS)}") from None


def all_run_files() -> list[str]:
    """Every file some method's finished run holds (what `overwrite=true` clears)."""
    return sorted({name for method in METHODS.values() for name in method.run_files})


def finished_weights(out: Path) -> list[Path]:
    """The weights files of a finished run (any method's) that `out` holds."""
    names = {name for method in METHODS.values() for name in method.weights_files}
    return [out / name for name in sorted(names) if (out / name).is_file()]


def recognise_run(run_dir: Path) -> Method:
    """The method whose finished files `run_dir` holds (a run without config.yaml, or a PEFT adapter)."""
    for method in METHODS.values():
        if method.recognises(run_dir):
            return method
    described = "; ".join(f"{name}: {', '.join(m.weights_files)}" for name, m in METHODS.items() if m.weights_files)
    raise AdapterError(f"'{run_dir}' holds no finished run (expected the files of one method: {described}); "
                       "point to a finished run's output directory")
