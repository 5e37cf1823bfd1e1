"""PEFT's ``adapter_config.json``: validation, PEFT's matching rules, and translation
to and from :class:`jlora.LoraConfig`.

PEFT names modules with "."-joined Hugging Face names relative to the base
model (``model.layers.0.self_attn.q_proj``, ``lm_head``). The rules here are
PEFT's own, applied to those names:

- ``target_modules`` as a list matches a module whose name equals an entry or
  ends with ``"." + entry``; as a string it is a regex that must match the
  whole name ("all-linear" is PEFT's shorthand for every Linear but the head);
- ``exclude_modules`` likewise removes modules;
- a ``rank_pattern`` / ``alpha_pattern`` key matches a name when
  ``re.match(rf"(.*\\.)?({key})$", name)`` does; the first such key wins.

These regular expressions come from files strangers publish, so they are
matched by :mod:`jlora.safe_regex` (same meaning, linear time), never by
backtracking ``re``.

Fields that change numbers and that jlora does not implement are rejected by
name; fields that only describe training or provenance are accepted.
"""
from __future__ import annotations

import collections
import json
import math
import os
import re
from typing import Any, Iterable, Mapping

from jlora import paths
from jlora import safe_regex
from jlora.config import LoraConfig
from jlora.errors import ConfigError, short
from jlora.interop.safetensors_io import read_json

CONFIG_NAME = "adapter_config.json"
ALL_LINEAR = "all-linear"

# Fields that jlora maps onto its LoraConfig (or uses to check the file).
SUPPORTED = (
    "r", "lora_alpha", "target_modules", "exclude_modules", "use_rslora", "use_dora",
    "rank_pattern", "alpha_pattern", "lora_dropout", "init_lora_weights",
)
# Fields that describe provenance or training only; they do not change the
# numbers an adapter computes.
INFORMATIONAL = (
    "peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path",
    "revision", "inference_mode", "megatron_core", "qalora_group_size", "loftq_config",
    "eva_config", "corda_config", "lora_ga_config", "runtime_config",
)
# Fields that change numbers and that jlora does not implement: each must hold
# its PEFT default (None, False, empty); "bias" must be "none".
MUST_BE_DEFAULT = {
    "fan_in_fan_out": "transposed (GPT-2 Conv1D) base weights",
    "bias": "trained biases",
    "lora_bias": "a bias on lora_B",
    "modules_to_save": "fully trained copies of modules",
    "layers_to_transform": "adapting only some layer indices",
    "layers_pattern": "adapting only some layer indices",
    "layer_replication": "replicated layers",
    "megatron_config": "Megatron parallel layers",
    "trainable_token_indices": "trainable token embeddings",
    "target_parameters": "adapting nn.Parameters directly (MoE experts)",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "use_qalora": "QALoRA",
    "use_bdlora": "block-diagonal LoRA",
    "arrow_config": "Arrow routing",
    "kasa_config": "KaSA",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
    "ensure_weight_tying": "tied adapters on tied weights",
}
# init_lora_weights values: those that only draw the initial A and B (no
# effect on a trained adapter), and those that rewrite the base weights or
# change the forward pass.
PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def read(directory: str | os.PathLike) -> dict:
  """Reads and validates ``<directory>/adapter_config.json``.

  Raises:
    FileNotFoundError: no config in ``directory``.
    FormatError: malformed JSON.
    ConfigError: a field jlora does not support, or a value it cannot use (named).

  Example:
    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> with open(os.path.join(d, CONFIG_NAME), "w") as f:
    ...   json.dump({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}, f)
    >>> read(d)["r"]
    4
  """
  path = os.path.join(os.fspath(directory), CONFIG_NAME)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no {CONFIG_NAME} in {short(os.fspath(directory))}: not a PEFT "
                            "adapter directory")
  d = read_json(path)
  validate(d, path)
  return d


def _unset(v: Any) -> bool:
  return v is None or v is False or (isinstance(v, (list, dict, str, tuple)) and len(v) == 0)


