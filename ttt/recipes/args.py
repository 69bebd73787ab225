"""Typed arguments of the recipes, and the one path from an argument dataclass to ``argparse`` options.

Every subcommand of ``ttt`` and every runnable recipe (``python -m ttt.recipes.mqar``, ``...digits``)
declares its arguments as a dataclass whose attribute docstrings are the ``--help`` text;
:func:`add_dataclass_args` turns the fields into options and :func:`dataclass_parser` builds a whole
parser for a recipe run on its own. Help text passes through :func:`plain`, so no reST or Markdown
markup reaches a terminal.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import inspect
import re
import sys
import textwrap
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any

__all__ = [
    "BenchArgs",
    "EvalArgs",
    "GenerateArgs",
    "LsArgs",
    "Parser",
    "TrainArgs",
    "add_dataclass_args",
    "add_subcommand",
    "dataclass_from_namespace",
    "dataclass_parser",
    "field_docs",
    "given_options",
    "parse_dataclass",
    "plain",
    "positive_int",
]


#: ``metadata`` key of the dataclass field that receives the names of the options given on the command
#: line (:func:`dataclass_from_namespace` fills it; it is no option itself)
GIVEN = "given_options"


@dataclass
class TrainArgs:
    """Arguments of :func:`ttt.recipes.train.train`."""

    mixer: str = "ttt_linear"
    """mixer of every block (a name in ttt.layers.MIXERS; ttt ls lists them)"""
    preset: str = "tiny"
    """model shape: a name in ttt.models.PRESETS (ttt ls shows each one's size)"""
    layer_mixers: str | None = None
    """comma-separated mixer per block for hybrids, e.g. 'ttt_linear,attention,ttt_linear,attention'
    (default: every block has --mixer)"""
    mixer_kwargs: str | None = None
    """JSON of extra constructor arguments per mixer, e.g. '{"ttt_linear": {"mini_batch_size": 8}}' (a key
    the mixer does not take is refused, naming those it takes, and so is a mixer the run does not build
    (by --mixer, --layer-mixers or --match-params); docs/layers.md). A key given wins over the
    defaults of `ttt train`, which give TTT-Linear and TTT-MLP short convolutions on q and k (share_qk, as
    the TTT paper's Mamba-backbone "(M)" models) and attention and swa short convolutions on q, k, v
    (conv_size 4; docs/results.md); the paper's Transformer-backbone layer: '{"ttt_linear": {"share_qk":
    false}}', plain attention: '{"attention": {"conv_size": 0}}'"""
    match_params: str | None = "attention"
    """resize the SwiGLU width so the model has the parameter count of the model `ttt train --mixer REF`
    builds (with its defaults and any --mixer-kwargs given for REF; 'none': off)"""
    corpus: str = "shakespeare"
    """corpus name (shakespeare, python-stdlib) or path to a text file / directory"""
    tokenizer: str = "bytes"
    """'bytes' (256 ids, bits per byte) or 'bpe' (byte-level BPE trained on the training split)"""
    vocab_size: int = 1024
    """BPE vocabulary size, 257 to 4,194,304 (ignored for bytes)"""
    steps: int = 600
    """optimizer steps; --resume with a larger --steps extends a run: its warm-up keeps the length it had
    when the run started and the cosine decay is stretched to the new end"""
    batch_size: int = 16
    """sequences per step (global, over all processes)"""
    context: int = 128
    """tokens per training sequence"""
    lr: float = 3e-3
    """peak learning rate (AdamW)"""
    min_lr: float = 1e-5
    """learning rate the cosine schedule reaches at the end of the run (after the last step, as torch's
    CosineAnnealingLR: the last step itself runs a little above it)"""
    warmup: float = 0.1
    """linear warm-up, as a fraction of --steps (< 1) or a number of steps (>= 1); its length in steps is
    fixed when the run starts (recorded in its checkpoints): a --resume that extends --steps keeps it"""
    weight_decay: float = 0.1
    """AdamW weight decay on matrices (not on norms, biases, gates)"""
    grad_clip: float = 1.0
    """clip the global gradient norm to this (0: off)"""
    skip_spikes: float = 0.0
    """skip the update of a step whose gradient norm is more than this multiple of the median of the last 20
    steps' norms (0: never; else > 1): its batch is used up and its metrics.jsonl record says skipped"""
    eval_every: int = 200
    """validate every this many steps and at the end (0: only at the end)"""
    eval_batches: int = 16
    """validation batches (of --batch-size sequences) per evaluation"""
    ckpt_every: int = 200
    """checkpoint every this many steps and at the end (0: only at the end); Ctrl-C saves the last step"""
    keep_checkpoints: int = 2
    """keep this many newest checkpoints, older ones are deleted as each is saved (0: keep every one)"""
    out: str | None = None
    """run directory for checkpoints and plots (default: runs/<mixer>-<preset>)"""
    resume: bool = False
    """continue the run in --out from its latest checkpoint, with the arguments stored there (--out and
    --resume are the whole command; docs/cli.md says which others may be given)"""
    overwrite: bool = False
    """start over: delete what a run writes in --out (checkpoints, loss_curve.png, result.json,
    metrics.jsonl, TensorBoard event files, eval files), once every argument is checked; other files stay"""
    seed: int = 0
    """seed of the initialisation and of the batch sampler"""
    device: str = "auto"
    """'auto' (CUDA when present, else CPU), 'cpu', 'cuda', 'cuda:1', ..."""
    dtype: str = "float32"
    """'float32', or 'bfloat16': torch.autocast mixed precision (matmuls in bfloat16, TTT inner loops in
    float32); saves time and memory on CUDA; on CPU it pays only where the CPU has bfloat16 matrix units
    (AMX: a ttt convert step's forward and backward took 0.69x the time on one, docs/convert.md) and may
    be slower without them"""
    threads: int | None = None
    """torch CPU threads (default: 1 on a CPU, the fast choice when cores are shared; more can help a
    larger preset on idle cores: see docs/cli.md)"""
    progress: bool = True
    """show a progress bar when stderr is a terminal (else a log line every --log-every steps)"""
    log_every: int = 50
    """print a line every this many steps when there is no progress bar (a log file; 0: validations only)"""
    plot: bool = True
    """write loss_curve.png into the run directory at the end"""
    strategy: str = "ddp"
    """'ddp' (weights replicated on every process) or 'fsdp' (FSDP2: weights, gradients and optimizer state
    sharded; with --dtype bfloat16 the sharded weights stay float32 and compute runs in bfloat16; sharded
    checkpoints in <out>/dcp plus the usual safetensors export); one process runs either"""
    activation_checkpointing: bool = False
    """recompute each block in the backward: activation memory of one block instead of all, for about one
    more forward; the same results (any --strategy; may change on --resume)"""
    context_parallel: int = 1
    """split every training sequence along T over this many processes (consecutive ranks; TTT-Linear /
    TTT-MLP mixers without share_qk, which ttt train turns on by default: add --mixer-kwargs
    '{"ttt_linear": {"share_qk": false}}'; --context divisible by it); the processes are this many times the
    data-parallel groups (torchrun --nproc_per_node 4 with --context-parallel 2: 2 groups of 2)"""
    given: frozenset[str] | None = field(default=None, compare=False, repr=False, metadata={GIVEN: True})
    """not an option: the names of the fields given on the command line (`ttt train` fills it), which
    --resume compares with the checkpoint's arguments, whatever their value; None (a TrainArgs made in
    Python): the fields whose value differs from their default"""


@dataclass
class EvalArgs:
    """Arguments of :func:`ttt.recipes.eval.evaluate_checkpoint`."""

    checkpoint: str = ""
    """a run directory (its latest checkpoint), one of its step-N checkpoint directories, or a HF directory
    saved from a ttt model (hf/ of ttt convert)"""
    file: str | None = None
    """score the whole of this UTF-8 text file, or of every text file in this directory (recursively; other
    files are skipped and listed; not a ttt run directory), read with the model's tokenizer: every token
    after the first, in windows of --context tokens; --max-batches does not apply"""
    corpus: str | None = None
    """corpus to evaluate on when --file is not given (default: the one it was trained on); only its
    validation split is scored: the last 10% of a text file's lines, every 10th file of a directory, the
    held-out plays / modules of a named corpus"""
    context: int | None = None
    """tokens per window (default: the training context); longer windows test length generalisation"""
    batch_size: int = 8
    """windows per batch"""
    max_batches: int | None = 32
    """stop after this many batches of a validation split, >= 1 ('none': the whole split)"""
    bins: int = 16
    """number of position bins in the loss-vs-position table"""
    out: str | None = None
    """directory for eval-step-N.json and loss_by_position-step-N.md/.png, named by the checkpoint's
    step (and with --file by the file's name: eval-step-N-file-NAME.json; with another --corpus or
    --context than the checkpoint's by them: ...-corpus-NAME, ...-context-N; a HF directory by ``hf``
    in place of step-N; then -2, -3, ... where those files exist) so evaluations never
    overwrite each other (default: the run directory of the checkpoint, or the checkpoint directory itself
    when it is not in a run directory; nothing is written elsewhere)"""
    device: str = "auto"
    """'auto', 'cpu', 'cuda', ..."""
    threads: int | None = None
    """torch CPU threads (default: 1 on a CPU, the fast choice when cores are shared; docs/cli.md)"""


@dataclass
class GenerateArgs:
    """Arguments of :func:`ttt.recipes.generate.generate_text`."""

    checkpoint: str = ""
    """a run directory (its latest checkpoint), one of its step-N checkpoint directories, or a HF directory
    saved from a ttt model (hf/ of ttt convert)"""
    prompt: str | None = None
    """prompt text (give one of --prompt, --prompt-file, --prompt-tokens, --prompts-file)"""
    prompt_file: str | None = None
    """read the prompt from this UTF-8 text file"""
    prompt_tokens: int | None = None
    """use the first N tokens of the validation split of the corpus the checkpoint was trained on as the
    prompt (for decode-speed measurements)"""
    prompts_file: str | None = None
    """one prompt per line: continue all of them as one batch (prompts of any lengths; not streamed)"""
    max_new_tokens: int = 200
    """tokens to generate"""
    temperature: float = 0.8
    """sampling temperature, >= 0 (0: greedy)"""
    top_k: int | None = 40
    """sample from the k most likely tokens, >= 1 ('none': all)"""
    top_p: float | None = None
    """nucleus sampling: sample from the fewest most likely tokens whose probability sums to at least p,
    0 < p <= 1, applied after --top-k ('none': off) (default: none)"""
    echo: bool = True
    """print the prompt before its continuation (--no-echo: only the new text)"""
    seed: int = 0
    """sampling seed"""
    stream: bool = True
    """print tokens as they come (--no-stream: the whole text at the end)"""
    device: str = "auto"
    """'auto', 'cpu', 'cuda', ..."""
    threads: int | None = None
    """torch CPU threads (default: 1 on a CPU, the fast choice when cores are shared; docs/cli.md)"""


@dataclass
class BenchArgs:
    """Arguments of :func:`ttt.recipes.bench.bench`."""

    mixers: str = "ttt_linear,ttt_mlp,gated_deltanet,attention"
    """comma-separated mixers to compare (names in ttt.layers.MIXERS; ttt ls lists them)"""
    dim: int = 128
    """model width C of the benchmarked layer"""
    heads: int = 4
    """heads of the benchmarked layer (head dim = --dim / --heads)"""
    batch_size: int = 1
    """sequences per timed call"""
    lengths: str = "256,512,1024,2048"
    """comma-separated context lengths"""
    repeats: int = 3
    """timed repetitions (after one warm-up); the median is reported"""
    out: str = "runs/bench"
    """directory for bench.md, bench.json and bench.png (bench-2.*, bench-3.*, ... where earlier results
    are: nothing is replaced) (default: runs/bench under the current directory, where ttt train writes its
    runs)"""
    device: str = "auto"
    """'auto', 'cpu', 'cuda', ..."""
    threads: int | None = None
    """torch CPU threads (default: 1 on a CPU, the fast choice when cores are shared; docs/cli.md)"""


@dataclass
class LsArgs:
    """Arguments of ``ttt ls``."""

    runs: str = "runs"
    """directory searched (recursively) for checkpoints, whose sizes on disk are listed"""


@cache
def field_docs(cls: type) -> dict[str, str]:
    """``{field: docstring}`` read from the attribute docstrings of a dataclass's source."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))  # a class defined in a function is indented
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
        ):
            docs[node.target.id] = str(nxt.value.value)
    missing = {f.name for f in dataclasses.fields(cls)} - set(docs)
    if missing:
        raise RuntimeError(f"{cls.__name__}: fields without a docstring: {sorted(missing)}")
    return docs


# :func:`x`, :meth:`x`, ... -> x; ``x`` -> x; `x` -> x; **x** -> x
_MARKUP = (
    (re.compile(r":[a-z]+(?::[a-z]+)?:`~?([^`]*)`"), r"\1"),
    (re.compile(r"``([^`]*)``"), r"\1"),
    (re.compile(r"`([^`]*)`"), r"\1"),
    (re.compile(r"\*\*([^*]+)\*\*"), r"\1"),
)


def plain(text: str | None) -> str:
    """``text`` without reST / Markdown inline markup (roles, literals, bold): what ``--help`` shows."""
    text = text or ""
    for pattern, repl in _MARKUP:
        text = pattern.sub(repl, text)
    return text


def _split_optional(tp: Any) -> tuple[Any, bool]:
    """``int | None`` -> ``(int, True)``; ``int`` -> ``(int, False)``."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(tp))
    return tp, False


def _or_none(tp: Callable[[str], Any]) -> Callable[[str], Any]:
    """A parser of ``tp`` values that also reads ``none`` (any case) as None."""

    def parse(text: str) -> Any:
        return None if text.strip().lower() == "none" else tp(text)

    # argparse names the type in its error: "invalid int-or-none value: 'x'"
    parse.__name__ = f"{tp.__name__}-or-none"
    return parse


def add_dataclass_args(
    parser: argparse.ArgumentParser,
    cls: type,
    *,
    skip: tuple[str, ...] = (),
    required: tuple[str, ...] = (),
    notes: dict[str, str] | None = None,
    aliases: dict[str, Sequence[str]] | None = None,
) -> None:
    """One ``--option`` per field of the dataclass ``cls`` with its type, default and docstring.

    ``required``: fields that must be given (their default is not shown). ``notes``: text appended to
    a field's help (e.g. choices read from a registry). ``aliases``: more flags of a field, e.g.
    ``{"mixers": ["--mixer"]}``. The default is appended to the help unless it is None or the docstring
    already speaks of it (a ``bool``'s as "on" / "off"). ``bool`` fields become ``--x / --no-x``;
    ``int | None`` and ``float | None`` options take ``none`` (any case) for None. Field types must be str,
    int, float or bool (optionally ``| None``); another type is refused here, not at parse time.
    """
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or f.metadata.get(GIVEN):
            continue
        flags = ["--" + f.name.replace("_", "-"), *((aliases or {}).get(f.name, ()))]
        doc = plain(docs[f.name] + (f"; {notes[f.name]}" if notes and f.name in notes else ""))
        # argparse expands %-formats in help texts
        doc = doc.replace("%", "%%")
        tp, optional = _split_optional(hints[f.name])
        if tp not in (str, int, float, bool):
            raise TypeError(f"{cls.__name__}.{f.name}: a CLI field is str, int, float or bool, not {tp}")
        if tp is bool:
            if "(default:" not in doc.lower():
                doc += " (default: on)" if f.default else " (default: off)"
            action = parser.add_argument(
                *flags, dest=f.name, action=_GivenBooleanOptional, default=f.default, help=doc
            )
            action.help = doc  # Python 3.10's BooleanOptionalAction appends "(default: True)" of its own
            continue
        if f.name in required:
            parser.add_argument(*flags, dest=f.name, action=_GivenStore, type=tp, required=True,
                                metavar=f.name.upper(), help=doc)  # fmt: skip
            continue
        # None says nothing a user can act on; a docstring that names its default says it better
        if f.default is not None and "(default:" not in doc.lower():
            doc += f" (default: {f.default})".replace("%", "%%")
        parser.add_argument(
            *flags,
            dest=f.name,
            action=_GivenStore,
            type=_or_none(tp) if optional and tp in (int, float) else tp,
            default=f.default,
            metavar=f.name.upper(),
            help=doc,
        )


_GIVEN_DEST = "_given_options"  # the namespace attribute of the options given, by their dest


def given_options(ns: argparse.Namespace) -> frozenset[str]:
    """The fields whose options were given on the command line that ``ns`` was parsed from (at any value,
    their default too): what a parser of :func:`add_dataclass_args` recorded."""
    return frozenset(getattr(ns, _GIVEN_DEST, ()))


def _note_given(namespace: argparse.Namespace, dest: str) -> None:
    given = getattr(namespace, _GIVEN_DEST, None)
    if given is None:
        given = set()
        setattr(namespace, _GIVEN_DEST, given)
    given.add(dest)


class _GivenStore(argparse._StoreAction):
    """argparse's ``store``, noting that the option was given (:func:`given_options`)."""

    def __call__(self, parser: Any, namespace: argparse.Namespace, values: Any, option_string: Any = None):
        _note_given(namespace, self.dest)
        super().__call__(parser, namespace, values, option_string)


class _GivenBooleanOptional(argparse.BooleanOptionalAction):
    """``--x / --no-x``, noting that the option was given (:func:`given_options`)."""

    def __call__(self, parser: Any, namespace: argparse.Namespace, values: Any, option_string: Any = None):
        _note_given(namespace, self.dest)
        super().__call__(parser, namespace, values, option_string)


def dataclass_from_namespace(cls: type, ns: argparse.Namespace) -> Any:
    """The ``cls`` instance held by the options that :func:`add_dataclass_args` added to ``ns``; a field
    with ``metadata={GIVEN: True}`` (``TrainArgs.given``) gets the names of the options given."""
    fields = dataclasses.fields(cls)
    values = {f.name: getattr(ns, f.name) for f in fields if not f.metadata.get(GIVEN)}
    names = set(values)
    values |= {f.name: given_options(ns) & names for f in fields if f.metadata.get(GIVEN)}
    return cls(**values)


def positive_int(text: str) -> int:
    """An option of one positive integer (``--threads``) (argparse reports the error)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


class Parser(argparse.ArgumentParser):
    """argparse's parser with errors in one line, as every other error of ``ttt``: ``PROG: error: MESSAGE;
    `PROG -h` lists the options`` and exit code 2 (the usage block it printed first hid the message); an
    option is its whole name, never a prefix of it.
    :meth:`parse` blames a subcommand's unknown options on that subcommand, not on ``ttt``, and an unknown
    option (or a missing required one) gets the nearest known option as a hint."""

    _words: list[str] = []  # the command line :meth:`parse` is reading, for the hints of :meth:`error`

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # no prefixes of options: `--lr 1e-3` was taken for `--lrs` and started a whole experiment
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> typing.NoReturn:
        if message.startswith("the following arguments are required"):  # often a typo of one of them
            message += self._hint(self._words)
        self.exit(2, f"{self.prog}: error: {message}; `{self.prog} -h` lists the options\n")

    def _hint(self, words: Sequence[str]) -> str:
        """`` (did you mean --steps?)`` for the words that look like a misspelt option of this parser."""
        known = {s[2:]: s for a in self._actions for s in a.option_strings if s.startswith("--")}
        hints = []
        for word in words:
            name = word.split("=", 1)[0]
            if name.startswith("--") and name[2:] not in known:
                hints += [known[m] for m in difflib.get_close_matches(name[2:], list(known), 1, cutoff=0.75)]
        return f" (did you mean {', '.join(hints)}?)" if hints else ""

    def parse(self, argv: Sequence[str] | None = None) -> argparse.Namespace:
        """``parse_args``, with unknown options reported by the (sub)command that was given them."""
        words = list(sys.argv[1:] if argv is None else argv)
        Parser._words = words
        ns, extra = self.parse_known_args(words)
        if extra:
            owner, command = getattr(ns, "_parser", None), getattr(ns, "command", None)
            after = words[words.index(command) + 1 :] if command in words else []
            if owner is None or not all(x in after for x in extra):  # typed before the command: ttt's
                owner = self
            owner.error(f"unrecognized arguments: {' '.join(extra)}{owner._hint(extra)}")
        return ns


def _parser_options(description: str | None, epilog: str | None) -> dict[str, Any]:
    """What every parser of ``ttt`` shares: plain description and epilog, laid out as written."""
    return {
        "description": plain(description),
        "epilog": plain(epilog) if epilog else None,
        "formatter_class": argparse.RawDescriptionHelpFormatter,
    }


def dataclass_parser(
    cls: type,
    description: str | None = None,
    *,
    prog: str | None = None,
    epilog: str | None = None,
    **kw: Any,
) -> argparse.ArgumentParser:
    """A whole parser for a recipe run on its own (``python -m ttt.recipes.mqar``): ``description``
    (e.g. the module docstring) and ``epilog`` without markup, one option per field of ``cls``; ``kw`` as
    :func:`add_dataclass_args`."""
    parser = Parser(prog=prog, **_parser_options(description, epilog))
    add_dataclass_args(parser, cls, **kw)
    return parser


def add_subcommand(
    subparsers: argparse._SubParsersAction,
    name: str,
    cls: type | None = None,
    *,
    help: str,
    description: str | None,
    epilog: str | None = None,
    **kw: Any,
) -> argparse.ArgumentParser:
    """A ``ttt <name>`` subcommand built like :func:`dataclass_parser`: one option per field of ``cls``
    (none when ``cls`` is None); ``help`` is its line in ``ttt -h``; ``kw`` as :func:`add_dataclass_args`."""
    parser = subparsers.add_parser(name, help=plain(help), **_parser_options(description, epilog))
    parser.set_defaults(_parser=parser)  # so that Parser.parse blames its unknown options on it
    if cls is not None:
        add_dataclass_args(parser, cls, **kw)
    return parser


def parse_dataclass(
    cls: type, argv: Sequence[str] | None = None, description: str | None = None, **kw: Any
) -> Any:
    """Parse ``argv`` (default ``sys.argv[1:]``) into a ``cls`` instance; ``kw`` as
    :func:`dataclass_parser`."""
    parser = dataclass_parser(cls, description, **kw)
    return dataclass_from_namespace(cls, parser.parse(argv))
