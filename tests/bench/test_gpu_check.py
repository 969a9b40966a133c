"""`bench/gpu_check.py --device cpu --tiny`: the GPU check's every step, end to end, on a tiny model.

The check itself compares slimtune with independent references (PEFT, transformers, bitsandbytes); this
test runs it as a GPU session would (a subprocess, the files it writes) so it cannot rot while no GPU
is lent, and holds it to what its report claims.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_dry_run_on_cpu_passes_and_reports_every_section(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])),
           "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "bench/gpu_check.py"), "--device", "cpu", "--tiny",
                           "--out-dir", str(tmp_path / "out"), "--work-dir", str(tmp_path / "work"),
                           "--budget-s", "600"],
                          capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, f"the dry run failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    report = json.loads((tmp_path / "out/gpu_check.json").read_text())
    markdown = (tmp_path / "out/gpu_check.md").read_text()
    assert report["pass"] and report["failures"] == [] and markdown.startswith("# slimtune GPU check (PASS)")

    from slimtune.methods.registry import METHODS

    rows = {row["method"]: row for row in report["correctness"]}
    assert set(rows) == set(METHODS), "every registered method must have a correctness row"
    for name, row in rows.items():
        assert len(row["losses"]) == 5 and row["losses"][-1] < row["losses"][0], f"{name}: {row['losses']}"
        assert row["logits_match"] and row["max_abs_diff"] <= row["tolerance"], f"{name}: {row}"
        assert row["effect"] >= 10 * row["max_abs_diff"], f"{name}: the comparison must see the trained change"
    assert "PEFT" in rows["lora"]["reference"] and "NF4" in rows["qlora"]["reference"]
    assert all(row["codes_equal"] and row["absmax_equal"] for row in report["nf4"]), report["nf4"]
    speed = {row["method"]: row for row in report["speed"]}
    assert set(speed) == {"LoRA", "DoRA", "QLoRA"}
    for name, row in speed.items():
        assert row["slimtune"]["tokens"] == row["peer"]["tokens"] > 0, f"{name}: both sides train the same tokens"
        assert row["speed_ratio"] > 0, row
    assert "bitsandbytes" in speed["QLoRA"]["peer"]["name"] and "DoRA" in speed["DoRA"]["peer"]["name"]
    serve = report["serving"]
    assert serve["clients"] == 64 and serve["requests"] == 64 and serve["failures"] == 0, serve
    assert serve["output_tokens"] == 64 * 4 and serve["output_tokens_per_s"] > 0
    assert "## Serving" in markdown and "| qlora |" in markdown
