"""Models over the mixer registry: the generic causal LM, the bidirectional encoder, the HF adapter.

The HuggingFace adapter (``ttt.models.hf``) imports ``transformers`` and is loaded only when used.
"""

from .config import PRESETS, LMConfig
from .lm import Block, CausalLM, build_mixer, sample, state_nbytes

__all__ = ["PRESETS", "Block", "CausalLM", "LMConfig", "build_mixer", "sample", "state_nbytes"]
