"""Pick the adapter for a prompt: routing signatures of runs and the router that compares prompts with them.

A prompt's representation is the base model's own hidden state at layer `layer` (two thirds of the way
up), averaged over the tokens of the prompt's message texts (no chat template: its fixed system text
would make every prompt look alike; the first token is left out, since models park huge "attention
sink" activations there), then scaled to unit length.

A run's *signature* (`routing_signature.safetensors` beside its adapter) summarises its training prompts
(up to `MAX_PROMPTS`, evenly spaced over the file): the unit mean of their representations and
`k` centroids (spherical k-means, cosine similarity, seeded), plus the threshold the router applies: the
`THRESHOLD_QUANTILE` quantile of the training prompts' own scores minus `THRESHOLD_MARGIN`, where a
prompt's score against a signature is its largest cosine similarity to the centroids. It needs the base
model only, no training: the finish stage writes it after every run, and `slimtune signature RUN`
(`compute_signature`) writes it for existing runs.

The router scores a prompt against every signature, takes the best, and answers the base model (None)
when that best score is under the run's threshold (or under the `threshold` given).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from slimtune.atomic import save_safetensors_atomically
from slimtune.data import Message
from slimtune.data.images import message_text
from slimtune.errors import AdapterError

SIGNATURE_NAME = "routing_signature.safetensors"
MAX_PROMPTS = 256
CENTROIDS = 4
THRESHOLD_QUANTILE = 0.02
THRESHOLD_MARGIN = 0.05


def prompt_text(prompt: str | Sequence[Message]) -> str:
    """The text a prompt is represented by: a string itself, else its messages' contents before the reply
    (a conversation ending with the assistant's answer, as training data does, loses that answer)."""
    if isinstance(prompt, str):
        return prompt
    messages = list(prompt)
    if messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    return "\n\n".join(message_text(m) for m in messages if m["role"] != "assistant")


def routing_layer(model: nn.Module) -> int:
    """Which hidden state represents prompts: two thirds of the way up the model."""
    return max(1, (2 * int(model.config.get_text_config().num_hidden_layers)) // 3)  # a VL model: its LM's


@torch.no_grad()
def represent(model: nn.Module, tokenizer, texts: Sequence[str], layer: int, batch_size: int = 16,
              max_tokens: int = 256) -> torch.Tensor:
    """Unit vectors (len(texts), hidden) of the texts (see the module docstring); `model` must be the base."""
    device = next(model.parameters()).device
    vectors = []
    for start in range(0, len(texts), batch_size):
        ids = [tokenizer(t, add_special_tokens=False)["input_ids"][:max_tokens] or [tokenizer.eos_token_id]
               for t in texts[start: start + batch_size]]
        width = max(len(i) for i in ids)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        input_ids = torch.tensor([i + [pad] * (width - len(i)) for i in ids], device=device)
        mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in ids], device=device)
        hidden = model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True,
                       use_cache=False).hidden_states[layer].float()  # (batch, width, hidden)
        weights = mask.float()
        weights[:, 0] = torch.where(mask.sum(1) > 1, 0.0, 1.0)  # leave out the sink token when there are others
        pooled = (hidden * weights.unsqueeze(-1)).sum(1) / weights.sum(1, keepdim=True)
        vectors.append(nn.functional.normalize(pooled, dim=-1).cpu())
    return torch.cat(vectors)


def spherical_kmeans(vectors: torch.Tensor, k: int, seed: int = 0, iterations: int = 25) -> torch.Tensor:
    """k unit centroids of unit `vectors` (n, d) under cosine similarity; k-means++ start, seeded."""
    generator = torch.Generator().manual_seed(seed)
    k = min(k, vectors.shape[0])
    centroids = [vectors[torch.randint(vectors.shape[0], (1,), generator=generator).item()]]
    for _ in range(1, k):
        distance = (1 - vectors @ torch.stack(centroids).T).min(dim=1).values.clamp(min=0)
        if distance.sum() <= 0:
            break
        centroids.append(vectors[torch.multinomial(distance, 1, generator=generator).item()])
    centers = torch.stack(centroids)
    for _ in range(iterations):
        assign = (vectors @ centers.T).argmax(dim=1)
        updated = torch.stack([
            nn.functional.normalize(vectors[assign == j].sum(0), dim=0) if (assign == j).any() else centers[j]
            for j in range(centers.shape[0])])
        if torch.allclose(updated, centers):
            break
        centers = updated
    return centers


@dataclass
class Signature:
    """A run's routing signature (see the module docstring)."""

    mean: torch.Tensor  # (hidden,)
    centroids: torch.Tensor  # (k, hidden)
    threshold: float
    layer: int
    base_model: str
    prompts: int

    def score(self, vectors: torch.Tensor) -> torch.Tensor:
        """Each unit vector's largest cosine similarity to the centroids: (n,)."""
        return (vectors @ self.centroids.T).max(dim=1).values

    def save(self, run_dir: str | Path) -> Path:
        metadata = {"threshold": repr(self.threshold), "layer": str(self.layer), "base_model": self.base_model,
                    "prompts": str(self.prompts), "format": "pt"}
        return save_safetensors_atomically({"mean": self.mean.clone(), "centroids": self.centroids.clone()},
                                           Path(run_dir) / SIGNATURE_NAME, metadata=metadata)

    @classmethod
    def load(cls, run_dir: str | Path) -> Signature:
        from safetensors import safe_open

        path = Path(run_dir) / SIGNATURE_NAME
        if not path.is_file():
            raise AdapterError(f"'{run_dir}' has no {SIGNATURE_NAME}: compute it with `slimtune signature {run_dir}`")
        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as handle:
            meta = handle.metadata() or {}
        try:
            return cls(tensors["mean"], tensors["centroids"], float(meta["threshold"]), int(meta["layer"]),
                       meta.get("base_model", ""), int(meta.get("prompts", 0)))
        except (KeyError, ValueError) as exc:
            raise AdapterError(f"{path} is not a routing signature ({exc}): recompute it with "
                               f"`slimtune signature {run_dir}`") from None


