"""Triton TTT-MLP (private; reached through ``ttt.ops.ttt_mlp(impl="triton")``): fused forward kernel,
backward by per-mini-batch recomputation in PyTorch (see ``function.py``)."""

from .function import ChunkTTTMLPFunction, triton_ttt_mlp

__all__ = ["ChunkTTTMLPFunction", "triton_ttt_mlp"]
