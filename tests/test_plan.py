"""`slimtune plan`: counts against hand computation, the activation model against measured memory, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from slimtune.config import build_config
from slimtune.errors import ConfigError
from slimtune.plan import NF4_DOUBLE_QUANT_BYTES, Settings, Shape, count, estimate, parse_memory, recommend
from slimtune.plan_report import attached_skeleton, settings_of

from conftest import bytes_kept_for_backward, make_tiny_tokenizer, make_wide_tiny_llama
from test_cli import run_cli, write_config, write_jsonl

ROOT = Path(__file__).resolve().parent.parent

# The conftest tiny Llama: hidden 32, MLP 64, 2 layers, 4 heads of 8, 2 kv heads (kv width 16), untied.
H, I, KV, LAYERS = 32, 64, 16, 2
LINEAR_PER_LAYER = H * H + H * KV + H * KV + H * H + 3 * H * I  # q, k, v, o, gate, up, down = 9216
NORMS_PER_LAYER = 2 * H


def _cfg(model_dir: Path, method: str, **sections) -> object:
    return build_config({"model": str(model_dir), "method": method, "data": {"train": "-"}, **sections})


def test_parse_memory_units():
    assert parse_memory("24GB") == 24 * 10**9
    assert parse_memory("16GiB") == 16 * 2**30
    assert parse_memory("1.5 TB") == 1_500_000_000_000
    assert parse_memory("512mb") == 512 * 10**6
    for bad in ("24XB", "GB", "-1GB", "0GB", "24 G B"):
        with pytest.raises(ConfigError, match="is not a memory size"):
            parse_memory(bad)


def test_counts_match_hand_computation(tiny_model_dir):
    vocab = len(make_tiny_tokenizer())
    base = LAYERS * (LINEAR_PER_LAYER + NORMS_PER_LAYER) + 2 * vocab * H + H  # + embeddings, head, final norm
    r = 4
    # LoRA r on every linear layer: r x (in + out) each.
    lora_per_layer = r * ((H + H) + (H + KV) * 2 + (H + H) + (H + I) * 2 + (I + H))
    lora = count(attached_skeleton(_cfg(tiny_model_dir, "lora", lora={"r": r, "targets": "all-linear"})), False)
    assert lora.trainable == LAYERS * lora_per_layer, "LoRA's trainable count is r (in + out) per adapted layer"
    assert lora.base == base and lora.total == base + LAYERS * lora_per_layer
    assert lora.embeddings == 2 * vocab * H and lora.grad_layers == LAYERS
    assert lora.adapted_out_features == H + KV + KV + H + I + I + H

    qlora = count(attached_skeleton(_cfg(tiny_model_dir, "qlora", lora={"r": r, "targets": "all-linear"})), True)
    assert qlora.quantizable == LAYERS * LINEAR_PER_LAYER, "every linear weight but the LM head is NF4"
    shape = Shape.of(attached_skeleton(_cfg(tiny_model_dir, "lora")))
    assert (shape.hidden, shape.kv_width, shape.intermediate, shape.layers) == (H, KV, I, LAYERS)

    freeze = count(attached_skeleton(_cfg(tiny_model_dir, "freeze", freeze={"last_layers": 1})), False)
    assert freeze.trainable == LINEAR_PER_LAYER + NORMS_PER_LAYER and freeze.grad_layers == 1
    full = count(attached_skeleton(_cfg(tiny_model_dir, "full")), False)
    assert full.trainable == full.total == base


def test_estimate_bytes_follow_the_counts(tiny_model_dir):
    """NF4 at 0.5 + 1/64 + 4/16384 B/param, fp32 trainables, grads and two AdamW moments."""
    cfg = _cfg(tiny_model_dir, "qlora", lora={"r": 4, "targets": "all-linear"}, train={"precision": "bf16"})
    skeleton = attached_skeleton(cfg)
    counts = count(skeleton, True)
    est = estimate("qlora", cfg.plugin, counts, Shape.of(skeleton), settings_of(cfg, "cuda", seq_len=64), True)
    vocab = len(make_tiny_tokenizer())
    nf4 = LAYERS * LINEAR_PER_LAYER * (0.5 + 1 / 64 + 4 / (64 * 256))
    assert NF4_DOUBLE_QUANT_BYTES == pytest.approx(0.5158691, abs=1e-7)
    assert est.line("frozen weights") == pytest.approx(nf4 + 2 * (2 * vocab * H + LAYERS * NORMS_PER_LAYER + H))
    assert est.line("trainable") == est.line("gradients") == 4 * counts.trainable
    assert est.line("optimizer states") == 8 * counts.trainable


def test_saved_activations_match_the_per_layer_model(tiny_model_dir):
    """The per-token-per-layer formula against the bytes autograd really keeps (saved_tensors_hooks),
    for a forward of LoRA and DoRA in bf16 autocast on a wider tiny model: within 10%."""
    from rich.console import Console

    from slimtune.train.fused import fuse_modules
    from slimtune.train.prepare import slimtune_attention

    tokens = 4 * 128  # batch 4 x 128
    for method in ("lora", "dora"):
        model = make_wide_tiny_llama()
        cfg = build_config({"model": "-", "method": method, "data": {"train": "-"},
                            "lora": {"r": 8, "targets": "all-linear"}})
        with slimtune_attention(model, cfg.train, Console(quiet=True)):
            fuse_modules(model)
            cfg.plugin.attach(model, cfg, Console(quiet=True))
            model.train()
            saved = bytes_kept_for_backward(model, 4, 128)
        settings = Settings(batch_size=4, seq_len=128, label_tokens=tokens, precision="bf16", optimizer="adamw",
                            offload_optimizer=False, grad_checkpointing=False, checkpoint_fraction=1.0,
                            loss_chunk=1024, device="cpu")
        predicted = estimate(method, cfg.plugin, count(model, False), Shape.of(model), settings, False).line("activations")
        assert predicted == pytest.approx(saved, rel=0.10), f"{method}: predicted {predicted} B, autograd kept {saved} B"


# Runs 2 LoRA steps of the config in argv[1] in a fresh process and prints what it measured.
TRAIN = """
from pathlib import Path
Path("/proc/self/clear_refs").write_text("5")
import json, sys
from contextlib import ExitStack
import torch
from rich.console import Console
from slimtune.config import build_config
from slimtune.stages import build_run, check_run
from slimtune.train.loop import run_training
from slimtune.train.prepare import training_mode

