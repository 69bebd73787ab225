"""Small shared nn blocks used by the layers and models (pure PyTorch)."""

from ttt.modules.conv import ShortConv, TokenShift
from ttt.modules.norm import GatedRMSNorm, RMSNorm
from ttt.modules.rotary import apply_rotary, rotary_cos_sin
from ttt.modules.swiglu import SwiGLU, swiglu_hidden_dim

__all__ = [
    "GatedRMSNorm",
    "RMSNorm",
    "ShortConv",
    "TokenShift",
    "SwiGLU",
    "apply_rotary",
    "rotary_cos_sin",
    "swiglu_hidden_dim",
]
