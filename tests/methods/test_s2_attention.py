"""S2-Attn (LongLoRA's shifted sparse attention) against references written here: full attention when
the group is the whole row and nothing shifts, a naive per-head, per-group loop otherwise, and
gradient probes that no position sees the future, padding, another packed example or the roll's
wrap-around. Tiny random models of every supported family, GQA with 1, 2 and 3 KV heads."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from slimtune.errors import AdapterError
from slimtune.methods.s2_attention import RealMask, family_problem, s2_attention, shifted_sparse_attention

NAIVE = "slimtune_test_naive_s2"


def tiny_model(family: str, kv_heads: int = 2, heads: int = 6, layers: int = 2, seed: int = 0):
    """A tiny random model of `family` with `heads` query heads of dim 8 and `kv_heads` KV heads."""
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=97, hidden_size=8 * heads, intermediate_size=64, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=8, max_position_embeddings=64,
                  tie_word_embeddings=False)
    if family == "llama":
        config = tf.LlamaConfig(**common)
        model = tf.LlamaForCausalLM(config)
    elif family == "mistral":
        config = tf.MistralConfig(**common, sliding_window=None)
        model = tf.MistralForCausalLM(config)
    elif family == "qwen2":
        config = tf.Qwen2Config(**common)
        model = tf.Qwen2ForCausalLM(config)
    elif family == "qwen3":
        config = tf.Qwen3Config(**common)
        model = tf.Qwen3ForCausalLM(config)
    elif family == "gemma3_text":  # every other layer a sliding window of 5 tokens, as Gemma-3 has (5:1 there)
        config = tf.Gemma3TextConfig(**common, sliding_window=5, query_pre_attn_scalar=16,
                                     layer_types=(["sliding_attention", "full_attention"] * layers)[:layers])
        model = tf.Gemma3ForCausalLM(config)
    else:
        raise ValueError(family)
    model.config.use_cache = False
    return model


def reference_allowed(attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None, length: int,
                      batch: int) -> torch.Tensor:
    """(batch, T, T) bool built from first principles: causal, no padding key, same packed example."""
    q = torch.arange(length)[:, None]
    kv = torch.arange(length)[None, :]
    allowed = (kv <= q).expand(batch, length, length).clone()
    if attention_mask is not None:
        allowed &= attention_mask.bool()[:, None, :]
    if position_ids is not None:  # a packed row: an example starts where the position restarts at 0
        example = torch.cumsum((position_ids == 0).long(), dim=-1)  # (batch, T)
        allowed &= example[:, :, None] == example[:, None, :]
    return allowed


def naive_s2(query, key, value, allowed, ratio, scaling, shift=True, window=None):
    """Loop over batch rows, heads and groups; each group's token set written out explicitly.

    Groups of G = ceil(ratio T) rounded up to even tokens over the row padded to a multiple of G; heads
    >= H // 2 use groups starting G/2 later, the last one wrapping round to the row's start (its two
    sides kept apart). A token attends to the tokens of its group that `allowed` (and the window) permit,
    itself alone if none."""
    batch, heads, length, dim = query.shape
    repeat = heads // key.shape[1]
    group = max(2, math.ceil(ratio * length))
    group += group % 2
    padded = math.ceil(length / group) * group
    out = torch.zeros(batch, heads, length, dim, dtype=query.dtype)
    for b in range(batch):
        for h in range(heads):
            shifted = shift and h >= heads // 2
            for g in range(padded // group):
                if shifted:
                    members = [(g * group + group // 2 + j) % padded for j in range(group)]
                else:
                    members = [g * group + j for j in range(group)]
                members = [i for i in members if i < length]
                for i in members:
                    keys = [j for j in members if allowed[b, i, j]
                            and (window is None or i - j < window)
                            and (not shifted or (i < group // 2) == (j < group // 2))]
                    keys = keys or [i]
                    scores = (key[b, h // repeat, keys] @ query[b, h, i]) * scaling
                    out[b, h, i] = torch.softmax(scores.float(), dim=0).to(value.dtype) @ value[b, h // repeat, keys]
    return out.transpose(1, 2)  # (batch, T, heads, dim)


def register_naive(allowed: torch.Tensor, ratio: float) -> None:
    from transformers import AttentionInterface

    def forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        window = getattr(module, "sliding_window", None)
        return naive_s2(query, key, value, allowed, ratio, scaling, window=window), None

    AttentionInterface.register(NAIVE, forward)


def plain_mask(allowed: torch.Tensor) -> RealMask:
    """A RealMask whose recipe reads a precomputed (batch, T, T) table."""
    return RealMask(lambda b, h, q, kv: allowed[b, q, kv], None, allowed.shape[0], allowed.shape[1],
                    torch.device("cpu"))


@pytest.mark.parametrize("kv_heads", [1, 2, 3, 6])
def test_whole_row_group_without_shift_is_full_attention(kv_heads):
    torch.manual_seed(0)
    batch, heads, length, dim = 2, 6, 12, 8
    query = torch.randn(batch, heads, length, dim)
    key, value = torch.randn(2, batch, kv_heads, length, dim)
    padding = torch.ones(batch, length, dtype=torch.long)
    padding[1, 9:] = 0
    allowed = reference_allowed(padding, None, length, batch)
    got = shifted_sparse_attention(query, key, value, plain_mask(allowed), group_ratio=1.0, shift=False)
    expected = F.scaled_dot_product_attention(query, key, value, attn_mask=allowed[:, None],
                                              enable_gqa=kv_heads != heads).transpose(1, 2)
    real = padding.bool()
    torch.testing.assert_close(got[real], expected[real], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kv_heads", [1, 2, 3])
@pytest.mark.parametrize("length,ratio", [(16, 0.25), (13, 0.25), (20, 0.3), (9, 0.5)])
def test_shifted_groups_match_the_naive_loop(kv_heads, length, ratio):
    """Lengths that are and are not multiples of the group; padding and a packed row in one batch."""
    torch.manual_seed(1)
    batch, heads, dim = 3, 6, 8
    query = torch.randn(batch, heads, length, dim)
    key, value = torch.randn(2, batch, kv_heads, length, dim)
    padding = torch.ones(batch, length, dtype=torch.long)
    padding[1, length - 3:] = 0
    positions = torch.arange(length).repeat(batch, 1)
    positions[2] = torch.cat([torch.arange(5), torch.arange(length - 5)])  # row 2 packs two examples
    allowed = reference_allowed(padding, None, length, batch) & reference_allowed(None, positions, length, batch)
    got = shifted_sparse_attention(query, key, value, plain_mask(allowed), ratio, scaling=0.3)
    expected = naive_s2(query, key, value, allowed, ratio, 0.3)
    real = padding.bool()
    torch.testing.assert_close(got[real], expected[real], rtol=1e-5, atol=1e-6)


FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma3_text"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kv_heads", [1, 2, 3])
def test_model_in_training_mode_matches_naive_reference(family, kv_heads):
    """The whole model under S2-Attn (padded batch) equals the model with the naive loop as attention."""
    model = tiny_model(family, kv_heads).train()
    torch.manual_seed(2)
    ids = torch.randint(0, 97, (2, 14))
    padding = torch.ones(2, 14, dtype=torch.long)
    padding[0, 10:] = 0
    with s2_attention(model, 0.25):
        got = model(input_ids=ids, attention_mask=padding).logits
    register_naive(reference_allowed(padding, None, 14, 2), 0.25)
    model.set_attn_implementation(NAIVE)
    expected = model(input_ids=ids, attention_mask=padding).logits
    real = padding.bool()
    torch.testing.assert_close(got[real], expected[real], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_packed_row_matches_naive_reference(family):
    model = tiny_model(family, 3).train()
    torch.manual_seed(3)
    ids = torch.randint(0, 97, (1, 16))
    positions = torch.cat([torch.arange(7), torch.arange(9)])[None]
    with s2_attention(model, 0.25):
        got = model(input_ids=ids, position_ids=positions).logits
    register_naive(reference_allowed(None, positions, 16, 1), 0.25)
    model.set_attn_implementation(NAIVE)
    expected = model(input_ids=ids, position_ids=positions).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def input_gradients(model, ids, target: int, **inputs) -> torch.Tensor:
    """|d logits[:, target] / d embeddings| summed per (row, position): (batch, T)."""
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    model(inputs_embeds=embeds, **inputs).logits[:, target].sum().backward()
    return embeds.grad.abs().sum(-1)


def one_layer_reach(target: int, length: int) -> set[int]:
    """What position `target` may see through one S2 layer with G = 4: its unshifted group [4k, 4k+4)
    and its shifted group (starting 2 later), causally; the wrap (0, 1 seen from 14, 15) is cut."""
    shift_start = ((target - 2) % length) // 4 * 4
    shifted = {(g + 2) % length for g in range(shift_start, shift_start + 4)}
    reach = set(range(target // 4 * 4, target + 1)) | {s for s in shifted if s <= target}
    return reach - {0, 1} if target >= length - 2 else reach


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_probes_no_future_padding_other_example_or_wraparound(family):
    model = tiny_model(family, 2, layers=1).train()
    length, ratio = 16, 0.25  # G = 4: one layer sees its groups only
    torch.manual_seed(4)
    ids = torch.randint(0, 97, (2, length))
    padding = torch.ones(2, length, dtype=torch.long)
    padding[1, :3] = 0  # left padding: real tokens come after it
    with s2_attention(model, ratio):
        for target in range(length):
            grads = input_gradients(model, ids, target, attention_mask=padding)
            assert (grads[:, target + 1:] == 0).all(), f"position {target} sees a future token"
            if target >= 3:
                assert (grads[1, :3] == 0).all(), f"position {target} sees padding"
            reach = one_layer_reach(target, length)
            seen = set(torch.nonzero(grads[0] != 0).view(-1).tolist())
            if family != "gemma3_text":  # Gemma-3's sliding layer narrows it further (window 5)
                assert seen == reach, f"position {target} sees {sorted(seen)}, expected {sorted(reach)}"
            else:
                assert seen <= reach, f"position {target} sees {sorted(seen - reach)} outside its groups"
        positions = torch.cat([torch.arange(6), torch.arange(10)])[None]
        for target in range(6):  # the first packed example never sees the second
            grads = input_gradients(model, ids[:1], target, position_ids=positions)
            assert (grads[0, 6:] == 0).all(), f"packed position {target} sees the other example"
        for target in range(6, length):
            grads = input_gradients(model, ids[:1], target, position_ids=positions)
            assert (grads[0, :6] == 0).all(), f"packed position {target} sees the previous example"


def test_eval_mode_uses_full_attention_and_the_previous_implementation_returns():
    model = tiny_model("llama", 2).eval()
    ids = torch.randint(0, 97, (1, 16))
    expected = model(input_ids=ids).logits
    previous = model.config._attn_implementation
    with s2_attention(model, 0.25):
        torch.testing.assert_close(model(input_ids=ids).logits, expected)  # eval: ordinary attention
        model.train()
        shifted = model(input_ids=ids).logits
        model.eval()
    assert not torch.allclose(shifted[:, 8:], expected[:, 8:]), "training mode should use grouped attention"
    assert model.config._attn_implementation == previous


def test_unsupported_family_is_named():
    from transformers import GPT2Config

    assert "gpt2" in family_problem(GPT2Config()) and "llama" in family_problem(GPT2Config())
    from transformers import Gemma3TextConfig

    assert "soft-capping" in family_problem(Gemma3TextConfig(attn_logit_softcapping=50.0))
    with pytest.raises(AdapterError, match="gpt2"):
        from transformers import GPT2LMHeadModel

        with s2_attention(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2)), 0.25):
            pass


@pytest.mark.parametrize("kv_heads", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_causal_rows_take_the_block_path_and_match_the_naive_loop(kv_heads, dtype):
    """A plain causal row (no padding, packing or window; T a multiple of G) runs without mask tensors,
    as causal blocks; it equals the naive loop, in fp32 and in bf16 (fp32 maths on CPU), with gradients."""
    from transformers.masking_utils import causal_mask_function

    torch.manual_seed(5)
    batch, heads, length, dim = 2, 6, 32, 8
    query = torch.randn(batch, heads, length, dim).to(dtype).requires_grad_(True)
    key, value = (torch.randn(batch, kv_heads, length, dim).to(dtype).requires_grad_(True) for _ in range(2))
    mask = RealMask(causal_mask_function, torch.ones(batch, length, dtype=torch.bool), batch, length,
                    torch.device("cpu"))
    assert mask.plain_causal()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        got = shifted_sparse_attention(query, key, value, mask, 0.25, scaling=0.3)
    assert not mask._groups, "a causal row should not build group masks"
    allowed = reference_allowed(None, None, length, batch)
    reference = [t.detach().float().requires_grad_(True) for t in (query, key, value)]
    expected = naive_s2(*reference, allowed, 0.25, 0.3)
    tolerance = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got.float(), expected, **tolerance)
    weights = torch.randn(got.shape)
    (got.float() * weights).sum().backward()
    (expected * weights).sum().backward()
    for mine, theirs in zip((query, key, value), reference):
        torch.testing.assert_close(mine.grad.float(), theirs.grad, **tolerance)


def test_causal_row_gradient_probe_never_crosses_the_wrap():
    """The block path's shifted blocks: position t sees its plain group and its shifted group only, and
    the wrapped group's two halves (the row's last G/2 and first G/2 tokens) never see each other."""
    model = tiny_model("llama", 2, layers=1).train()
    length = 16  # G = 4
    torch.manual_seed(6)
    ids = torch.randint(0, 97, (1, length))
    with s2_attention(model, 0.25):
        for target in range(length):
            grads = input_gradients(model, ids, target)
            reach = one_layer_reach(target, length)
            seen = set(torch.nonzero(grads[0] != 0).view(-1).tolist())
            assert seen == reach, f"position {target} sees {sorted(seen)}, expected {sorted(reach)}"
