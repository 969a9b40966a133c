"""Two real processes under torchrun (gloo, CPU) on the tiny model, against one process.

Two processes with train.batch_size 2 must take the same steps as one process with batch size 4: the
same examples per step in the same order, the loss normalised by the response tokens of both
processes. So their per-step losses and saved weights must agree with the one-process run up to fp32
summation order (tolerances below). Ten examples make each epoch end on a half micro-batch, where
process 1 has no examples and runs a zero-weight share; AdaLoRA masks ranks in steps 2-4, so a
process choosing other masks than process 0 would change the summed losses after step 2.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from rich.console import Console
from safetensors.torch import load_file

import slimtune
from slimtune.api import finetune
from slimtune.config import build_config
from slimtune.errors import ConfigError
from tests.conftest import write_repeat_data

LOSS_TOLERANCE = 2e-5     # per-step loss (metrics.jsonl rounds to 1e-6); fp32 sums in another order
WEIGHT_TOLERANCE = 1e-4   # saved tensors after 6 AdamW steps at lr 1e-2
WORKER = Path(__file__).with_name("distributed_runs.py")
METHODS = {
    "lora": {"lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "train": {"grad_accum": 2}},
    "qlora": {"lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
    "adalora": {"lora": {"alpha": 8, "dropout": 0.0},
                "adalora": {"init_r": 6, "target_r": 3, "tinit": 1, "tfinal": 2}},
    "full": {},
}
RUNS = {  # name -> (method, train.distributed)
    "ddp-lora": ("lora", "ddp"), "ddp-qlora": ("qlora", "ddp"), "ddp-adalora": ("adalora", "ddp"),
    "ddp-full": ("full", "ddp"), "fsdp-lora": ("lora", "fsdp"), "fsdp-qlora": ("qlora", "fsdp"),
    "fsdp-full": ("full", "fsdp"),
}
WEIGHTS = {"full": "model.safetensors"}


def _env() -> dict[str, str]:
    src = str(Path(slimtune.__file__).parents[1])
    root = str(Path(__file__).parents[2])
    return {**os.environ, "PYTHONPATH": os.pathsep.join([src, root, os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1"}


def _torchrun(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args],
                          env=_env(), capture_output=True, text=True, timeout=timeout)


def _config(model_dir: Path, data: Path, out: Path, method: str, batch_size: int, **train) -> dict:
    extra = json.loads(json.dumps(METHODS[method]))
    return {"model": str(model_dir), "method": method, "output": str(out), "data": {"train": str(data)},
            **{k: v for k, v in extra.items() if k != "train"},
            "train": {"batch_size": batch_size, "max_steps": 6, "lr": 1e-2, "precision": "fp32", "warmup_ratio": 0,
                      "log_every": 1, "save_every": None, **extra.get("train", {}), **train}}


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    """Every two-process run in one torchrun job, and the one-process references (batch 4)."""
    root = tmp_path_factory.mktemp("distributed")
    data = write_repeat_data(root / "train.jsonl", 10)
    paths = []
    for name, (method, mode) in RUNS.items():
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(_config(tiny_model_dir, data, root / name, method, 2, distributed=mode)))
        paths.append(str(path))
    job = _torchrun(str(WORKER), *paths)
    assert job.returncode == 0, job.stderr[-3000:]
    for method in METHODS:
        finetune(build_config(_config(tiny_model_dir, data, root / f"one-{method}", method, 4)), Console(quiet=True))
    return root


@pytest.mark.parametrize("name", list(RUNS))
def test_two_processes_take_the_steps_of_one_with_twice_the_batch(runs, name):
    method = RUNS[name][0]
    two, one = runs / name, runs / f"one-{method}"
    two_losses, one_losses = _losses(two), _losses(one)
    assert len(two_losses) == len(one_losses) == 6
    assert max(abs(a - b) for a, b in zip(two_losses, one_losses)) <= LOSS_TOLERANCE, (two_losses, one_losses)
    weights = WEIGHTS.get(method, "adapter_model.safetensors")
    ours, reference = load_file(str(two / weights)), load_file(str(one / weights))
    assert sorted(ours) == sorted(reference)
    for key, value in reference.items():
        assert ours[key].shape == value.shape, f"{key}: {tuple(ours[key].shape)} is not the whole tensor"
        assert torch.allclose(ours[key], value, atol=WEIGHT_TOLERANCE, rtol=0), key
    assert not list(two.glob("checkpoints/*/rng-rank2*")) and len(list(two.glob("checkpoints/step-*"))) == 1
    if method == "adalora":
        masks = [json.loads((run / "adapter_config.json").read_text())["rank_pattern"] for run in (two, one)]
        assert masks[0] == masks[1] and any(not all(kept) for kept in masks[0].values()), "ranks were pruned alike"


def test_peft_loads_the_two_process_adapter(runs, tiny_model_dir):
    """PEFT reads the adapter the two processes wrote, and it computes what the one-process adapter does."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    probe = torch.randint(0, 250, (2, 12), generator=torch.Generator().manual_seed(3))
    logits = []
    for run in ("ddp-lora", "fsdp-lora", "one-lora"):
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        with torch.no_grad():
            logits.append(PeftModel.from_pretrained(base, str(runs / run)).eval()(probe).logits)
    assert (logits[2] - logits[0]).abs().max() < 1e-4 and (logits[2] - logits[1]).abs().max() < 1e-4


