from .api import ttt_linear
from .chunk import chunk_ttt_linear
from .recurrent import recurrent_ttt_linear
from .reference import naive_recurrent_ttt_linear

__all__ = ["ttt_linear", "chunk_ttt_linear", "recurrent_ttt_linear", "naive_recurrent_ttt_linear"]