def validate(d: Mapping[str, Any], where: str = CONFIG_NAME) -> None:
  """Raises a ConfigError naming every field of ``d`` that jlora cannot honour.

  Example:
    >>> validate({"target_modules": ["q_proj"], "bias": "all"})
    Traceback (most recent call last):
    ...
    jlora.errors.ConfigError: adapter_config.json: unsupported PEFT adapter settings: bias='all' (trained biases; only 'none' is supported)
  """
  bad = []
  if d.get("peft_type", "LORA") != "LORA":
    bad.append(f"peft_type={short(d['peft_type'], 60)} (only LORA adapters are supported)")
  for name, what in MUST_BE_DEFAULT.items():
    v = d.get(name)
    if name == "bias":
      if v not in (None, "none"):
        bad.append(f"bias={short(v, 60)} ({what}; only 'none' is supported)")
    elif name == "layers_pattern":
      if not _unset(v) and not _unset(d.get("layers_to_transform")):
        bad.append(f"layers_pattern={short(v, 60)} ({what})")
    elif not _unset(v):
      bad.append(f"{name}={short(v, 60)} ({what})")
  init = d.get("init_lora_weights", True)
  if not isinstance(init, (bool, str)) or init not in PLAIN_INITS:
    if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
      bad.append(f"init_lora_weights={short(init, 60)} (this init rewrites the base weights, so the adapter "
                 "only fits PEFT's residual base; convert it to plain LoRA with PEFT's "
                 "save_pretrained(..., path_initial_model_for_weight_conversion=...) first)")
    else:
      bad.append(f"init_lora_weights={short(init, 60)} (a LoRA variant jlora does not implement)")
  if d.get("peft_type", "LORA") != "LORA" and not isinstance(d.get("peft_type"), str):
    bad.append(f"peft_type={short(d['peft_type'], 60)} (must be a string)")
  known = set(SUPPORTED) | set(INFORMATIONAL) | set(MUST_BE_DEFAULT)
  unknown = [n for n in sorted(set(d) - known) if not _unset(d[n])]
  for name in unknown[:8]:
    bad.append(f"{name if len(name) <= 60 else short(name, 60)}={short(d[name], 60)} "
               "(a field jlora does not know)")
  if len(unknown) > 8:
    bad.append(f"and {len(unknown) - 8} more unknown fields")
  bad += _check_values(d)
  if bad:
    raise ConfigError(f"{where}: unsupported PEFT adapter settings: " + "; ".join(bad[:12]))


MAX_RANK = 1 << 16


def _rank_ok(r) -> bool:
  return isinstance(r, int) and not isinstance(r, bool) and 0 < r <= MAX_RANK


def _alpha_ok(a) -> bool:
  return isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a) and a > 0


def _pattern_error(pattern, what: str, shown) -> str | None:
  why = safe_regex.why_not(pattern)
  return None if why is None else f"{what} {short(shown, 60)} {why}"


def _check_values(d: Mapping[str, Any]) -> list[str]:
  bad = []
  r = d.get("r", 8)
  if not _rank_ok(r):
    bad.append(f"r={short(r, 40)} (must be a positive int"
               f"{f' up to {MAX_RANK}' if isinstance(r, int) and r > 0 else ''})")
  alpha = d.get("lora_alpha", 8)
  if not _alpha_ok(alpha):
    bad.append(f"lora_alpha={short(alpha, 40)} (must be a positive finite number)")
  dropout = d.get("lora_dropout", 0.0)
  if dropout is not None and (not isinstance(dropout, (int, float)) or isinstance(dropout, bool)
                              or not 0 <= dropout < 1):
    bad.append(f"lora_dropout={short(dropout, 40)} (must be in [0, 1))")
  for field in ("use_rslora", "use_dora"):
    if not isinstance(d.get(field, False), bool):
      bad.append(f"{field}={short(d[field], 40)} (must be true or false)")
  for field in ("target_modules", "exclude_modules"):
    spec = d.get(field)
    if spec is None and field == "exclude_modules":
      continue
    if isinstance(spec, str):
      why = None if spec.lower() == ALL_LINEAR else _pattern_error(spec, field, spec)
      bad += [why] if why else []
    elif not _is_str_list(spec):
      bad.append(f"{field}={short(spec, 60)} (must be a list of module names or a regex string)")
  for field in ("rank_pattern", "alpha_pattern"):
    pat = d.get(field) or {}
    if not isinstance(pat, dict):
      bad.append(f"{field}={short(pat, 60)} (must be a mapping)")
      continue
    for key, value in list(pat.items())[:1000]:
      why = _pattern_error(_peft_key(key), f"{field} key", key)
      bad += [why] if why else []
      if not (_rank_ok(value) if field == "rank_pattern" else _alpha_ok(value)):
        bad.append(f"{field}[{short(key, 60)}]={short(value, 40)} (must be a positive "
                   f"{'int' if field == 'rank_pattern' else 'finite number'}"
                   f"{f' up to {MAX_RANK}' if isinstance(value, int) and value > 0 else ''})")
    if len(pat) > 1000:
      bad.append(f"{field} has {len(pat)} keys (at most 1000 are read)")
  return bad


