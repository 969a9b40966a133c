"""LoRALinear and the attach / merge / disable functions against hand computations.

Expected values come from plain torch matmuls written out here (y = x W^T + b + (alpha/r) (x A^T) B^T),
from the tiny model's config (parameter counts) and from the Kaiming-uniform formula, never from the
functions under test. Adapters get random non-zero B so merge checks mean something.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from slimtune.errors import AdapterError
from slimtune.methods.lora import (
    DoRALinear,
    LoRALinear,
    adapters_disabled,
    attach_lora,
    lora_layers,
    lora_state_dict,
    merge_and_unload,
    merge_lora,
    merge_state_dict,
    pattern_value,
    unmerge_lora,
)

R, ALPHA = 4, 12.0  # scaling 3.0: a swapped alpha/r (0.33) or alpha alone (12) would show


def randomize_lora(model: nn.Module, seed: int = 1, std: float = 0.1) -> None:
    """Give every lora_B (and lora_A) seeded random values so the update B A is non-zero."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_A.weight.copy_(torch.randn(layer.lora_A.weight.shape, generator=gen) * std)
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=gen) * std)


def logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits


@pytest.fixture
def input_ids(tiny_tokenizer) -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    return torch.randint(0, len(tiny_tokenizer), (2, 12), generator=gen)


