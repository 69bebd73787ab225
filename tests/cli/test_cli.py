"""``ttt`` command: help texts, a 3-step smoke run of every subcommand, bad input -> exit code != 0."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from ttt.cli.main import COMMANDS, build_parser, main
from ttt.models.checkpoint import find_checkpoint

#: the smallest bench run (add --mixers and --out)
TINY_BENCH = ["bench", "--dim", "16", "--heads", "2", "--lengths", "8", "--repeats", "1"]

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
        assert main(["generate", *greedy, "--prompt", prompt, "--no-stream", "--no-echo"]) == 0
        alone = capsys.readouterr().out.rstrip("\n")
        # the blank line is skipped, and the third prompt's header names its line in the file
        where = " (line 4)" if i == 2 else ""
        assert f"--- prompt {i + 1} of 3{where} ---\n{prompt}{alone}\n" in captured.out


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
        (["generate", "--checkpoint", str(trained)], "no prompt given: give --prompt TEXT"),
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
        (["bench", "--dim", "15", "--heads", "4"], "--dim (15) must be divisible by --heads (4)"),
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
    # torchrun ends its stderr with a failure summary; the failing rank's own traceback comes before it
    first = r.stderr.find("Traceback")
    assert r.returncode == 0, (
        (r.stderr[first : first + 4000] if first >= 0 else "") + "\n...\n" + r.stderr[-1500:]
    )
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
    assert "does not exist" in err and "Traceback" not in err
    assert main(["--debug", *argv]) == 1
    assert "Traceback" in capsys.readouterr().err
    monkeypatch.setenv("TTT_DEBUG", "1")
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "CheckpointError" in err
    # a refused value (a ValueError: the message says what was expected) needs no traceback hint
    monkeypatch.delenv("TTT_DEBUG")
    assert main(["bench", "--mixers", "nope"]) == 1
    err = capsys.readouterr().err
    assert "unknown mixer" in err and "TTT_DEBUG" not in err and err.count("\n") == 1
    # nor does an argument a run refuses (CheckpointError); an error of many lines (torch's C++ frames)
    # or an arithmetic one (OverflowError) is shown as one line, not a traceback
    from ttt.models.checkpoint import CheckpointError

    for raised, shown in [
        (CheckpointError("cannot resume: other arguments"), "error: cannot resume: other arguments\n"),
        (
            RuntimeError("can't allocate\nframe #0: c10::alloc\nframe #1: at::empty"),
            "error: can't allocate (",
        ),
        (OverflowError("math range error"), "error: math range error ("),
    ]:

        def fail(args, raised=raised):
            raise raised

        monkeypatch.setattr("ttt.cli.bench.run", fail)
        assert main(["bench"]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and shown in err and "Traceback" not in err, err
        assert ("TTT_DEBUG" in err) == (not isinstance(raised, CheckpointError))


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


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_saves_a_checkpoint_and_exits_130(corpus_dir, tmp_path, signum):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "ttt.cli.main", "train", "--preset", "micro", "--corpus", corpus_dir,
           "--steps", "100000", "--batch-size", "2", "--context", "16", "--eval-every", "0", "--ckpt-every", "0",
           "--out", str(run)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # the handler is in place before this line is printed
        assert proc.stdout.readline().startswith("model:")
        time.sleep(0.2)
        proc.send_signal(signum)
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


def test_streamed_text_ends_like_the_whole_text_when_a_character_is_cut(trained, capsys, monkeypatch):
    # the last new token is the first byte of a two-byte character: streamed output used to drop it
    import ttt.models

    monkeypatch.setattr(ttt.models, "sample", lambda logits, **kw: torch.full(logits.shape[:1], 0xC3))
    base = ["generate", "--checkpoint", str(trained), "--prompt", "The", "--no-echo", "--max-new-tokens"]
    for n in ("1", "2", "5"):
        outs = []
        for extra in ([], ["--no-stream"]):
            assert main([*base, n, *extra]) == 0
            outs.append(capsys.readouterr().out)
        assert outs[0] == outs[1] and outs[0].rstrip("\n").endswith("\ufffd")


def test_generate_echoes_the_prompt_unless_told_not_to_and_offers_top_p(trained, capsys):
    base = ["generate", "--checkpoint", str(trained), "--prompt", "SPEAKER 1:", "--max-new-tokens", "9"]
    for extra in ([], ["--no-stream"]):
        assert main([*base, "--temperature", "0", *extra]) == 0
        echoed = capsys.readouterr().out
        assert main([*base, "--temperature", "0", "--no-echo", *extra]) == 0
        bare = capsys.readouterr().out
        assert echoed == "SPEAKER 1:" + bare and len(bare.rstrip("\n")) >= 1
    # top-p 1 is plain sampling: same seed, same text; a tiny p keeps only the most likely token
    outs = []
    for extra in ([], ["--top-p", "1"], ["--top-p", "1e-9"], ["--temperature", "0"]):
        assert main([*base, "--top-k", "none", "--no-echo", *extra]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and outs[2] == outs[3]
    for bad in ("0", "1.5", "nan"):
        assert main([*base, "--top-p", bad]) == 1
        assert "--top-p must lie in (0, 1]" in capsys.readouterr().err
    # greedy decoding takes the most likely token whatever top-p says: asking for both is refused
    assert main([*base, "--top-p", "0.9", "--temperature", "0"]) == 1
    assert "--top-p has no effect with --temperature 0" in capsys.readouterr().err


def test_eval_scores_every_token_of_a_named_file_or_directory(trained, tmp_path, capsys, monkeypatch):
    import json

    import torch
    import torch.nn.functional as F

    from ttt.models.checkpoint import load_model

    texts = tmp_path / "texts"
    (texts / "sub").mkdir(parents=True)
    (texts / "a.txt").write_text("SPEAKER 1:\nWhat light through yonder window breaks?\n" * 2)
    (texts / "sub" / "b.md").write_text("The rest is silence.\n")
    (texts / "image.bin").write_bytes(bytes(range(256)))
    (texts / ".hidden").write_text("not read")
    before = sorted(p.name for p in texts.rglob("*"))
    assert main(["eval", "--checkpoint", str(trained), "--file", str(texts / "a.txt")]) == 0
    out = capsys.readouterr().out
    assert "the whole of" in out and "eval-step-000003-file-a.txt.json" in out
    result = json.loads((trained / "eval-step-000003-file-a.txt.json").read_text())
    # oracle: every token after the first, in windows of 32 (the training context) and one shorter tail
    ids = torch.tensor(list((texts / "a.txt").read_bytes()))
    model, _ = load_model(trained)
    windows = [(ids[i : i + 32][: len(ids) - 1 - i], ids[i + 1 : i + 33]) for i in range(0, len(ids) - 1, 32)]
    with torch.no_grad():
        losses = [F.cross_entropy(model(x[None])[0][0], y, reduction="sum") for x, y in windows]
    assert result["windows"] == len(losses) == 4 and result["max_batches"] is None
    assert abs(result["loss"] - float(sum(losses)) / (len(ids) - 1)) < 1e-5
    assert (trained / "loss_by_position-step-000003-file-a.txt.md").exists()

    assert main(["eval", "--checkpoint", str(trained), "--file", str(texts), "--context", "8"]) == 0
    captured = capsys.readouterr()
    assert "(2 text files)" in captured.out and "image.bin" in captured.err
    result = json.loads((trained / "eval-step-000003-file-texts-context-8.json").read_text())
    assert result["files"] == 2 and result["skipped"] == [str(texts / "image.bin")] and result["context"] == 8
    # nothing written beside the texts; the run directory's corpus evaluation is left alone
    assert sorted(p.name for p in texts.rglob("*")) == before
    assert not (trained / "eval-step-000003.json").exists()

    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    (tmp_path / "short.txt").write_text("a")
    (tmp_path / "empty").mkdir()
    for path, message in [
        (tmp_path / "missing.txt", "no such file"),
        (texts / "image.bin", "not a text file"),
        (tmp_path / "latin1.txt", "not UTF-8 text"),
        (tmp_path / "short.txt", "need at least 2"),
        (tmp_path / "empty", "no UTF-8 text file"),
        (trained, f"{trained} is a ttt run or checkpoint directory, not text to evaluate"),  # its JSON files
        (find_checkpoint(trained), "is a ttt run or checkpoint directory"),
    ]:
        assert main(["eval", "--checkpoint", str(trained), "--file", str(path)]) == 1
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not list(trained.glob("*-file-run*")) and not list(trained.glob("*-file-step*"))
    assert main(["eval", "--checkpoint", str(trained), "--file", str(texts), "--corpus", "shakespeare"]) == 1
    assert "not both" in capsys.readouterr().err
    # no matplotlib: the tables are written, the missing plot is named with the extra that draws it
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert (
        main(
            [
                "eval",
                "--checkpoint",
                str(trained),
                "--file",
                str(texts / "a.txt"),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 0
    )
    assert "no plot: the plot needs matplotlib: pip install 'ttt[plot]'" in capsys.readouterr().out
    assert json.loads((tmp_path / "o" / "eval-step-000003-file-a.txt.json").read_text())["plot"] == ""


def test_bench_writes_under_runs_by_default_says_where_and_names_the_plot_extra(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    argv = [*TINY_BENCH, "--mixers", "attention"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert (tmp_path / "runs" / "bench" / "bench.md").exists() and (
        tmp_path / "runs" / "bench" / "bench.json"
    ).exists()
    assert "written: runs/bench/bench.md, runs/bench/bench.json; no bench.png" in err
    assert "pip install 'ttt[plot]'" in err and sorted(p.name for p in tmp_path.iterdir()) == ["runs"]


def test_ls_lists_checkpoints_with_their_sizes(trained, tmp_path, capsys, monkeypatch):
    from ttt.cli.ls import human_bytes

    assert [human_bytes(n) for n in (0, 1023, 1024, 1536, 1000 * 1024, 5 * 2**30)] == [
        "0 B", "1023 B", "1 KiB", "1.5 KiB", "1000 KiB", "5 GiB"]  # fmt: skip
    assert main(["ls", "--runs", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for step in ("step-000002", "step-000003"):
        ckpt = trained / step
        size = sum(f.stat().st_size for f in ckpt.iterdir())
        line = next(line for line in out.splitlines() if str(ckpt) in line)
        assert (
            human_bytes(size) in line
            and f"(model {human_bytes((ckpt / 'model.safetensors').stat().st_size)})" in line
        )
        assert line.endswith("[latest]") == (step == "step-000003")
    assert "in 2 checkpoints" in out and "tiny" in out and "892K params" in out
    # a damaged checkpoint is flagged (its tensor files are checked against their own headers, not hashed)
    model = trained / "step-000002" / "model.safetensors"
    model.write_bytes(model.read_bytes()[:-100])
    (trained / "step-000003" / "trainer.safetensors").unlink()
    assert main(["ls", "--runs", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    line = next(line for line in lines if str(trained / "step-000002") in line)
    assert line.endswith("[damaged: model.safetensors truncated]"), line
    line = next(line for line in lines if str(trained / "step-000003") in line)
    assert line.endswith("[latest] [damaged: trainer.safetensors missing]"), line
    # not a safetensors file at all (a Git LFS pointer): its "header length" is absurd, flagged all the same
    model.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n")
    assert main(["ls", "--runs", str(tmp_path)]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if str(trained / "step-000002") in line)
    assert line.endswith("[damaged: model.safetensors truncated]"), line
    # a `latest` that names no checkpoint of its run is flagged (it was listed as if nothing were wrong)
    latest = trained / "latest"
    kept = latest.read_text()
    latest.write_text("step-000999\n")
    assert main(["ls", "--runs", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"{latest} names step-000999, which is not a checkpoint of the run" in out
    assert not any(line.endswith("[latest]") for line in out.splitlines())
    latest.write_bytes(b"\xff\xfe\x00")  # not text at all: flagged the same, the listing goes on
    assert main(["ls", "--runs", str(tmp_path)]) == 0
    assert f"{latest} names " in capsys.readouterr().out
    latest.write_text(kept)
    # a --runs that does not exist (a typo) looked like an empty runs directory; the default may be missing
    assert main(["ls", "--runs", str(tmp_path / "nowhere")]) == 1
    assert f"--runs {tmp_path / 'nowhere'} does not exist" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)
    assert main(["ls"]) == 0
    assert "checkpoints: none under runs" in capsys.readouterr().out


def test_hostile_or_broken_checkpoints_give_one_line_errors(trained, tmp_path, capsys):
    import json

    from ttt.data.tokenizer import BPETokenizer
    from ttt.models import checkpoint

    ckpt = find_checkpoint(trained)
    original = (ckpt / "checkpoint.json").read_text()
    bpe = BPETokenizer.train("a few words, and a few more words " * 50, vocab_size=300)  # ids beyond 255

    def edit(**changes):
        doc = json.loads(original)
        for key, value in changes.items():
            if value is None:
                doc.pop(key)
            elif key.startswith("config__"):
                doc["config"][key[8:]] = value
            else:
                doc[key] = value
        doc["meta_sha256"] = checkpoint._meta_digest(doc)
        (ckpt / "checkpoint.json").write_text(json.dumps(doc))

    cases = [
        ({"config__n_layers": 200_000}, "n_layers"),
        ({"tokenizer": None}, "has no tokenizer"),
        ({"config": None}, "missing fields"),
        ({"tokenizer": {"kind": "bpe", "json": "{broken"}}, "tokenizer is corrupted"),
        ({"config__vocab_size": 100}, "weights do not fit the model"),
        ({"tokenizer": bpe.to_dict()}, "out of the model's vocabulary of 256"),
        ({"step": 2.5}, "'step' must be an integer"),
    ]
    for changes, message in cases:
        edit(**changes)
        for argv in (
            ["eval", "--checkpoint", str(trained)],
            ["generate", "--checkpoint", str(trained), "--prompt", "x"],
        ):
            assert main(argv) == 1, (changes, argv)
            err = capsys.readouterr().err
            assert err.startswith(f"ttt {argv[0]}: error:") and message in err and err.count("\n") == 1, err
    (ckpt / "checkpoint.json").write_text(original)
    # a run whose 'latest' leads into another run: refused, and nothing is written there
    attacker = tmp_path / "attacker"
    attacker.mkdir()
    (attacker / "latest").write_text(f"../{trained.name}/{ckpt.name}\n")
    before = sorted(p.name for p in trained.iterdir())
    assert main(["eval", "--checkpoint", str(attacker)]) == 1
    assert "must name a step-N directory" in capsys.readouterr().err
    assert sorted(p.name for p in trained.iterdir()) == before


def test_a_diverged_run_exits_nonzero_with_one_line(corpus_dir, tmp_path, capsys, monkeypatch):
    import ttt.recipes.train as recipe

    monkeypatch.setattr(recipe, "lm_loss", lambda logits, y: logits.sum() * float("nan"))
    argv = ["train", "--preset", "micro", "--corpus", corpus_dir, "--steps", "2", "--batch-size", "2",
            "--context", "16", "--out", str(tmp_path / "r"), "--no-progress", "--no-plot"]  # fmt: skip
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert (
        err.startswith("ttt train: error: training diverged at step 1: the loss is nan")
        and "no earlier" in err
    )
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("under", [False, True], ids=["file", "under-a-file"])
def test_an_out_that_is_a_file_is_one_line_and_writes_nothing(trained, corpus_dir, tmp_path, capsys, under):
    """--out naming an existing file (or a path under one) gave the raw "[Errno 17] File exists" line, for
    eval and convert only after all their work."""
    afile = tmp_path / "afile"
    afile.write_text("precious\n")
    out = afile / "sub" if under else afile
    train_argv = ["--preset", "micro", "--corpus", corpus_dir, "--steps", "1", "--batch-size", "2",
                  "--context", "16", "--no-progress"]  # fmt: skip
    commands = [
        ["train", *train_argv],
        ["eval", "--checkpoint", str(trained), "--max-batches", "1"],
        [*TINY_BENCH, "--mixers", "attention"],
        ["convert", "--teacher", str(tmp_path / "teacher"), "--context", "16"],
    ]
    before = sorted(p.name for p in tmp_path.iterdir())
    run_before = sorted(p.name for p in trained.iterdir())
    for argv in commands:
        assert main([*argv, "--out", str(out)]) == 1, argv
        err = capsys.readouterr().err
        expected = "a run directory" if argv[0] in ("train", "convert") else "a directory"
        assert err.startswith(f"ttt {argv[0]}: error: --out {out}") and err.count("\n") == 1, err
        assert f"{afile} is a file; expected {expected}" in err, err
    assert afile.read_text() == "precious\n" and sorted(p.name for p in tmp_path.iterdir()) == before
    assert sorted(p.name for p in trained.iterdir()) == run_before


def test_sigterm_before_the_training_loop_leaves_no_lock(corpus_dir, tmp_path):
    """A SIGTERM between taking the run's lock and installing the loop's handler (data, tokenizer, model)
    ended the process where it stood: its .lock (and the empty run directory) stayed behind."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "ttt.cli.main", "train", "--preset", "micro", "--corpus", corpus_dir,
           "--steps", "100000", "--batch-size", "2", "--context", "16", "--out", str(run)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (run / ".lock").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert not (run / ".lock").exists(), (proc.returncode, err)
    assert proc.returncode == 130 and "ttt train: interrupted" in err, (proc.returncode, err)
    # nothing left (the usual case: the signal came before the loop), or a saved step (the loop had begun)
    assert (not run.exists() and "model:" not in out) or find_checkpoint(run)