def _peft_key(key: str) -> str:
  """PEFT's pattern rule ``re.match(rf"(.*\\.)?({key})$", name)`` as one full-match regex
  (``re.match`` matches a prefix: the same text followed by anything)."""
  return rf"(?:(.*\.)?({key})$)[\s\S]*"


def _is_str_list(x) -> bool:
  return isinstance(x, (list, tuple)) and all(isinstance(s, str) for s in x)


def is_targeted(d: Mapping[str, Any], name: str, linear: bool, head: bool) -> bool:
  """PEFT's rule: is module ``name`` (HF naming) adapted by config ``d``?

  ``linear``: the module is a Linear layer (for "all-linear"); ``head``: it is
  the output head (which "all-linear" leaves out).

  Example:
    >>> d = {"target_modules": ["q_proj"]}
    >>> is_targeted(d, "model.layers.0.self_attn.q_proj", True, False)
    True
    >>> is_targeted({"target_modules": "all-linear"}, "lm_head", True, True)
    False
  """
  em = d.get("exclude_modules")
  if em and _name_matches(em, name):
    return False
  tm = d["target_modules"]
  if isinstance(tm, str) and tm.lower() == ALL_LINEAR:
    return linear and not head
  return _name_matches(tm, name)


def _name_matches(spec: str | Iterable[str], name: str) -> bool:
  if isinstance(spec, str):
    return safe_regex.fullmatch(spec, name, "target_modules")
  return any(name == s or name.endswith("." + s) for s in spec)


def unused_targets(d: Mapping[str, Any], names: Iterable[str]) -> list[str]:
  """Entries of ``target_modules`` that match none of ``names``.

  Example:
    >>> unused_targets({"target_modules": ["q_proj", "c_attn"]}, ["model.layers.0.self_attn.q_proj"])
    ['c_attn']
  """
  tm = d["target_modules"]
  if isinstance(tm, str):
    return [] if tm.lower() == ALL_LINEAR or any(_name_matches(tm, n) for n in names) else [tm]
  names = list(names)
  return [s for s in tm if not any(_name_matches([s], n) for n in names)]


def pattern_value(pattern: Mapping[str, Any] | None, name: str, default):
  """PEFT's ``get_pattern_key``: the value of the first key matching ``name``.

  Example:
    >>> pattern_value({"v_proj": 2}, "model.layers.0.self_attn.v_proj", 8)
    2
  """
  for key, value in (pattern or {}).items():
    if safe_regex.fullmatch(_peft_key(key), name, "pattern key"):
      return value
  return default


def rank_alpha(d: Mapping[str, Any], name: str) -> tuple[int, float]:
  """``(r, lora_alpha)`` of module ``name`` under config ``d`` (PEFT's rule).

  Example:
    >>> d = {"r": 8, "lora_alpha": 16, "rank_pattern": {"layers.1.self_attn.v_proj": 4}}
    >>> rank_alpha(d, "model.layers.1.self_attn.v_proj"), rank_alpha(d, "model.layers.0.self_attn.v_proj")
    ((4, 16.0), (8, 16.0))
  """
  r = pattern_value(d.get("rank_pattern"), name, d.get("r", 8))
  alpha = pattern_value(d.get("alpha_pattern"), name, d.get("lora_alpha", 8))
  return int(r), float(alpha)


# ---------------------------------------------------------------- to and from LoraConfig

def _portable(key: str) -> bool:
  """A pattern key that means the same on "." and "/" joined names (no separators)."""
  return re.fullmatch(r"[A-Za-z0-9_|()]+", key) is not None


def to_lora_config(d: Mapping[str, Any], nodes: Mapping[str, Any], table, dtype) -> LoraConfig:
  """A LoraConfig that adapts exactly ``nodes`` with their ranks and alphas.

  PEFT's bare module names ("q_proj") and separator-free pattern keys mean the
  same in jlora and are kept; anything else (regexes over "."-joined names,
  dotted names, exclude_modules) becomes the explicit list of adapted module
  paths and per-module patterns.
  """
  r, alpha = int(d.get("r", 8)), float(d.get("lora_alpha", 8))
  init = d.get("init_lora_weights", True)
  base = dict(rank=r, alpha=alpha, use_rslora=bool(d.get("use_rslora")),
              use_dora=bool(d.get("use_dora")), dropout=float(d.get("lora_dropout") or 0.0),
              init="gaussian" if init == "gaussian" else "default", dtype=dtype)
  tm, rank_pattern = d["target_modules"], dict(d.get("rank_pattern") or {})
  alpha_pattern = dict(d.get("alpha_pattern") or {})
  if (not isinstance(tm, str) and all("." not in t for t in tm) and not d.get("exclude_modules")
      and all(map(_portable, list(rank_pattern) + list(alpha_pattern)))):
    cfg = LoraConfig(targets=list(tm), rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
                     **base)
    if _selects(cfg, nodes, table):
      return cfg
  rp = {re.escape(paths.module_path(p)): lo.rank for p, lo in nodes.items() if lo.rank != r}
  ap = {re.escape(paths.module_path(p)): lo.alpha for p, lo in nodes.items() if lo.alpha != alpha}
  cfg = LoraConfig(targets=sorted(paths.module_path(p) for p in nodes), rank_pattern=rp,
                   alpha_pattern=ap, **base)
  if not _selects(cfg, nodes, table):
    raise FormatError("internal: the translated LoraConfig does not select exactly the PEFT "
                     "adapter's modules; please report this")
  return cfg