def build_signature(model: nn.Module, tokenizer, prompts: Sequence[str | Sequence[Message]], base_model: str,
                    k: int = CENTROIDS, seed: int = 0) -> Signature:
    """The signature of `prompts` (a run's training prompts) on the base `model`."""
    if not prompts:
        raise AdapterError("no prompts to build a routing signature from")
    step = max(1, math.ceil(len(prompts) / MAX_PROMPTS))
    texts = [prompt_text(p) for p in list(prompts)[::step]]
    layer = routing_layer(model)
    vectors = represent(model, tokenizer, texts, layer)
    centroids = spherical_kmeans(vectors, k, seed)
    own = (vectors @ centroids.T).max(dim=1).values
    threshold = torch.quantile(own, THRESHOLD_QUANTILE).item() - THRESHOLD_MARGIN
    mean = nn.functional.normalize(vectors.mean(0), dim=0)
    return Signature(mean, centroids, threshold, layer, base_model, len(texts))


def compute_signature(run_dir: str | Path, data: str | Path | None = None, model: str | None = None) -> Path:
    """Write `run_dir`'s routing signature from its training data (`data.train` of its config, or `data`),
    on its base model; returns the file. Needs no training: a run's adapter is not even read."""
    from slimtune.data import load_dataset
    from slimtune.methods.base import load_base
    from slimtune.runs import base_model_name, run_config

    run_dir = Path(run_dir)
    cfg = run_config(run_dir)
    source = data or (cfg.data.train if cfg else None)
    if source is None:
        raise AdapterError(f"'{run_dir}' has no run config naming its training data: pass --data FILE")
    base = base_model_name(run_dir, model)
    base_model, tokenizer = load_base(base, bool(cfg and cfg.quantized))
    dataset = load_dataset(source, tokenizer, max_length=cfg.data.max_length if cfg else 1024)
    signature = build_signature(base_model.eval(), tokenizer, dataset.conversations, base)
    return signature.save(run_dir)


@dataclass(frozen=True)
class Route:
    """The router's answer: `name` (None: the base model), its score, and every candidate's score."""

    name: str | None
    score: float
    scores: dict[str, float]


class Router:
    """Scores prompts against the signatures of named runs on one base model (see the module docstring).

    `model` must run as the base (adapters off) when `route` is called; `threshold` overrides every run's own.
    """

    def __init__(self, model: nn.Module, tokenizer, signatures: dict[str, Signature],
                 threshold: float | None = None) -> None:
        layers = {s.layer for s in signatures.values()}
        if len(layers) > 1:
            raise AdapterError(f"the signatures use different layers {sorted(layers)}: were they computed on "
                               "different base models? recompute them with `slimtune signature`")
        self.model, self.tokenizer, self.signatures, self.threshold = model, tokenizer, signatures, threshold

    def route_many(self, prompts: Sequence[str | Sequence[Message]]) -> list[Route]:
        if not self.signatures:
            return [Route(None, float("nan"), {}) for _ in prompts]
        layer = next(iter(self.signatures.values())).layer
        vectors = represent(self.model, self.tokenizer, [prompt_text(p) for p in prompts], layer)
        scores = {name: s.score(vectors) for name, s in self.signatures.items()}
        routes = []
        for i in range(len(prompts)):
            row = {name: float(v[i]) for name, v in scores.items()}
            best = max(row, key=row.get)
            threshold = self.threshold if self.threshold is not None else self.signatures[best].threshold
            routes.append(Route(best if row[best] >= threshold else None, row[best], row))
        return routes

    def route(self, prompt: str | Sequence[Message]) -> Route:
        return self.route_many([prompt])[0]


def route(prompt: str | Sequence[Message], runs: Sequence[str | Path] | dict[str, str | Path],
          model: str | None = None, threshold: float | None = None) -> Route:
    """The run for `prompt` among `runs` (paths, named by their directory name, or name -> path); `name` None
    means the base model. Loads the base model each call: for many prompts build a `Router` once."""
    from slimtune.methods.base import load_base
    from slimtune.runs import base_model_name

    named = dict(runs) if isinstance(runs, dict) else {Path(r).name: r for r in runs}
    signatures = {name: Signature.load(path) for name, path in named.items()}
    bases = {base_model_name(path, model) for path in named.values()}
    if len(bases) > 1:
        raise AdapterError(f"the runs belong to different base models ({', '.join(sorted(bases))}): route among "
                           "runs of one base model")
    base_model, tokenizer = load_base(bases.pop(), False)
    return Router(base_model.eval(), tokenizer, signatures, threshold).route(prompt)


__all__ = ["SIGNATURE_NAME", "Route", "Router", "Signature", "build_signature", "compute_signature", "prompt_text",
           "represent", "route"]
