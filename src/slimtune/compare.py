"""`slimtune compare COMPARE.yaml`: every listed method on the same data and budget, one after another.

Each entry trains in its own process (so its peak memory is its own: RSS on a CPU, reset at the child's
start; `torch.cuda.max_memory_allocated` on a GPU), read between training and the finish stage, next to
the plan's prediction for the same config. A finished entry (its `compare_entry.json` exists) is not
run again, so an interrupted comparison continues where it stopped. At the end: `compare.json`,
`compare.md` (the table) and two pictures, `compare_loss.png` (loss curves overlaid) and
`compare_quality.png` (eval loss against measured peak memory).

    base: {model: ..., data: {...}, train: {...}, eval: {...}}   # a train config every entry starts from
    output: runs/compare
    memory: 24GB                                                # optional: the budget the table is read against
    methods:
      - {name: lora, method: lora}
      - {name: adalora, method: adalora, overrides: [train.lr=5e-3]}
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError
from rich.console import Console
from rich.markup import escape

from slimtune.config import Config, _deep_merge, build_config, drop_unread_sections, parse_overrides
from slimtune.errors import ConfigError
from slimtune.section import Section

ENTRY_RESULT = "compare_entry.json"
COMPARE_JSON, COMPARE_MD = "compare.json", "compare.md"
LOSS_PLOT, QUALITY_PLOT = "compare_loss.png", "compare_quality.png"


class Entry(Section):
    """One method of the comparison."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="Row name and the run's directory under output.")
    method: str = Field(description="The method (lora, qlora, dora, adalora, freeze, full).")
    overrides: list[str] = Field(default_factory=list, description="KEY=VALUE overrides for this entry only.")


class CompareSpec(Section):
    """A comparison: one base config, one budget, several methods."""

    base: dict[str, Any] = Field(description="A train config (model, data, train, eval ...) every entry starts from.")
    output: Path = Field(Path("runs/compare"), description="Directory of the entries' runs and the reports.")
    memory: str | None = Field(None, description="Memory budget the table is read against, e.g. 24GB.")
    methods: list[Entry] = Field(min_length=1, description="The entries, run in this order.")


