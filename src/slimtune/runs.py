"""A run directory: its layout, the checks on it before training, and loading a finished run.

    <output>/
      config.yaml          the resolved config (only the method's own sections)
      checkpoints/step-N/  complete checkpoints of an unfinished (or finished) run
      metrics.jsonl, loss.png, eval.json, method reports (AdaLoRA: rank_heatmap.png, ...)
      the method's files, weights last: their presence marks a finished run

Nothing here trains. The server and `slimtune eval/generate/chat/merge` read runs through this module
without importing the trainer.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import yaml

from slimtune.config import Config, build_config, drop_unread_sections
from slimtune.errors import AdapterError, ConfigError, SlimtuneError
from slimtune.methods.base import AttachedMethod, Method
from slimtune.methods.registry import all_run_files, finished_weights, get_method, recognise_run
from slimtune.train.checkpoint import Checkpoint, latest_checkpoint, list_checkpoints

RUN_CONFIG = "config.yaml"
CHECKPOINTS = "checkpoints"
EVAL_REPORT, EVAL_METRICS = "eval_report.md", "eval_metrics.json"
# Files every run writes besides its method's (the method's reports are in its run_files).
COMMON_FILES = (RUN_CONFIG, "metrics.jsonl", "loss.png", "eval.json", EVAL_REPORT, EVAL_METRICS,
                "routing_signature.safetensors")
# Config keys whose change does not make a checkpoint meaningless to continue from.
_RESUME_INSENSITIVE = {"resume", "overwrite", "output", "eval", "train.log_every", "train.save_every",
                       "train.keep_checkpoints", "train.on_nan", "train.device", "train.report_to", "data.eval",
                       "train.distributed", "train.distributed_timeout_s",
                       "train.batch_size"}  # per process: the global batch is checked in resume_point


# -- checks before training: nothing is touched --------------------------------------------------------

def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def output_problems(cfg: Config) -> list[str]:
    """What stops `cfg.output` from taking this run, one line each; reads only. (Whether the newest
    checkpoint fits a resumed config is `resume_point`'s check.)

    A finished run is replaced only with overwrite=true; an unfinished run's checkpoints are continued
    with resume=true or discarded with overwrite=true, never silently."""
    out = cfg.output
    if out.exists() and not out.is_dir():
        return [f"output '{out}' exists and is not a directory: choose another output=..."]
    problems = []
    finished = finished_weights(out) if out.is_dir() else []
    checkpoints = list_checkpoints(out / CHECKPOINTS)
    if finished and cfg.resume:
        problems.append(f"resume=true, but the run in '{out}' already finished: nothing to resume; "
                        "pass overwrite=true instead of resume=true to train it again")
    elif finished and not cfg.overwrite:
        problems.append(f"output '{out}' already holds a finished run ({finished[0].name}): choose another "
                        "output=..., or pass overwrite=true to replace it")
    elif checkpoints and not cfg.resume and not cfg.overwrite:
        problems.append(f"output '{out}' holds an unfinished run's checkpoints (newest: step {checkpoints[-1].step}): "
                        "pass resume=true to continue it, or overwrite=true to discard them and start again")
    if cfg.resume and cfg.overwrite:
        problems.append("resume=true and overwrite=true contradict each other: pass only one of them")
    where = _nearest_existing(out)
    if not os.access(where, os.W_OK | os.X_OK):
        problems.append(f"cannot write to output '{out}' ('{where}' is not writable): choose a writable directory")
    return problems


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def resume_point(cfg: Config) -> Checkpoint:
    """The checkpoint to resume from, after checking it fits the current config."""
    checkpoint = latest_checkpoint(cfg.output / CHECKPOINTS)
    if checkpoint is None:
        raise SlimtuneError(
            f"resume=true, but '{cfg.output / CHECKPOINTS}' holds no complete checkpoint: run without resume=true"
        )
    saved, current = _flatten(checkpoint.state.get("config", {})), _flatten(cfg.to_yaml_dict())
    # Only the keys this config has: a saved key of a section the method does not read changes nothing.
    changed = [
        f"{key}: {saved.get(key)!r} -> {current.get(key)!r}"
        for key in sorted(current)
        if saved.get(key) != current.get(key)
        and key not in _RESUME_INSENSITIVE and key.split(".")[0] not in _RESUME_INSENSITIVE
    ]
    changed += _global_batch_change(checkpoint, cfg)
    if changed:
        raise SlimtuneError(
            f"cannot resume from {checkpoint.path}: the config differs where it matters ({'; '.join(changed)}); "
            "restore those values, or start a new run in another output directory"
        )
    return checkpoint


def _global_batch_change(checkpoint: Checkpoint, cfg: Config) -> list[str]:
    """The examples per micro-batch (train.batch_size x processes) must stay the same on resume, so that
    the steps continue on the same data; the number of processes may change with it."""
    from slimtune.train.distributed import launched_world_size

    saved_batch = checkpoint.state.get("config", {}).get("train", {}).get("batch_size")
    saved_processes = checkpoint.state.get("progress", {}).get("processes", 1)
    processes = launched_world_size()
    if saved_batch is None or saved_batch * saved_processes == cfg.train.batch_size * processes:
        return []
    total = saved_batch * saved_processes
    hint = (f", e.g. train.batch_size={total // processes}" if total % processes == 0 else "")
    return [f"train.batch_size x processes: {saved_batch} x {saved_processes} -> {cfg.train.batch_size} x {processes} "
            f"(keep {total} examples per micro-batch{hint})"]


def prepare_output(cfg: Config) -> Path:
    """After every check passed: create `output`, and on a fresh start remove a previous run's files
    (only with overwrite=true can there be any: `output_problems` refuses otherwise)."""
    out = cfg.output
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("", encoding="utf-8")
        probe.unlink()
    except OSError as exc:
        raise SlimtuneError(f"cannot write to output '{out}' ({exc.strerror}): choose a writable directory") from None
    if not cfg.resume:
        for name in (*COMMON_FILES, *all_run_files()):
            (out / name).unlink(missing_ok=True)
        # Checkpoints of the old run would be pruned in step order against the new run's, or resumed from.
        shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
    return out


# -- finished runs -------------------------------------------------------------------------------------

def run_config(run_dir: str | Path) -> Config | None:
    """The resolved config a slimtune run saved, or None for a bare PEFT adapter directory."""
    path = Path(run_dir) / RUN_CONFIG
    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as exc:
        reason = ("not UTF-8 text" if isinstance(exc, UnicodeDecodeError) else
                  "nested too deeply" if isinstance(exc, RecursionError) else "not valid YAML")
        raise ConfigError(f"{path}: not a readable run config ({reason}); restore it or remove it") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a run config must be a mapping of keys, got {type(data).__name__}")
    return build_config(drop_unread_sections(data), source=str(path))


def run_method(run_dir: str | Path, cfg: Config | None = None) -> Method:
    """The method of a finished run: its config's (`cfg`, else read), else recognised from its files (a PEFT
    adapter)."""
    run_dir = Path(run_dir)
    cfg = cfg or run_config(run_dir)
    method = cfg.plugin if cfg is not None else recognise_run(run_dir)
    if cfg is not None and not any((run_dir / name).is_file() for name in method.weights_files):
        raise AdapterError(f"'{run_dir}' holds no finished {method.name} run (no {', '.join(method.weights_files)}): "
                           "train it to the end, or resume it with resume=true")
    return method


def base_model_name(run_dir: str | Path, model: str | None = None) -> str:
    """The base a run belongs to: `model` if given, else the run's config, else what its files record."""
    run_dir = Path(run_dir)
    cfg = run_config(run_dir)
    base = model or (cfg.model if cfg else None) or run_method(run_dir, cfg).recorded_base(run_dir)
    if not base:
        raise AdapterError(f"'{run_dir}' does not name its base model: pass --model")
    return base


