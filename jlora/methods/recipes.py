"""The fine-tuning family on one trainer: each method as (trainable tree, frozen tree, forward).

:func:`setup` returns a :class:`Method` for one of :data:`METHODS`, so one
training loop compares them on the same model and data::

  m = setup("prefix", key, model, params, example_ids)
  step = train.make_train_step(loss, train.make_optimizer(m.learning_rate), trainable=m.select)
  state = train.init_train_state(m.trainable, opt, trainable=m.select)
  # loss(trainable, base, batch, rng) uses m.logits(trainable, base, batch["ids"])

=========  ===============================================  ========================
method     trainable tree                                   frozen tree
=========  ===============================================  ========================
lora       LoRA adapter (``jlora.init_adapter``)            base params
qlora      LoRA adapter                                     NF4 + double-quant base
full       every parameter (``select="all"``)               nothing
bitfit     the model's biases (``select="biases"``)         the other parameters
prompt     soft prompt ``[n, hidden]`` (:mod:`.prompt`)     base params
prefix     per-layer key/value prefix (:mod:`.prefix`)      base params
adapter    Houlsby bottleneck adapters (:mod:`.bottleneck`) base params
ia3        IA³ vectors on k, v, down_proj (:mod:`.ia3`)     base params
=========  ===============================================  ========================

The reference Llama has no biases; for ``bitfit`` :func:`setup` turns on its
``qkv_bias``/``o_bias``/``mlp_bias`` switches and adds the biases as zeros,
which change nothing until trained.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jlora import paths
from jlora.config import LoraConfig
from jlora.errors import ConfigError
from jlora.methods import bottleneck, ia3, prefix, prompt, select

METHODS = ("lora", "qlora", "full", "bitfit", "prompt", "prefix", "adapter", "ia3")
LEARNING_RATES = {"lora": 5e-3, "qlora": 5e-3, "full": 1e-3, "bitfit": 1e-2, "prompt": 1e-1,
                  "prefix": 1e-1, "adapter": 5e-3, "ia3": 2e-2}
"""Learning rates that work for the demo task (examples/finetune.py) with AdamW."""


@dataclasses.dataclass(frozen=True)
class Method:
  """One method set up on one model.

  Attributes:
    name: one of :data:`METHODS`.
    model: the model to run (for ``bitfit`` a copy with bias switches on).
    trainable: the train step's first argument (its ``select``-ed part is
      trained; for ``full`` and ``bitfit`` a copy of the params, since the
      step donates its first argument).
    base: the frozen argument (None for ``full`` and ``bitfit``, whose
      frozen part is the rest of ``trainable``).
    select: the trainable selection for ``make_train_step(trainable=)``, or None.
    logits: ``(trainable, base, ids [B, T]) -> logits [B, T, vocab]`` for the
      ids' own positions; ``trainable=None`` runs the base alone (not for
      ``full``/``bitfit``).
    learning_rate: a learning rate that suits the method.
  """
  name: str
  model: Any
  trainable: Any
  base: Any
  select: Any
  logits: Callable[[Any, Any, jax.Array], jax.Array]
  learning_rate: float

  def count(self) -> int:
    """The number of trained parameters."""
    part = self.trainable if self.select is None else select.split(self.trainable, self.select)[0]
    return int(sum(x.size for x in jax.tree.leaves(part)))


def with_zero_biases(model, params: Any, example_ids: jax.Array):
  """The reference Llama with biases on every projection, and ``params`` with them at zero.

  Example:
    >>> from jlora.models import Llama, preset, abstract_params
    >>> ids = jnp.ones((1, 4), jnp.int32)
    >>> model = Llama(preset("tiny"))
    >>> params = jax.tree.map(lambda x: x.value, abstract_params(model.config),
    ...                       is_leaf=lambda x: hasattr(x, "names"))        # shapes only
    >>> m2, p2 = with_zero_biases(model, params, ids)
    >>> p2["layers_0"]["self_attn"]["q_proj"]["bias"].shape, m2.config.o_bias
    ((64,), True)
  """
  from jlora.models.llama import unboxed_init
  cfg = model.config.replace(qkv_bias=True, o_bias=True, mlp_bias=True)
  biased = type(model)(cfg)
  shapes = jax.eval_shape(lambda k: unboxed_init(biased, k, example_ids), jax.random.key(0))
  have = paths.flatten(params)
  flat = {p: have[p] if p in have else jnp.zeros(s.shape, s.dtype)
          for p, s in paths.flatten(shapes).items()}
  return biased, paths.unflatten(flat)


def setup(name: str, key: jax.Array, model, params: Any, example_ids: jax.Array, *,
          lora: LoraConfig | None = None, num_virtual_tokens: int = 8,
          prefix_projection: int | None = None, adapter_width: int = 8,
          placement: str = "houlsby") -> Method:
  """Sets up ``name`` (one of :data:`METHODS`) on a Flax ``model`` with base ``params``.

  Args:
    name: the method.
    key: PRNG key for the trainable tree's initialisation.
    model: a Linen model (``prompt``, ``prefix`` and ``bitfit`` need the
      reference :class:`~jlora.models.Llama`: a ``KVCache`` argument, bias switches).
    params: its params tree (unquantized).
    example_ids: ``[batch, T]`` ids to trace the model with (abstractly).
    lora: the LoRA config for ``lora``/``qlora`` (default rank 4 on q/v).
    num_virtual_tokens: for ``prompt`` and ``prefix``.
    prefix_projection: the MLP width of a reparameterised prefix, or None.
    adapter_width / placement: for ``adapter``.

  Returns:
    The :class:`Method`.

  Example:
    >>> from jlora.models import Llama, preset, unboxed_init
    >>> ids = jnp.ones((1, 4), jnp.int32)
    >>> model = Llama(preset("tiny"))
    >>> params = jax.eval_shape(lambda k: unboxed_init(model, k, ids), jax.random.key(0))
    >>> m = setup("ia3", jax.random.key(1), model, params, ids)       # (shapes are enough here)
    >>> m.count(), m.select, sorted(m.trainable["layers_0"]["self_attn"])
    (320, None, ['k_proj', 'v_proj'])
  """
  if name not in METHODS:
    raise ConfigError(f"method must be one of {METHODS}, got {name!r}")
  from jlora import flax as jflax
  lr = LEARNING_RATES[name]
  ex = (example_ids,)

  def adapted(ad, base, ids):
    return jflax.apply(model, {"params": base}, ad, ids)

  if name in ("lora", "qlora"):
    cfg = lora or LoraConfig(rank=4, alpha=8, targets=["q_proj", "v_proj"])
    ad = jflax.init_adapter(key, params, cfg, model=model, args=ex)
    base = params
    if name == "qlora":
      from jlora.quant import quantize
      base = quantize(params, scheme="nf4", block_size=64, double_quant=True, min_size=0)
    return Method(name, model, ad, base, None, adapted, lr)
  if name == "full":
    params = jax.tree.map(jnp.copy, params)   # the train step donates (deletes) its first argument
    return Method(name, model, params, None, None,
                  lambda p, base, ids: model.apply({"params": p}, ids), lr)
  if name == "bitfit":
    if not any(p.endswith("/bias") for p in paths.flatten(params)):
      model, params = with_zero_biases(model, params, example_ids)
    params = jax.tree.map(jnp.copy, params)
    run = model
    return Method(name, model, params, None, select.BIASES,
                  lambda p, base, ids: run.apply({"params": p}, ids), lr)
  if name == "prompt":
    pr = prompt.init_prompt(key, num_virtual_tokens, params["embed_tokens"]["embedding"])

    def prompted(pr, base, ids):
      out = prompt.apply(model, base, pr, ids)
      return out if pr is None else out[:, pr.num_virtual_tokens:]
    return Method(name, model, pr, params, None, prompted, lr)
  if name == "prefix":
    px = prefix.init_prefix(key, model.config, num_virtual_tokens, projection=prefix_projection)
    return Method(name, model, px, params, None,
                  lambda px, base, ids: prefix.apply(model, base, px, ids), lr)
  if name == "adapter":
    ad = bottleneck.init_bottleneck(key, params, width=adapter_width, placement=placement,
                                    model=model, args=ex)
    return Method(name, model, ad, params, None, adapted, lr)
  ad = ia3.init_ia3(params, model=model, args=ex)
  return Method(name, model, ad, params, None, adapted, lr)
