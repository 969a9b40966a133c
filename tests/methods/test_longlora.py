"""LongLoRA as a plugin: config, position interpolation, files that PEFT loads with the same logits, the base
view, and a whole run in which training (and only training) uses S2-Attn.

Save -> load_run and merge == unmerged for LongLoRA are in test_contract.py's table."""

from __future__ import annotations

import json

import pytest
import torch
from rich.console import Console

import slimtune.methods.s2_attention as s2
from conftest import make_tiny_tokenizer
from slimtune.api import evaluate_run, finetune, load_run
from slimtune.config import build_config
from slimtune.data import load_dataset
from slimtune.errors import ConfigError
from slimtune.evaluate import evaluate_model
from slimtune.methods.base import AttachedMethod
from slimtune.models import load_model
from tests.methods.test_s2_attention import tiny_model


def longlora_config(model_dir, out, data="unused.jsonl", **extra):
    longlora = {"context": 1024, **extra.pop("longlora", {})}
    return build_config({"model": str(model_dir), "method": "longlora", "output": str(out), "data": {"train": str(data)},
                         "longlora": longlora, **extra})


def saved_model_dir(tmp_path, family: str, tied: bool) -> str:
    """A tiny model of `family` (native context 64) saved with a byte tokenizer."""
    tokenizer = make_tiny_tokenizer()
    model = tiny_model(family, kv_heads=3)
    model.resize_token_embeddings(len(tokenizer))
    if tied:
        model.config.tie_word_embeddings = True
        model.lm_head.weight = model.get_input_embeddings().weight
    path = tmp_path / f"{family}-{'tied' if tied else 'untied'}"
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return str(path)


def perturb(model, seed=5):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                scale = 0.2 if "lora_" in name else 0.05
                param.add_(scale * torch.randn(param.shape, generator=gen))


def test_config_context_sets_max_length_and_problems_are_named(tmp_path):
    cfg = longlora_config("m", tmp_path)
    assert cfg.data.max_length == 1024, "data.max_length follows longlora.context when unset"
    assert cfg.longlora.group_ratio == 0.25 and cfg.longlora.trainable == ["embed", "norm"]
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.targets) == (8, 16.0, ["q_proj", "k_proj", "v_proj", "o_proj"])
    again = build_config(cfg.to_yaml_dict())  # what config.yaml reads back as (resume, eval, load)
    assert again == cfg, "the saved config must read back as the same config"
    assert build_config({**cfg.to_yaml_dict(), "lora": {"r": 4}}).lora.r == 4, "a set key wins"
    assert build_config({"method": "longlora", "data": {"train": "x.jsonl"}}).data.max_length == 1024, \
        "without a context (twice the native one) data.max_length keeps its default"
    with pytest.raises(ConfigError, match="data.max_length 4096 exceeds longlora.context 1024"):
        build_config({"method": "longlora", "data": {"train": "x.jsonl", "max_length": 4096},
                      "longlora": {"context": 1024}})
    with pytest.raises(ConfigError, match="freeze.train_norms does not apply to method: longlora"):
        longlora_config("m", tmp_path, freeze={"train_norms": True})


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_position_interpolation_divides_the_rotary_frequencies(family, tmp_path):
    model_dir = saved_model_dir(tmp_path, family, tied=False)
    model, _, _ = load_model(model_dir)
    cfg = longlora_config(model_dir, tmp_path / "run", longlora={"context": 150})  # ceil(150 / 64) = 3
    cfg.plugin.attach(model, cfg, Console(quiet=True))
    dim, theta = 8, 10000.0
    native = 1.0 / theta ** (torch.arange(0, dim, 2).float() / dim)  # RoPE's frequencies, by hand
    rotary = model.model.rotary_emb
    if family == "gemma3_text":  # only the full-attention layers interpolate; the sliding window never needs to
        local_theta = model.config.rope_parameters["sliding_attention"]["rope_theta"]
        theta = model.config.rope_parameters["full_attention"]["rope_theta"]
        native = 1.0 / theta ** (torch.arange(0, dim, 2).float() / dim)
        torch.testing.assert_close(rotary.full_attention_inv_freq, native / 3)
        torch.testing.assert_close(rotary.sliding_attention_inv_freq,
                                   1.0 / local_theta ** (torch.arange(0, dim, 2).float() / dim))
        assert model.config.rope_parameters["full_attention"] == {**model.config.rope_parameters["full_attention"],
                                                                  "rope_type": "linear", "factor": 3.0}
    else:
        torch.testing.assert_close(rotary.inv_freq, native / 3)
        assert model.config.rope_parameters["rope_type"] == "linear" and model.config.rope_parameters["factor"] == 3.0
    assert model.config.max_position_embeddings == 192