def rss(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

cfg = build_config(json.loads(sys.argv[1]))
console = Console(quiet=True)
checked = check_run(cfg, console)
before = rss("VmRSS")
with ExitStack() as stack:
    built = build_run(checked, console, stack)
    if sys.argv[2] == "live":
        # Every CPU allocation and free of the training steps, in order (torch's profiler).
        profiler = stack.enter_context(torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                              profile_memory=True))
    with training_mode(built.model, cfg.train, console):
        run_training(built.model, built.attached, checked.train_set, cfg.train, checked.tokenizer.pad_token_id,
                     cfg.output / "metrics.jsonl", console, device=checked.device, precision=built.precision,
                     packing=built.packing, checkpoint_dir=cfg.output / "checkpoints", runtime=built.runtime)
if sys.argv[2] == "rss":
    print(json.dumps({"growth": rss("VmHWM") - before}))
else:
    from torch._C._profiler import _EventType
    sizes = []
    def walk(node):
        if node.typed[0] == _EventType.Allocation:
            sizes.append((node.start_time_ns, node.typed[1].alloc_size))  # negative: a free
        for child in node.children:
            walk(child)
    for root in profiler.profiler.kineto_results.experimental_event_tree():
        walk(root)
    live = peak = 0
    for _, size in sorted(sizes):
        live += size
        peak = max(peak, live)
    print(json.dumps({"peak_live": peak}))
"""


@pytest.fixture(scope="module")
def wide_model_dir(tmp_path_factory) -> Path:
    """A tiny-vocabulary Llama wide enough that activations dominate the training process's growth."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("wide-llama")
    tokenizer = make_tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path, safe_serialization=True)  # as HF models ship
    tokenizer.save_pretrained(path)
    return path


