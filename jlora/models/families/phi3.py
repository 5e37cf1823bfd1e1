"""Phi-3 ``config.json`` <-> :class:`LlamaConfig`.

``fused_projections``: ``qkv_proj`` (q, k, v outputs in that order) and
``gate_up_proj`` (gate first) stay one Dense each, so PEFT adapters on them
map 1:1. ``partial_rotary_factor`` (in ``rope_parameters`` or at the top)
rotates part of each head; ``sliding_window`` applies to every layer.
``resid_pdrop`` / ``embd_pdrop`` / ``attention_dropout`` are training-time
dropout, which the reference model does not have, and are ignored;
``original_max_position_embeddings`` only matters to "longrope".

Refused by name: rope types other than default / linear / llama3 (so
"longrope", Phi-3's 128k-context scaling, and its old names "su" / "yarn").
"""
from __future__ import annotations

from jlora.models.config import LlamaConfig
from jlora.models.families.common import (Family, HFConfig, activation, base_fields,
                                          partial_rotary_factor)

DEFAULTS = {"phi3": dict(rms_norm_eps=1e-5, tie_word_embeddings=False, hidden_act="silu",
                         max_position_embeddings=4096, sliding_window=None)}


def read(cfg: HFConfig) -> dict:
  """The :class:`LlamaConfig` fields of a Phi-3 ``config.json``.

  Example:
    >>> f = read(HFConfig({"model_type": "phi3", "vocab_size": 8, "hidden_size": 64,
    ...                    "intermediate_size": 96, "num_hidden_layers": 2,
    ...                    "num_attention_heads": 4, "partial_rotary_factor": 0.5},
    ...                   "config.json", DEFAULTS["phi3"]))
    >>> f["fused_projections"], f["partial_rotary_factor"], f["rms_norm_eps"]
    (True, 0.5, 1e-05)
  """
  return dict(base_fields(cfg), hidden_act=activation(cfg, "hidden_act"), fused_projections=True,
              partial_rotary_factor=partial_rotary_factor(cfg),
              sliding_window=cfg.get("sliding_window"))


def write(cfg: LlamaConfig) -> dict:
  """The family's ``config.json`` fields of ``cfg`` beyond the common ones."""
  return dict(hidden_act=cfg.hidden_act, sliding_window=cfg.sliding_window,
              partial_rotary_factor=cfg.partial_rotary_factor)


FAMILY = Family(name="phi3", architectures={"phi3": "Phi3ForCausalLM"}, defaults=DEFAULTS,
                read=read, write=write)
