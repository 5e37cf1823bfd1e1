"""``jlora merge`` (base + adapter -> merged checkpoint), ``jlora quantize``, and the
Hugging Face half of ``jlora inspect``.

Outputs are Hugging Face checkpoint directories (``config.json`` +
safetensors, plus the base's tokenizer and generation files) that
transformers' ``from_pretrained`` loads; a quantized one holds bitsandbytes
4-bit weights (bit for bit what bitsandbytes would store) with the
``quantization_config`` transformers reads. Each is written beside DST and
swapped in whole (``jlora.checkpoint.files.atomic_directory``).
"""
from __future__ import annotations

import collections
import json
import os
import re
import shutil
import sys
from typing import Any

from jlora.errors import CheckpointError, ConfigError, FormatError, short

DTYPES = ("float32", "bfloat16", "float16")
SCHEMES = ("nf4", "fp4", "int8", "int4")
BNB_SCHEMES = ("nf4", "fp4")
# files of a Hugging Face model directory that describe how to use it, not its weights
AUX_FILES = re.compile(r"(tokenizer.*|special_tokens_map\.json|added_tokens\.json|"
                       r"generation_config\.json|vocab\..*|merges\.txt|.*\.model|.*\.tiktoken|"
                       r"chat_template.*|README\.md|LICENSE.*)")
TOKEN_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")
_ST_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float32"}


# ----------------------------------------------------------------------------- shared

def _check_dst(dst: str, force: bool) -> None:
  if os.path.lexists(dst) and not force:
    raise CheckpointError(f"{dst} exists; pass --force to replace it")


def _model_dir(name: str) -> str:
  """A Hugging Face model directory (or Hub name in the local cache), checked to be one."""
  from jlora.cli.adapters import HF, locate
  kind, directory = locate(name)
  if kind != HF:
    raise FormatError(f"{name!r} is not a Hugging Face model directory (no config.json"
                      f"{'; it is a PEFT adapter' if kind == 'peft' else ''})")
  return directory


def _stored_dtype(directory: str) -> str:
  """The checkpoint's dtype: ``config.json``'s ``torch_dtype``/``dtype``, else its embedding's."""
  from jlora.interop import safetensors_io as st
  hf = st.read_json(os.path.join(directory, "config.json"))
  declared = hf.get("torch_dtype") or hf.get("dtype")
  if declared in DTYPES:
    return declared
  with st.open_checkpoint(directory) as ckpt:
    name = "model.embed_tokens.weight" if "model.embed_tokens.weight" in ckpt.names else \
        sorted(ckpt.names)[0]
    return _ST_DTYPES.get(ckpt.dtype(name), "float32")


def _cast(tree: Any, dtype: str) -> Any:
  import jax
  import jax.numpy as jnp
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                      tree)


def _owned_model_dir(directory: str) -> str | None:
  if os.path.isfile(os.path.join(directory, "config.json")):
    return None
  return "it holds no config.json, so it is not a Hugging Face model directory jlora would write"


def _write_hf(dst: str, config: Any, params: Any, base_dir: str, *, force: bool,
              keep_quantized: bool = False, max_shard_size: int | None = None,
              progress: bool | None = None) -> int:
  """``to_hf`` into a new directory swapped in at ``dst``, with the base's tokenizer and
  generation files; returns the bytes written."""
  from jlora.checkpoint import files
  from jlora.interop import safetensors_io as st
  from jlora.interop import to_hf
  base_config = st.read_json(os.path.join(base_dir, "config.json"))
  extra = {k: base_config[k] for k in TOKEN_FIELDS if base_config.get(k) is not None}
  target, written = files.local_path(dst), 0
  with files.atomic_directory(target, overwrite=force, owned=_owned_model_dir) as tmp:
    if files.is_primary():
      to_hf(tmp, config, params, max_shard_size=max_shard_size, extra_config=extra,
            keep_quantized=keep_quantized, progress=progress)
      for name in sorted(os.listdir(base_dir)):
        if AUX_FILES.fullmatch(name) and os.path.isfile(os.path.join(base_dir, name)):
          shutil.copyfile(os.path.join(base_dir, name), os.path.join(tmp, name))
      written = sum(os.path.getsize(os.path.join(tmp, f)) for f in os.listdir(tmp))
  return written


