"""AdaLoRA: the budget schedule against the paper's formula, scores and masking against PEFT's
RankAllocator, files both ways with PEFT, the regulariser by hand, training end to end and resume."""

from __future__ import annotations

import copy
import json
import os
import signal
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from rich.console import Console

from slimtune.api import finetune, load_run
from slimtune.methods.base import AttachedMethod
from tests.conftest import write_repeat_data
from slimtune.config import build_config
from slimtune.data import load_dataset
from slimtune.errors import ConfigError
from slimtune.methods.adalora import AdaLoRAMethod, SVDLinear, attach_adalora, budget_at, keep_masks, svd_layers
from slimtune.methods.adalora_report import rank_grid
from slimtune.models import load_model
from slimtune.train.checkpoint import latest_checkpoint
from slimtune.train.loop import TrainingInterrupted, run_training, seed_everything

TARGETS = ["q_proj", "v_proj", "down_proj"]



def attach_method(model, cfg, console):
    """The config's method plugin attached to `model`."""
    return cfg.plugin.attach(model, cfg, console)


def save_method(model, tokenizer, cfg, out, base_model, steps=1):
    """The config's method plugin saving `model` (attached earlier) into `out`."""
    return cfg.plugin.save(AttachedMethod(cfg.method_name, model), tokenizer, cfg, out, base_model, steps)

def paper_budget(t: int, b0: int, bt: int, ti: int, tf: int, total: int) -> int:
    """Eq. 12 of the paper in exact rational arithmetic, then rounded down."""
    if t <= ti:
        return b0
    if t > total - tf:
        return bt
    fraction = 1 - Fraction(t - ti, total - tf - ti)
    return int(bt + (b0 - bt) * fraction ** 3)


@pytest.mark.parametrize("step", [1, 10, 11, 25, 50, 79, 80, 81, 100])
def test_budget_schedule_matches_the_paper(step):
    budget, decaying = budget_at(step, initial=144, target=48, tinit=10, tfinal=20, total=100)
    assert budget == paper_budget(step, 144, 48, 10, 20, 100)
    assert decaying == (10 < step <= 80), "the cubic phase is t_init < t <= T - t_final"


def test_budget_hand_values():
    # (69/70)^3 * 96 + 48 = 328509/343000 * 96 + 48 = 139.94: b(11) = 139;  (1/2)^3 * 96 + 48 = 60 exactly.
    assert budget_at(11, 144, 48, 10, 20, 100)[0] == 139
    assert budget_at(45, 144, 48, 10, 20, 100)[0] == 60


def test_keep_masks_keeps_exactly_the_budget():
    importance = {"a": torch.tensor([0.5, 0.1, 0.9]), "b": torch.tensor([0.2, 0.8, 0.3])}
    masks = keep_masks(importance, budget=3)
    assert masks["a"].tolist() == [True, False, True] and masks["b"].tolist() == [False, True, False]  # 0.9, 0.8, 0.5
    assert all(m.all() for m in keep_masks(importance, budget=6).values()), "a full budget keeps everything"


def test_orthogonality_by_hand():
    layer = SVDLinear(torch.nn.Linear(3, 4), r=2, alpha=2.0)
    with torch.no_grad():
        layer.lora_B.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0], [0.0, 0.0]]))  # P^T P = diag(1, 4)
        layer.lora_A.copy_(torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]))  # Q Q^T = diag(2, 1)
    # ||diag(0, 3)||^2 + ||diag(1, 0)||^2 = 9 + 1
    assert layer.orthogonality().item() == pytest.approx(10.0)


def test_svd_layer_matches_its_formula():
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5)
    layer = SVDLinear(base, r=3, alpha=4.0)
    with torch.no_grad():
        layer.lora_E.normal_()
    x = torch.randn(2, 6)
    P, lam, Q = layer.lora_B, layer.lora_E.view(-1), layer.lora_A
    expected = base(x) + (4.0 / 3) * x @ (P @ torch.diag(lam) @ Q).T
    assert torch.allclose(layer(x), expected, atol=1e-6)


# --- PEFT's RankAllocator as the oracle -------------------------------------------------------------

def _peft_pair(tiny_model_dir, total, tinit, tfinal, delta_t):
    from peft import AdaLoraConfig, get_peft_model

    base, _, _ = load_model(str(tiny_model_dir))
    ours = copy.deepcopy(base)
    config = AdaLoraConfig(init_r=4, target_r=2, lora_alpha=8, target_modules=TARGETS, total_step=total,
                           tinit=tinit, tfinal=tfinal, deltaT=delta_t, beta1=0.8, beta2=0.9)
    peft_model = get_peft_model(base, config)
    attach_adalora(ours, TARGETS, init_r=4, alpha=8)
    method = AdaLoRAMethod(ours, init_r=4, target_r=2, tinit=tinit, tfinal=tfinal, delta_t=delta_t,
                           beta1=0.8, beta2=0.9, orth_reg=0.1)
    peft_params = {n.replace(".default", ""): p for n, p in peft_model.base_model.model.named_parameters()
                   if "lora_" in n}
    assert set(peft_params) == set(method.named), "parameter names must line up with PEFT's"
    with torch.no_grad():
        for name, param in method.named.items():
            param.copy_(peft_params[name])
    return peft_model, method, peft_params


