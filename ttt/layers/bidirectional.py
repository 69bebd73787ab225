"""A bidirectional wrapper that turns any causal mixer into an encoder mixer.

Recipe of the TTT video model (ttt-video-dit, arXiv 2504.05298): the mixer runs over the
sequence, then over the reversed sequence, each pass followed by a gated residual with a learned
per-channel gate ``tanh(alpha)``, ``alpha`` initialised to 0.1 so that the new branch starts small:

    h  = x + tanh(alpha_f) * M_f(x)
    h' = h + tanh(alpha_b) * reverse(M_b(reverse(h)))
    y  = h' - x

``y`` is returned without ``x`` so that the wrapper is a drop-in mixer: the block adds its own residual
and gets ``h'``. By default both directions share one mixer (as the video model: "same layer, same
parameters"); ``shared=False`` gives the backward pass its own copy.

Shapes: B batch, T tokens, C model width.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from ttt.layers.protocol import check_input, check_mask


def reverse_real_tokens(x: Tensor, mask: Tensor | None) -> Tensor:
    """Reverse each row of ``x [B, T, ...]`` within its real tokens; right padding stays at the end.

    With ``mask [B, T]`` (right padding, row b has L_b real tokens) token i < L_b goes to L_b - 1 - i, so
    the reversed row is again right padded. The map is its own inverse.
    """
    length = x.shape[1]
    if mask is None:
        return x.flip(1)
    steps = torch.arange(length, device=x.device)
    lengths = mask.sum(dim=1, keepdim=True)  # [B, 1]
    index = torch.where(steps < lengths, lengths - 1 - steps, steps)  # [B, T]
    index = index.view(*index.shape, *([1] * (x.dim() - 2))).expand_as(x)
    return x.gather(1, index)


class Bidirectional(nn.Module):
    """Forward pass then reversed pass of a causal mixer, combined with tanh gates (encoders only).

    Args:
        mixer: a causal mixer following the ``ttt.layers`` protocol, e.g. ``TTTLinear(dim=..., ...)``.
        shared: use ``mixer`` for both directions. Default: ``True`` (ttt-video-dit). ``False`` gives the
            reversed pass a deep copy (same initial values, trained separately).
        gate_init: initial ``alpha`` of both gates. Default: ``0.1`` (ttt-video-dit).

    Build one from the registry with :meth:`from_name`.

    Examples::

        >>> import torch
        >>> from ttt.layers import Bidirectional
        >>> encoder_mixer = Bidirectional.from_name("ttt_linear", dim=64, num_heads=4)
        >>> x, mask = torch.randn(2, 12, 64), torch.arange(12) < torch.tensor([[12], [7]])
        >>> y, _ = encoder_mixer(x, mask=mask)
        >>> y.shape
        torch.Size([2, 12, 64])
    """

    def __init__(self, mixer: nn.Module, *, shared: bool = True, gate_init: float = 0.1) -> None:
        super().__init__()
        dim = getattr(mixer, "dim", None)
        if not isinstance(dim, int):
            raise TypeError(f"Bidirectional needs a mixer with an integer .dim, got {type(mixer).__name__}")
        self.dim, self.shared = dim, shared
        self.forward_mixer = mixer
        self.backward_mixer = mixer if shared else copy.deepcopy(mixer)
        self.gate_forward = nn.Parameter(torch.full((dim,), float(gate_init)))
        self.gate_backward = nn.Parameter(torch.full((dim,), float(gate_init)))

    @classmethod
    def from_name(cls, name: str, *, dim: int, num_heads: int, shared: bool = True, gate_init: float = 0.1,
                  **mixer_kwargs) -> Bidirectional:  # fmt: skip
        """``Bidirectional(make_mixer(name, dim, num_heads, mixer_kwargs), ...)``."""
        from ttt.layers import make_mixer

        return cls(make_mixer(name, dim, num_heads, mixer_kwargs), shared=shared, gate_init=gate_init)

    def init_state(self, batch_size: int, device=None, dtype=None) -> None:
        """An encoder carries no state between calls: always ``None``."""
        return None

    def forward(self, x: Tensor, state: None = None, mask: Tensor | None = None) -> tuple[Tensor, None]:
        """Encode a whole sequence.

        Args:
            x: ``[B, T, C]``.
            state: must be ``None`` (a bidirectional pass needs the whole sequence at once).
            mask: ``[B, T]`` bool, True = real token (right padding). Only the real tokens are reversed,
                so a padded batch gives, at its real positions, the outputs of the unpadded sequences
                (with ``causal=False`` TTT mixers too, at any real length).

        Returns:
            ``(y [B, T, C], None)``.
        """
        check_input("Bidirectional", x, self.dim)
        mask = check_mask("Bidirectional", mask, x)
        if state is not None:
            raise ValueError("Bidirectional encodes whole sequences; it takes no state (pass state=None)")
        y_forward, _ = self.forward_mixer(x, mask=mask)
        h = x + torch.tanh(self.gate_forward) * y_forward
        y_backward, _ = self.backward_mixer(reverse_real_tokens(h, mask), mask=mask)
        h = h + torch.tanh(self.gate_backward) * reverse_real_tokens(y_backward, mask)
        return h - x, None

    def step(self, x_t: Tensor, state: None) -> tuple[Tensor, None]:
        """Not available: the reversed pass needs tokens that have not arrived yet."""
        raise RuntimeError("Bidirectional mixers see the future; they cannot decode token by token")