@pytest.mark.parametrize("family,tied", [("llama", True), ("llama", False), ("qwen3", False), ("mistral", True)])
def test_peft_loads_the_adapter_with_the_same_logits(family, tied, tmp_path):
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    model_dir = saved_model_dir(tmp_path, family, tied)
    cfg = longlora_config(model_dir, tmp_path / "run", longlora={"context": 200})
    model, tokenizer, _ = load_model(model_dir)
    cfg.plugin.attach(model, cfg, Console(quiet=True))
    perturb(model)
    model.eval()
    cfg.output.mkdir()
    cfg.plugin.save(AttachedMethod("longlora", model), tokenizer, cfg, cfg.output, model_dir, 1)
    saved = json.loads((cfg.output / "adapter_config.json").read_text())
    assert "embed_tokens" in saved["modules_to_save"] and "norm" in saved["modules_to_save"], saved["modules_to_save"]
    assert ("lm_head" in saved["modules_to_save"]) == tied, "a tied head needs its own copy for PEFT"
    ids = torch.randint(0, 200, (2, 150), generator=torch.Generator().manual_seed(1))  # past the native 64
    with torch.no_grad():
        ours = model(input_ids=ids).logits
        # The documented recipe: the run's config.json (interpolated RoPE) for the base, then the adapter.
        base = AutoModelForCausalLM.from_pretrained(model_dir, config=AutoConfig.from_pretrained(cfg.output))
        theirs = PeftModel.from_pretrained(base, cfg.output).eval()(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(model_dir).eval()(input_ids=ids).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)
    assert (plain - ours).abs().max() > 1e-2, "the trained tensors and RoPE must change the logits"


def test_base_view_restores_embeddings_norms_and_rope(tmp_path):
    model_dir = saved_model_dir(tmp_path, "llama", tied=True)
    base, _, _ = load_model(model_dir)
    model, _, _ = load_model(model_dir)
    cfg = longlora_config(model_dir, tmp_path / "run")
    attached = cfg.plugin.attach(model, cfg, Console(quiet=True))
    perturb(model)
    ids = torch.randint(0, 200, (1, 100))
    with torch.no_grad():
        expected = base.eval()(input_ids=ids).logits
        tuned = model.eval()(input_ids=ids).logits
        with attached.base_view() as view:
            torch.testing.assert_close(view(input_ids=ids).logits, expected)
        torch.testing.assert_close(model(input_ids=ids).logits, tuned)  # the tuned model comes back


def test_a_run_trains_with_s2_attention_and_evaluates_with_full_attention(tmp_path, data_file, monkeypatch):
    model_dir = saved_model_dir(tmp_path, "llama", tied=True)
    calls = {"s2": 0, "full": 0}
    real = s2.shifted_sparse_attention

    def counting(*args, **kwargs):  # counts, then runs the real function
        calls["s2"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(s2, "shifted_sparse_attention", counting)
    cfg = longlora_config(model_dir, tmp_path / "run", data=data_file, eval={"generations": 1, "max_new_tokens": 4},
                          train={"max_steps": 2, "batch_size": 4, "lr": 1e-2, "precision": "fp32", "save_every": None,
                                 "packing": True})
    cfg = build_config({**cfg.to_yaml_dict(), "data": {**cfg.to_yaml_dict()["data"], "eval": str(data_file)}})
    finetune(cfg, Console(quiet=True))
    assert calls["s2"] == 2 * 2, "each of 2 steps runs S2-Attn in both layers (one packed micro-batch)"
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["rope_parameters"]["rope_type"] == "linear" and saved["rope_parameters"]["factor"] == 16.0
    loaded, _ = load_run(tmp_path / "run")
    assert loaded.config.rope_parameters["factor"] == 16.0, "load_run must use the interpolated RoPE"
    assert loaded.config._attn_implementation != s2.ATTENTION_NAME
    result = evaluate_run(tmp_path / "run", data=data_file, generations=0, console=Console(quiet=True))
    base, tokenizer, _ = load_model(model_dir)
    reference, _ = evaluate_model(base.eval(), tokenizer, load_dataset(data_file, tokenizer, "auto", 1024), 0, 8, 8)
    assert result["base"]["loss"] == pytest.approx(reference["loss"], abs=1e-6), "the base row is the untouched base"
    assert abs(result["tuned"]["loss"] - reference["loss"]) > 1e-4, "the tuned row must differ from the base"


def test_an_unsupported_family_is_refused_in_the_check_stage(tmp_path, data_file):
    from transformers import GPT2Config, GPT2LMHeadModel

    from slimtune.api import check_run

    tokenizer = make_tiny_tokenizer()
    path = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_layer=1, n_embd=16, n_head=2)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    cfg = longlora_config(path, tmp_path / "run", data=data_file)
    with pytest.raises(ConfigError, match="supports the model families llama, mistral, qwen2, qwen3, gemma3_text; "
                                          "this model is 'gpt2'"):
        check_run(cfg, Console(quiet=True))
    assert not (tmp_path / "run").exists(), "nothing is written when the check fails"
