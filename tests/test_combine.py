"""`combine_adapters` / `slimtune combine` against PEFT's `add_weighted_adapter` (the oracle).

Adapters are made and saved by PEFT itself (A and B random, non-zero, with alphas that give different
scalings), so the inputs are what a user brings. For every `how` our tensors must equal the ones PEFT
builds within 1e-5, and the combined adapter loaded by slimtune and merged must give PEFT's logits.
DARE's masks are random: PEFT draws them from torch's global generator (which its own adapter setup
also consumes), so for the comparison PEFT's `random_pruning` is given a generator seeded as ours is,
drawing the same Bernoulli(density) masks in the same order; the maths around them (rescale, weights,
sign election, disjoint mean) is then PEFT's own.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import merge_utils
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from slimtune.adapters import load_lora_adapter
from slimtune.combine import HOWS, combine_adapters
from slimtune.errors import AdapterError, SlimtuneError
from slimtune.methods.lora import merge_lora

PREFIX = "base_model.model."
WEIGHTS = [0.6, -0.4]  # a negative weight exercises PEFT's sign handling
DENSITY = 0.5
SEED = 7


def load_base(model_dir: Path):
    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


def peft_adapter(model_dir: Path, out: Path, seed: int, r: int, alpha: float, targets: list[str], **kwargs) -> Path:
    """A PEFT LoRA adapter with random non-zero A and B, saved by PEFT to `out`."""
    torch.manual_seed(seed)
    model = get_peft_model(load_base(model_dir), LoraConfig(r=r, lora_alpha=alpha, target_modules=targets,
                                                            init_lora_weights=False, **kwargs))
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("combine-inputs")
    qv, vd = ["q_proj", "v_proj"], ["v_proj", "down_proj"]
    return {
        "a": peft_adapter(tiny_model_dir, root / "a", 1, 4, 8.0, qv),
        "b": peft_adapter(tiny_model_dir, root / "b", 2, 4, 12.0, qv),
        "b6": peft_adapter(tiny_model_dir, root / "b6", 3, 6, 9.0, qv),  # another rank
        "c": peft_adapter(tiny_model_dir, root / "c", 4, 4, 12.0, vd),  # other targets
        "rs_a": peft_adapter(tiny_model_dir, root / "rs_a", 5, 4, 8.0, qv, use_rslora=True),
        "rs_b": peft_adapter(tiny_model_dir, root / "rs_b", 6, 6, 8.0, qv, use_rslora=True),
    }


def seeded_random_pruning(monkeypatch) -> None:
    """PEFT's DARE drop, drawing from a generator seeded like `combine_adapters`' (see the module docstring)."""
    generator = torch.Generator().manual_seed(SEED)

    def random_pruning(tensor, density, rescale):
        mask = torch.bernoulli(torch.full_like(input=tensor, fill_value=density), generator=generator)
        pruned = tensor * mask
        return pruned / density if rescale else pruned

    monkeypatch.setattr(merge_utils, "random_pruning", random_pruning)


def peft_combination(model_dir: Path, dirs: list[Path], weights: list[float], how: str, monkeypatch, **kwargs):
    """(PeftModel with the sources and 'combo', {path: (A, B)} of 'combo') built by PEFT."""
    model = PeftModel.from_pretrained(load_base(model_dir), dirs[0], adapter_name="s0")
    for i, path in enumerate(dirs[1:], 1):
        model.load_adapter(path, adapter_name=f"s{i}")
    if how.startswith("dare"):
        seeded_random_pruning(monkeypatch)
    model.add_weighted_adapter([f"s{i}" for i in range(len(dirs))], weights, "combo", combination_type=how, **kwargs)
    tensors = {
        name[len(PREFIX):]: (module.lora_A["combo"].weight.detach(), module.lora_B["combo"].weight.detach())
        for name, module in model.named_modules() if hasattr(module, "lora_A") and "combo" in module.lora_A
    }
    model.set_adapter("combo")
    return model, tensors


def ours(out: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    loaded = load_file(str(out / "adapter_model.safetensors"))
    paths = {key[len(PREFIX):].rsplit(".lora_", 1)[0] for key in loaded}
    return {p: (loaded[f"{PREFIX}{p}.lora_A.weight"], loaded[f"{PREFIX}{p}.lora_B.weight"]) for p in paths}


def merged_logits(model_dir: Path, adapter_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    model = load_base(model_dir)
    load_lora_adapter(model, adapter_dir)
    merge_lora(model)
    with torch.no_grad():
        return model(input_ids=ids).logits


def assert_close(got: torch.Tensor, want: torch.Tensor, what: str, atol: float = 1e-5) -> None:
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)}, PEFT has {tuple(want.shape)}"
    diff = (got - want).abs().max().item()
    assert diff <= atol, f"{what}: max |ours - PEFT| = {diff:.2e} > {atol}"


def kwargs_for(how: str) -> dict:
    return {"density": DENSITY} if how in ("ties", "dare_linear", "dare_ties") else {}


@pytest.mark.parametrize("how", HOWS)
def test_equal_ranks_match_peft_tensors_and_merged_logits(how, adapters, tiny_model_dir, tmp_path, monkeypatch):
    dirs = [adapters["a"], adapters["b"]]
    peft_model, want = peft_combination(tiny_model_dir, dirs, WEIGHTS, how, monkeypatch, **kwargs_for(how))
    out = combine_adapters(dirs, tmp_path / "combo", WEIGHTS, how, seed=SEED, **kwargs_for(how))
    got = ours(out)
    assert set(got) == set(want), f"adapted layers {sorted(got)} differ from PEFT's {sorted(want)}"
    assert any(w[1].abs().max() > 0 for w in want.values()), "PEFT's combination is zero: the comparison means nothing"
    for path in want:
        assert_close(got[path][0], want[path][0], f"{how} {path} lora_A")
        assert_close(got[path][1], want[path][1], f"{how} {path} lora_B")
    ids = torch.randint(0, 200, (2, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        peft_logits = peft_model.merge_and_unload()(input_ids=ids).logits
        base_logits = load_base(tiny_model_dir)(input_ids=ids).logits
    assert (peft_logits - base_logits).abs().max() > 1e-3, "the combination does not change the logits"
    assert_close(merged_logits(tiny_model_dir, out, ids), peft_logits, f"{how} merged logits", atol=1e-4)


@pytest.mark.parametrize("how", ["cat", "svd"])
def test_different_ranks_match_peft(how, adapters, tiny_model_dir, tmp_path, monkeypatch):
    dirs = [adapters["a"], adapters["b6"]]
    peft_model, want = peft_combination(tiny_model_dir, dirs, WEIGHTS, how, monkeypatch)
    got = ours(combine_adapters(dirs, tmp_path / "combo", WEIGHTS, how))
    expected_rank = 4 + 6 if how == "cat" else 6
    for path in want:
        assert got[path][0].shape[0] == expected_rank, f"{how}: rank {got[path][0].shape[0]}, want {expected_rank}"
        assert_close(got[path][0], want[path][0], f"{how} {path} lora_A")
        assert_close(got[path][1], want[path][1], f"{how} {path} lora_B")


@pytest.mark.parametrize("how", ["linear", "ties", "dare_linear", "dare_ties"])
def test_entrywise_combinations_refuse_different_ranks_as_peft_does(how, adapters, tiny_model_dir, tmp_path,
                                                                    monkeypatch):
    dirs = [adapters["a"], adapters["b6"]]
    with pytest.raises(ValueError, match="same r"):
        peft_combination(tiny_model_dir, dirs, WEIGHTS, how, monkeypatch, **kwargs_for(how))
    with pytest.raises(AdapterError, match="use --how cat or --how svd") as caught:
        combine_adapters(dirs, tmp_path / "combo", WEIGHTS, how, **kwargs_for(how))
    assert "ranks [4, 6]" in str(caught.value), f"the message must name the ranks: {caught.value}"
    assert not (tmp_path / "combo").exists(), "a refused combination must not leave an output directory"


def test_different_targets_cat_equals_peft_per_layer(adapters, tiny_model_dir, tmp_path, monkeypatch):
    """a targets q/v, c targets v/down: PEFT pads every layer to rank 8 with zeros; ours keeps each layer's own
    rank (rank_pattern), so the leading block must equal PEFT's and the padding must be zero."""
    dirs = [adapters["a"], adapters["c"]]
    _, want = peft_combination(tiny_model_dir, dirs, WEIGHTS, "cat", monkeypatch)
    out = combine_adapters(dirs, tmp_path / "combo", WEIGHTS, "cat")
    got = ours(out)
    assert set(got) == set(want), f"adapted layers {sorted(got)} differ from PEFT's {sorted(want)}"
    for path, (want_a, want_b) in want.items():
        rank = got[path][0].shape[0]
        assert rank == (8 if "v_proj" in path else 4), f"{path}: rank {rank}"
        assert_close(got[path][0], want_a[:rank], f"{path} lora_A")
        assert_close(got[path][1], want_b[:, :rank], f"{path} lora_B")
        assert want_a[rank:].abs().max().item() == 0 if rank < want_a.shape[0] else True, "PEFT padding not zero"
    # PEFT loads our file with its rank_pattern.
    peft_loaded = PeftModel.from_pretrained(load_base(tiny_model_dir), out)
    ids = torch.randint(0, 200, (1, 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert_close(merged_logits(tiny_model_dir, out, ids), peft_loaded(input_ids=ids).logits, "logits", 1e-4)


@pytest.mark.parametrize("how", ["cat", "svd", "ties"])
def test_rslora_tensors_match_peft_and_cat_equals_both_adapters_active(how, adapters, tiny_model_dir, tmp_path,
                                                                        monkeypatch):
    """rsLoRA scalings (alpha / sqrt(r)) go into the tensors as PEFT puts them; our file says scaling 1 (PEFT's
    in-memory result keeps use_rslora and would scale by sqrt(r) more). With weights 1, 1 `cat` must act exactly
    as PEFT running both source adapters at once."""
    dirs = [adapters["rs_a"], adapters["rs_a" if how == "ties" else "rs_b"]]
    _, want = peft_combination(tiny_model_dir, dirs, [1.0, 1.0], how, monkeypatch, **kwargs_for(how))
    out = combine_adapters(dirs, tmp_path / "combo", [1.0, 1.0], how, **kwargs_for(how))
    got = ours(out)
    for path in want:
        assert_close(got[path][0], want[path][0], f"{how} {path} lora_A")
        assert_close(got[path][1], want[path][1], f"{how} {path} lora_B")
    if how == "cat":
        both = PeftModel.from_pretrained(load_base(tiny_model_dir), dirs[0], adapter_name="s0")
        both.load_adapter(dirs[1], adapter_name="s1")
        both.base_model.set_adapter(["s0", "s1"])
        ids = torch.randint(0, 200, (2, 9), generator=torch.Generator().manual_seed(6))
        with torch.no_grad():
            assert_close(merged_logits(tiny_model_dir, out, ids), both(input_ids=ids).logits, "logits", 1e-4)


def test_adalora_combines_as_the_lora_it_equals(adapters, tiny_model_dir, tmp_path):
    """An AdaLoRA adapter saved by PEFT: its term is (alpha / init_r) P diag(lambda) Q, computed here by hand
    from its raw tensors."""
    from peft import AdaLoraConfig

    torch.manual_seed(9)
    config = AdaLoraConfig(init_r=6, target_r=3, lora_alpha=12, target_modules=["q_proj", "v_proj"], total_step=10)
    model = get_peft_model(load_base(tiny_model_dir), config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_E" in name or "lora_B" in name:
                param.normal_(0, 0.5)
    model.save_pretrained(tmp_path / "ada")
    raw = load_file(str(tmp_path / "ada" / "adapter_model.safetensors"))
    lora = load_file(str(adapters["a"] / "adapter_model.safetensors"))
    out = combine_adapters([tmp_path / "ada", adapters["a"]], tmp_path / "combo", [0.5, 2.0], "cat")
    got = ours(out)
    for path, (A, B) in got.items():
        P, lam, Q = (raw[f"{PREFIX}{path}.{n}"] for n in ("lora_B", "lora_E", "lora_A"))
        want = 0.5 * (12 / 6) * (P @ (lam * Q)) + 2.0 * (8 / 4) * (
            lora[f"{PREFIX}{path}.lora_B.weight"] @ lora[f"{PREFIX}{path}.lora_A.weight"])
        assert_close(B @ A, want, f"{path} delta weight")


def test_refusals_are_one_clear_line(adapters, tiny_model_dir, tmp_path):
    from peft import LoraConfig as Config

    torch.manual_seed(0)
    dora = get_peft_model(load_base(tiny_model_dir), Config(r=4, target_modules=["q_proj"], use_dora=True))
    dora.save_pretrained(tmp_path / "dora")
    with pytest.raises(AdapterError, match="DoRA adapter"):
        combine_adapters([adapters["a"], tmp_path / "dora"], tmp_path / "o1")
    other = tmp_path / "other"
    other.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        text = (adapters["b"] / name).read_bytes()
        if name.endswith(".json"):
            text = text.replace(str(tiny_model_dir).encode(), b"HuggingFaceTB/SmolLM2-360M-Instruct")
        (other / name).write_bytes(text)
    with pytest.raises(AdapterError, match="different base models"):
        combine_adapters([adapters["a"], other], tmp_path / "o2")
    with pytest.raises(SlimtuneError, match="needs --density"):
        combine_adapters([adapters["a"], adapters["b"]], tmp_path / "o3", how="ties")
    with pytest.raises(SlimtuneError, match="one weight per adapter"):
        combine_adapters([adapters["a"], adapters["b"]], tmp_path / "o4", [1.0])
    with pytest.raises(SlimtuneError, match="not a combination"):
        combine_adapters([adapters["a"], adapters["b"]], tmp_path / "o5", how="mean")
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 6)), "a refusal must write nothing"


def test_dare_repeats_with_its_seed_and_changes_without(adapters, tmp_path):
    dirs = [adapters["a"], adapters["b"]]
    first = ours(combine_adapters(dirs, tmp_path / "s1", WEIGHTS, "dare_ties", density=0.5, seed=1))
    again = ours(combine_adapters(dirs, tmp_path / "s1b", WEIGHTS, "dare_ties", density=0.5, seed=1))
    other = ours(combine_adapters(dirs, tmp_path / "s2", WEIGHTS, "dare_ties", density=0.5, seed=2))
    path = next(iter(first))
    assert torch.equal(first[path][0], again[path][0]), "the same seed must give the same combination"
    assert not torch.equal(first[path][0], other[path][0]), "another seed must draw other masks"


def test_cli_combine(adapters, tmp_path, monkeypatch, capsys):
    from test_cli import run_cli

    code, _, err = run_cli(monkeypatch, capsys, "combine", adapters["a"], adapters["b"], "--weights", "0.6,0.4",
                           "--how", "svd", tmp_path / "cli")
    assert code == 0, err
    assert (tmp_path / "cli" / "adapter_model.safetensors").is_file(), "no adapter written"
    code, _, err = run_cli(monkeypatch, capsys, "combine", adapters["a"], adapters["b"], "--weights", "0.6,x",
                           tmp_path / "cli2")
    assert code == 2 and err.strip().count("\n") == 0 and "--weights" in err, err
