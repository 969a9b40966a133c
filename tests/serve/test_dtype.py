"""`slimtune serve --dtype bfloat16`: the base's weights in bf16 (adapters beside them in fp32), and a
greedy reply equal to what transformers' own `generate` gives with the same bf16 model and adapter."""

from __future__ import annotations

import time

import torch

from slimtune.methods.multi import AdapterSet
from slimtune.models import load_model
from slimtune.serve.engine import Engine, Finished, Generation
from slimtune.serve.sampling import SamplingParams
from slimtune.serve.server import build_app


def test_bf16_weights_and_greedy_reply_equal_generate(tiny_model_dir, adapter_root):
    app = build_app(str(tiny_model_dir), {"alpha": "alpha"}, adapter_root=adapter_root, device="cpu",
                    dtype="bfloat16", route_name=None)
    engine: Engine = app.state.server.engine
    assert engine.model.lm_head.weight.dtype == torch.bfloat16, "--dtype bfloat16 casts the base's weights"

    reference, tokenizer, _ = load_model(str(tiny_model_dir))
    reference = reference.to(torch.bfloat16).eval()
    adapters = AdapterSet(reference)
    adapters.load(adapter_root / "alpha", "alpha")
    adapters.set_active("alpha")
    ids = list(tokenizer("The cat sat on")["input_ids"])
    with torch.no_grad():
        expected = reference.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                      do_sample=False, max_new_tokens=12, min_new_tokens=12,
                                      pad_token_id=tokenizer.eos_token_id)[0, len(ids):].tolist()

    events = []
    generation = Generation(ids, "alpha", SamplingParams(max_tokens=12, temperature=0, ignore_eos=True), events.append)
    engine.start()
    try:
        engine.submit(generation)
        deadline = time.monotonic() + 60
        while not any(isinstance(e, Finished) for e in events):
            assert time.monotonic() < deadline, "the engine did not finish in time"
            time.sleep(0.01)
    finally:
        engine.stop()
    assert generation.text.ids == expected, "bf16 serving must give the greedy tokens of generate on the bf16 model"
