"""Fused Triton kernels for TTT-Linear (private; reached through ``ttt.ops.ttt_linear(impl="triton")``)."""

from .function import ChunkTTTLinearFunction, decode_ttt_linear, triton_ttt_linear

__all__ = ["ChunkTTTLinearFunction", "decode_ttt_linear", "triton_ttt_linear"]