def _quantize_kwargs(scheme: str, block_size: int, double_quant: bool) -> dict:
  if scheme not in SCHEMES:
    raise ConfigError(f"unknown scheme {scheme!r}; jlora quantizes to {', '.join(SCHEMES)}")
  return dict(scheme=scheme, block_size=block_size, double_quant=double_quant)


def _mb(n: int) -> str:
  return f"{n / 1e6:,.2f} MB" if n >= 1e5 else f"{n:,} bytes"


# ----------------------------------------------------------------------------- merge

def merge(base: str, adapter: str, dst: str, *, quantize: str | None = None,
          block_size: int = 64, double_quant: bool = True, dtype: str | None = None,
          max_shard_size: int | None = None, force: bool = False, progress: bool | None = None,
          out=None) -> None:
  """Merges ``adapter`` into the model ``base`` and writes the merged Hugging Face checkpoint.

  The base is read in float32, the adapter (a PEFT directory or a jlora
  checkpoint, or Hub names of either) is checked against it, ``W + s·a@b``
  (or DoRA's merged weight) replaces each adapted weight, and the result is
  cast to ``dtype`` (default: the base's) and, with ``quantize`` ("nf4" or
  "fp4"), quantized to bitsandbytes 4-bit weights.

  Example:
      merge("meta-llama/Llama-3.2-1B", "out/my-lora", "out/merged")
  """
  import jax.numpy as jnp
  import jlora
  from jlora.cli.adapters import JLORA, _check_fits_params, _summary, locate
  from jlora.interop import from_hf, peft
  out = out or sys.stdout
  _check_dst(dst, force)
  if quantize is not None and quantize not in BNB_SCHEMES:
    raise ConfigError(f"--quantize {quantize}: a merged Hugging Face checkpoint can hold "
                      f"bitsandbytes 4-bit weights ({', '.join(BNB_SCHEMES)}); for int8/int4 use "
                      "`jlora quantize --format jlora` on the merged checkpoint")
  base_dir = _model_dir(base)
  kind, adapter_dir = locate(adapter)
  if kind not in ("peft", JLORA):
    raise FormatError(f"{adapter!r} is a Hugging Face model, not an adapter")
  out_dtype = dtype or _stored_dtype(base_dir)
  model, params = from_hf(base_dir, jnp.float32, progress=progress)
  print(f"read Hugging Face model {base_dir}: {_model_line(model.config, params)}", file=out)
  if kind == "peft":
    tree, _ = peft.load(adapter_dir, params, model=model)
    print(f"read PEFT adapter {adapter_dir}: {_summary(tree)}", file=out)
  else:
    tree = jlora.restore(adapter_dir)
    _check_fits_params(tree, params, base)
    print(f"read jlora adapter {adapter_dir}: {_summary(tree)}", file=out)
  merged = _cast(jlora.merge(params, tree), out_dtype)
  print(f"merged {len(jlora.adapted_paths(tree))} weights; largest relative change "
        f"{_largest_change(params, merged, tree)}", file=out)
  del params
  if quantize is not None:
    merged = jlora.quantize(merged, **_quantize_kwargs(quantize, block_size, double_quant),
                            donate=True)
  size = _write_hf(dst, model.config, merged, base_dir, force=force,
                   keep_quantized=quantize is not None, max_shard_size=max_shard_size,
                   progress=progress)
  what = f"bitsandbytes {quantize} weights" if quantize else out_dtype
  print(f"wrote Hugging Face checkpoint {dst} ({what}, {_mb(size)})", file=out)


def _model_line(config: Any, params: Any) -> str:
  from jlora.summary import count_base
  return (f"{config.model_type}, {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
          f"vocab {config.vocab_size}, {count_base(params):,} parameters")


def _largest_change(params: Any, merged: Any, adapter: Any) -> str:
  """max over adapted weights of ‖W' - W‖ / ‖W‖, with its path."""
  import numpy as np
  import jlora
  from jlora import paths
  before, after = paths.flatten(params), paths.flatten(merged)
  worst = (0.0, "")
  for p in jlora.adapted_paths(adapter):
    w = np.asarray(before[p], np.float64)
    change = float(np.linalg.norm(np.asarray(after[p], np.float64) - w) /
                   max(np.linalg.norm(w), 1e-30))
    worst = max(worst, (change, p))
  return f"{worst[0]:.4g} ({worst[1]})"