def test_sigterm_stops_both_processes_once_and_the_run_resumes(tmp_path, tiny_model_dir):
    """`slimtune train --nproc 2`, SIGTERM to the launcher mid-way: both processes stop after the same step,
    one checkpoint, exit 0; resumed with two processes, the losses are those of an uninterrupted run."""
    data = write_repeat_data(tmp_path / "train.jsonl", 10)
    steps = 60
    config = _config(tiny_model_dir, data, tmp_path / "run", "lora", 2, max_steps=steps, lr=1e-3)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    launcher = subprocess.Popen([sys.executable, "-m", "slimtune", "train", "--nproc", "2", str(path)], env=_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.05)
    launcher.send_signal(signal.SIGTERM)
    _, stderr = launcher.communicate(timeout=120)
    assert launcher.returncode == 0, stderr[-3000:]
    saved = sorted((tmp_path / "run" / "checkpoints").glob("step-*"))
    assert len(saved) == 1 and (saved[0] / "rng-rank1.safetensors").is_file(), saved
    stopped = int(saved[0].name.split("-")[1])
    assert 3 <= stopped < steps and stderr.count("stopped after step") == 1, stderr[-2000:]
    # A different number of processes must keep the examples per micro-batch (2 x 2 = 1 x 4).
    with pytest.raises(ConfigError, match="keep 4 examples per micro-batch"):
        from slimtune.stages import check_run
        check_run(build_config({**config, "resume": True}), Console(quiet=True))

    resumed = _torchrun("-m", "slimtune", "train", str(path), "resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    finetune(build_config(_config(tiny_model_dir, data, tmp_path / "one", "lora", 4, max_steps=steps, lr=1e-3)),
             Console(quiet=True))
    two, one = _losses(tmp_path / "run"), _losses(tmp_path / "one")
    assert len(two) == len(one) == steps
    assert max(abs(a - b) for a, b in zip(two, one)) <= LOSS_TOLERANCE, [(a, b) for a, b in zip(two, one) if a != b][:5]


def test_check_stage_problems_are_reported_once(tmp_path, tiny_model_dir):
    """Both processes find the problem (AdaLoRA cannot be sharded); only process 0 reports it, exit 2."""
    data = write_repeat_data(tmp_path / "train.jsonl", 4)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(_config(tiny_model_dir, data, tmp_path / "run", "adalora", 2, distributed="fsdp")))
    job = _torchrun("-m", "slimtune", "train", str(path))
    assert job.returncode != 0 and "exitcode  : 2" in job.stderr, job.stderr[-2000:]
    assert job.stderr.count("fsdp cannot shard this method") == 1, job.stderr[-3000:]
    assert str(Path(slimtune.__file__).parent) not in job.stderr, "no traceback through slimtune's code"
    assert not (tmp_path / "run").exists(), "nothing is written when the check stage fails"


def test_a_failed_collective_becomes_one_clear_error():
    """gloo reports a vanished peer as a RuntimeError naming its transport: it becomes a PeerFailure."""
    from slimtune.train.distributed import PeerFailure, peer_failures

    with pytest.raises(PeerFailure, match="process 1: another process of this run stopped"):
        with peer_failures(1):
            raise RuntimeError("[gloo/transport/tcp/pair.cc:537] Read error: Connection reset by peer")
    with pytest.raises(RuntimeError, match="unrelated"), peer_failures(0):
        raise RuntimeError("unrelated")
