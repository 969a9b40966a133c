"""The glibc heap levers: mapped large blocks are unmapped on free, trimming hands free holes back,
and neither changes what training computes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from rich.console import Console

from slimtune.train.heap import heap_control_available, set_mmap_threshold

MIB = 2**20
glibc_only = pytest.mark.skipif(not heap_control_available(), reason="mallopt/malloc_trim are glibc's")


# Run in a fresh interpreter: in a long-lived process earlier tests leave free holes in the heap, and
# malloc serves a block from a fitting hole before it considers a new mapping.
PROBE = """
import json, os, torch
from slimtune.train.heap import release_free_memory, set_mmap_threshold
MIB = 2**20

def resident():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

def released_by_freeing_a_block_below_a_live_one(mib):
    block = torch.ones(mib * MIB, dtype=torch.uint8)  # written, so every page is resident
    above = torch.ones(mib * MIB, dtype=torch.uint8)  # grows the heap past the block: its top is not free
    before = resident()
    del block
    return before - resident()

out = {}
# Mapped first: a hole left by the heap case would serve the next 16 MiB request before any mapping.
set_mmap_threshold(1 * MIB)
out["mapped"] = released_by_freeing_a_block_below_a_live_one(16)
set_mmap_threshold(32 * MIB)  # where glibc's own threshold ends up once it has grown
out["from_heap"] = released_by_freeing_a_block_below_a_live_one(16)
blocks = [torch.ones(MIB, dtype=torch.uint8) for _ in range(160)]
del blocks[::2]  # 80 free 1 MiB holes, each below a live block: nothing can shrink the heap's top
before = resident()
out["untrimmed"] = before - resident()
release_free_memory()
out["trimmed"] = before - resident()
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def probe() -> dict[str, int]:
    run = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.splitlines()[-1])


@glibc_only
def test_blocks_at_the_threshold_are_unmapped_when_freed(probe):
    assert probe["from_heap"] < 2 * MIB, "from the heap, a freed 16 MiB hole below a live block stays resident"
    assert probe["mapped"] > 15 * MIB, (
        f"over a 1 MiB threshold the block must be unmapped on free, released {probe['mapped'] / MIB:.1f} MiB")


@glibc_only
def test_trim_returns_the_holes_between_live_blocks(probe):
    assert probe["untrimmed"] < 2 * MIB, "without a trim the holes stay resident"
    assert probe["trimmed"] > 60 * MIB, (
        f"malloc_trim must hand back the ~80 MiB of holes, released {probe['trimmed'] / MIB:.1f} MiB")


def test_heap_settings_leave_training_unchanged(tiny_model_dir, tmp_path):
    from slimtune.api import finetune
    from slimtune.config import build_config

    rows = [{"instruction": f"repeat {i}", "output": f"word{i} " * 3} for i in range(8)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")

    def losses(**heap) -> list[tuple[float, float]]:
        out = tmp_path / ("run-" + "-".join(heap) if heap else "run")
        finetune(build_config({
            "model": str(tiny_model_dir), "output": str(out), "data": {"train": str(tmp_path / "train.jsonl")},
            "lora": {"r": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]},
            "train": {"max_steps": 3, "batch_size": 4, "lr": 1e-2, "precision": "fp32", "save_every": None, **heap},
        }), Console(quiet=True))
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return [(row["loss"], row["grad_norm"]) for row in rows]

    try:
        assert losses(mmap_threshold_mb=1, trim_memory=True) == losses()
    finally:
        set_mmap_threshold(32 * MIB)


@pytest.mark.parametrize("heap, noted", [({"trim_memory": True}, True), ({"mmap_threshold_mb": 4}, True), ({}, False)])
def test_without_glibc_chosen_settings_get_a_note_and_the_default_none(heap, noted, tiny_model_dir, tmp_path,
                                                                       monkeypatch):
    import slimtune.stages
    from slimtune.api import finetune
    from slimtune.config import build_config

    monkeypatch.setattr(slimtune.stages, "heap_control_available", lambda: False)  # as on musl or macOS
    (tmp_path / "train.jsonl").write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n", encoding="utf-8")
    console = Console(record=True, width=200)
    finetune(build_config({
        "model": str(tiny_model_dir), "output": str(tmp_path / "run"), "data": {"train": str(tmp_path / "train.jsonl")},
        "train": {"max_steps": 1, "batch_size": 1, "precision": "fp32", "save_every": None, **heap},
    }), console)
    assert ("need glibc's allocator" in console.export_text()) == noted, (
        "a setting the user chose must be noted as without effect; the default threshold must stay silent")