def _selects(cfg: LoraConfig, nodes: Mapping[str, Any], table) -> bool:
  """Whether ``cfg`` adapts exactly the paths of ``nodes``, with their ranks and alphas."""
  by_path = {s.path: s for s in table.values()}
  chosen = {p for p, s in by_path.items()
            if cfg.matches(p, len(s.kernel_shape) + s.info.stack, s.info.kind)}
  return chosen == set(nodes) and all(cfg.resolve(p) == (lo.rank, lo.alpha)
                                      for p, lo in nodes.items())


def _num(x: float):
  return int(x) if float(x).is_integer() else float(x)


def to_peft_config(nodes, settings, cfg, base_model_name_or_path, task_type, *,
                   bare_names: bool = True) -> dict:
  """PEFT's adapter_config.json for ``settings``: ``{module name: (rank, alpha, path)}``.

  ``bare_names``: ``cfg``'s bare target names ("q_proj") may stand for the
  modules (true when PEFT's module names end in jlora's module names, as in
  the default name map); else ``target_modules`` lists the full names.
  """
  common = collections.Counter((r, a) for r, a, _ in settings.values()).most_common(1)[0][0]
  r, alpha = (cfg.rank, float(cfg.alpha)) if cfg is not None else common
  dropouts = collections.Counter(lo.dropout for lo in nodes.values()).most_common(1)[0][0]
  any_lo = next(iter(nodes.values()))
  d = {
      "peft_type": "LORA", "task_type": task_type,
      "base_model_name_or_path": base_model_name_or_path, "revision": None,
      "r": int(r), "lora_alpha": _num(alpha),
      "target_modules": _targets(cfg if bare_names else None, settings),
      "exclude_modules": None,
      "use_rslora": bool(any_lo.rslora), "use_dora": bool(any_lo.use_dora),
      "lora_dropout": float(cfg.dropout if cfg is not None else dropouts),
      "init_lora_weights": "gaussian" if cfg is not None and cfg.init == "gaussian" else True,
      "bias": "none", "fan_in_fan_out": False, "modules_to_save": None, "lora_bias": False,
      "layers_to_transform": None, "layers_pattern": None, "inference_mode": True,
  }
  d["rank_pattern"], d["alpha_pattern"] = _patterns(cfg, settings, d)
  return d


def _targets(cfg: LoraConfig | None, settings) -> list[str]:
  """Bare names from ``cfg`` when they name exactly the adapted modules' kinds,
  else the full module names (always exact)."""
  last = {name.rpartition(".")[2] for name in settings}
  if (cfg is not None and not isinstance(cfg.targets, str) and cfg.exclude is None
      and all("/" not in t and "." not in t for t in cfg.targets) and last == set(cfg.targets)):
    return sorted(cfg.targets)
  return sorted(settings)


def _patterns(cfg: LoraConfig | None, settings, d) -> tuple[dict, dict]:
  """rank/alpha patterns under which PEFT gives every module its (rank, alpha)."""
  if cfg is not None:
    rp, ap = dict(cfg.rank_pattern), {k: _num(v) for k, v in cfg.alpha_pattern.items()}
    if all(map(_portable, list(rp) + list(ap))):
      trial = {**d, "rank_pattern": rp, "alpha_pattern": ap}
      if all(rank_alpha(trial, n) == (r, a) for n, (r, a, _) in settings.items()):
        return rp, ap
  rp = {re.escape(n): r for n, (r, a, _) in sorted(settings.items()) if r != d["r"]}
  ap = {re.escape(n): _num(a) for n, (r, a, _) in sorted(settings.items())
        if a != float(d["lora_alpha"])}
  return rp, ap
