"""4-bit NF4 quantization (QLoRA): the quantizer and the frozen 4-bit linear layer built on it."""

from slimtune.quant.linear4bit import Linear4bit, dequantize_model, load_bnb_4bit_state, quantize_model
from slimtune.quant.nf4 import DYNAMIC_MAP, NF4_CODEBOOK, NF4State, dequantize_nf4, quantize_nf4

__all__ = [
    "DYNAMIC_MAP",
    "NF4_CODEBOOK",
    "Linear4bit",
    "NF4State",
    "dequantize_model",
    "dequantize_nf4",
    "load_bnb_4bit_state",
    "quantize_model",
    "quantize_nf4",
]
