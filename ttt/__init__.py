"""ttt: Test-Time Training layers as a drop-in replacement for attention."""

from . import ops

__all__ = ["ops"]
__version__ = "0.1.0"