def test_scores_and_masks_equal_peft_rank_allocator(tiny_model_dir):
    total, tinit, tfinal, delta_t = 12, 2, 3, 2
    peft_model, method, peft_params = _peft_pair(tiny_model_dir, total, tinit, tfinal, delta_t)
    allocator = peft_model.base_model.rankallocator
    gen = torch.Generator().manual_seed(0)
    scale = {name: 10 ** torch.empty(()).uniform_(-2, 1, generator=gen).item() for name in method.named}
    for step in range(1, total + 1):
        with torch.no_grad():
            for name, param in method.named.items():  # an "optimizer step" and fresh gradients, shared
                update = 0.01 * torch.randn(param.shape, generator=gen)
                grad = scale[name] * torch.randn(param.shape, generator=gen)
                for p in (param, peft_params[name]):
                    p.add_(update)
                    p.grad = grad.clone()
        peft_model.base_model.update_and_allocate(step)
        metrics = method.on_step_end(step, total)
        if step < total - tfinal:
            for name in method.named:
                peft_name = name + ".default"
                assert torch.allclose(method.allocator.sensitivity[name], allocator.exp_avg_ipt[peft_name],
                                      rtol=1e-6, atol=0), f"step {step}: sensitivity EMA of {name}"
                assert torch.allclose(method.allocator.uncertainty[name], allocator.exp_avg_unc[peft_name],
                                      rtol=1e-5, atol=1e-12), f"step {step}: uncertainty EMA of {name}"
            # PEFT's triplet score, built from its own helpers the way its mask_to_budget does.
            ours = method.allocator.triplet_importance(list(method.layers))
            for path in method.layers:
                score = {key: allocator._element_score(f"{path}.{key}.default") for key in ("lora_A", "lora_E", "lora_B")}
                expected = allocator._combine_ipt(score["lora_E"], torch.cat(
                    [score["lora_A"].mean(dim=1, keepdim=True), score["lora_B"].mean(dim=0).view(-1, 1)], dim=1))
                assert torch.allclose(ours[path], expected, rtol=1e-5, atol=0), f"step {step}: triplet scores of {path}"
        for name, param in method.named.items():
            if name.endswith("lora_E"):
                assert torch.equal(param == 0, peft_params[name] == 0), f"step {step}: masked triplets of {name}"
        expected_budget, _ = allocator.budget_schedule(step)
        if step <= total - tfinal:
            assert metrics["budget"] == expected_budget, f"step {step}: budget"
    pattern = peft_model.peft_config["default"].rank_pattern
    ours = {f"{path}.lora_E.default": layer.kept.tolist() for path, layer in method.layers.items()}
    assert ours == pattern, "the final allocation must equal PEFT's rank_pattern"
    assert method.kept_rank() == 2 * len(method.layers), "the final total rank must equal the target budget"


# --- training, files both ways with PEFT -----------------------------------------------------------

@pytest.fixture
def data_file(tmp_path):
    return write_repeat_data(tmp_path / "train.jsonl", 16)


def _config(tiny_model_dir, data_file, out, **train):
    return build_config({
        "model": str(tiny_model_dir), "method": "adalora", "output": str(out),
        "data": {"train": str(data_file)}, "lora": {"targets": TARGETS, "alpha": 8, "dropout": 0.0},
        "adalora": {"init_r": 4, "target_r": 2, "tinit": 2, "tfinal": 2},
        "train": {"max_steps": 10, "batch_size": 4, "lr": 2e-2, "precision": "fp32", "save_every": None, **train},
    })


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.randint(0, 200, (2, 9), generator=torch.Generator().manual_seed(5))