def load_compare(path: str | Path) -> tuple[CompareSpec, list[tuple[Entry, Config]]]:
    """The spec and every entry's validated config; every problem of every entry in one `ConfigError`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"compare file '{path}' does not exist: pass a YAML file, e.g. examples/compare.yaml")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        spec = CompareSpec.model_validate(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc}); fix the syntax there") from None
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"{path}: {problems}") from None
    problems, entries = [], []
    names = [entry.name for entry in spec.methods]
    problems += [f"methods: the name '{n}' is used twice; give each entry its own name"
                 for n in sorted({n for n in names if names.count(n) > 1})]
    if spec.memory is not None:
        from slimtune.plan import parse_memory

        try:
            parse_memory(spec.memory)
        except ConfigError as exc:
            problems.append(str(exc).replace("--memory", "memory:"))
    for entry in spec.methods:
        # The base's method keys that this entry's method does not read are dropped (base lora.r for
        # adalora or full); the entry's own overrides are validated strictly.
        data = drop_unread_sections(_deep_merge(spec.base, {"method": entry.method, "output": str(spec.output / entry.name),
                                                            "overwrite": True, "resume": False}))
        try:
            data = _deep_merge(data, parse_overrides(entry.overrides))
            entries.append((entry, build_config(data, source=f"{path} entry '{entry.name}'")))
        except ConfigError as exc:
            problems.append(str(exc))
    if problems:
        raise ConfigError(f"{len(problems)} problem(s) in {path}:\n" + "\n".join(f"  - {p}" for p in problems))
    return spec, entries


# -- one entry, in a child process ----------------------------------------------------------------

def _peak_bytes() -> float:
    import torch

    if torch.cuda.is_available():
        return float(torch.cuda.max_memory_allocated())
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024.0
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0


def run_entry(config: dict[str, Any], result_path: str) -> None:
    """The child: train `config`, record the training peak before the finish stage, write the result
    (atomically, last: its presence marks a finished entry)."""
    try:  # the peak RSS survives exec on Linux: start from this process's own
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    from slimtune.stages import finetune

    started = time.perf_counter()
    peaks: list[float] = []
    result = finetune(build_config(config), Console(stderr=True), on_trained=lambda _: peaks.append(_peak_bytes()))
    partial = Path(result_path).with_suffix(".partial")
    partial.write_text(json.dumps({
        "measured_peak_bytes": peaks[0], "tokens_per_s": result.tokens_per_s, "train_seconds": result.train_seconds,
        "wall_seconds": time.perf_counter() - started, "steps": result.steps, "base": result.base,
        "tuned": result.tuned}, indent=2) + "\n", encoding="utf-8")
    partial.replace(result_path)  # atomic: a half-written result never marks an entry finished


# -- the comparison -------------------------------------------------------------------------------

def _weights_bytes(cfg: Config) -> int:
    return sum((cfg.output / name).stat().st_size for name in cfg.plugin.weights_files if (cfg.output / name).is_file())


def run_compare(path: str | Path, console: Console) -> Path:
    """Run every unfinished entry, then write the reports; returns the output directory."""
    from slimtune.plan import parse_memory
    from slimtune.plan_report import make_plan
    from slimtune.stages import check_run

    spec, entries = load_compare(path)
    budget = parse_memory(spec.memory) if spec.memory else None
    checked = [(entry, cfg, check_run(cfg, Console(quiet=True))) for entry, cfg in entries]  # all before any run
    rows = []
    for entry, cfg, check in checked:
        plan = make_plan(cfg, None, check.device.type, check.train_set, measure_time=False)
        estimate = plan.methods[cfg.method_name].estimate
        result_path = cfg.output / ENTRY_RESULT
        if result_path.is_file():
            console.print(f"{escape(entry.name)}: finished earlier, not run again ({escape(str(result_path))})")
        else:
            console.print(f"[bold]{escape(entry.name)}[/bold]: {cfg.method_name} -> {escape(str(cfg.output))}")
            call = f"from slimtune.compare import run_entry; import json, sys; run_entry(json.loads(sys.argv[1]), sys.argv[2])"
            done = subprocess.run([sys.executable, "-c", call, json.dumps(cfg.to_yaml_dict()), str(result_path)])
            if done.returncode != 0:
                raise ConfigError(f"entry '{entry.name}' failed (exit status {done.returncode}); fix it and rerun "
                                  f"slimtune compare {path}: finished entries are not run again")
        measured = json.loads(result_path.read_text(encoding="utf-8"))
        counts = estimate.counts
        rows.append({
            "name": entry.name, "method": cfg.method_name, "trainable": counts.trainable, "total": counts.total,
            "trainable_pct": 100 * counts.trainable / counts.total, "adapter_bytes": _weights_bytes(cfg),
            "predicted_peak_bytes": estimate.peak, **measured,
            "fits": None if budget is None else measured["measured_peak_bytes"] <= budget,
            "loss_curve": _loss_curve(cfg.output / "metrics.jsonl"),
        })
    out = spec.output
    out.mkdir(parents=True, exist_ok=True)
    (out / COMPARE_JSON).write_text(json.dumps({"memory_budget": spec.memory, "entries": rows}, indent=2) + "\n",
                                    encoding="utf-8")
    (out / COMPARE_MD).write_text(compare_table(rows, spec.memory) + "\n", encoding="utf-8")
    plot_comparison(rows, out)
    return out


def _loss_curve(metrics: Path) -> list[list[float]]:
    if not metrics.is_file():
        return []
    rows = [json.loads(line) for line in metrics.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [[row["step"], row["loss"]] for row in rows if "loss" in row]


def compare_table(rows: list[dict[str, Any]], memory: str | None) -> str:
    def metric(row: dict, key: str, fmt: str) -> str:
        value = row.get("tuned", {}).get(key)
        return "-" if value is None else format(value, fmt)

    lines = ["| method | trainable % | adapter MB | predicted peak MB | measured peak MB | predicted / measured | "
             "tokens/s | wall s | eval loss | exact match | ROUGE-L | BLEU |" + (" fits |" if memory else ""),
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---|" if memory else "")]
    for row in rows:
        lines.append(
            f"| {row['name']} | {row['trainable_pct']:.2f} | {row['adapter_bytes'] / 2**20:.1f} | "
            f"{row['predicted_peak_bytes'] / 2**20:,.0f} | {row['measured_peak_bytes'] / 2**20:,.0f} | "
            f"{row['predicted_peak_bytes'] / row['measured_peak_bytes']:.2f} | {row['tokens_per_s']:.0f} | "
            f"{row['wall_seconds']:.0f} | {metric(row, 'loss', '.4f')} | {metric(row, 'exact_match', '.2f')} | "
            f"{metric(row, 'rouge_l', '.3f')} | {metric(row, 'bleu', '.1f')} |"
            + (f" {'yes' if row['fits'] else 'no'} |" if memory else ""))
    return "\n".join(lines)


def plot_comparison(rows: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for row in rows:
        if row["loss_curve"]:
            steps, losses = zip(*row["loss_curve"])
            ax.plot(steps, losses, linewidth=1.5, label=row["name"])
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (response tokens)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / LOSS_PLOT, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    for row in rows:
        loss = row.get("tuned", {}).get("loss")
        if loss is not None:
            ax.scatter(row["measured_peak_bytes"] / 2**20, loss)
            ax.annotate(row["name"], (row["measured_peak_bytes"] / 2**20, loss), textcoords="offset points",
                        xytext=(5, 3))
    ax.set_xlabel("measured peak memory (MiB)")
    ax.set_ylabel("eval loss (lower is better)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / QUALITY_PLOT, dpi=110)
    plt.close(fig)
