"""Expert quantization: group-wise packing in ONNX Runtime's layout, sensitivity, bit allocation."""

from moeopt.quant.allocate import Choice, Item, brute_force, solve_greedy, solve_ilp, solve_uniform
from moeopt.quant.apply import quantize_slot, slot_bytes, slot_params
from moeopt.quant.groupwise import Quantized, dequantize, fake_quantize, matrix_bytes, quantize
from moeopt.quant.sensitivity import Sensitivity, measure

__all__ = [
    "Choice", "Item", "Quantized", "Sensitivity", "brute_force", "dequantize", "fake_quantize", "matrix_bytes",
    "measure", "quantize", "quantize_slot", "slot_bytes", "slot_params", "solve_greedy", "solve_ilp",
    "solve_uniform",
]
