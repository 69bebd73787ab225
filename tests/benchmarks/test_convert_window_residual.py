"""benchmarks/convert_window_residual.py on a tiny random Llama: its float64 attention equals the library's
full attention and its window + sinks (``swa``), the residual decomposes as ``lam (a_f - a_w)``, and the
explained shares are fractions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ttt.testing import load_script

pytest.importorskip("transformers")

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "convert_window_residual.py"


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    from ttt.models.llama import load_llama
    from ttt.testing import tiny_llama

    path = tmp_path_factory.mktemp("llama")
    tiny_llama(path, n_layers=2)
    return load_llama(path)[0], path


def _o_proj_input(mixer, h):
    seen = []
    hook = mixer.o_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        mixer(h)
    hook.remove()
    return seen[0]


def test_the_probes_attention_is_the_librarys(teacher):
    from ttt.layers import SlidingWindowAttention
    from ttt.layers.protocol import merge_heads

    model, _ = teacher
    script = load_script(SCRIPT)
    mixer = model.blocks[1].mixer
    h = torch.randn(2, 20, model.config.dim, generator=torch.Generator().manual_seed(0))
    parts = script.attention_parts(mixer, h, window=5, sink=2)
    torch.testing.assert_close(merge_heads(parts["a"]).float(), _o_proj_input(mixer, h), rtol=1e-4, atol=1e-5)
    swa = SlidingWindowAttention(
        model.config.dim, mixer.num_heads, window=5, sink=2, num_kv_heads=mixer.num_kv_heads,
        rope_theta=mixer.rope_theta,
    )  # fmt: skip
    swa.load_state_dict(mixer.state_dict())
    torch.testing.assert_close(merge_heads(parts["a_w"]).float(), _o_proj_input(swa, h), rtol=1e-4, atol=1e-5)
    lam = torch.sigmoid(parts["lse_f"] - parts["lse_w"])[..., None]
    torch.testing.assert_close(parts["a"], (1 - lam) * parts["a_w"] + lam * parts["a_f"])
    stats = script.residual_stats(parts)
    assert 0 < stats["residual_share"] < 1
    assert all(s <= 1 for s in (stats["scaled_window"], stats["lse_gate"]))
    assert stats["scaled_window"] >= stats["lse_gate"] - 1e-9  # the per-token scalar bounds any gate
    assert stats["lse_gate"] >= stats["mass_gate"]  # the best beta is at least as good as the mass start


def test_main_writes_the_table(teacher, tmp_path, capsys):
    _, path = teacher
    (tmp_path / "text.txt").write_text("the cat then the hat, he said.\n" * 400)
    script = load_script(SCRIPT)
    script.main(["--teacher", str(path), "--blocks", "2", "--windows", "4,2", "--sink", "1", "--context", "12",
                 "--batch-size", "2", "--corpus", str(tmp_path / "text.txt"), "--out", str(tmp_path / "r")])  # fmt: skip
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert [(r["window"], r["block"]) for r in rows] == [(4, 0), (4, 1), (2, 0), (2, 1)]
    assert "| 4 | 1 |" in (tmp_path / "r.md").read_text()
    with pytest.raises(SystemExit):
        script.main(["--teacher", str(path), "--windows", "4,x"])
    with pytest.raises(SystemExit):  # a missing teacher: argparse's one line (was a LlamaLoadError traceback)
        script.main(["--teacher", str(tmp_path / "nothing")])
    assert "--teacher" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # no query has keys beyond 10 + 2 of 12 tokens (a ZeroDivisionError)
        script.main(["--teacher", str(path), "--windows", "10", "--sink", "2", "--context", "12"])