def test_eval_never_writes_through_a_named_link_to_a_checkpoint(trained, tmp_path, capsys):
    """A checkpoint named through a symbolic link, outside any run directory: eval's results went to the
    link's target, into another run's checkpoint directory."""
    target = trained / "step-000002"
    (tmp_path / "elsewhere").mkdir()
    link = tmp_path / "elsewhere" / "best"
    link.symlink_to(target)
    before = sorted(p.name for p in target.iterdir())
    assert main(["eval", "--checkpoint", str(link), "--max-batches", "1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"ttt eval: error: --checkpoint {link} is a symbolic link") and err.count("\n") == 1
    assert "--out" in err
    assert sorted(p.name for p in target.iterdir()) == before
    assert os.listdir(tmp_path / "elsewhere") == ["best"]
    # with --out the results go where it says
    assert main(["eval", "--checkpoint", str(link), "--max-batches", "1", "--out", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "eval-step-000002.json").is_file()
    assert sorted(p.name for p in target.iterdir()) == before


def test_an_out_that_is_empty_or_inside_a_checkpoint_is_refused(
    trained, corpus_dir, tmp_path, capsys, monkeypatch
):
    """--out '' meant the default (train, eval) or the current directory (convert wrote its checkpoints and
    hf/ there); --out naming a checkpoint directory (or a path inside one) wrote a run into it."""
    monkeypatch.chdir(tmp_path)
    ckpt = trained / "step-000002"
    before = sorted(p.name for p in ckpt.iterdir())
    commands = [
        ["train", "--preset", "micro", "--corpus", corpus_dir, "--steps", "1", "--batch-size", "2",
         "--context", "16", "--no-progress"],
        ["eval", "--checkpoint", str(trained), "--max-batches", "1"],
        [*TINY_BENCH, "--mixers", "attention"],
        ["convert", "--teacher", str(tmp_path / "teacher"), "--context", "16"],
    ]  # fmt: skip
    top = sorted(p.name for p in tmp_path.iterdir())
    for argv in commands:
        for out, message in [
            ("", "--out is empty; expected"),
            (str(ckpt), f"--out {ckpt} is a checkpoint directory"),
            (str(ckpt / "sub"), f"--out {ckpt / 'sub'}: {ckpt} is a checkpoint directory"),
        ]:
            assert main([*argv, "--out", out]) == 1, (argv, out)
            err = capsys.readouterr().err
            assert err.startswith(f"ttt {argv[0]}: error: {message}") and err.count("\n") == 1, err
    assert sorted(p.name for p in ckpt.iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == top


def test_bench_and_generate_numbers_are_checked(trained, tmp_path, capsys):
    """bench: --heads 0 was a raw ZeroDivisionError traceback, --dim 0 torch's three-line message,
    --batch-size 0 wrote a table of nothing, --lengths abc named no option; generate --temperature inf
    sampled uniformly without a word."""
    bench = [*TINY_BENCH, "--mixers", "attention",
             "--out", str(tmp_path / "b")]  # fmt: skip
    cases = [
        ([*bench, "--heads", "0"], "--heads must be >= 1, got 0"),
        ([*bench, "--dim", "0"], "--dim must be >= 1, got 0"),
        ([*bench, "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        ([*bench, "--lengths", "abc"], "--lengths must be comma-separated integers >= 1, e.g. '256,1024', got 'abc'"),
        ([*bench, "--lengths", "8,,16"], "--lengths must be comma-separated integers >= 1"),
        ([*bench, "--lengths", "0"], "--lengths must be comma-separated integers >= 1"),
        (["generate", "--checkpoint", str(trained), "--prompt", "x", "--temperature", "inf"],
         "--temperature must be a finite number >= 0 (0: greedy), got inf"),
    ]  # fmt: skip
    for argv, message in cases:
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert err.startswith(f"ttt {argv[0]}: error: {message}") and err.count("\n") == 1, err
    assert not (tmp_path / "b").exists()


def test_eval_on_another_corpus_or_context_keeps_the_earlier_results(trained, tmp_path, capsys):
    """The results were named by the step alone (and --file): evaluating the same checkpoint on another
    --corpus, or at another --context, replaced the earlier eval-step-N.json and its table and plot."""
    import json

    other = tmp_path / "other.txt"
    other.write_text("".join(f"line {i}: a quick brown fox\n" for i in range(400)))
    base = ["eval", "--checkpoint", str(trained), "--max-batches", "1"]
    assert main(base) == 0
    first = (trained / "eval-step-000003.json").read_text()
    assert main([*base, "--context", "8"]) == 0
    assert main([*base, "--corpus", str(other)]) == 0
    assert main([*base, "--corpus", str(other), "--context", "8"]) == 0
    capsys.readouterr()
    assert (trained / "eval-step-000003.json").read_text() == first
    for stem, corpus, context in [
        ("step-000003-context-8", None, 8),
        ("step-000003-corpus-other.txt", str(other), 32),
        ("step-000003-corpus-other.txt-context-8", str(other), 8),
    ]:
        result = json.loads((trained / f"eval-{stem}.json").read_text())
        assert result["context"] == context and (corpus is None or result["corpus"] == corpus)
        assert (trained / f"loss_by_position-{stem}.md").is_file()


@pytest.mark.parametrize("name", ["bench.md", "bench.json", "bench.png"])
def test_bench_never_writes_through_a_link(tmp_path, capsys, name):
    """bench wrote its files with plain writes: a bench.md, bench.json or bench.png in --out that links
    elsewhere had its target overwritten. A name taken (by a link too) is never written: bench-2.*."""
    out, victim = tmp_path / "b", tmp_path / "victim.txt"
    out.mkdir()
    victim.write_text("precious\n")
    (out / name).symlink_to(victim)
    argv = [*TINY_BENCH, "--mixers", "attention",
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert f"written: {out / 'bench-2.md'}" in capsys.readouterr().err
    assert victim.read_text() == "precious\n"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [name, "bench-2.md", "bench-2.json", "bench-2.png"]
    )


def test_ls_and_device_bad_input_name_what_was_expected(tmp_path, capsys):
    """ls --runs FILE said 'none under FILE' and exited 0; --device tpu gave torch's list of device types
    without naming the option."""
    (tmp_path / "afile").write_text("x\n")
    assert main(["ls", "--runs", str(tmp_path / "afile")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"ttt ls: error: --runs {tmp_path / 'afile'} is a file; expected a directory")
    argv = [
        "bench",
        "--mixers",
        "attention",
        "--lengths",
        "8",
        "--device",
        "tpu",
        "--out",
        str(tmp_path / "b"),
    ]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("ttt bench: error: --device 'tpu': expected 'auto', 'cpu', 'cuda' or 'cuda:N'")
    assert err.count("\n") == 1 and not (tmp_path / "b").exists()


def test_an_unknown_mixer_argument_is_one_line_naming_the_mixer_and_its_arguments(tmp_path, capsys):
    """train and convert refuse a --mixer-kwargs key the mixer does not take before loading any data or
    teacher, naming the mixer as written (not a private class) and the keys it accepts."""
    bad = ["--mixer", "ttt_linear", "--mixer-kwargs", '{"ttt_linear": {"nope": 1}}']
    for argv in (
        ["train", "--preset", "micro", "--corpus", str(tmp_path / "missing"), "--out", str(tmp_path / "a")],
        ["convert", "--teacher", str(tmp_path / "missing"), "--out", str(tmp_path / "b")],
    ):
        assert main(argv + bad) == 1, argv
        err = capsys.readouterr().err
        assert err.startswith(f"ttt {argv[0]}: error: unknown argument 'nope' for mixer 'ttt_linear'"), err
        assert err.count("\n") == 1 and "share_qk" in err and "_TTT" not in err
    assert not any(tmp_path.iterdir())


def _examples() -> list[tuple[str, list[str]]]:
    """``(where, argv)`` of every ``ttt`` command in the examples of ``ttt -h`` and of each subcommand's
    ``-h``, and in the bash blocks of docs/cli.md (``torchrun ... -m ttt.cli.main ARGS`` too)."""
    import re
    import shlex
    from pathlib import Path

    from ttt.cli import main as root

    texts = {"ttt -h": root.EPILOG, **{f"ttt {m.__name__.rsplit('.', 1)[1]} -h": m.EPILOG for m in COMMANDS}}
    doc = (Path(__file__).parents[2] / "docs" / "cli.md").read_text()
    texts.update(
        {f"docs/cli.md block {i}": t for i, t in enumerate(re.findall(r"```bash\n(.*?)```", doc, re.S))}
    )
    found = []
    for where, text in texts.items():
        for line in text.splitlines():
            words = shlex.split(line, comments=True)
            if words[:1] == ["ttt"]:
                found.append((where, words[1:]))
            elif words[:1] == ["torchrun"]:
                found.append((where, words[words.index("ttt.cli.main") + 1 :]))
    return found


def test_every_example_command_is_valid_and_none_trains_into_an_earlier_ones_run():
    """Each example parses, names known mixers and presets, passes its recipe's argument checks (nothing
    runs), and, run in the order shown, no train or convert example writes into a run directory an
    earlier one made without --resume (it would stop at 'already holds checkpoints')."""
    from ttt.cli.main import build_parser
    from ttt.layers import MIXERS
    from ttt.models import PRESETS
    from ttt.recipes import convert as convert_recipe
    from ttt.recipes import eval as eval_recipe
    from ttt.recipes import train as train_recipe
    from ttt.recipes.args import dataclass_from_namespace

    checks = {"train": train_recipe._check_args, "convert": convert_recipe._check_args,
              "eval": eval_recipe._check}  # fmt: skip
    examples = _examples()
    assert len({w for w, _ in examples}) == 9 and len(examples) >= 30
    runs: dict[str, set[str]] = {}
    for where, argv in examples:
        try:
            ns = build_parser().parse_args(argv)
        except SystemExit:
            pytest.fail(f"{where}: ttt {' '.join(argv)} does not parse")
        args = dataclass_from_namespace(ns._command.ARGS, ns)
        mixers = [getattr(args, "mixer", None), *(getattr(args, "layer_mixers", None) or "").split(","),
                  *(getattr(args, "mixers", None) or "").split(",")]  # fmt: skip
        assert set(filter(None, mixers)) <= set(MIXERS), (where, argv)
        if ns.command == "train":
            assert args.preset in PRESETS, (where, argv)
            if args.layer_mixers:
                assert len(args.layer_mixers.split(",")) == PRESETS[args.preset]["n_layers"], (where, argv)
        if ns.command in checks:
            checks[ns.command](args)
        if ns.command in ("train", "convert"):
            out = args.out or f"runs/{args.mixer}-{args.preset}"
            seen = runs.setdefault(where, set())
            assert args.resume or out not in seen, f"{where}: ttt {' '.join(argv)} trains into {out} again"
            seen.add(out)


def test_help_shows_every_default_the_same_way():
    """Every --x/--no-x switch says whether it is on by default; a default reads '(default: X)'."""
    import argparse
    import re

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(commands) == set(SUBCOMMANDS)
    for name, sub in commands.items():
        for action in sub._actions:
            if isinstance(action, argparse.BooleanOptionalAction):
                expected = "(default: on)" if action.default else "(default: off)"
                assert action.help.endswith(expected), (name, action.option_strings, action.help)
            assert not re.search(r"\(default [^:]", action.help or ""), (name, action.option_strings)


@pytest.mark.parametrize(
    "argv",
    [
        ["eval", "--max-batches", "1"],
        ["generate", "--prompt", "ab", "--max-new-tokens", "2"],
        ["bench", "--mixers", "ttt_linear", "--lengths", "16", "--repeats", "1"],
    ],
)
def test_every_command_runs_on_one_cpu_thread_by_default(trained, tmp_path, argv, capsys, monkeypatch):
    """eval, generate and bench ran on torch's default (every core) while train ran on one: a stranger's
    `ttt generate` on the shared 2-core machine gave 4-16 tokens/s, 222 with --threads 1. The caller's
    count comes back at the end (a notebook keeps its own)."""
    import torch

    before, calls = torch.get_num_threads(), []
    real = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (calls.append(n), real(n))[1])
    try:
        real(2)
        where = [] if argv[0] == "bench" else ["--checkpoint", str(trained)]
        out = [] if argv[0] == "generate" else ["--out", str(tmp_path / "out")]
        assert main([argv[0], *where, *argv[1:], *out]) == 0, capsys.readouterr().err
        assert calls == [1, 2] and torch.get_num_threads() == 2
    finally:
        real(before)


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["train", "--steps", "abc"], "ttt train: error: argument --steps: invalid int value: 'abc'"),
        (["generate", "--checkpoint", "x", "--top-p", "abc"], "ttt generate: error: argument --top-p"),
        (["trian"], "ttt: error: argument <command>: invalid choice: 'trian'"),
        (
            ["train", "--stpes", "20"],
            "ttt train: error: unrecognized arguments: --stpes 20 (did you mean --steps?)",
        ),
        (["eval", "--checkpoint"], "ttt eval: error: argument --checkpoint: expected one argument"),
        # a prefix is not an option (`--batch` was taken for --batch-size, an evidence script's `--lr` for
        # --lrs), and a misspelt required option is hinted at
        (["train", "--batch", "4"], "ttt train: error: unrecognized arguments: --batch 4"),
        (
            ["eval", "--chekpoint", "x"],
            "ttt eval: error: the following arguments are required: --checkpoint "
            "(did you mean --checkpoint?)",
        ),  # fmt: skip
        (["--foo", "train"], "ttt: error: unrecognized arguments: --foo"),
        (["train", "--verbose"], "ttt train: error: unrecognized arguments: --verbose;"),
    ],
)
def test_a_command_line_that_does_not_parse_is_one_line_too(argv, expected, capsys):
    """argparse's own errors printed the whole usage block (18 lines for train) before the error, and an
    unknown option of a command was blamed on `ttt`; docs/cli.md promises one line."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(expected) and err.count("\n") == 1, err


def test_ctrl_c_inside_exec_code_of_any_command_exits_with_130(tmp_path):
    """`python -m ttt.cli.main eval` (no run lock, Python's own SIGINT handler) ended by SIGINT when the
    KeyboardInterrupt was raised inside code run by exec of a string, though main() returned 130."""
    script = (
        "import os, signal, sys\n"
        "import ttt.cli.ls as ls\n"
        "ls.run = lambda args: exec('os.kill(os.getpid(), signal.SIGINT)\\nwhile True: pass')\n"
        "from ttt.cli.main import main\n"
        "sys.argv = ['ttt', 'ls']\n"
        "sys.exit(main())\n"
    )
    (tmp_path / "ctrl_c_main.py").write_text(script)
    proc = subprocess.run([sys.executable, "-m", "ctrl_c_main"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert proc.returncode == 130 and "ttt ls: interrupted" in proc.stderr, (proc.returncode, proc.stderr)


def test_a_huge_thread_count_is_refused_before_torch_takes_it(tmp_path, capsys):
    """--threads 100000 reached torch.set_num_threads and the process died with a segfault (rc 139, no
    message) (stranger review)."""
    import os

    limit = 4 * (os.cpu_count() or 1)
    argv = [*TINY_BENCH, "--mixers", "attention",
            "--out", str(tmp_path / "b"), "--threads", "100000"]  # fmt: skip
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith(
        f"ttt bench: error: --threads 100000 is more than 4 per CPU of this machine (1..{limit})"
    )
    assert not (tmp_path / "b").exists()


def test_eval_and_bench_never_replace_earlier_results(trained, tmp_path, capsys):
    """eval named its results by the step, the file's base name and the context only: the same command run
    again (or with other --max-batches / --batch-size / --bins), or --file a/x.txt then b/x.txt, replaced
    the earlier eval-*.json, table and plot; bench replaced bench.md, .json and .png (stranger review).
    Each now writes under the first free name (-2, -3, ...) and says where."""
    import json

    base = ["eval", "--checkpoint", str(trained), "--max-batches", "1", "--bins", "4"]
    assert main(base) == 0
    first = (trained / "eval-step-000003.json").read_text()
    assert main([*base[:-1], "2"]) == 0
    out = capsys.readouterr().out
    assert (trained / "eval-step-000003.json").read_text() == first
    again = json.loads((trained / "eval-step-000003-2.json").read_text())
    assert (
        again["out"] == str(trained / "eval-step-000003-2.json")
        and str(trained / "eval-step-000003-2") in out
    )
    assert len(again["positions"]) == 2 and (trained / "loss_by_position-step-000003-2.png").exists()
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "x.txt").write_text(f"text of {sub}: " + "the quick brown fox " * 20 + "\n")
        assert main(["eval", "--checkpoint", str(trained), "--file", str(tmp_path / sub / "x.txt")]) == 0
    scored = [
        json.loads((trained / f"eval-step-000003-file-x.txt{s}.json").read_text())["file"] for s in ("", "-2")
    ]
    assert scored == [str(tmp_path / "a" / "x.txt"), str(tmp_path / "b" / "x.txt")]

    bench = [*TINY_BENCH, "--out", str(tmp_path / "bn")]
    assert main([*bench, "--mixers", "attention"]) == 0
    assert main([*bench, "--mixers", "gated_deltanet"]) == 0
    captured = capsys.readouterr()
    assert "| gated_deltanet |" in captured.out and str(tmp_path / "bn" / "bench-2.md") in captured.err
    assert "attention" in (tmp_path / "bn" / "bench.md").read_text()
    assert "gated_deltanet" in (tmp_path / "bn" / "bench-2.md").read_text()
    assert (tmp_path / "bn" / "bench-2.json").exists()


def test_a_corpus_given_by_a_relative_path_is_recorded_absolute(corpus_dir, tmp_path, capsys, monkeypatch):
    """ttt train stored --corpus as typed: from another directory eval then scored (and named its results
    after) whatever held that relative name there, or failed with 'unknown corpus' (stranger review).
    A checkpoint of an earlier version that holds a relative path is refused rather than guessed at."""
    import json
    import shutil

    from ttt.models.checkpoint import update_checkpoint_meta

    w1, w2 = tmp_path / "w1", tmp_path / "w2"
    shutil.copytree(corpus_dir, w1 / "texts")
    (w2 / "texts").mkdir(parents=True)
    (w2 / "texts" / "other.txt").write_text("not the training text\n" * 300)
    monkeypatch.chdir(w1)
    argv = ["train", "--preset", "micro", "--corpus", "texts", "--steps", "2", "--batch-size", "2", "--context",
            "16", "--eval-batches", "1", "--out", "run", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    ckpt = find_checkpoint(w1 / "run")
    assert json.loads((ckpt / "checkpoint.json").read_text())["args"]["corpus"] == str(w1 / "texts")
    assert main(["eval", "--checkpoint", "run", "--max-batches", "1"]) == 0
    monkeypatch.chdir(w2)
    assert main(["eval", "--checkpoint", str(w1 / "run"), "--max-batches", "1", "--out", str(w2 / "e")]) == 0
    capsys.readouterr()
    here, there = (
        json.loads(p.read_text())
        for p in (w1 / "run" / "eval-step-000002.json", w2 / "e" / "eval-step-000002.json")
    )
    assert here["loss"] == there["loss"] and there["corpus"] == str(w1 / "texts")

    update_checkpoint_meta(
        ckpt, args={**json.loads((ckpt / "checkpoint.json").read_text())["args"], "corpus": "texts"}
    )
    for cmd in (
        ["eval", "--checkpoint", str(ckpt)],
        ["generate", "--checkpoint", str(ckpt), "--prompt-tokens", "4"],
    ):
        assert main(cmd) == 1
        err = capsys.readouterr().err
        assert err.startswith(
            f"ttt {cmd[0]}: error: the checkpoint names its corpus by the relative path 'texts'"
        )
        assert err.count("\n") == 1
    assert (
        main(
            [
                "eval",
                "--checkpoint",
                str(ckpt),
                "--max-batches",
                "1",
                "--corpus",
                str(w1 / "texts"),
                "--out",
                str(w2 / "f"),
            ]
        )
        == 0
    )


def test_small_bad_inputs_name_the_flag_and_the_value(trained, tmp_path, capsys):
    """From the stranger review: --seed 10**23 gave 'Overflow when unpacking long long'; --bins 0 did not
    say what it got; bench --mixers '' said "unknown mixer(s) []"; generate printed bytes / 1024 as KB."""
    huge = str(10**23)
    cases = [
        (["generate", "--checkpoint", str(trained), "--prompt", "x", "--seed", huge],
         f"ttt generate: error: --seed must be an integer in [0, 2**63), got {huge}"),
        (["train", "--preset", "micro", "--seed", "-1", "--out", str(tmp_path / "r")],
         "ttt train: error: --seed must be an integer in [0, 2**63), got -1"),
        (["eval", "--checkpoint", str(trained), "--bins", "0"], "ttt eval: error: --bins must be >= 1, got 0"),
        (["bench", "--mixers", " , ", "--out", str(tmp_path / "b")],
         "ttt bench: error: --mixers is empty; expected comma-separated names of"),
    ]  # fmt: skip
    for argv, message in cases:
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert err.startswith(message) and err.count("\n") == 1, err
    assert not (tmp_path / "r").exists() and not (tmp_path / "b").exists()
    assert main(["generate", "--checkpoint", str(trained), "--prompt", "x", "--max-new-tokens", "2"]) == 0
    assert " KiB]" in capsys.readouterr().err


def test_ls_flags_a_checkpoint_json_that_eval_would_refuse(trained, tmp_path, capsys):
    """ttt ls listed a checkpoint whose checkpoint.json had been edited (its digest no longer matching, the
    mixer shown as 'bogus') as healthy, while eval and --resume refuse it (stranger review)."""
    meta = trained / "step-000003" / "checkpoint.json"
    meta.write_text(meta.read_text().replace('"mixer": "ttt_linear"', '"mixer": "bogus"', 1))
    assert main(["ls", "--runs", str(tmp_path)]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if str(trained / "step-000003") in line)
    assert line.endswith(
        "[damaged: checkpoint.json: its content does not match its sha256 (the file was edited or corrupted)]"
    ), line


def test_the_meta_device_is_refused_with_the_flag_named(tmp_path, capsys):
    """--device meta passed the check and failed later with "META device type not an accelerator" (bench)
    or "Tensor.item() cannot be called on meta tensors" (eval) (stranger review)."""
    assert main([*TINY_BENCH, "--mixers", "attention", "--device", "meta", "--out", str(tmp_path / "b")]) == 1
    err = capsys.readouterr().err
    assert (
        err.startswith("ttt bench: error: --device 'meta': the meta device holds no data")
        and err.count("\n") == 1
    )
    assert not (tmp_path / "b").exists()


def test_ls_flags_a_run_without_latest_and_a_step_directory_holding_another_step(trained, tmp_path, capsys):
    """ttt ls listed a run whose 'latest' was gone (eval and --resume refuse it) and a step-000007 that
    holds step 3 without a word (stranger review)."""
    (trained / "latest").unlink()
    (trained / "step-000003").rename(trained / "step-000007")
    assert main(["ls", "--runs", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"  {trained} has no 'latest': ttt eval and --resume refuse the run; name a step directory" in out
    line = next(line for line in out.splitlines() if str(trained / "step-000007") in line)
    assert line.endswith("[damaged: the directory is named step 7 but holds step 3]"), line


def test_ls_follows_linked_runs_and_lists_hf_model_directories(trained, tmp_path, capsys):
    """ttt ls skipped a run reached through a symbolic link and the HF directories that ttt convert writes,
    both of which eval and generate accept (stranger review)."""
    pytest.importorskip("transformers")
    from ttt.cli.ls import human_bytes
    from ttt.models.hf import TTTForCausalLM

    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "linked").symlink_to(trained, target_is_directory=True)
    (runs / "loop").symlink_to(runs, target_is_directory=True)  # a cycle must not hang the walk
    hf = runs / "conv" / "hf"
    TTTForCausalLM.from_checkpoint(str(trained)).save_pretrained(hf)
    (runs / "other").mkdir()
    (runs / "other" / "config.json").write_text('{"model_type": "llama"}')  # not a ttt model: not listed
    assert main(["ls", "--runs", str(runs)]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if str(runs / "linked" / "step-000003") in line)
    assert line.endswith("[latest]"), line
    line = next(line for line in out.splitlines() if str(hf) in line)
    model = (hf / "model.safetensors").stat().st_size
    assert f"(model {human_bytes(model)})  HF model" in line and "[damaged" not in line, line
    assert "in 3 checkpoints" in out and str(runs / "other") not in out and "loop" not in out
    (hf / "model.safetensors").write_bytes((hf / "model.safetensors").read_bytes()[:-10])
    assert main(["ls", "--runs", str(runs)]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if str(hf) in line)
    assert line.endswith("[damaged: model.safetensors truncated]"), line
