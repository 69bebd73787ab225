from . import inner
from .api import ttt_general

__all__ = ["ttt_general", "inner"]
