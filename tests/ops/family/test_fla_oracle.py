"""External oracle: fla-core 0.6.0's pure-PyTorch references (``fla/ops/*/naive.py``) on CPU.

fla-core is not a dependency. The test finds it at ``$TTT_FLA_PATH`` (a folder holding the ``fla``
package, e.g. the unzipped wheel of ``pip download fla-core==0.6.0 --no-deps``) or as an installed
package, and loads only the ``naive.py`` files (importing ``fla`` itself needs a GPU driver for most
of its modules). It skips when neither exists or ``einops`` (fla's one dependency) is missing.

fla's references compute in float32; ours run in float64 and the budget is float32 round-off.
Layout: fla uses [B, T, H, D] except the delta_rule and dplr references ([B, H, T, D]).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import ttt.ops.family as fam
from ttt.testing import load_script

pytest.importorskip("einops")


def _fla_ops_dir() -> Path | None:
    root = os.environ.get("TTT_FLA_PATH")
    if root:
        path = Path(root) / "fla" / "ops"
        return path if path.is_dir() else None
    spec = importlib.util.find_spec("fla")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "ops"


OPS = _fla_ops_dir()
pytestmark = pytest.mark.skipif(OPS is None, reason="fla-core not found (set TTT_FLA_PATH or install it)")


def _naive(rel: str):
    return load_script(OPS / rel / "naive.py", f"_fla_naive_{rel.replace('/', '_')}")


B, H, T, D = 2, 2, 64, 16  # T a multiple of fla's chunk sizes (its chunk references require it)


def _bthd(x):
    return x.transpose(1, 2).float()


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v, p = torch.randn(4, B, H, T, D, generator=g, dtype=torch.float64).unbind(0)
    return {
        "q": q,
        "k": F.normalize(k, dim=-1),
        "v": v,
        "p": F.normalize(p, dim=-1),
        "beta": torch.rand(B, H, T, generator=g, dtype=torch.float64),
        "beta_vec": torch.rand(B, H, T, D, generator=g, dtype=torch.float64),
        "log_alpha": -0.2 * torch.rand(B, H, T, generator=g, dtype=torch.float64),
        "log_alpha_vec": -0.2 * torch.rand(B, H, T, D, generator=g, dtype=torch.float64),
        "S0": torch.randn(B, H, D, D, generator=g, dtype=torch.float64),
    }


def _close(ours, theirs, what):
    ours = ours.double()
    theirs = theirs.double()
    err = (ours - theirs).abs().max().item()
    budget = 1e-4 * max(1.0, ours.abs().max().item())  # float32 reference
    assert err < budget, f"{what}: max error {err:.3g} > {budget:.3g}"
    print(f"fla oracle {what}: max abs err {err:.2e} (max |x| {ours.abs().max().item():.2f})")
    return err


def test_deltanet_vs_fla_delta_rule():
    x = _inputs()
    m = _naive("delta_rule")
    o, S = fam.deltanet(
        x["q"], x["k"], x["v"], beta=x["beta"], initial_state=x["S0"], output_final_state=True
    )
    o_f, S_f = m.delta_rule_recurrence(*(t.float() for t in (x["q"], x["k"], x["v"], x["beta"])),
                                       initial_state=x["S0"].float(), output_final_state=True)  # fmt: skip
    _close(o, o_f, "recurrent o")
    _close(S, S_f, "recurrent S")
    o0, S0 = fam.deltanet(x["q"], x["k"], x["v"], beta=x["beta"], output_final_state=True)
    o_c, S_c = m.delta_rule_chunkwise(
        *(t.float() for t in (x["q"], x["k"], x["v"], x["beta"])), chunk_size=32
    )
    _close(o0, o_c, "chunk o")
    _close(S0, S_c, "chunk S")


@pytest.mark.parametrize("form", ["recurrent", "chunk"])
def test_gated_deltanet_vs_fla(form):
    x = _inputs(1)
    m = _naive("gated_delta_rule")
    o, S = fam.gated_deltanet(x["q"], x["k"], x["v"], beta=x["beta"], log_alpha=x["log_alpha"],
                              initial_state=x["S0"], output_final_state=True)  # fmt: skip
    q, k, v, beta, g = (_bthd(t) if t.dim() == 4 else t.transpose(1, 2).float()
                        for t in (x["q"], x["k"], x["v"], x["beta"], x["log_alpha"]))  # fmt: skip
    if form == "recurrent":
        o_f, S_f = m.naive_recurrent_gated_delta_rule(q, k, v, beta, g, initial_state=x["S0"].float(),
                                                      output_final_state=True)  # fmt: skip
    else:
        o_f, S_f = m.naive_chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=16,
                                                  initial_state=x["S0"].float(), output_final_state=True)  # fmt: skip
    _close(o, o_f.transpose(1, 2), f"{form} o")
    _close(S, S_f, f"{form} S")


@pytest.mark.parametrize("form", ["recurrent", "chunk"])
def test_kda_vs_fla(form):
    x = _inputs(2)
    m = _naive("kda")
    o, S = fam.kda(x["q"], x["k"], x["v"], beta=x["beta"], log_alpha=x["log_alpha_vec"],
                   initial_state=x["S0"], output_final_state=True)  # fmt: skip
    q, k, v, g = (_bthd(t) for t in (x["q"], x["k"], x["v"], x["log_alpha_vec"]))
    beta = x["beta"].transpose(1, 2).float()
    fn = m.naive_recurrent_kda if form == "recurrent" else m.naive_chunk_kda
    o_f, S_f = fn(q, k, v, g, beta, initial_state=x["S0"].float(), output_final_state=True)
    _close(o, o_f.transpose(1, 2), f"{form} o")
    _close(S, S_f, f"{form} S")


def test_comba_vs_fla_and_their_disagreement():
    """fla's chunk reference computes the Comba paper's ``(alpha - beta k p^T) S``; its recurrent
    reference decays first, ``(I - beta k p^T) alpha S``, which is our comba with ``p -> alpha p``."""
    x = _inputs(3)
    m = _naive("comba")
    kw = dict(beta=x["beta"], log_alpha=x["log_alpha"], initial_state=x["S0"], output_final_state=True)
    o, S = fam.comba(x["q"], x["k"], x["v"], p=x["p"], **kw)
    q, k, v, p = (_bthd(t) for t in (x["q"], x["k"], x["v"], x["p"]))
    beta, g = (t.transpose(1, 2).float() for t in (x["beta"], x["log_alpha"]))
    o_c, S_c = m.naive_chunk_comba(q, k, v, p, g, beta, chunk_size=16, initial_state=x["S0"].float(),
                                   output_final_state=True)  # fmt: skip
    _close(o, o_c.transpose(1, 2), "chunk o")
    _close(S, S_c, "chunk S")
    o_r, S_r = m.naive_recurrent_comba(
        q, k, v, p, beta, g, initial_state=x["S0"].float(), output_final_state=True
    )
    gap = (o - o_r.transpose(1, 2).double()).abs().max().item()
    print(f"fla oracle comba: naive_recurrent_comba vs the paper's form: max abs diff {gap:.2e}")
    assert gap > 1e-2, "fla's two comba references were expected to disagree"
    o_d, S_d = fam.comba(x["q"], x["k"], x["v"], p=x["log_alpha"].exp().unsqueeze(-1) * x["p"], **kw)
    _close(o_d, o_r.transpose(1, 2), "decay-first recurrent o")
    _close(S_d, S_r, "decay-first recurrent S")


def test_gla_and_hgrn2_vs_fla_gla():
    x = _inputs(4)
    m = _naive("gla")
    o, S = fam.gla(
        x["q"], x["k"], x["v"], log_alpha=x["log_alpha_vec"], initial_state=x["S0"], output_final_state=True
    )
    q, k, v, g = (_bthd(t) for t in (x["q"], x["k"], x["v"], x["log_alpha_vec"]))
    o_f, S_f = m.naive_recurrent_gla(q, k, v, g, initial_state=x["S0"].float(), output_final_state=True)
    _close(o, o_f.transpose(1, 2), "gla o")
    _close(S, S_f, "gla S")
    # HGRN2 is GLA with the key tied to the forget gate (fla's HGRN2 layer does exactly this)
    o2, S2 = fam.hgrn2(
        x["q"], x["v"], log_alpha=x["log_alpha_vec"], initial_state=x["S0"], output_final_state=True
    )
    o_h, S_h = m.naive_recurrent_gla(
        q, -torch.expm1(g), v, g, initial_state=x["S0"].float(), output_final_state=True
    )
    _close(o2, o_h.transpose(1, 2), "hgrn2 o")
    _close(S2, S_h, "hgrn2 S")


@pytest.mark.parametrize("form", ["recurrent", "chunk"])
def test_mamba2_vs_fla_simple_gla(form):
    """Mamba2 / scalar-decay SSD is fla's simple_gla with the input step folded into the key."""
    x = _inputs(5)
    m = _naive("simple_gla")
    o, S = fam.mamba2(x["q"], x["k"], x["v"], beta=x["beta"], log_alpha=x["log_alpha"],
                      initial_state=x["S0"], output_final_state=True)  # fmt: skip
    q, k, v = (_bthd(t) for t in (x["q"], x["k"] * x["beta"].unsqueeze(-1), x["v"]))
    g = x["log_alpha"].transpose(1, 2).float()
    if form == "recurrent":
        o_f, S_f = m.naive_recurrent_simple_gla(
            q, k, v, g, initial_state=x["S0"].float(), output_final_state=True
        )
    else:
        o_f, S_f = m.naive_chunk_simple_gla(q, k, v, g, initial_state=x["S0"].float(), output_final_state=True,
                                            chunk_size=16)  # fmt: skip
    _close(o, o_f.transpose(1, 2), f"{form} o")
    _close(S, S_f, f"{form} S")