def tiny_linear_shapes(config) -> list[tuple[str, int, int]]:
    """(name, d_in, d_out) of each Llama projection, from the config alone."""
    hidden, inter = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (hidden // config.num_attention_heads)
    return [
        ("q_proj", hidden, hidden), ("k_proj", hidden, kv), ("v_proj", hidden, kv), ("o_proj", hidden, hidden),
        ("gate_proj", hidden, inter), ("up_proj", hidden, inter), ("down_proj", inter, hidden),
    ]


def test_forward_matches_hand_computation():
    torch.manual_seed(0)
    linear = nn.Linear(16, 12, bias=True)
    layer = LoRALinear.from_linear(linear, r=R, alpha=ALPHA, dropout=0.0)
    gen = torch.Generator().manual_seed(3)
    A = torch.randn(R, 16, generator=gen)
    B = torch.randn(12, R, generator=gen)
    with torch.no_grad():
        layer.lora_A.weight.copy_(A)
        layer.lora_B.weight.copy_(B)
    x = torch.randn(3, 5, 16, generator=gen)

    W, b = linear.weight.detach(), linear.bias.detach()
    expected = x @ W.T + b + (ALPHA / R) * ((x @ A.T) @ B.T)
    with torch.no_grad():
        got = layer(x)

    assert got.shape == (3, 5, 12), f"LoRALinear output must keep the base layer's shape, got {tuple(got.shape)}"
    diff = (got - expected).abs().max().item()
    assert diff <= 1e-5, f"LoRA forward must equal x W^T + b + (alpha/r) (x A^T) B^T; max abs diff {diff}"
    base_only = (x @ W.T + b)
    assert (got - base_only).abs().max().item() > 1e-2, "with non-zero A and B the update must change the output"


def test_zero_init_b_keeps_logits_and_a_has_kaiming_bound(tiny_model, input_ids):
    before = logits(tiny_model, input_ids)
    torch.manual_seed(0)
    attach_lora(tiny_model, "all-linear", r=8, alpha=16)
    after = logits(tiny_model, input_ids)

    assert torch.equal(before, after), "B = 0 at init: attaching LoRA must leave the logits bit-identical"
    layers = lora_layers(tiny_model)
    assert len(layers) == 14, f"all-linear on a 2-layer Llama adapts 7 projections per layer, got {len(layers)}"
    for path, layer in layers.items():
        A = layer.lora_A.weight
        d_in = A.shape[1]
        # kaiming_uniform_(a=sqrt(5)): gain sqrt(2 / (1 + 5)), bound = gain * sqrt(3 / fan_in) = 1 / sqrt(d_in)
        bound = 1 / math.sqrt(d_in)
        assert torch.count_nonzero(layer.lora_B.weight) == 0, f"{path}: lora_B must start at zero"
        assert A.abs().max().item() <= bound, f"{path}: |A| must stay within the Kaiming bound 1/sqrt({d_in})={bound:.4f}"
        # r * d_in >= 256 uniform draws: the largest is above half the bound unless the bound is wrong
        assert A.abs().max().item() > 0.5 * bound, f"{path}: A looks drawn from a narrower range than 1/sqrt(d_in)"
        assert A.std().item() > 0.3 * bound, f"{path}: A must not be (near) zero, std {A.std().item():.4g}"


def test_merged_unmerged_and_unloaded_agree(tiny_model, input_ids):
    base_weight = tiny_model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    base_logits = logits(tiny_model, input_ids)
    attach_lora(tiny_model, "all-linear", r=R, alpha=ALPHA)
    randomize_lora(tiny_model)
    unmerged = logits(tiny_model, input_ids)
    assert (unmerged - base_logits).abs().max().item() > 1e-3, "random B must change the logits, else the test is void"

    assert merge_lora(tiny_model) == 14, "merge_lora must merge all 14 adapted layers"
    merged = logits(tiny_model, input_ids)
    diff = (merged - unmerged).abs().max().item()
    assert diff <= 1e-5, f"merged logits must equal unmerged ones; max abs diff {diff}"

    assert unmerge_lora(tiny_model) == 14, "unmerge_lora must unmerge all 14 layers"
    restored = tiny_model.model.layers[0].self_attn.q_proj.base_layer.weight
    wdiff = (restored - base_weight).abs().max().item()
    assert wdiff <= 1e-6, f"unmerge must restore the base weight; max abs diff {wdiff}"
    again = logits(tiny_model, input_ids)
    assert (again - unmerged).abs().max().item() <= 1e-5, "after unmerge the adapter path must give the same logits"

    unloaded_model = merge_and_unload(tiny_model)
    assert not lora_layers(unloaded_model), "merge_and_unload must leave no LoRALinear in the model"
    assert type(unloaded_model.model.layers[0].self_attn.q_proj) is nn.Linear, "the plain nn.Linear must be put back"
    unloaded = logits(unloaded_model, input_ids)
    diff = (unloaded - unmerged).abs().max().item()
    assert diff <= 1e-5, f"merged-and-unloaded logits must equal unmerged ones; max abs diff {diff}"


def test_merging_twice_is_a_no_op(tiny_model):
    attach_lora(tiny_model, ["q_proj", "down_proj"], r=R, alpha=ALPHA)
    randomize_lora(tiny_model)
    assert merge_lora(tiny_model) == 4, "first merge must merge 2 kinds x 2 layers = 4 layers"
    once = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    assert merge_lora(tiny_model) == 0, "a second merge_lora must merge nothing and return 0"
    for key, value in tiny_model.state_dict().items():
        assert torch.equal(value, once[key]), f"a second merge must not change '{key}'"


def test_merge_with_nan_raises(tiny_model):
    attach_lora(tiny_model, ["v_proj"], r=R, alpha=ALPHA)
    randomize_lora(tiny_model)
    layer = tiny_model.model.layers[0].self_attn.v_proj
    weight_before = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        layer.lora_B.weight[0, 0] = float("nan")
    with pytest.raises(AdapterError, match="NaN"):
        merge_lora(tiny_model)
    assert not layer.merged, "a refused merge must not mark the layer merged"
    assert torch.equal(layer.base_layer.weight, weight_before), "a refused merge must leave the base weight untouched"


def test_adapters_disabled_gives_base_logits(tiny_model, input_ids):
    base_logits = logits(tiny_model, input_ids)
    attach_lora(tiny_model, "all-linear", r=R, alpha=ALPHA)
    randomize_lora(tiny_model)
    adapted = logits(tiny_model, input_ids)
    assert (adapted - base_logits).abs().max().item() > 1e-3, "random B must change the logits, else the test is void"

    with adapters_disabled(tiny_model):
        inside = logits(tiny_model, input_ids)
    assert torch.equal(inside, base_logits), "inside adapters_disabled the model must give the base logits exactly"
    after = logits(tiny_model, input_ids)
    assert torch.equal(after, adapted), "on leaving adapters_disabled the adapter must be active again"

    with pytest.raises(RuntimeError, match="boom"):
        with adapters_disabled(tiny_model):
            raise RuntimeError("boom")
    assert torch.equal(logits(tiny_model, input_ids), adapted), "an exception in the block must still re-enable adapters"


def test_only_lora_params_train_and_count_matches_config(tiny_model):
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    attach_lora(tiny_model, targets, r=R, alpha=ALPHA)
    trainable = {name: p for name, p in tiny_model.named_parameters() if p.requires_grad}
    assert trainable, "attach_lora must leave the adapter trainable"
    for name in trainable:
        assert ".lora_A." in name or ".lora_B." in name, f"only lora_A/lora_B may require grad, but '{name}' does"

    config = tiny_model.config
    expected = config.num_hidden_layers * sum(R * (d_in + d_out) for _, d_in, d_out in tiny_linear_shapes(config))
    assert expected == 4096, "hand count for hidden 32, inter 64, kv 16, 2 layers, r=4: 2 * 4 * 512"
    got = sum(p.numel() for p in trainable.values())
    assert got == expected, f"trainable count must be sum of r*(d_in+d_out) over targets = {expected}, got {got}"


def test_merge_state_dict_is_pure_and_matches_in_place_merge(tiny_model):
    base = {k: v.detach().clone() for k, v in tiny_model.state_dict().items()}
    snapshot = {k: v.clone() for k, v in base.items()}
    paths = attach_lora(tiny_model, ["q_proj", "up_proj"], r=R, alpha=ALPHA)
    randomize_lora(tiny_model)
    adapter = {k: v.clone() for k, v in lora_state_dict(tiny_model).items()}

    merged = merge_state_dict(base, adapter, ALPHA / R)
    for key, value in base.items():
        assert torch.equal(value, snapshot[key]), f"merge_state_dict must not modify its input tensor '{key}'"
    assert set(merged) == set(base), "merge_state_dict must return every base key and no others"

    merge_lora(tiny_model)
    for path in paths:
        key = f"{path}.weight"
        in_place = tiny_model.get_submodule(path).base_layer.weight
        diff = (merged[key] - in_place).abs().max().item()
        assert diff <= 1e-6, f"'{key}': pure merge must equal the in-place merge; max abs diff {diff}"
        A, B = adapter[f"{path}.lora_A.weight"], adapter[f"{path}.lora_B.weight"]
        hand = snapshot[key] + (ALPHA / R) * (B @ A)
        diff = (merged[key] - hand).abs().max().item()
        assert diff <= 1e-6, f"'{key}': merge must be W + (alpha/r) B A; max abs diff {diff}"
    untouched = "model.layers.0.self_attn.k_proj.weight"
    assert torch.equal(merged[untouched], snapshot[untouched]), "non-adapted weights must pass through unchanged"


def test_rank_larger_than_layer_raises():
    with pytest.raises(AdapterError, match=r"r <= 4\b"):
        LoRALinear.from_linear(nn.Linear(8, 4), r=5, alpha=10)


def test_rank_larger_than_layer_raises_via_attach(tiny_model):
    # k_proj is 32 -> 16 in the tiny model (2 kv heads of dim 8)
    with pytest.raises(AdapterError, match=r"r=17.*r <= 16"):
        attach_lora(tiny_model, ["k_proj"], r=17, alpha=17)


def test_attaching_twice_raises(tiny_model):
    attach_lora(tiny_model, ["q_proj"], r=R, alpha=ALPHA)
    with pytest.raises(AdapterError, match="already has LoRA"):
        attach_lora(tiny_model, ["v_proj"], r=R, alpha=ALPHA)
    assert set(lora_layers(tiny_model)) == {
        "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"
    }, "a refused second attach must not wrap any more layers"


def test_eval_and_to_do_not_merge(tiny_model, input_ids):
    attach_lora(tiny_model, ["o_proj"], r=R, alpha=ALPHA)
    randomize_lora(tiny_model)
    reference = copy.deepcopy(tiny_model)
    tiny_model.train().eval().to(torch.float32)
    for path, layer in lora_layers(tiny_model).items():
        assert not layer.merged, f"{path}: .eval()/.to() must never merge"
        ref = reference.get_submodule(path).base_layer.weight
        assert torch.equal(layer.base_layer.weight, ref), f"{path}: .eval()/.to() must not change the base weight"


def test_dropout_path_is_unbiased_in_expectation():
    """E[s/(1-p) * B A (mask * x)] = s * B A x: the 1/(1-p) factor sits on the rank-r path."""
    torch.manual_seed(0)
    layer = LoRALinear.from_linear(torch.nn.Linear(32, 8, bias=False), r=4, alpha=8, dropout=0.3)
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(1, 32)
    layer.eval()
    exact = layer(x) - layer.base_layer(x)
    layer.train()
    with torch.no_grad():
        mean = torch.stack([layer(x) - layer.base_layer(x) for _ in range(20000)]).mean(0)
    assert torch.allclose(mean, exact, atol=0.05 * exact.abs().max().item()), \
        f"dropout must be unbiased: mean update {mean} vs exact {exact}"


# --- rsLoRA, DoRA, rank / alpha patterns ----------------------------------------------------------


def randomize_dora_magnitude(model: nn.Module, seed: int = 2) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            m = layer.lora_magnitude_vector
            m.mul_(1 + 0.2 * torch.randn(m.shape, generator=gen))


def test_rslora_scaling_is_alpha_over_sqrt_r():
    layer = LoRALinear(nn.Linear(8, 6), r=4, alpha=6.0, rslora=True)
    assert layer.scaling == pytest.approx(3.0), f"rsLoRA scaling must be alpha / sqrt(r) = 6/2 = 3, got {layer.scaling}"
    assert LoRALinear(nn.Linear(8, 6), r=4, alpha=6.0).scaling == pytest.approx(1.5), "plain LoRA keeps alpha / r"


def test_dora_forward_matches_hand_computation():
    torch.manual_seed(0)
    linear = nn.Linear(10, 7)
    W, b = linear.weight.detach().clone(), linear.bias.detach().clone()
    layer = DoRALinear.from_linear(linear, r=3, alpha=6.0)
    row_norms = torch.sqrt((W ** 2).sum(dim=1))
    assert torch.allclose(layer.lora_magnitude_vector, row_norms, atol=1e-6), "m must start as the row norms of W (d_out,)"
    with torch.no_grad():
        layer.lora_A.weight.normal_()
        layer.lora_B.weight.normal_()
        layer.lora_magnitude_vector.mul_(torch.linspace(0.5, 1.5, 7))
    x = torch.randn(4, 10)
    A, B, m = layer.lora_A.weight.detach(), layer.lora_B.weight.detach(), layer.lora_magnitude_vector.detach()
    adapted = W + 2.0 * B @ A
    W_prime = m[:, None] * adapted / torch.sqrt((adapted ** 2).sum(dim=1, keepdim=True))
    expected = x @ W_prime.T + b
    diff = (layer(x) - expected).abs().max().item()
    assert diff <= 1e-5, f"DoRA output must be x (m (W + s B A) / ||W + s B A||)^T + b; max abs diff {diff}"


def test_dora_starts_at_the_base_model(tiny_model, input_ids):
    base_logits = logits(tiny_model, input_ids)
    attach_lora(tiny_model, "all-linear", r=R, alpha=ALPHA, use_dora=True)
    diff = (logits(tiny_model, input_ids) - base_logits).abs().max().item()
    assert diff <= 1e-5, f"with B = 0 and m = ||W|| DoRA must reproduce the base logits; max abs diff {diff}"


def test_dora_gradients_treat_the_norm_as_a_constant():
    torch.manual_seed(1)
    linear = nn.Linear(6, 5, bias=False)
    W = linear.weight.detach().clone()
    layer = DoRALinear.from_linear(linear, r=2, alpha=2.0)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(3, 6)
    layer(x).pow(2).sum().backward()

    A = layer.lora_A.weight.detach().clone().requires_grad_(True)
    B = layer.lora_B.weight.detach().clone().requires_grad_(True)
    m = layer.lora_magnitude_vector.detach().clone().requires_grad_(True)
    adapted = W + B @ A
    norm = torch.sqrt((adapted ** 2).sum(dim=1)).detach()  # sec. 4.3: ||V + dV|| is a constant in backward
    (x @ ((m / norm)[:, None] * adapted).T).pow(2).sum().backward()
    for name, ours, ref in (("lora_A", layer.lora_A.weight.grad, A.grad), ("lora_B", layer.lora_B.weight.grad, B.grad),
                            ("magnitude", layer.lora_magnitude_vector.grad, m.grad)):
        diff = (ours - ref).abs().max().item()
        assert diff <= 1e-5, f"grad of {name} must match the detached-norm formula; max abs diff {diff}"
    assert not linear.weight.requires_grad, "the base weight must stay frozen"


def test_dora_merge_unmerge_and_pure_merge(tiny_model, input_ids):
    base = {k: v.detach().clone() for k, v in tiny_model.state_dict().items()}
    attach_lora(tiny_model, ["q_proj", "down_proj"], r=R, alpha=ALPHA, use_dora=True)
    randomize_lora(tiny_model)
    randomize_dora_magnitude(tiny_model)
    unmerged = logits(tiny_model, input_ids)
    adapter = {k: v.clone() for k, v in lora_state_dict(tiny_model).items()}
    pure = merge_state_dict(base, adapter, ALPHA / R)
    assert merge_lora(tiny_model) == 4, "all 4 DoRA layers must merge"
    diff = (logits(tiny_model, input_ids) - unmerged).abs().max().item()
    assert diff <= 1e-5, f"merged DoRA logits must equal unmerged ones; max abs diff {diff}"
    for path in lora_layers(tiny_model):
        diff = (pure[f"{path}.weight"] - tiny_model.get_submodule(path).base_layer.weight).abs().max().item()
        assert diff <= 1e-6, f"'{path}': merge_state_dict must equal the in-place DoRA merge; max abs diff {diff}"
    unmerge_lora(tiny_model)
    for path in lora_layers(tiny_model):
        diff = (tiny_model.get_submodule(path).base_layer.weight - base[f"{path}.weight"]).abs().max().item()
        assert diff <= 1e-5, f"'{path}': DoRA unmerge must restore W; max abs diff {diff}"


def test_dora_trainable_parameters_include_the_magnitude(tiny_model):
    from slimtune.methods.lora import LoRAMethod

    attach_lora(tiny_model, ["q_proj"], r=R, alpha=ALPHA, use_dora=True)
    hidden = tiny_model.config.hidden_size
    trainable, _ = LoRAMethod("dora", tiny_model).parameter_counts()
    expected = 2 * (R * hidden + hidden * R + hidden)  # A, B and m per layer, 2 layers
    assert trainable == expected, f"DoRA on q_proj must train A, B and m: {expected} parameters, got {trainable}"
    assert len(LoRAMethod("dora", tiny_model).trainable_parameters()) == 6, "3 tensors per layer, 2 layers"


def test_rank_and_alpha_pattern_use_peft_matching(tiny_model):
    attach_lora(tiny_model, ["q_proj", "v_proj"], r=4, alpha=8.0,
                rank_pattern={"v_proj": 2}, alpha_pattern={r"layers\.0\.self_attn\.q_proj": 3.0})
    layers = lora_layers(tiny_model)
    got = {path: (layer.r, layer.alpha) for path, layer in layers.items()}
    assert got == {
        "model.layers.0.self_attn.q_proj": (4, 3.0), "model.layers.0.self_attn.v_proj": (2, 8.0),
        "model.layers.1.self_attn.q_proj": (4, 8.0), "model.layers.1.self_attn.v_proj": (2, 8.0),
    }, f"per-module rank/alpha must follow the patterns, got {got}"
    assert layers["model.layers.0.self_attn.v_proj"].lora_A.weight.shape == (2, 32), "v_proj's A must have rank 2"
    assert pattern_value({"proj": 9}, "model.layers.0.self_attn.q_proj", 1) == 1, "a key must match a whole path component"


def test_pattern_matching_nothing_raises(tiny_model):
    with pytest.raises(AdapterError, match="rank_pattern key 'k_proj' matches no adapted module"):
        attach_lora(tiny_model, ["q_proj"], r=4, alpha=8.0, rank_pattern={"k_proj": 2})


def test_dora_eval_norm_cache_follows_weight_changes():
    torch.manual_seed(3)
    layer = DoRALinear.from_linear(nn.Linear(8, 6), r=2, alpha=2.0).eval()
    x = torch.randn(2, 8)
    before = layer(x)
    with torch.no_grad():
        layer.lora_B.weight.normal_()  # an in-place change must invalidate the cached norm
    A, B, m = layer.lora_A.weight, layer.lora_B.weight, layer.lora_magnitude_vector
    adapted = layer.base_layer.weight + B @ A
    expected = x @ (m[:, None] * adapted / adapted.norm(dim=1, keepdim=True)).T + layer.base_layer.bias
    after = layer(x)
    assert (after - before).abs().max().item() > 1e-3, "changing B must change the output, else the test is void"
    diff = (after - expected).detach().abs().max().item()
    assert diff <= 1e-5, f"eval-mode DoRA must use the current ||W + s B A||, not a stale one; max abs diff {diff}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dora_weight_norm_equals_the_direct_row_norm(dtype):
    torch.manual_seed(4)
    layer = DoRALinear.from_linear(nn.Linear(48, 40).to(dtype), r=4, alpha=8.0)
    with torch.no_grad():
        layer.lora_A.weight.normal_(std=0.1)
        layer.lora_B.weight.normal_(std=0.1)
    W = layer.base_layer.weight.float()
    direct = torch.sqrt(((W + 2.0 * layer.lora_B.weight @ layer.lora_A.weight) ** 2).sum(dim=1))
    rel = ((layer.weight_norm() - direct).abs() / direct).max().item()
    assert rel <= (1e-6 if dtype == torch.float32 else 1e-3), f"||W + s B A|| per row is off by {rel} (relative)"
