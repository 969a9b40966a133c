"""Routing signatures and the router (slimtune.routing), on the tiny model.

Expected values come from a naive reference written here: each text alone through the model (no batch,
no padding), its layer-L hidden states averaged over every token but the first, scaled to unit length;
cosine similarities and the threshold rule by hand.
"""

from __future__ import annotations

import pytest
import torch
from rich.console import Console

from slimtune.errors import AdapterError
from slimtune.routing import (SIGNATURE_NAME, Router, Signature, build_signature, compute_signature, represent,
                              routing_layer, spherical_kmeans)

TEXTS = ["repeat 1", "hello there, how are you?", "x", "a much longer prompt about sorting fruit: pear, fig, apple"]


def naive(model, tokenizer, text: str, layer: int) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        hidden = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[layer][0]
    pooled = hidden[1:].mean(0) if len(ids) > 1 else hidden[0]
    return pooled / pooled.norm()


def test_represent_equals_each_text_alone(tiny_model, tiny_tokenizer):
    layer = routing_layer(tiny_model)
    assert layer == 1, "two thirds of the tiny model's 2 layers, rounded down"
    got = represent(tiny_model, tiny_tokenizer, TEXTS, layer, batch_size=3)  # padded batches of 3 and 1
    for i, text in enumerate(TEXTS):
        want = naive(tiny_model, tiny_tokenizer, text, layer)
        diff = (got[i] - want).abs().max().item()
        assert diff <= 1e-5, f"{text!r}: batched representation differs from the text alone by {diff:.2e}"


def test_spherical_kmeans_finds_two_clusters():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.nn.functional.normalize(torch.randn(2, 16, generator=gen), dim=-1)
    points = torch.cat([a + 0.05 * torch.randn(20, 16, generator=gen), b + 0.05 * torch.randn(20, 16, generator=gen)])
    points = torch.nn.functional.normalize(points, dim=-1)
    centers = spherical_kmeans(points, 2, seed=3)
    best = sorted((centers @ torch.stack([a, b]).T).max(dim=0).values.tolist())
    assert best[0] > 0.99, f"each true direction must have a centroid within cos 0.99, got {best}"


def test_router_picks_the_best_signature_and_the_base_below_threshold(tiny_model, tiny_tokenizer):
    layer = routing_layer(tiny_model)
    vectors = {t: naive(tiny_model, tiny_tokenizer, t, layer) for t in TEXTS}
    sig = {name: Signature(vectors[text], vectors[text][None], 0.999, layer, "tiny", 1)
           for name, text in (("one", TEXTS[0]), ("two", TEXTS[1]))}
    router = Router(tiny_model, tiny_tokenizer, sig)
    for text in TEXTS:
        cos = {name: float(vectors[text] @ s.centroids[0]) for name, s in sig.items()}
        best = max(cos, key=cos.get)
        want = best if cos[best] >= 0.999 else None
        got = router.route(text)
        assert got.name == want, f"{text!r}: routed to {got.name}, the scores {cos} say {want}"
        assert got.score == pytest.approx(cos[best], abs=1e-5)
    assert router.route(TEXTS[0]).name == "one" and router.route(TEXTS[2]).name is None, "the test must cover both"
    low = Router(tiny_model, tiny_tokenizer, sig, threshold=-1.0)
    assert low.route(TEXTS[2]).name is not None, "a threshold of -1 accepts every prompt"


def test_signature_threshold_and_file_round_trip(tiny_model, tiny_tokenizer, tmp_path):
    prompts = [f"repeat {i}" for i in range(40)]
    sig = build_signature(tiny_model, tiny_tokenizer, prompts, "tiny")
    own = sig.score(represent(tiny_model, tiny_tokenizer, prompts, sig.layer))
    assert (own >= sig.threshold).float().mean() >= 0.98, "at least 98% of the training prompts pass their threshold"
    assert sig.centroids.shape == (4, tiny_model.config.hidden_size)
    sig.save(tmp_path)
    back = Signature.load(tmp_path)
    assert torch.equal(back.centroids, sig.centroids) and back.threshold == sig.threshold and back.layer == sig.layer
    with pytest.raises(AdapterError, match="slimtune signature"):
        Signature.load(tmp_path / "nowhere")


def test_training_writes_the_signature_and_compute_signature_repeats_it(tiny_model_dir, data_file, tmp_path):
    from slimtune.api import finetune
    from slimtune.config import build_config

    cfg = build_config({
        "model": str(tiny_model_dir), "method": "lora", "output": str(tmp_path / "run"),
        "data": {"train": str(data_file)}, "lora": {"r": 2, "alpha": 4, "targets": ["q_proj"]},
        "train": {"max_steps": 1, "batch_size": 4, "precision": "fp32", "save_every": None},
    })
    out = finetune(cfg, Console(quiet=True)).output
    first = Signature.load(out)
    assert first.prompts == 12, f"the signature must cover the 12 training prompts, got {first.prompts}"
    (out / SIGNATURE_NAME).unlink()
    compute_signature(out)
    again = Signature.load(out)
    diff = (again.centroids - first.centroids).abs().max().item()
    assert diff <= 1e-5, f"`slimtune signature` must give the finish stage's signature; max diff {diff:.2e}"
