"""Triton TTT-MLP (private; reached through ``ttt.ops.ttt_mlp(impl="triton")``): fused forward kernel
and a two-kernel backward (``chunk_fwd.py``, ``chunk_bwd.py``; derivation in ``README.md``)."""

from .function import ChunkTTTMLPFunction, decode_ttt_mlp, triton_ttt_mlp

__all__ = ["ChunkTTTMLPFunction", "decode_ttt_mlp", "triton_ttt_mlp"]
