"""Base-weight memory of NF4 (QLoRA) on the bundled model: bytes per parameter of the quantized layers.

    python bench/nf4_bytes.py [--model smollm2-135m] [--blocksize 64]

Counts the packed 4-bit codes plus every scaling constant (absmax codes, nested absmax, offset), for
every linear layer but the LM head (which QLoRA keeps in 16 bits), and the round-trip error.
"""

from __future__ import annotations

import argparse

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--blocksize", type=int, default=64)
    args = parser.parse_args()

    from slimtune.models import load_model
    from slimtune.quant import Linear4bit, quantize_model

    for double_quant in (True, False):
        model, _, _ = load_model(args.model)
        originals = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        quantize_model(model, skip=("lm_head",), blocksize=args.blocksize, double_quant=double_quant)
        layers = {n: m for n, m in model.named_modules() if isinstance(m, Linear4bit)}
        params = sum(m.in_features * m.out_features for m in layers.values())
        nbytes = sum(m.weight_bytes() for m in layers.values())
        error = sum((m.dequantized_weight(torch.float32) - originals[n]).abs().sum().item()
                    for n, m in layers.items()) / params
        scale = sum(w.abs().sum().item() for n, w in originals.items() if n in layers) / params
        print(f"NF4 b{args.blocksize} {'double quant' if double_quant else 'no double quant'}: "
              f"{nbytes / params:.4f} bytes/param over {params:,} params in {len(layers)} layers "
              f"(bf16: 2.0, fp32: 4.0); mean |W - dequant(W)| = {error:.2e} "
              f"({100 * error / scale:.1f}% of mean |W|; NF4 on N(0,1) gives 9.1%)")

if __name__ == "__main__":
    main()