def test_linear_attention_vs_fla():
    x = _inputs(6)
    m = _naive("linear_attn")
    o, S = fam.linear_attention(x["q"], x["k"], x["v"], initial_state=x["S0"], output_final_state=True)
    q, k, v = (_bthd(t) for t in (x["q"], x["k"], x["v"]))
    o_f, S_f = m.naive_recurrent_linear_attn(q, k, v, initial_state=x["S0"].float(), output_final_state=True)
    _close(o, o_f.transpose(1, 2), "o")
    _close(S, S_f, "S")


def test_rwkv7_vs_fla_dplr():
    """fla's DPLR reference: ``S_t = Diag(exp(gk)) S + b (a^T S) + k v^T``; RWKV-7 is a = k_hat,
    b = -(beta * k_hat) (fla's rwkv7 op builds the same a, b from kappa-hat and the in-context rate)."""
    x = _inputs(7)
    m = _naive("generalized_delta_rule/dplr")
    k_hat = x["p"]
    o, S = fam.rwkv7(x["q"], x["k"], x["v"], beta=x["beta_vec"], k_hat=k_hat, log_alpha=x["log_alpha_vec"],
                     initial_state=x["S0"], output_final_state=True)  # fmt: skip
    args = (x["q"], x["k"], x["v"], k_hat, -x["beta_vec"] * k_hat, x["log_alpha_vec"])
    o_f, S_f = m.dplr_recurrence(
        *(t.float() for t in args), initial_state=x["S0"].float(), output_final_state=True
    )
    _close(o, o_f, "o")
    _close(S, S_f, "S")
