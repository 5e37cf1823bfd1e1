"""The ``jlora`` command: convert, inspect, merge and quantize adapters and checkpoints.

  jlora convert SRC DST       PEFT adapter directory <-> jlora adapter checkpoint
  jlora inspect DIR           what an adapter, a Hugging Face model or a jlora checkpoint holds
  jlora merge BASE ADAPTER DST
                              base model + adapter -> merged Hugging Face checkpoint
                              (optionally with bitsandbytes NF4/FP4 weights)
  jlora quantize SRC DST      Hugging Face checkpoint -> NF4/FP4 (transformers + bitsandbytes)
                              or int8/int4 (a jlora checkpoint), with a size and error report

Every DIR, SRC, BASE or ADAPTER may be a directory or a Hugging Face Hub name
(``org/name``) found in the local Hugging Face cache (nothing is downloaded).
Outputs are written beside DST and swapped in whole; an existing DST is
replaced only with ``--force``. ``jlora COMMAND --help`` explains each flag.
Every user error (a missing or malformed file, an unwritable destination)
ends the command with exit status 1 and one line on stderr.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from jlora.cli.adapters import JLORA, PEFT, convert, inspect
from jlora.cli.models import BNB_SCHEMES, DTYPES, SCHEMES, merge, quantize

__all__ = ["main", "convert", "inspect", "merge", "quantize"]


def _size(text: str) -> int:
  """'2GB', '500MB', '1000000' -> bytes."""
  units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
  t = text.strip().upper()
  for unit in sorted(units, key=len, reverse=True):
    if t.endswith(unit):
      return int(float(t[:-len(unit)]) * units[unit])
  return int(t)


def _common(p: argparse.ArgumentParser, progress: bool = True) -> None:
  p.add_argument("--force", action="store_true",
                 help="replace DST if it exists (atomically: a failed run leaves it as it was)")
  if progress:
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars (by default shown on a terminal for 64+ tensors)")


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="jlora", description="LoRA adapters and checkpoints for JAX/Flax, to and from "
      "Hugging Face. Names may be directories or Hugging Face Hub names in the local cache.",
      epilog="`jlora COMMAND --help` explains each command's flags.")
  sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

  c = sub.add_parser("convert", help="PEFT adapter dir <-> jlora adapter checkpoint",
                     description="Convert a PEFT adapter directory into a jlora (orbax) adapter "
                     "checkpoint, or a jlora checkpoint into a PEFT adapter directory.")
  c.add_argument("src", help="a PEFT adapter directory or a jlora adapter checkpoint")
  c.add_argument("dst", help="the output directory")
  c.add_argument("--to", choices=(JLORA, PEFT), help="output format (default: the other one)")
  c.add_argument("--base", help="Hugging Face model (directory or Hub name) to check the adapter "
                 "against; without it the shapes come from the adapter file alone")
  c.add_argument("--scan-layers", action="store_true",
                 help="PEFT -> jlora: stack per-layer weights under 'layers' (needs --base)")
  c.add_argument("--base-model-name", help="jlora -> PEFT: base_model_name_or_path to record in "
                 "adapter_config.json (default: --base)")
  c.add_argument("--task-type", default="CAUSAL_LM",
                 help="jlora -> PEFT: PEFT task_type to record (default CAUSAL_LM)")
  _common(c, progress=False)

  i = sub.add_parser("inspect", help="what an adapter, a Hugging Face model or a jlora "
                     "checkpoint holds", description="Print an adapter's paths, shapes, ranks, "
                     "alphas and size (PEFT or jlora), a Hugging Face model's architecture, "
                     "tensors and size (from the safetensors headers only), or a jlora base "
                     "checkpoint's size.")
  i.add_argument("directory", help="a PEFT adapter, a Hugging Face model directory or a jlora "
                 "checkpoint (or a Hub name)")

  m = sub.add_parser("merge", help="base model + adapter -> merged Hugging Face checkpoint",
                     description="Merge an adapter into its base model (W + s*a@b, or DoRA's "
                     "merged weight) and write the result as a Hugging Face checkpoint that "
                     "transformers' from_pretrained loads, with the base's tokenizer files.")
  m.add_argument("base", help="the base model: a Hugging Face model directory or Hub name")
  m.add_argument("adapter", help="a PEFT adapter directory or a jlora adapter checkpoint (or "
                 "Hub name) trained on BASE")
  m.add_argument("dst", help="the output directory")
  m.add_argument("--quantize", choices=BNB_SCHEMES, help="also quantize the merged Dense kernels "
                 "(all but the head) to bitsandbytes 4-bit weights")
  m.add_argument("--block-size", type=int, default=64,
                 help="values per quantization block with --quantize (default 64)")
  m.add_argument("--no-double-quant", action="store_true",
                 help="with --quantize, keep one float32 scale per block (default: scales "
                 "quantized to 8 bits, as bitsandbytes' compress_statistics)")
  m.add_argument("--dtype", choices=DTYPES, help="dtype of the written weights (default: the "
                 "base checkpoint's); the merge itself runs in float32")
  m.add_argument("--max-shard-size", type=_size, help="split the weights into safetensors "
                 "shards of at most this size (e.g. 2GB) with an index (default: one file)")
  _common(m)

  q = sub.add_parser("quantize", help="Hugging Face checkpoint -> NF4/FP4/int8/int4, with a "
                     "size and error report", description="Quantize every Dense kernel but the "
                     "head (of 4096+ values) and report the size before and after and each "
                     "weight's relative error |W - Q| / |W|.")
  q.add_argument("src", help="a Hugging Face model directory or Hub name")
  q.add_argument("dst", help="the output directory")
  q.add_argument("--scheme", choices=SCHEMES, default="nf4", help="nf4/fp4: bitsandbytes' 4-bit "
                 "code books (bit for bit); int8/int4: jlora's blockwise absmax integers "
                 "(default nf4)")
  q.add_argument("--block-size", type=int, default=64, help="values per block (default 64)")
  q.add_argument("--no-double-quant", action="store_true",
                 help="keep one float32 scale per block (default: scales quantized to 8 bits)")
  q.add_argument("--format", dest="fmt", choices=("hf", "jlora"),
                 help="hf: a Hugging Face checkpoint with bitsandbytes weights that transformers "
                 "loads (nf4/fp4 only; their default); jlora: a jlora checkpoint of the "
                 "quantized params tree (jlora.restore; the default for int8/int4)")
  q.add_argument("--dtype", choices=DTYPES, help="dtype the weights dequantize to and the other "
                 "tensors are stored in (default: the checkpoint's)")
  _common(q)
  return p


def main(argv: Sequence[str] | None = None) -> int:
  """Entry point of the ``jlora`` console script; returns the exit status."""
  args = _parser().parse_args(argv)
  progress = (False if getattr(args, "no_progress", False) or not sys.stderr.isatty() else None)
  try:
    if args.command == "convert":
      convert(args.src, args.dst, to=args.to, base=args.base, scan_layers=args.scan_layers,
              base_model_name=args.base_model_name, task_type=args.task_type, force=args.force)
    elif args.command == "inspect":
      inspect(args.directory)
    elif args.command == "merge":
      merge(args.base, args.adapter, args.dst, quantize=args.quantize,
            block_size=args.block_size, double_quant=not args.no_double_quant, dtype=args.dtype,
            max_shard_size=args.max_shard_size, force=args.force, progress=progress)
    elif args.command == "quantize":
      quantize(args.src, args.dst, scheme=args.scheme, block_size=args.block_size,
               double_quant=not args.no_double_quant, fmt=args.fmt, dtype=args.dtype,
               force=args.force, progress=progress)
  except (ValueError, OSError, NotImplementedError) as e:
    print(f"jlora {args.command}: error: {_one_line(e)}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print(f"jlora {args.command}: interrupted", file=sys.stderr)
    return 130
  return 0


def _one_line(e: BaseException) -> str:
  """The error as one bounded line (OSErrors: what failed and on which path)."""
  if isinstance(e, OSError) and e.strerror:
    text = f"{e.strerror}: {e.filename}" if e.filename else e.strerror
  else:
    text = str(e) or type(e).__name__
  text = " ".join(text.split())
  return text if len(text) <= 1000 else text[:997] + "..."
