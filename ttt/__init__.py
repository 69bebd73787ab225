"""ttt: Test-Time Training layers as a drop-in replacement for attention."""

from . import ops
from .ops import attention

__all__ = ["attention", "ops"]
__version__ = "0.1.0"
