"""The MQAR recipe: a tiny run of two mixers, the result structure, the files it writes, the CLI flags."""

from __future__ import annotations

import json

import pytest
import torch

from ttt.recipes.mqar import MQARArgs, build_model, example_accuracy, main, run_mqar, slices

TINY = dict(dim=16, layers=1, heads=2, vocab=40, seq_len="16,32", num_kv="2,4", train_examples=32,
            test_examples=8, epochs=1, batch_size=16, progress=False)  # fmt: skip


def test_two_mixers_smoke_run():
    results = run_mqar(MQARArgs(mixers="attention,ttt_linear", **TINY))
    assert [r.mixer for r in results] == ["attention", "ttt_linear"]
    for r in results:
        assert set(r.slice_accuracy) == {"T=16,D=2", "T=32,D=4"}
        assert 0.0 <= r.accuracy <= 1.0 and all(0.0 <= a <= 1.0 for a in r.slice_accuracy.values())
        # two equal-sized slices: the overall accuracy is their mean
        assert r.accuracy == pytest.approx(sum(r.slice_accuracy.values()) / 2, abs=1e-6)
        assert r.epochs == 1 and len(r.history) == 1 and r.num_params > 0 and r.train_loss > 0


def test_main_writes_table_and_json(tmp_path, capsys):
    argv = ["--mixer", "linear_attention", "--dim", "16", "--layers", "1", "--vocab", "40", "--seq-len", "16",
            "--num-kv", "2", "--train-examples", "16", "--test-examples", "4", "--epochs", "1", "--no-progress",
            "--threads", "1", "--out", str(tmp_path)]  # fmt: skip
    main(argv)
    table = (tmp_path / "mqar.md").read_text()
    assert "`linear_attention`" in table and "T=16,D=2" in table and table in capsys.readouterr().out + "\n"
    payload = json.loads((tmp_path / "mqar.json").read_text())
    assert payload["args"]["mixers"] == "linear_attention" and payload["results"][0]["epochs"] == 1


def test_example_accuracy_counts_only_labelled_positions():
    labels = torch.tensor([[-100, 3, -100, 5], [2, -100, -100, -100]])
    logits = torch.zeros(2, 4, 8)
    logits[0, 1, 3] = logits[0, 3, 1] = logits[1, 0, 2] = 1.0  # right, wrong, right
    assert example_accuracy(logits, labels).tolist() == [0.5, 1.0]


def test_slices_pair_lengths_and_pair_counts():
    assert slices(MQARArgs(seq_len="64,128", num_kv="4,8")) == [(64, 4), (128, 8)]
    assert slices(MQARArgs(seq_len="64", num_kv="4,8")) == [(64, 4), (64, 8)]
    with pytest.raises(ValueError, match="equal counts"):
        slices(MQARArgs(seq_len="64,128,256", num_kv="4,8"))


def test_mixer_kwargs_reach_the_mixer():
    args = MQARArgs(dim=16, heads=2, vocab=40, mixer_kwargs='{"ttt_linear": {"share_qk": true}}')
    with_conv, without = (
        build_model("ttt_linear", a, max_seq_len=16) for a in (args, MQARArgs(dim=16, vocab=40))
    )
    assert with_conv.blocks[0].mixer.conv_q is not None and without.blocks[0].mixer.conv_q is None


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--train-examples", "0"], "--train-examples must be >= 1"),
        (["--test-examples", "0"], "--test-examples must be >= 1"),
        (["--epochs", "0"], "--epochs must be >= 1"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--lr", "0"], "--lr must be a finite number > 0"),
        (["--seq-len", "64,x"], "--seq-len: expected comma-separated integers"),
        (["--num-kv", "4,"], "--num-kv: expected comma-separated integers"),
        (["--seq-len", "16", "--num-kv", "8"], "num_kv_pairs must be <= seq_len"),
        (["--vocab", "40", "--seq-len", "64"], "vocab_size must be larger than seq_len"),
        (["--mixers", "foo"], "unknown mixer 'foo'"),
        (["--mixers", ","], "--mixers: expected one or more mixer names"),
        (["--dim", "0"], "--dim must be >= 1"),
        (["--mixer-kwargs", "{"], "--mixer-kwargs must be JSON"),
    ],
)
def test_bad_arguments_stop_with_one_line_before_any_work(tmp_path, argv, message):
    """Every bad option is one line naming the option, before any data, model or output (no traceback)."""
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--out", str(tmp_path / "out"), "--no-progress"])
    text = str(exc.value.code)
    assert message in text and "\n" not in text, text
    assert not (tmp_path / "out").exists()
