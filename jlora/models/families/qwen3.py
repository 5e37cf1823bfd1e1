"""Qwen3 ``config.json`` <-> :class:`LlamaConfig`.

Qwen2's layout (:mod:`.llama`) with ``qk_norm`` (an RMSNorm over each head
of q and k before RoPE), ``attention_bias`` -> q/k/v/o biases (no default
bias on q/k/v), and Qwen2's sliding-window fields: ``use_sliding_window``,
``sliding_window``, ``max_window_layers`` / ``layer_types``.

Refused by name: ``partial_rotary_factor`` != 1, rope types other than
default / linear / llama3.
"""
from __future__ import annotations

from jlora.models.config import LlamaConfig
from jlora.models.families import llama
from jlora.models.families.common import (Family, HFConfig, activation, base_fields,
                                          partial_rotary_factor)

DEFAULTS = {"qwen3": dict(llama.DEFAULTS["qwen2"], head_dim=128, attention_bias=False)}


def read(cfg: HFConfig) -> dict:
  """The :class:`LlamaConfig` fields of a Qwen3 ``config.json``.

  Example:
    >>> f = read(HFConfig({"model_type": "qwen3", "vocab_size": 8, "hidden_size": 64,
    ...                    "intermediate_size": 96, "num_hidden_layers": 2,
    ...                    "num_attention_heads": 4, "head_dim": 32},
    ...                   "config.json", DEFAULTS["qwen3"]))
    >>> f["qk_norm"], f["qkv_bias"], f["head_dim"], f["sliding_window"]
    (True, False, 32, None)
  """
  if partial_rotary_factor(cfg) != 1.0:
    raise cfg.error(f"partial_rotary_factor={partial_rotary_factor(cfg)} is not supported for "
                    "model_type 'qwen3'")
  bias = bool(cfg.get("attention_bias"))
  return dict(base_fields(cfg), hidden_act=activation(cfg, "hidden_act"), qk_norm=True,
              qkv_bias=bias, o_bias=bias, **llama.qwen_sliding(cfg, cfg.get("num_hidden_layers")))


def write(cfg: LlamaConfig) -> dict:
  """The family's ``config.json`` fields of ``cfg`` beyond the common ones."""
  return dict(hidden_act=cfg.hidden_act, attention_bias=cfg.qkv_bias,
              **llama.qwen_sliding_to_hf(cfg))


FAMILY = Family(name="qwen3", architectures={"qwen3": "Qwen3ForCausalLM"}, defaults=DEFAULTS,
                read=read, write=write)
