"""One process x 2 threads vs 2 processes x 1 thread (torchrun, DDP, gloo) on this machine's CPU.

The same run both ways: LoRA (r 16, all linear layers) on the bundled SmolLM2-135M-Instruct, the demo's
extraction data, `--steps` optimizer steps of 8 examples each (one process: batch 8; two processes:
batch 4 each, the same global batch and order, so the same losses). Reported: trained tokens/s from
metrics.jsonl (prompt + response tokens of every process over the loop's elapsed time) and the peak
resident memory summed over the training processes, sampled every 0.1 s from /proc. Configurations
alternate over `--rounds`.

    python bench/distributed_cpu.py --steps 12 --rounds 2

It shows what splitting the cores between processes costs or saves here, not a speed-up: on one
machine's CPU, two processes do the same arithmetic as one with two threads, plus a gradient
all-reduce each step, and each holds its own copy of the model.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _tree(pid: int) -> list[int]:
    """`pid` and all its descendants."""
    from slimtune.launch import child_pids

    pids, queue = [], [pid]
    while queue:
        current = queue.pop()
        pids.append(current)
        queue += child_pids(current)
    return pids


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _is_trainer(pid: int) -> bool:
    """A process that trains (not torchrun's agent, not the launcher)."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"slimtune" in cmd and b"torch.distributed.run" not in cmd and b"--nproc" not in cmd


def run(processes: int, steps: int, out: Path) -> dict:
    batch = 8 // processes
    args = ["examples/extract.yaml", f"output={out}", "overwrite=true", f"train.max_steps={steps}",
            f"train.batch_size={batch}", "data.eval=null", "train.save_every=null"]
    env = {**os.environ, "OMP_NUM_THREADS": str(2 // processes)}
    command = [sys.executable, "-m", "slimtune", "train", *args] + (["--nproc", str(processes)] if processes > 1 else [])
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = 0.0
    while process.poll() is None:
        peak = max(peak, sum(_rss_mb(pid) for pid in _tree(process.pid) if _is_trainer(pid)))
        time.sleep(0.1)
    if process.returncode != 0:
        raise SystemExit(f"{command} failed:\n{process.stderr.read()[-2000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"processes": processes, "threads_each": 2 // processes, "tokens_per_s": rows[-1]["tokens_per_s"],
            "peak_rss_mb": round(peak), "final_loss": rows[-1]["loss"], "wall_s": round(time.perf_counter() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for processes in (1, 2):
                result = run(processes, args.steps, Path(tmp) / f"p{processes}-r{round_}")
                results.append(result)
                print(json.dumps(result), flush=True)
    print("\n| processes x threads | tokens/s | peak RSS (MB, all processes) | final loss |")
    print("|---|---|---|---|")
    for processes in (1, 2):
        mine = [r for r in results if r["processes"] == processes]
        tps = sum(r["tokens_per_s"] for r in mine) / len(mine)
        rss = max(r["peak_rss_mb"] for r in mine)
        print(f"| {processes} x {2 // processes} | {tps:,.0f} | {rss:,} | {mine[-1]['final_loss']:.4f} |")
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
