"""The ``jlora`` command line: convert adapters between PEFT and jlora, inspect them.

  jlora convert SRC DST [--to jlora|peft] [--base HF_DIR] [--scan-layers]
                        [--base-model-name NAME] [--task-type TYPE] [--force]
  jlora inspect DIR

``convert`` reads a PEFT adapter directory (``adapter_config.json`` +
``adapter_model.safetensors``) and writes a jlora (orbax) adapter checkpoint,
or the other way round; the direction follows from what SRC is (``--to``
states it explicitly). ``--base`` names the Hugging Face model directory the
adapter belongs to: with it the adapter is checked against the model's
weights (and may target a scanned layer stack with ``--scan-layers``);
without it the shapes come from the adapter file alone. An existing DST is
replaced only with ``--force`` (and then atomically: a failed conversion
leaves it as it was).

Every user error (a missing or malformed file, an unwritable destination)
ends the command with exit status 1 and one line on stderr.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Sequence

from jlora.errors import CheckpointError

PEFT, JLORA = "peft", "jlora"


def _kind_of(directory: str) -> str:
  """"peft" or "jlora": what the adapter directory holds (by its PEFT config)."""
  from jlora.interop.peft import config as peft_config
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"{directory!r} is not a directory")
  if os.path.isfile(os.path.join(directory, peft_config.CONFIG_NAME)):
    return PEFT
  return JLORA


def _base_params(base: str | None, scan_layers: bool) -> Any:
  from jlora.interop import from_hf
  _, params = from_hf(base, scan_layers=scan_layers)
  return params


def _load_peft(src: str, base: str | None, scan_layers: bool):
  from jlora.interop import peft
  if scan_layers and base is None:
    raise ValueError("--scan-layers needs --base: the number of layers of the stack comes "
                     "from the model")
  if base is not None:
    return peft.load(src, _base_params(base, scan_layers))
  copies = sorted(n for n, parts in peft.split_keys(peft.read_tensors(src)).items()
                  if "base" in parts)
  if copies:
    raise ValueError(f"{src!r} carries copies of base weights ({', '.join(copies)}), which PEFT "
                     "saves for embedding layers; pass --base HF_DIR so they can be checked "
                     "against the model")
  return peft.load(src, peft.params_from_file(src))


def _check_fits(adapter: Any, base: str, scan_layers: bool) -> None:
  from jlora import adapter as adapter_lib
  from jlora import lora as L
  from jlora import paths
  flat = paths.flatten(_base_params(base, scan_layers))
  for path, lo in adapter_lib.loras(adapter).items():
    if path not in flat:
      raise ValueError(f"adapter path {path!r} is not a weight of the model in {base!r}")
    L.check_weight(tuple(flat[path].shape), lo, path)


def convert(src: str, dst: str, *, to: str | None = None, base: str | None = None,
            scan_layers: bool = False, base_model_name: str | None = None,
            task_type: str | None = "CAUSAL_LM", force: bool = False, out=None) -> None:
  """Converts the adapter in ``src`` (PEFT or jlora) into the other format at ``dst``.

  Example:
    >>> import tempfile, jax.numpy as jnp, jlora
    >>> d = tempfile.mkdtemp()
    >>> lora = jlora.LoRA(a=jnp.ones((16, 4)), b=jnp.ones((4, 24)), alpha=8.0, rank=4)
    >>> jlora.save(f"{d}/ours", {"lm_head": {"kernel": lora}})
    >>> convert(f"{d}/ours", f"{d}/peft")
    read jlora adapter ...: 1 weight, 160 parameters, rank 4
    wrote PEFT adapter ... (adapter_config.json, adapter_model.safetensors)
    path            a        b        rank  alpha  scale  kind   dora
    lm_head/kernel  [16, 4]  [4, 24]  4     8      2      dense  no
  """
  import jlora
  from jlora import adapter as adapter_lib
  out = out or sys.stdout
  if os.path.lexists(dst) and not force:
    raise CheckpointError(f"{dst} exists; pass --force to replace it")
  source = _kind_of(src)
  target = to or (JLORA if source == PEFT else PEFT)
  if target == source:
    raise ValueError(f"{src!r} already is a {source} adapter; --to {target} converts nothing")
  if source == PEFT:
    adapter, cfg = _load_peft(src, base, scan_layers)
    print(f"read PEFT adapter {src}: {_summary(adapter)}", file=out)
    jlora.save(dst, adapter, overwrite=force)
    print(f"wrote jlora adapter checkpoint {dst}", file=out)
  else:
    adapter = jlora.restore(src)
    adapter_lib.loras(adapter)   # an adapter, not some other tree
    print(f"read jlora adapter {src}: {_summary(adapter)}", file=out)
    if base is not None:
      _check_fits(adapter, base, scan_layers)
      print(f"checked against the model in {base}", file=out)
    jlora.peft.save(dst, adapter, None, task_type=task_type,
                    base_model_name_or_path=base_model_name or base, overwrite=force)
    print(f"wrote PEFT adapter {dst} (adapter_config.json, adapter_model.safetensors)", file=out)
  _print_table(adapter, out)


def _summary(adapter: Any) -> str:
  from jlora import adapter as adapter_lib
  nodes = adapter_lib.loras(adapter)
  n = adapter_lib.count_params(adapter)
  flags = [name for name, on in (("rsLoRA", any(lo.rslora for lo in nodes.values())),
                                 ("DoRA", any(lo.use_dora for lo in nodes.values()))) if on]
  ranks = sorted({lo.rank for lo in nodes.values()})
  return (f"{len(nodes)} weight{'s' if len(nodes) != 1 else ''}, {n:,} parameters, rank {'/'.join(map(str, ranks))}"
          + (f", {' + '.join(flags)}" if flags else ""))


def _print_table(adapter: Any, out) -> None:
  from jlora import adapter as adapter_lib
  rows = [("path", "a", "b", "rank", "alpha", "scale", "kind", "dora")]
  for path, lo in sorted(adapter_lib.loras(adapter).items()):
    rows.append((path, str(list(lo.a.shape)), str(list(lo.b.shape)), str(lo.rank),
                 f"{lo.alpha:g}", f"{lo.scale:.4g}", lo.kind + (" (stacked)" if lo.stack else ""),
                 "yes" if lo.use_dora else "no"))
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  for r in rows:
    print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip(), file=out)


def inspect(directory: str, *, out=None) -> None:
  """Prints an adapter's paths, shapes, ranks, alphas and parameter count.

  Example:
    >>> import tempfile, jax.numpy as jnp, jlora
    >>> d = tempfile.mkdtemp()
    >>> lora = jlora.LoRA(a=jnp.ones((16, 4)), b=jnp.ones((4, 24)), alpha=8.0, rank=4)
    >>> jlora.peft.save(f"{d}/peft", {"layers_0": {"mlp": {"up_proj": {"kernel": lora}}}})
    >>> inspect(f"{d}/peft")
    PEFT LoRA adapter ...: 1 weight, 160 parameters, rank 4
    path                          a        b        rank  alpha  scale  kind   dora
    layers_0/mlp/up_proj/kernel   [16, 4]  [4, 24]  4     8      2      dense  no
  """
  import jlora
  from jlora.interop import peft
  out = out or sys.stdout
  if _kind_of(directory) == PEFT:
    adapter, cfg = peft.read(directory, peft.params_from_file(directory), check_base_copies=False)
    print(f"PEFT LoRA adapter {directory}: {_summary(adapter)}", file=out)
    copies = sorted(n for n, parts in peft.split_keys(peft.read_tensors(directory)).items()
                    if "base" in parts)
    if copies:
      print(f"also carries base weight copies (PEFT's save_embedding_layers) of: "
            f"{', '.join(copies)}", file=out)
  else:
    adapter = jlora.restore(directory)
    print(f"jlora adapter checkpoint {directory}: {_summary(adapter)}", file=out)
  _print_table(adapter, out)


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="jlora", description="LoRA adapters for JAX/Flax.")
  sub = p.add_subparsers(dest="command", required=True)
  c = sub.add_parser("convert", help="PEFT adapter dir <-> jlora adapter checkpoint",
                     description="Convert a PEFT adapter directory into a jlora (orbax) adapter "
                     "checkpoint, or a jlora checkpoint into a PEFT adapter directory.")
  c.add_argument("src", help="a PEFT adapter directory or a jlora adapter checkpoint")
  c.add_argument("dst", help="the output directory")
  c.add_argument("--to", choices=(JLORA, PEFT), help="output format (default: the other one)")
  c.add_argument("--base", help="Hugging Face model directory to check the adapter against")
  c.add_argument("--scan-layers", action="store_true",
                 help="PEFT -> jlora: stack per-layer weights under 'layers' (needs --base)")
  c.add_argument("--base-model-name", help="jlora -> PEFT: base_model_name_or_path to record")
  c.add_argument("--task-type", default="CAUSAL_LM", help="jlora -> PEFT: PEFT task_type")
  c.add_argument("--force", action="store_true", help="replace DST if it exists")
  i = sub.add_parser("inspect", help="print an adapter's paths, shapes, ranks and size")
  i.add_argument("directory", help="a PEFT adapter directory or a jlora adapter checkpoint")
  return p


def main(argv: Sequence[str] | None = None) -> int:
  """Entry point of the ``jlora`` console script; returns the exit status."""
  args = _parser().parse_args(argv)
  try:
    if args.command == "convert":
      convert(args.src, args.dst, to=args.to, base=args.base, scan_layers=args.scan_layers,
              base_model_name=args.base_model_name, task_type=args.task_type, force=args.force)
    elif args.command == "inspect":
      inspect(args.directory)
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


if __name__ == "__main__":
  sys.exit(main())
