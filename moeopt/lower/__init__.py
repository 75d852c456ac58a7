"""Lowering an MoEModel to an ONNX Runtime artifact (see `artifact.lower`).

Modules: `onnx_routing` (router as ONNX ops), `onnx_experts` (MoE node / plain-op experts, quantized
hook), `onnx_quant` (quantized experts: one QMoE node per bitwidth group; registers itself on the hook
when this package is imported), `translate` (the custom op's translation), `decoder` (KV-cache
wrapper), `export` (torch.onnx.export), `seq2seq` (encoder-decoder as two graphs), `graph_passes`
(onnx-ir clean-ups), `profiles` (target session settings), `artifact` (the folder and its manifest).
"""

from moeopt.lower import onnx_quant  # noqa: F401  (registers the quantized lowering)
from moeopt.lower.artifact import lower

__all__ = ["lower"]
