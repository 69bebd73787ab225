"""``ttt`` command: help texts, a 3-step smoke run of every subcommand, bad input -> exit code != 0."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from ttt.cli.main import COMMANDS, build_parser, main
from ttt.models.checkpoint import find_checkpoint

SUBCOMMANDS = ["train", "eval", "generate", "bench", "ls", "convert"]


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
            "--ckpt-every",
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
    assert "bits/byte" in out and (trained / "loss_by_position-step-000003.png").exists()
    assert (trained / "loss_by_position-step-000003.md").read_text().count("\n|") >= 5
    assert (
        main(["generate", "--checkpoint", str(trained), "--prompt", "SPEAKER 1:", "--max-new-tokens", "12"])
        == 0
    )
    captured = capsys.readouterr()
    assert "tokens/s" in captured.err and len(captured.out) > 0


def test_generate_a_batch_of_prompts_equals_each_prompt_alone(trained, tmp_path, capsys):
    prompts = ["SPEAKER 1:", "The", "A much longer prompt than the others, past a mini-batch"]
    # Windows line ends: no prompt may keep a trailing \r
    (tmp_path / "prompts.txt").write_bytes(
        ("\r\n".join(prompts[:2]) + "\r\n\r\n" + prompts[2] + "\r\n").encode()
    )
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
        (["eval", "--checkpoint", str(trained), "--max-batches", "0"], "--max-batches must be >= 1"),
        (["eval", "--checkpoint", str(trained), "--corpus", str(tmp_path / "one.txt")], "split by lines"),
        (["generate", "--checkpoint", str(trained), "--prompt", "x", "--temperature", "-1"], "temperature"),
        (["generate", "--checkpoint", str(trained), "--prompt", "x", "--top-k", "0"], "--top-k must be >= 1"),
        (
            ["generate", "--checkpoint", str(trained), "--prompt-file", str(tmp_path / "latin1.txt")],
            "latin1.txt",
        ),
        (["generate", "--checkpoint", str(trained), "--prompts-file", str(tmp_path / "latin1.txt")], "UTF-8"),
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
    (tmp_path / "one.txt").write_text("a single line\n")
    (tmp_path / "latin1.txt").write_bytes("café\n".encode("latin-1"))
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


def test_optional_numbers_accept_none():
    parser = build_parser()
    ns = parser.parse_args(["eval", "--checkpoint", "x", "--max-batches", "None", "--context", "none"])
    assert ns.max_batches is None and ns.context is None
    assert parser.parse_args(["eval", "--checkpoint", "x", "--max-batches", "3"]).max_batches == 3
    assert parser.parse_args(["generate", "--checkpoint", "x", "--top-k", "NONE"]).top_k is None
    assert parser.parse_args(["train", "--threads", "none"]).threads is None
    # a str | None option keeps the text
    assert parser.parse_args(["train", "--layer-mixers", "none"]).layer_mixers == "none"


def test_help_shows_required_options_presets_and_each_default_once(capsys):
    from ttt.models import PRESETS

    with pytest.raises(SystemExit):
        main(["train", "-h"])
    out = " ".join(capsys.readouterr().out.split())
    assert "runs/<mixer>-<preset>) --resume" in out and "(default: None)" not in out
    assert all(name in out for name in PRESETS) and "micro" in out
    assert "on CUDA" in out and "on CPU" in out
    for cmd in ("eval", "generate"):
        with pytest.raises(SystemExit):
            main([cmd, "-h"])
        out = " ".join(capsys.readouterr().out.split())
        assert f"ttt {cmd} [-h] --checkpoint CHECKPOINT" in out and "(default: )" not in out
        with pytest.raises(SystemExit) as e:
            main([cmd])
        assert e.value.code == 2 and "required: --checkpoint" in capsys.readouterr().err


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    import ttt

    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"ttt {ttt.__version__}"


def test_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    argv = ["eval", "--checkpoint", str(tmp_path / "missing")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "does not exist" in err and "TTT_DEBUG=1" in err and "Traceback" not in err
    assert main(["--debug", *argv]) == 1
    assert "Traceback" in capsys.readouterr().err
    monkeypatch.setenv("TTT_DEBUG", "1")
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "CheckpointError" in err


def test_closed_pipe_exits_quietly():
    # the reader is gone before ttt writes (like `ttt ls | head -0`)
    proc = subprocess.Popen(
        [sys.executable, "-m", "ttt.cli.main", "ls"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 141 and err == b""


def test_no_progress_bar_in_a_log(corpus_dir, tmp_path, capsys):
    argv = ["train", "--preset", "micro", "--corpus", corpus_dir, "--steps", "2", "--batch-size", "2",
            "--context", "16", "--eval-every", "1", "--eval-batches", "1", "--out", str(tmp_path / "r"),
            "--no-plot"]  # fmt: skip
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "\r" not in captured.err and "step 1/2: train loss" in captured.out


def test_ctrl_c_saves_a_checkpoint_and_exits_130(corpus_dir, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "ttt.cli.main", "train", "--preset", "micro", "--corpus", corpus_dir,
           "--steps", "100000", "--batch-size", "2", "--context", "16", "--eval-every", "0", "--ckpt-every", "0",
           "--out", str(run)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # the handler is in place before this line is printed
        assert proc.stdout.readline().startswith("model:")
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert f"is saved in {run}" in err and "--resume" in err and "ttt train: interrupted" in err
    assert int(find_checkpoint(run).name.split("-")[1]) >= 1


def test_eval_results_are_named_by_step_and_record_what_was_evaluated(trained, corpus_dir, capsys):
    assert main(["eval", "--checkpoint", str(trained / "step-000002"), "--max-batches", "1"]) == 0
    assert main(["eval", "--checkpoint", str(trained), "--max-batches", "none", "--batch-size", "3"]) == 0
    assert "step 3" in capsys.readouterr().out
    import json

    early = json.loads((trained / "eval-step-000002.json").read_text())
    late = json.loads((trained / "eval-step-000003.json").read_text())
    assert early["step"] == 2 and early["checkpoint"].endswith("step-000002") and early["batches"] == 1
    assert late["corpus"] == corpus_dir and late["context"] == 32 and late["max_batches"] is None
    # none: every window of the validation split
    assert late["windows"] > 3 and late["batches"] == -(-late["windows"] // 3)
    assert (trained / "loss_by_position-step-000002.md").exists()


def test_generate_options(trained, tmp_path, capsys):
    (tmp_path / "prompts.txt").write_text("SPEAKER 1:\nThe\n")
    base = ["generate", "--checkpoint", str(trained), "--max-new-tokens", "1"]
    assert main([*base, "--prompts-file", str(tmp_path / "prompts.txt")]) == 0
    assert "n/a tokens/s" in capsys.readouterr().err
    assert main([*base, "--prompt", "The", "--top-k", "none"]) == 0
    assert "n/a tokens/s" in capsys.readouterr().err
