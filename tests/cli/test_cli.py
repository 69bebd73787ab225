"""``ttt`` command: help texts, a 3-step smoke run of every subcommand, bad input -> exit code != 0."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ttt.cli.main import COMMANDS, build_parser, main
from ttt.models.checkpoint import find_checkpoint

SUBCOMMANDS = ["train", "eval", "generate", "bench", "ls"]


def test_root_help_lists_every_subcommand_with_examples(capsys):
    with pytest.raises(SystemExit) as e:
        main(["-h"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert all(cmd in out for cmd in SUBCOMMANDS) and "examples:" in out
    assert len(COMMANDS) == len(SUBCOMMANDS)


@pytest.mark.parametrize("cmd", SUBCOMMANDS)
def test_subcommand_help_has_worked_examples(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "-h"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and f"ttt {cmd}" in out


def test_train_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["train", "-h"])
    out = capsys.readouterr().out
    for flag in (
        "--mixer",
        "--preset",
        "--corpus",
        "--steps",
        "--resume",
        "--context",
        "--lr",
        "--tokenizer",
    ):
        assert flag in out


def test_console_script_entry_point_runs():
    r = subprocess.run(
        [sys.executable, "-m", "ttt.cli.main", "ls"], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0 and "ttt_linear" in r.stdout and "tiny" in r.stdout


@pytest.fixture
def trained(corpus_dir, tmp_path):
    run = tmp_path / "run"
    code = main(
        [
            "train",
            "--preset",
            "micro",
            "--corpus",
            corpus_dir,
            "--steps",
            "3",
            "--batch-size",
            "4",
            "--context",
            "32",
            "--eval-every",
            "3",
            "--eval-batches",
            "2",
            "--out",
            str(run),
            "--no-progress",
        ]
    )
    assert code == 0
    return run


def test_train_eval_generate_smoke(trained, tmp_path, capsys):
    assert find_checkpoint(trained).name == "step-000003" and (trained / "loss_curve.png").exists()
    assert main(["eval", "--checkpoint", str(trained), "--max-batches", "2", "--bins", "4"]) == 0
    out = capsys.readouterr().out
    assert "bits/byte" in out and (trained / "loss_by_position.png").exists()
    assert (trained / "loss_by_position.md").read_text().count("\n|") >= 5
    assert (
        main(["generate", "--checkpoint", str(trained), "--prompt", "SPEAKER 1:", "--max-new-tokens", "12"])
        == 0
    )
    captured = capsys.readouterr()
    assert "tokens/s" in captured.err and len(captured.out) > 0


def test_generate_a_batch_of_prompts_equals_each_prompt_alone(trained, tmp_path, capsys):
    prompts = ["SPEAKER 1:", "The", "A much longer prompt than the others, past a mini-batch"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts[:2]) + "\n\n" + prompts[2] + "\n")
    greedy = ["--checkpoint", str(trained), "--max-new-tokens", "7", "--temperature", "0"]
    assert main(["generate", *greedy, "--prompts-file", str(tmp_path / "prompts.txt")]) == 0
    captured = capsys.readouterr()
    assert "3 prompts" in captured.err and "tokens/s" in captured.err
    for i, prompt in enumerate(prompts):
        assert main(["generate", *greedy, "--prompt", prompt, "--no-stream"]) == 0
        alone = capsys.readouterr().out.rstrip("\n")
        assert f"--- prompt {i + 1} of 3 ---\n{prompt}{alone}\n" in captured.out


def test_bench_smoke(tmp_path, capsys):
    out = tmp_path / "bench"
    assert (
        main(
            [
                "bench",
                "--mixers",
                "ttt_linear,attention",
                "--dim",
                "32",
                "--heads",
                "2",
                "--lengths",
                "16,32",
                "--repeats",
                "1",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    table = (out / "bench.md").read_text()
    assert "ttt_linear" in table and "attention" in table and (out / "bench.png").exists()


def test_bad_input_exits_nonzero_with_a_message(trained, corpus_dir, tmp_path, capsys):
    ckpt = find_checkpoint(trained)
    before = (ckpt / "model.safetensors").read_bytes()
    cases = [
        (["train", "--mixer", "nope", "--preset", "micro", "--out", str(tmp_path / "a")], "unknown mixer"),
        (["train", "--preset", "huge", "--out", str(tmp_path / "a")], "unknown preset"),
        (["train", "--corpus", "nope", "--preset", "micro", "--out", str(tmp_path / "a")], "unknown corpus"),
        (
            [
                "train",
                "--preset",
                "micro",
                "--context",
                "4096",
                "--corpus",
                corpus_dir,
                "--out",
                str(tmp_path / "a"),
            ],
            "max_seq_len",
        ),
        (["train", "--preset", "micro", "--corpus", corpus_dir, "--out", str(trained)], "--resume"),
        (
            [
                "train",
                "--preset",
                "micro",
                "--corpus",
                corpus_dir,
                "--out",
                str(trained),
                "--resume",
                "--mixer",
                "attention",
            ],
            "other arguments",
        ),
        (["generate", "--checkpoint", str(trained), "--prompt", ""], "prompt is empty"),
        (
            ["generate", "--checkpoint", str(trained), "--prompt", "x", "--max-new-tokens", "1000"],
            "max_seq_len",
        ),
        (["generate", "--checkpoint", str(tmp_path / "missing"), "--prompt", "x"], "does not exist"),
        (
            ["generate", "--checkpoint", str(trained), "--prompts-file", str(tmp_path / "blank.txt")],
            "no prompt",
        ),
        (
            [
                "generate",
                "--checkpoint",
                str(trained),
                "--prompts-file",
                str(tmp_path / "blank.txt"),
                "--prompt",
                "x",
            ],
            "only one of",
        ),
        (["eval", "--checkpoint", str(trained), "--context", "100000"], "max_seq_len"),
        (["bench", "--mixers", "nope"], "unknown mixer"),
        (
            [
                "train",
                "--preset",
                "micro",
                "--corpus",
                corpus_dir,
                "--dtype",
                "float16",
                "--out",
                str(tmp_path / "a"),
            ],
            "dtype",
        ),
    ]
    (tmp_path / "blank.txt").write_text("\n  \n")
    for argv, message in cases:
        assert main(argv) != 0, argv
        assert message in capsys.readouterr().err, argv
    assert not (tmp_path / "a").exists()
    # a corrupted checkpoint: clear message, and the file is left as it was
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[:100])
    assert main(["eval", "--checkpoint", str(trained)]) != 0
    assert "truncated or corrupted" in capsys.readouterr().err
    (ckpt / "model.safetensors").write_bytes(before)
    assert build_parser().parse_args(["ls"]).command == "ls"


def test_torchrun_two_processes_on_cpu(corpus_dir, tmp_path):
    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "ttt.cli.main",
           "train", "--preset", "micro", "--corpus", corpus_dir, "--steps", "3", "--batch-size", "4", "--context", "32",
           "--eval-every", "3", "--out", str(run), "--no-progress", "--no-plot"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "2 process(es)" in r.stdout and "val bits/byte" in r.stdout
    assert find_checkpoint(run).name == "step-000003"