# ----------------------------------------------------------------------------- quantize

def quantize(src: str, dst: str, *, scheme: str = "nf4", block_size: int = 64,
             double_quant: bool = True, fmt: str | None = None, dtype: str | None = None,
             force: bool = False, progress: bool | None = None, out=None) -> None:
  """Quantizes the Hugging Face checkpoint ``src`` and reports sizes and errors.

  Every Dense kernel but the output head (of at least ``jlora.quant``'s
  minimum size) is quantized, as ``jlora.quantize`` and transformers choose.
  ``fmt="hf"`` (the default for nf4/fp4) writes a Hugging Face checkpoint
  with bitsandbytes 4-bit weights that transformers loads (with bitsandbytes
  installed); ``fmt="jlora"`` (the default for int8/int4, which transformers
  has no format for) writes the quantized params tree as a jlora checkpoint
  (``jlora.restore(dst)``; the model is ``jlora.interop.from_hf(src)``'s).

  The report: the bytes of the source's parameters and of the quantized
  ones, the bits per quantized weight, and the relative error
  ``‖W - dequantize(Q)‖ / ‖W‖`` per quantized weight (mean, max, worst five).

  Example:
      quantize("meta-llama/Llama-3.2-1B", "out/llama-nf4", scheme="nf4")
  """
  import jax.numpy as jnp
  import numpy as np
  import jlora
  from jlora import paths
  from jlora.interop import from_hf
  from jlora.quant import quantize as quantize_tree
  from jlora.quant.qarray import QArray
  out = out or sys.stdout
  kwargs = _quantize_kwargs(scheme, block_size, double_quant)
  fmt = fmt or ("hf" if scheme in BNB_SCHEMES else "jlora")
  if fmt == "hf" and scheme not in BNB_SCHEMES:
    raise ConfigError(f"--format hf holds bitsandbytes 4-bit weights ({', '.join(BNB_SCHEMES)}); "
                      f"transformers has no format for jlora's blockwise {scheme}: use --format "
                      "jlora")
  if fmt not in ("hf", "jlora"):
    raise ConfigError(f"--format {fmt!r}: choose hf or jlora")
  _check_dst(dst, force)
  src_dir = _model_dir(src)
  out_dtype = dtype or _stored_dtype(src_dir)
  errors, before = {}, {"bytes": 0}

  def hook(path, x):      # each tensor as it is loaded: quantize, measure, free the float copy
    before["bytes"] += x.size * np.dtype(out_dtype).itemsize
    y = x.astype(out_dtype)
    q = paths.flatten(quantize_tree(paths.unflatten({path: y}), **kwargs))[path]
    if isinstance(q, QArray):
      w = np.asarray(x, np.float64)
      errors[path] = (float(np.linalg.norm(np.asarray(q.dequantize(jnp.float32), np.float64) - w)
                            / max(np.linalg.norm(w), 1e-30)), q.size)
    return q

  model, qparams = from_hf(src_dir, jnp.float32, quantize=hook, progress=progress)
  if not errors:
    raise ConfigError(f"{src!r}: no weight is large enough to quantize (kernels of at least "
                      "4096 values)")
  if fmt == "hf":
    size = _write_hf(dst, model.config, qparams, src_dir, force=force, keep_quantized=True,
                     progress=progress)
    where = (f"Hugging Face checkpoint {dst} (bitsandbytes {scheme}; transformers loads it "
             f"with bitsandbytes installed)")
  else:
    jlora.save(dst, qparams, overwrite=force)
    size = jlora.nbytes(qparams)
    where = f"jlora checkpoint {dst} (jlora.restore; the model: jlora.interop.from_hf({src!r}))"
  _report(errors, before["bytes"], jlora.nbytes(qparams), qparams, kwargs, out)
  print(f"wrote {where}, {_mb(size)}", file=out)


