"""Preference tuning: DPO and IPO losses with the adapter switched off as the reference.

Direct Preference Optimization (Rafailov et al., 2023) trains a policy on
pairs (chosen, rejected) of completions of one prompt, against a frozen
reference policy. With jlora the reference is the same base run without the
trainable tree (an adapter, a prompt, a prefix: ``trainable=None``), so one
copy of the base serves both::

  logratio = (log π(c) - log π(r)) - (log π_ref(c) - log π_ref(r))
  DPO:  loss = -(1-ε)·log σ(β·logratio) - ε·log σ(-β·logratio)   (ε: label smoothing)
  IPO:  loss = (logratio - 1/(2β))²                                (Azar et al., 2023)

``log π(c)`` sums the completion's token log-probabilities (IPO averages them
per token, as TRL does). The implicit rewards are ``β·(log π - log π_ref)``;
the metrics report their mean margin (chosen - rejected) and the accuracy
(the fraction of pairs whose chosen reward is higher).

Example:
  >>> logits_fn = lambda ad, base, ids: jax.nn.one_hot(ids, 8) * (0.0 if ad is None else ad)
  >>> ids = jnp.array([[1, 2, 3], [1, 4, 5]])
  >>> mask = jnp.array([[0, 1, 1], [0, 1, 1]])
  >>> batch = {"chosen": ids[:1], "rejected": ids[1:], "chosen_mask": mask[:1],
  ...          "rejected_mask": mask[1:]}
  >>> loss, m = make_loss_fn(logits_fn)(jnp.float32(0.5), None, batch, None)
  >>> round(float(loss), 4), float(m["accuracy"])
  (0.6931, 0.0)
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from jlora.errors import ConfigError

KINDS = ("sigmoid", "ipo")


def sequence_logps(logits: jax.Array, ids: jax.Array, mask: jax.Array,
                   average: bool = False) -> jax.Array:
  """Log-probability of each sequence's masked tokens under causal-LM ``logits``.

  Args:
    logits: ``[batch, T, vocab]``; position t predicts ``ids[:, t + 1]``.
    ids: ``[batch, T]`` token ids.
    mask: ``[batch, T]``, 1 on the tokens to score (the completion), aligned
      with ``ids`` (the first position is never scored).
    average: the mean per scored token instead of the sum.

  Returns:
    ``[batch]`` float32.

  Example:
    >>> logits = jnp.log(jnp.array([[[0.5, 0.5], [0.25, 0.75]]]))
    >>> sequence_logps(logits, jnp.array([[0, 1]]), jnp.array([[0, 1]]))   # log 0.5
    Array([-0.6931472], dtype=float32)
  """
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  tok = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
  w = mask[:, 1:].astype(jnp.float32)
  total = jnp.sum(tok * w, axis=1)
  return total / jnp.maximum(jnp.sum(w, axis=1), 1.0) if average else total


def dpo_loss(policy_chosen: jax.Array, policy_rejected: jax.Array, reference_chosen: jax.Array,
             reference_rejected: jax.Array, *, beta: float = 0.1, kind: str = "sigmoid",
             label_smoothing: float = 0.0) -> tuple[jax.Array, dict]:
  """The mean DPO (or IPO) loss over pairs, and its metrics.

  Args:
    policy_chosen, policy_rejected, reference_chosen, reference_rejected:
      ``[pairs]`` sequence log-probabilities (:func:`sequence_logps`).
    beta: β, the strength of the pull towards the reference.
    kind: "sigmoid" (DPO) or "ipo".
    label_smoothing: ε, the assumed fraction of flipped labels (DPO only;
      conservative DPO).

  Returns:
    ``(loss, metrics)``: metrics "reward_margin" (mean of chosen minus
    rejected implicit reward), "accuracy", "chosen_reward", "rejected_reward".

  Example:
    >>> z = jnp.zeros(2)
    >>> loss, m = dpo_loss(jnp.array([1.0, 0.0]), z, z, z, beta=1.0)
    >>> round(float(loss), 4), float(m["accuracy"])
    (0.5032, 0.5)
  """
  if kind not in KINDS:
    raise ConfigError(f"dpo_loss: kind must be one of {KINDS}, got {kind!r}")
  if not beta > 0:
    raise ConfigError(f"dpo_loss: beta must be positive, got {beta!r}")
  if not 0.0 <= label_smoothing < 0.5:
    raise ConfigError(f"dpo_loss: label_smoothing must be in [0, 0.5), got {label_smoothing!r}")
  logratio = (policy_chosen - policy_rejected) - (reference_chosen - reference_rejected)
  if kind == "ipo":
    losses = (logratio - 1.0 / (2.0 * beta)) ** 2
  else:
    losses = (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * logratio)
              - label_smoothing * jax.nn.log_sigmoid(-beta * logratio))
  chosen = beta * jax.lax.stop_gradient(policy_chosen - reference_chosen)
  rejected = beta * jax.lax.stop_gradient(policy_rejected - reference_rejected)
  metrics = {"reward_margin": jnp.mean(chosen - rejected),
             "accuracy": jnp.mean((chosen > rejected).astype(jnp.float32)),
             "chosen_reward": jnp.mean(chosen), "rejected_reward": jnp.mean(rejected)}
  return jnp.mean(losses), metrics


def make_loss_fn(logits_fn: Callable[[Any, Any, jax.Array], jax.Array], *, beta: float = 0.1,
                 kind: str = "sigmoid", label_smoothing: float = 0.0,
                 average: bool | None = None, reference_fn: Callable | None = None):
  """``loss_fn(trainable, base, batch, rng) -> (loss, metrics)`` for ``make_train_step(has_aux=True)``.

  The policy is ``logits_fn(trainable, base, ids)``; the reference is the
  same function with the trainable tree switched off, ``logits_fn(None,
  base, ids)`` (``jlora.apply`` with ``adapter=None`` runs the base alone),
  under ``stop_gradient``. Chosen and rejected sequences run as one batch.

  Args:
    logits_fn: ``(trainable or None, base, ids [2·pairs, T]) -> logits [2·pairs, T, vocab]``.
    beta, kind, label_smoothing: see :func:`dpo_loss`.
    average: average log-probabilities per token (default: for IPO only, as TRL).
    reference_fn: ``(base, ids) -> logits`` to use instead of the switched-off
      policy (e.g. a separately held reference model).

  Returns:
    The loss function. ``batch`` holds "chosen", "rejected" ``[pairs, T]``
    ids and "chosen_mask", "rejected_mask" ``[pairs, T]`` (1 on completion tokens).
  """
  if average is None:
    average = kind == "ipo"
  if reference_fn is None:
    reference_fn = lambda base, ids: logits_fn(None, base, ids)

  def loss_fn(trainable, base, batch, rng=None):
    ids, mask = pair_batch(batch)
    n = batch["chosen"].shape[0]
    policy = sequence_logps(logits_fn(trainable, base, ids), ids, mask, average)
    ref = jax.lax.stop_gradient(sequence_logps(reference_fn(base, ids), ids, mask, average))
    return dpo_loss(policy[:n], policy[n:], ref[:n], ref[n:], beta=beta, kind=kind,
                    label_smoothing=label_smoothing)
  return loss_fn


def pair_batch(batch: dict) -> tuple[jax.Array, jax.Array]:
  """Chosen then rejected as one batch: ``(ids [2·pairs, T], mask [2·pairs, T])``.

  Example:
    >>> b = {"chosen": jnp.ones((2, 3), int), "rejected": jnp.zeros((2, 3), int),
    ...      "chosen_mask": jnp.ones((2, 3)), "rejected_mask": jnp.ones((2, 3))}
    >>> pair_batch(b)[0].shape
    (4, 3)
  """
  c, r = batch["chosen"], batch["rejected"]
  if c.shape != r.shape:
    raise ConfigError(f"DPO batch: chosen {list(c.shape)} and rejected {list(r.shape)} must have "
                      "one shape (pad them to one length)")
  return (jnp.concatenate([c, r], axis=0),
          jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]], axis=0))
