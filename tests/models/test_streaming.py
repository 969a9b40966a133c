"""QLoRA's streamed load: the same 4-bit model as load + quantize_model, without the 16-bit model in memory."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from slimtune.models import load_model
from slimtune.models.streaming import load_quantized_model
from slimtune.quant import Linear4bit, quantize_model


def same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb), set(sa) ^ set(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), f"'{key}' differs"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streamed_equals_load_then_quantize(tiny_model_dir, dtype):
    streamed, _, _, paths, note = load_quantized_model(str(tiny_model_dir), dtype, torch.device("cpu"), dtype)
    assert note is None, f"the tiny Llama must stream, got: {note}"
    reference, _, _ = load_model(str(tiny_model_dir), dtype=dtype)
    assert sorted(paths) == sorted(quantize_model(reference, compute_dtype=dtype))
    same_state(streamed, reference)
    ids = torch.randint(0, 200, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(streamed(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_sharded_checkpoint_and_tied_embeddings_stream(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(tmp_path, safe_serialization=True, max_shard_size="40KB")
    from tests.conftest import make_tiny_tokenizer

    make_tiny_tokenizer().save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors.index.json").is_file(), "the checkpoint must be sharded for this test"
    streamed, _, _, _, note = load_quantized_model(str(tmp_path), torch.float32, torch.device("cpu"), torch.float32)
    assert note is None, note
    assert streamed.lm_head.weight is streamed.model.embed_tokens.weight, "a tied head must stay tied"
    reference, _, _ = load_model(str(tmp_path))
    quantize_model(reference, compute_dtype=torch.float32)
    same_state(streamed, reference)


def test_layers_are_quantized_one_at_a_time(tiny_model_dir):
    """Whenever a layer has just been quantized, no other linear layer holds 16-bit weights yet."""
    seen, dense_counts = [], []

    def on_layer(path, model):
        dense = [name for name, m in model.named_modules()
                 if isinstance(m, nn.Linear) and name != "lm_head" and not m.weight.is_meta]
        dense_counts.append(len(dense))
        seen.append(path)

    model, _, _, paths, _ = load_quantized_model(str(tiny_model_dir), torch.bfloat16, torch.device("cpu"),
                                                 torch.bfloat16, on_layer=on_layer)
    assert seen == paths and len(paths) == 14, f"every linear layer but the head, in file order: {seen}"
    assert dense_counts == [0] * len(paths), f"dense linear layers alive while quantizing: {dense_counts}"
    assert all(isinstance(model.get_submodule(p), Linear4bit) for p in paths)


PEAK_SCRIPT = textwrap.dedent('''
    import json, sys, torch
    from pathlib import Path

    def rss(field):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(field)

    from slimtune.models import load_model
    from slimtune.models.skeleton import build_skeleton
    from slimtune.models.streaming import load_quantized_model
    from slimtune.quant import Linear4bit, quantize_model
    model_dir, how = sys.argv[1], sys.argv[2]
    # Imports and one-time setup (thread pools, the quantizer's tables) outside the measurement.
    build_skeleton(model_dir)
    from slimtune.quant import quantize_nf4
    quantize_nf4(torch.randn(512, 2048).to(torch.bfloat16))
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    start = rss("VmRSS")
    if how == "stream":
        model = load_quantized_model(model_dir, torch.bfloat16, torch.device("cpu"), torch.bfloat16)[0]
    else:
        model = load_model(model_dir, dtype=torch.bfloat16)[0]
        quantize_model(model, compute_dtype=torch.bfloat16)
    peak = rss("VmHWM") - start
    quantized = sum(m.weight_bytes() for m in model.modules() if isinstance(m, Linear4bit))
    dense = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps({"peak": peak, "model_bytes": quantized + dense}))
''')


@pytest.fixture(scope="module")
def medium_model_dir(tmp_path_factory):
    """A random Llama of ~67M parameters saved in fp32 (like slimtune's GGUF cache): 134 MB in 16 bits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.conftest import make_tiny_tokenizer

    path = tmp_path_factory.mktemp("medium-llama")
    config = LlamaConfig(vocab_size=512, hidden_size=512, intermediate_size=2048, num_hidden_layers=16,
                         num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    make_tiny_tokenizer().save_pretrained(path)
    return path


def peak_of(how, model_dir):
    done = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(model_dir), how], capture_output=True, text=True,
                          check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS reset needs Linux's /proc/self/clear_refs")
def test_qlora_load_peak_is_the_4bit_model_plus_about_one_layer(medium_model_dir, capsys):
    largest_16bit = 512 * 2048 * 2  # one MLP projection in bf16
    full_16bit = sum(p.numel() for p in load_model(str(medium_model_dir))[0].parameters()) * 2
    streamed = peak_of("stream", medium_model_dir)
    whole = peak_of("whole", medium_model_dir)
    with capsys.disabled():
        print(f"\n[memory] 16-bit model {full_16bit / 2**20:.0f} MiB; 4-bit model {streamed['model_bytes'] / 2**20:.0f} "
              f"MiB; load peak streamed {streamed['peak'] / 2**20:.0f} MiB, whole-then-quantize "
              f"{whole['peak'] / 2**20:.0f} MiB")
    # Besides the 4-bit model: one tensor as read from the fp32 file plus its 16-bit copy, the
    # quantizer's fixed-size work buffers (~6.5 MB) and allocator slack. Far below the 16-bit model.
    bound = streamed["model_bytes"] + 3 * 2 * largest_16bit + 16 * 2**20
    assert bound < full_16bit / 2, "the test model is too small for the bound to mean anything"
    assert streamed["peak"] <= bound, f"streamed load peaked at {streamed['peak']} bytes, bound {bound}"
    assert whole["peak"] > bound, "the measurement must be able to fail: loading the whole model exceeds the bound"
