"""Choosing the next token of every row of a decode batch: greedy, or temperature + nucleus sampling.

For a row with temperature T > 0 and top_p p the token is drawn from

    q = softmax(logits / T),   keep token i iff  sum_{j ranked above i} q_j < p   (the nucleus; the most
                               likely token is always kept),   then draw from q restricted to the kept set.

The draw is by inverse CDF with one uniform number u ~ U[0, 1) per row, taken from that row's own
`torch.Generator`: token = the first i with cumsum(q_kept)_i > u * sum(q_kept). So a request with a
`seed` gets the same tokens whatever else shares its batch. Greedy rows (T == 0) take argmax(logits),
the first maximum, as `transformers`' greedy search does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How one request generates: the OpenAI request fields, checked by the server beforehand."""

    max_tokens: int
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()  # strings that end the reply (not included in it)
    seed: int | None = None
    ignore_eos: bool = False  # keep generating past the EOS token (vLLM's extension; for benchmarks)


def make_generator(seed: int | None) -> torch.Generator:
    """The row's random stream: seeded when the request gives a seed, else from the OS's entropy."""
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def nucleus_mask(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """True where a token lies outside the nucleus of its row. probs: (rows, vocab); top_p: (rows,)."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_above = sorted_probs.cumsum(-1) - sorted_probs  # (rows, vocab): probability ranked above each token
    outside_sorted = mass_above >= top_p[:, None]
    outside_sorted[:, 0] = False  # the most likely token always stays
    return torch.zeros_like(outside_sorted).scatter(-1, order, outside_sorted)


def next_tokens(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]) -> list[int]:
    """One token per row. logits: (rows, vocab); params and generators: one per row."""
    chosen = logits.argmax(dim=-1)  # (rows,)
    sampled = [i for i, p in enumerate(params) if p.temperature > 0]
    if sampled:
        index = torch.tensor(sampled, device=logits.device)
        temperature = torch.tensor([params[i].temperature for i in sampled], device=logits.device)
        probs = torch.softmax(logits[index].float() / temperature[:, None], dim=-1)  # (sampled rows, vocab)
        top_p = torch.tensor([params[i].top_p for i in sampled], device=logits.device)
        if (top_p < 1).any():
            probs = probs.masked_fill(nucleus_mask(probs, top_p), 0.0)
        cdf = probs.cumsum(-1)
        u = torch.cat([torch.rand(1, generator=generators[i]) for i in sampled]).to(logits.device)
        picks = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(-1)
        chosen[index] = picks.clamp(max=logits.shape[-1] - 1)
    return chosen.tolist()
