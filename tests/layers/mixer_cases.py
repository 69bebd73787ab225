"""Small float64 configurations of every mixer, shared by the protocol tests.

``CASES`` maps a case id to the registry name plus constructor kwargs; :func:`make` builds it in float64
with a fixed seed. ``EXACT_AFTER_PADDING``: cases whose state after a padded forward continues exactly
like the unpadded sequence.
"""

from __future__ import annotations

import torch

from ttt.layers import MIXERS

DIM, HEADS = 24, 3


def build(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return MIXERS[name](dim=DIM, num_heads=HEADS, **kwargs).double()


CASES: dict[str, dict] = {
    "attention": dict(name="attention"),
    "attention_gqa": dict(name="attention", num_kv_heads=1),
    "swa": dict(name="swa", window=5),
    "attention_conv": dict(name="attention", conv_size=4, num_kv_heads=1),
    "swa_conv": dict(name="swa", window=5, conv_size=3),
    "swa_sink": dict(name="swa", window=4, sink=2, num_kv_heads=1),
    "swa_far_gate": dict(name="swa", window=4, sink=1, num_kv_heads=1, far_gate=True),
    "ttt_linear": dict(name="ttt_linear", mini_batch_size=4),
    "ttt_linear_m": dict(name="ttt_linear", mini_batch_size=4, share_qk=True, use_gate=True),
    "ttt_mlp": dict(name="ttt_mlp", mini_batch_size=4),
    "ttt_mlp_m": dict(name="ttt_mlp", mini_batch_size=4, share_qk=True, use_gate=True),
    "deltanet": dict(name="deltanet", chunk_size=8),
    "gated_deltanet": dict(name="gated_deltanet", chunk_size=8),
    "gated_deltanet_v2": dict(name="gated_deltanet", chunk_size=8, expand_v=2.0, conv_size=None),
    "kda": dict(name="kda", chunk_size=8),
    "longhorn": dict(name="longhorn", chunk_size=8),
    "comba": dict(name="comba", chunk_size=8),
    "linear_attention": dict(name="linear_attention", chunk_size=8),
    "retnet": dict(name="retnet", chunk_size=8),
    "mamba2": dict(name="mamba2", chunk_size=8, d_state=8),
    "gla": dict(name="gla", chunk_size=8),
    "hgrn2": dict(name="hgrn2", chunk_size=8),
    "rwkv7": dict(name="rwkv7", chunk_size=8),
    "hebbian": dict(name="hebbian", chunk_size=8),
    "kv_binding": dict(name="kv_binding", chunk_size=8),
    "kv_binding_momentum": dict(name="kv_binding", chunk_size=8, momentum=0.5, hidden_mult=2),
    "windowed": dict(name="windowed", window=5, inner_kwargs=dict(mini_batch_size=4), num_kv_heads=1),
    "windowed_gdn": dict(
        name="windowed", window=5, sink=1, inner="gated_deltanet", inner_kwargs=dict(chunk_size=8)
    ),
    "windowed_far_gate": dict(
        name="windowed", window=3, inner="deltanet", inner_kwargs=dict(chunk_size=8), far_gate=True
    ),
}

# TTT states after padding are documented as not continuable (padding advances the mini-batch slot)
EXACT_AFTER_PADDING = {
    case
    for case, spec in CASES.items()
    if not spec["name"].startswith("ttt_")
    and spec.get("inner", "ttt_linear" if spec["name"] == "windowed" else "")[:4] != "ttt_"
}


def make(case: str) -> torch.nn.Module:
    spec = dict(CASES[case])
    return build(spec.pop("name"), **spec)
