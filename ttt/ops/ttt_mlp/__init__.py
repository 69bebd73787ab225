from .api import ttt_mlp
from .chunk import chunk_ttt_mlp
from .reference import naive_recurrent_ttt_mlp

__all__ = ["ttt_mlp", "chunk_ttt_mlp", "naive_recurrent_ttt_mlp"]