def open_run(run_dir: str | Path, model: str | None = None) -> tuple[Any, Any, AttachedMethod]:
    """(model, tokenizer, attached) of a finished run, in eval mode; `attached.base_view()` gives the base."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise AdapterError(f"run directory '{run_dir}' does not exist: pass the `output` directory of a training run")
    cfg = run_config(run_dir)
    method = run_method(run_dir, cfg)
    base = model or (cfg.model if cfg else None) or method.recorded_base(run_dir)
    if not base and not method.trains_base_weights:
        raise AdapterError(f"'{run_dir}' does not name its base model: pass --model")
    loaded, tokenizer, attached = method.load(run_dir, base, bool(cfg and cfg.quantized))
    loaded.eval()
    return loaded, tokenizer, attached


def load_run(run_dir: str | Path, model: str | None = None):
    """(model, tokenizer) of a finished run, in eval mode.

    `run_dir` is a slimtune run (any method) or a PEFT LoRA / AdaLoRA adapter directory. For runs on a
    base the base model is `model` if given, else the run's `model` key, else the base model the run's
    files record. A run trained on the NF4 base (QLoRA) gets that base again.
    """
    loaded, tokenizer, _ = open_run(run_dir, model)
    return loaded, tokenizer


__all__ = ["CHECKPOINTS", "RUN_CONFIG", "base_model_name", "load_run", "open_run", "output_problems",
           "prepare_output", "resume_point", "run_config", "run_method"]