def test_training_reaches_the_target_budget_and_peft_loads_the_files(tiny_model_dir, data_file, tmp_path):
    from peft import PeftModel

    result = finetune(_config(tiny_model_dir, data_file, tmp_path / "run"), Console(quiet=True))
    config = json.loads((result.output / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADALORA" and config["total_step"] == 10
    kept = {key: sum(mask) for key, mask in config["rank_pattern"].items()}
    assert sum(kept.values()) == 2 * len(kept) == 2 * 3 * 2, f"total rank must equal target_r x matrices: {kept}"
    assert len(set(kept.values())) > 1, f"the allocation should move rank between matrices: {kept}"
    rows = [json.loads(line) for line in (result.output / "metrics.jsonl").read_text().splitlines()]
    assert all("extra_loss" in row and "budget" in row for row in rows), "regulariser and budget are logged"
    assert rows[0]["budget"] == 24 and rows[-1]["budget"] == 12 and rows[-1]["rank"] == 12
    for name in ("rank_heatmap.png", "rank_budget.png"):
        assert (result.output / name).stat().st_size > 1000, f"{name} must be written"

    ours, _ = load_run(result.output)
    base, _, _ = load_model(str(tiny_model_dir))
    peft_model = PeftModel.from_pretrained(base, str(result.output)).eval()
    diff = (logits(peft_model, IDS) - logits(ours, IDS)).abs().max().item()
    assert diff <= 1e-5, f"PEFT must load our AdaLoRA files with the same logits; max abs diff {diff}"
    plain, _, _ = load_model(str(tiny_model_dir))
    assert (logits(ours, IDS) - logits(plain, IDS)).abs().max().item() > 1e-4, "the trained adapter must matter"


def test_peft_adalora_files_load_here(tiny_model_dir, tmp_path):
    from peft import AdaLoraConfig, get_peft_model

    base, _, _ = load_model(str(tiny_model_dir))
    torch.manual_seed(1)
    config = AdaLoraConfig(init_r=4, target_r=2, lora_alpha=8, target_modules=TARGETS, total_step=8, tinit=1,
                           tfinal=2, deltaT=1)
    peft_model = get_peft_model(base, config)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=5e-2)
    for step in range(1, 9):
        peft_model(input_ids=IDS, labels=IDS).loss.backward()
        optimizer.step()
        peft_model.base_model.update_and_allocate(step)
        optimizer.zero_grad()
    peft_model.save_pretrained(tmp_path / "peft")
    peft_model.eval()
    expected = logits(peft_model, IDS)
    ours, _ = load_run(tmp_path / "peft", model=str(tiny_model_dir))
    diff = (logits(ours, IDS) - expected).abs().max().item()
    assert diff <= 1e-5, f"a PEFT AdaLoRA adapter must load with PEFT's logits; max abs diff {diff}"


def test_pruned_triplets_are_left_out_of_the_files(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    cfg = _config(tiny_model_dir, "unused.jsonl", tmp_path / "run")
    model, tokenizer, _ = load_model(str(tiny_model_dir))
    attach_adalora(model, TARGETS, init_r=4, alpha=8)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for i, layer in enumerate(svd_layers(model).values()):
            layer.lora_E.copy_(torch.randn(4, 1, generator=gen))
            layer.kept.copy_(torch.tensor([True, i % 2 == 0, False, i % 3 == 0]))
            layer.lora_E.masked_fill_(~layer.kept.view(-1, 1), 0.0)
    model.eval()
    cfg.output.mkdir(parents=True)
    save_method(model, tokenizer, cfg, cfg.output, str(tiny_model_dir), steps=10)
    tensors = load_file(str(cfg.output / "adapter_model.safetensors"))
    for path, layer in svd_layers(model).items():
        rank = int(layer.kept.sum())
        assert tensors[f"base_model.model.{path}.lora_A"].shape == (rank, layer.in_features)
        assert tensors[f"base_model.model.{path}.lora_B"].shape == (layer.out_features, rank)
    loaded, _ = load_run(cfg.output)
    diff = (logits(loaded, IDS) - logits(model, IDS)).abs().max().item()
    assert diff <= 1e-6, f"pruned files must reproduce the masked model; max abs diff {diff}"


# --- resume ------------------------------------------------------------------------------------------

class SignalAt(AdaLoRAMethod):
    stop_after: int | None = None

    def on_step_end(self, step: int, total_steps: int) -> dict[str, float]:
        metrics = super().on_step_end(step, total_steps)
        if step == self.stop_after:
            os.kill(os.getpid(), signal.SIGTERM)
        return metrics


def _train_direct(tiny_model_dir, data_file, out: Path, resume=False, stop_after=None):
    cfg = _config(tiny_model_dir, data_file, out, max_steps=8, save_every=2, batch_size=2, grad_accum=2, seed=3)
    seed_everything(cfg.train.seed)
    model, tokenizer, _ = load_model(cfg.model)
    data = load_dataset(cfg.data.train, tokenizer, max_length=256)
    attach_adalora(model, TARGETS, init_r=4, alpha=8)
    ada = cfg.adalora
    method = SignalAt(model, ada.init_r, ada.target_r, ada.tinit, ada.tfinal, ada.delta_t, ada.beta1, ada.beta2,
                      ada.orth_reg)
    method.stop_after = stop_after
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = latest_checkpoint(out / "checkpoints") if resume else None
    run_training(model, method, data, cfg.train, tokenizer.pad_token_id, out / "metrics.jsonl", Console(quiet=True),
                 checkpoint_dir=out / "checkpoints", resume_from=checkpoint, config_snapshot=cfg.to_yaml_dict())
    return ({name: p.detach().clone() for name, p in method.named.items()},
            {path: layer.kept.tolist() for path, layer in method.layers.items()})


def test_interrupted_adalora_run_resumes_bit_identically(tiny_model_dir, data_file, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference, reference_masks = _train_direct(tiny_model_dir, data_file, tmp_path / "straight")
        with pytest.raises(TrainingInterrupted):
            _train_direct(tiny_model_dir, data_file, tmp_path / "split", stop_after=3)
        resumed, resumed_masks = _train_direct(tiny_model_dir, data_file, tmp_path / "split", resume=True)
    finally:
        torch.set_num_threads(threads)
    def logged(out: Path) -> list[tuple]:
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"], r["extra_loss"], r["budget"], r["rank"]) for r in rows]

    assert logged(tmp_path / "split") == logged(tmp_path / "straight"), \
        "losses, regulariser, budget and kept rank per step must equal the uninterrupted run's"
    assert resumed_masks == reference_masks, "the allocation after resume must equal the uninterrupted run's"
    for name, value in reference.items():
        assert torch.equal(resumed[name], value), f"{name} differs after resume (importance state lost?)"


# --- config and schedule errors ----------------------------------------------------------------------

def test_bad_adalora_settings_are_named(tiny_model_dir, data_file, tmp_path):
    with pytest.raises(ConfigError, match="target_r=16 exceeds adalora.init_r=12"):
        build_config({"data": {"train": "x.jsonl"}, "method": "adalora", "adalora": {"target_r": 16}})
    with pytest.raises(ConfigError, match="lora.use_dora"):
        build_config({"data": {"train": "x.jsonl"}, "method": "adalora", "lora": {"use_dora": True}})
    cfg = _config(tiny_model_dir, data_file, tmp_path / "run", max_steps=4)
    cfg.adalora.tinit = 3
    with pytest.raises(ConfigError, match="tinit=3 and adalora.tfinal=2 leave no budget phase in a run of 4 steps"):
        finetune(cfg, Console(quiet=True))
    assert not (tmp_path / "run").exists(), "a schedule that cannot work must fail before the output is touched"


def test_rank_grid_lays_out_layers_and_modules():
    rows, columns, grid = rank_grid({"model.layers.0.self_attn.q_proj": 3, "model.layers.1.self_attn.q_proj": 1,
                                     "model.layers.1.mlp.down_proj": 0, "model.layers.10.self_attn.q_proj": 2})
    assert rows == ["0", "1", "10"] and columns == ["self_attn.q_proj", "mlp.down_proj"]
    assert grid == [[3, None], [1, 0], [2, None]]


@pytest.mark.integration
def test_cli_trains_the_bundled_model_with_adalora(bundled_model_dir, tmp_path, monkeypatch, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from test_cli import run_cli

    example = Path(__file__).resolve().parents[2] / "examples" / "extract_adalora.yaml"
    out = tmp_path / "run"
    code, _, err = run_cli(monkeypatch, capsys, "train", example, f"model={bundled_model_dir}", f"output={out}",
                           "train.max_steps=6", "train.batch_size=2", "adalora.tinit=1", "adalora.tfinal=2",
                           "adalora.delta_t=1", "data.eval=null", "data.max_length=96")
    assert code == 0, err[-3000:]
    config = json.loads((out / "adapter_config.json").read_text())
    kept = [sum(mask) for mask in config["rank_pattern"].values()]
    assert len(kept) == 30 * 7 and sum(kept) == 4 * len(kept), "all-linear on 30 layers, pruned to target_r 4 each"
    ids = torch.randint(0, 49152, (1, 12), generator=torch.Generator().manual_seed(0))
    ours, _ = load_run(out)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(bundled_model_dir)), str(out))
    diff = (logits(peft_model.eval(), ids) - logits(ours, ids)).abs().max().item()
    assert diff <= 1e-4, f"PEFT must load the bundled model's AdaLoRA adapter with our logits; max abs diff {diff}"


def test_adalora_on_a_4bit_base_trains_and_reloads(tiny_model_dir, data_file, tmp_path):
    from slimtune.quant import Linear4bit

    cfg = _config(tiny_model_dir, data_file, tmp_path / "run", max_steps=6)
    cfg.quantize = "nf4"
    result = finetune(cfg, Console(quiet=True))
    config = json.loads((result.output / "adapter_config.json").read_text())
    assert sum(sum(mask) for mask in config["rank_pattern"].values()) == 2 * 6
    model, _ = load_run(result.output)
    assert any(isinstance(m, Linear4bit) for m in model.modules()), "the adapter must be reloaded on the 4-bit base"
    assert torch.isfinite(logits(model, IDS)).all()