def _measure_two_steps(model_dir: Path, tmp_path: Path, checkpointing: bool, what: str) -> tuple[int, object]:
    """(what the child measured, the plan's estimate) for 2 LoRA steps of batch 4 x ~430 tokens."""
    rows = [{"instruction": f"say {i}", "output": "abcdefgh" * 50} for i in range(8)]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    data = {"model": str(model_dir), "method": "lora", "output": str(tmp_path / "run"), "overwrite": True,
            "lora": {"targets": "all-linear"}, "data": {"train": str(train), "max_length": 512},
            "train": {"batch_size": 4, "max_steps": 2, "save_every": None, "grad_checkpointing": checkpointing}}
    done = subprocess.run([sys.executable, "-c", TRAIN, json.dumps(data), what], capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"}, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    measured = next(iter(json.loads(done.stdout.strip().splitlines()[-1]).values()))

    from rich.console import Console

    from slimtune.plan_report import make_plan
    from slimtune.stages import check_run

    cfg = build_config(data)
    plan = make_plan(cfg, None, "cpu", check_run(cfg, Console(quiet=True)).train_set, measure_time=False)
    return measured, plan.methods["lora"].estimate


@pytest.mark.parametrize("checkpointing", [False, True])
def test_predicted_tensors_match_the_steps_peak_of_live_tensors(wide_model_dir, tmp_path, checkpointing):
    """The plan's tensor lines (gradients, optimizer states, activations, loss) against the peak of the
    bytes of live CPU tensors during 2 steps, from the profiler's record of every allocation and free:
    no heap, no libraries, so the arithmetic itself is held to 10%. Measured 122.5 vs 118.5 MiB, and
    48.0 vs 46.6 MiB with checkpointing; before the fused backward passes formed their products in
    place, the checkpointed peak was 58.1 MiB (the recomputed MLP's backward temporaries) and this failed."""
    measured, est = _measure_two_steps(wide_model_dir, tmp_path, checkpointing, "live")
    predicted = sum(est.line(name) for name in ("gradients", "optimizer states", "16-bit weight copies",
                                                 "activations", "loss chunk", "loss gradient"))
    print(f"checkpointing={checkpointing}: predicted {predicted / 2**20:.1f} MiB, live peak {measured / 2**20:.1f} MiB")
    assert predicted == pytest.approx(measured, rel=0.10), f"predicted {predicted / 2**20:.1f} MiB, live peak {measured / 2**20:.1f} MiB"


@pytest.mark.parametrize("checkpointing, tolerance", [(False, 0.30), (True, 0.45)])
def test_predicted_growth_matches_measured_rss(wide_model_dir, tmp_path, checkpointing, tolerance):
    """Peak RSS of 2 LoRA steps in a fresh process, above its RSS before the build, against the plan's
    peak without the runtime line: the tensors (held to 10% above) plus the measured constants for the
    libraries' workspaces and the CPU heap's holes. The growth of this small model moves from run to run
    and between machines, so the tolerance is wide: without checkpointing measured 277-290 MiB against
    267 predicted. With checkpointing the heap holds far more than the 45% the plan assumes for this
    geometry (1.7-3.3 MB activation blocks; with train.mmap_threshold_mb=1 the growth falls from ~210 to
    141 MiB), which the plan does not model: measured 203-214 MiB here, 271 MiB on CI before the fused
    backward passes lost their extra temporaries, against 162 predicted, so 45%."""
    measured, est = _measure_two_steps(wide_model_dir, tmp_path, checkpointing, "rss")
    predicted = est.peak - est.line("runtime")
    print(f"checkpointing={checkpointing}: predicted {predicted / 2**20:.0f} MiB, measured {measured / 2**20:.0f} MiB")
    assert predicted == pytest.approx(measured, rel=tolerance), f"predicted {predicted / 2**20:.0f} MiB, measured {measured / 2**20:.0f} MiB"


def test_recommendation_follows_the_guide():
    everything = {"lora": True, "qlora": True, "dora": True, "adalora": True, "freeze": True, "full": True}
    assert recommend(everything, False, 10_000, 100)[0] == "lora"
    assert recommend(everything, False, 100_000_000, 500_000)[0] == "full"
    assert recommend({**everything, "lora": False, "dora": False, "adalora": False, "full": False},
                     False, 10_000, 100)[0] == "qlora"
    assert recommend({name: name == "freeze" for name in everything}, False, 10_000, 100)[0] == "freeze"


@pytest.mark.parametrize("args, needle", [
    (["--model", "smollm2-135m", "--memory", "24XB"], "--memory '24XB' is not a memory size"),
    (["--model", "/no/such/model-dir"], "'/no/such/model-dir' is not a HF model directory"),
    ([], "needs a config file or --model"),
])
def test_bad_input_is_one_line_exit_2(monkeypatch, capsys, args, needle):
    code, _, err = run_cli(monkeypatch, capsys, "plan", *args)
    assert code == 2, err
    assert needle in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


def test_plan_json_on_tiny_model(monkeypatch, capsys, tiny_model_dir):
    code, out, err = run_cli(monkeypatch, capsys, "plan", "--model", tiny_model_dir, "--memory", "2GB", "--json",
                             "--length", "64")
    assert code == 0, err
    plan = json.loads(out)
    assert set(plan["methods"]) == {"lora", "qlora", "dora", "adalora", "freeze", "full", "longlora"}
    assert all(entry["fit"]["fits"] for entry in plan["methods"].values())
    assert plan["recommendation"]["method"] == "lora"
    assert plan["time_per_epoch"]["seconds_per_epoch"] > 0


def test_time_uses_a_measured_rate_of_a_similar_size_only(tiny_model_dir):
    """The efficiency comes from a run on this machine when its model is within RATE_SIZE_RANGE of the
    planned one's size, else from STEP_EFFICIENCY; a rate above the peak counts as the peak."""
    from slimtune.plan import RATE_SIZE_RANGE, STEP_EFFICIENCY, estimate_time, flops_per_token

    cfg = _cfg(tiny_model_dir, "lora")
    skeleton = attached_skeleton(cfg)
    counts, shape = count(skeleton, False), Shape.of(skeleton)
    settings = settings_of(cfg, "cpu", seq_len=64)
    per_token = flops_per_token(counts, shape, settings)
    peak, tokens = 1e12, 50_000
    near = {"flops_per_s": 2e11, "params": counts.base * 2, "model": "m"}
    assert estimate_time(counts, shape, settings, tokens, peak, near).seconds_per_epoch == pytest.approx(
        tokens * per_token / 2e11)
    far = {**near, "params": counts.base * RATE_SIZE_RANGE * 1.5}
    default = estimate_time(counts, shape, settings, tokens, peak, far)
    assert default.efficiency == STEP_EFFICIENCY and "no run of a similar size" in default.source
    assert estimate_time(counts, shape, settings, tokens, peak, {**near, "flops_per_s": 5e12}).efficiency == 1.0


def test_plan_predicts_the_time_a_run_of_the_same_config_took(monkeypatch, capsys, tmp_path, tiny_model_dir):
    """After a finished run, `slimtune plan` of that config on this machine predicts the run's own time:
    the run records what it reached as the plan counts FLOPs (the matmul peak measured by the plan cancels)."""
    from slimtune.plan_report import RATE_MIN_STEPS

    monkeypatch.setenv("SLIMTUNE_HOME", str(tmp_path / "home"))
    rows = [{"instruction": "Repeat the word twice.", "input": f"w{i}", "output": f"w{i} w{i}"}
            for i in range(40 * RATE_MIN_STEPS)]
    config = write_config(tmp_path, tiny_model_dir, data=f"data:\n  train: {write_jsonl(tmp_path / 'rows.jsonl', rows)}\n",
                          train="train:\n  batch_size: 2\n  precision: fp32\n")
    code, out, err = run_cli(monkeypatch, capsys, "plan", config, "--json")
    assert code == 0, err
    assert "no run of a similar size" in json.loads(out)["time_per_epoch"]["source"]
    code, _, err = run_cli(monkeypatch, capsys, "train", config)
    assert code == 0, err
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    code, out, err = run_cli(monkeypatch, capsys, "plan", config, "--json")
    assert code == 0, err
    time_estimate = json.loads(out)["time_per_epoch"]
    assert time_estimate["tokens"] == last["tokens"], "the plan's epoch is the run's one epoch"
    # The last step's elapsed time: the run's clock stops after the final checkpoint (tens of ms). The
    # fallback efficiency would predict microseconds for this tiny model.
    assert time_estimate["seconds_per_epoch"] == pytest.approx(last["elapsed_s"], rel=0.1, abs=0.1)
    assert "reached on this machine" in time_estimate["source"]