def _report(errors: dict, bytes_before: int, bytes_after: int, qparams: Any, kwargs: dict,
            out) -> None:
  import jax
  from jlora.quant.qarray import QArray
  from jlora.summary import format_table
  qs = [x for x in jax.tree.leaves(qparams, is_leaf=lambda x: isinstance(x, QArray))
        if isinstance(x, QArray)]
  n_q = sum(q.size for q in qs)
  q_bytes = sum(q.nbytes for q in qs)
  errs = [e for e, _ in errors.values()]
  dq = " + double quant" if kwargs["double_quant"] else ""
  print(f"quantized {len(errors)} weights ({n_q:,} values) to {kwargs['scheme']} "
        f"(block {kwargs['block_size']}{dq}): {8 * q_bytes / n_q:.3f} bits per weight", file=out)
  print(f"size: {_mb(bytes_before)} -> {_mb(bytes_after)} "
        f"({100 * bytes_after / bytes_before:.1f}%)", file=out)
  print(f"relative error |W - Q| / |W|: mean {sum(errs) / len(errs):.4f}, max {max(errs):.4f}",
        file=out)
  rows = [("weight (largest errors)", "values", "relative error")]
  for path, (e, n) in sorted(errors.items(), key=lambda kv: -kv[1][0])[:5]:
    rows.append((path, f"{n:,}", f"{e:.4f}"))
  print(format_table(rows), file=out)


# ----------------------------------------------------------------------------- inspect

def inspect_model(directory: str, *, out=None) -> None:
  """Prints a Hugging Face model directory's architecture, size and tensors (from the
  safetensors headers: no weight is read); bitsandbytes 4-bit weights count as their
  logical shape."""
  from jlora.interop import safetensors_io as st
  from jlora.quant.bnb_format import STATE_KEY
  from jlora.summary import format_table
  out = out or sys.stdout
  hf = st.read_json(os.path.join(directory, "config.json"))
  arch = ", ".join(hf.get("architectures") or []) or "?"
  heads = hf.get("num_attention_heads")
  kv = hf.get("num_key_value_heads")
  print(f"Hugging Face model {directory}: {hf.get('model_type', '?')} ({arch}), "
        f"{hf.get('num_hidden_layers', '?')} layers, hidden {hf.get('hidden_size', '?')}, "
        f"{heads} heads" + (f" ({kv} KV)" if kv and kv != heads else "")
        + f", vocab {hf.get('vocab_size', '?')}", file=out)
  groups: dict = collections.defaultdict(int)
  n_params, n_bytes, quantized = 0, 0, {}
  with st.open_checkpoint(directory) as ckpt:
    for name in sorted(n for n in ckpt.names if STATE_KEY in n):
      state = json.loads(bytes(ckpt.read(name)).decode("utf-8"))
      quantized[name.split(STATE_KEY)[0]] = (state.get("quant_type", "?"), state.get("shape"))
    for name in sorted(ckpt.names):
      shape = list(ckpt.shape(name))
      n_bytes += int(_prod(shape)) * _itemsize(ckpt.dtype(name))
      owner = next((q for q in quantized if name == q or name.startswith(q + ".")), None)
      if owner is not None:
        if name == owner:
          scheme, logical = quantized[owner]
          n_params += int(_prod(logical or []))
          groups[(_pattern(owner), str(logical), scheme)] += 1
        continue
      n_params += int(_prod(shape))
      groups[(_pattern(name), str(shape), ckpt.dtype(name))] += 1
  q = hf.get("quantization_config") or {}
  qline = (f"; {len(quantized)} bitsandbytes {q.get('bnb_4bit_quant_type', '4-bit')} weights"
           if quantized else "")
  print(f"{n_params:,} parameters, {_mb(n_bytes)} of tensors{qline}", file=out)
  rows = [("tensor", "shape", "dtype", "count")]
  rows += [(p, sh, dt, str(n)) for (p, sh, dt), n in sorted(groups.items())]
  print(format_table(rows), file=out)


def _pattern(name: str) -> str:
  return re.sub(r"\.layers\.\d+\.", ".layers.*.", name)


def _prod(shape) -> int:
  n = 1
  for d in shape:
    n *= int(d)
  return n


def _itemsize(st_dtype: str) -> int:
  return {"F64": 8, "F32": 4, "I32": 4, "U32": 4, "BF16": 2, "F16": 2, "I16": 2, "U8": 1,
          "I8": 1, "BOOL": 1, "I64": 8, "U64": 8}.get(st_dtype, 4)
