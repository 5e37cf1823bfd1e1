"""Meshes, logical-axis rules, and shardings derived for adapters.

jlora shards the pjit way: every array gets a ``NamedSharding`` over a device
mesh with the axes ``("data", "fsdp", "tensor")``, and ``jax.jit`` (with
``in_shardings`` / ``out_shardings``) inserts the collectives. The base's
shardings come from the *logical* axis names its parameters carry
(``nn.with_logical_partitioning``, the MaxText/T5X style) mapped to mesh axes
by a rule table; an adapter's shardings are derived from its base kernel's:

  kernel W: [*stack, *kernel]   spec (s..., k_0, k_1, ...)
  a: [*stack, *in_dims, r]      spec (s..., k_i for i in in_axes, None)
  b: [*stack, r, *out_dims]     spec (s..., None, k_o for o in out_axes)
  magnitude: [*stack, *out_dims] spec (s..., k_o for o in out_axes)

so ``x @ a`` contracts over the same devices as ``x @ W`` and ``(x a) @ b``
comes out sharded like ``x @ W``; the rank axis is replicated.

A dimension that a mesh axis does not divide evenly is replicated instead
(``fit_spec``), so any rule table works for any model size.

Pipeline parallelism (:mod:`jlora.sharding.pipeline`) adds a fourth,
outermost mesh axis ``"stage"`` (``make_mesh(stage=S)``) over which a stacked
layer axis is split; :class:`Pipeline` says how the batch is cut into
microbatches and scheduled ("gpipe" or "1f1b").
"""
from jlora.sharding.mesh import (DEFAULT_RULES, MESH_AXES, STAGE_AXIS, batch_sharding, constrain,
                                 fit_spec, logical_spec, make_mesh, param_shardings,
                                 pipeline_rules, place, shard_batch)
from jlora.sharding.derive import (adapter_shardings, lora_shardings, qarray_shardings,
                                   quantized_shardings, state_shardings)
from jlora.sharding.steps import greedy_decode, shard_generate, shard_train_step
from jlora.sharding.pipeline import (SCHEDULES, Pipeline, bubble_fraction, gpipe, one_f_one_b,
                                     schedule_table)

__all__ = [
    "MESH_AXES", "DEFAULT_RULES", "make_mesh", "fit_spec", "logical_spec", "param_shardings",
    "lora_shardings", "adapter_shardings", "qarray_shardings", "quantized_shardings",
    "state_shardings", "place", "batch_sharding", "shard_batch", "constrain",
    "shard_train_step", "greedy_decode", "shard_generate",
    "STAGE_AXIS", "pipeline_rules", "SCHEDULES", "Pipeline", "bubble_fraction", "schedule_table",
    "gpipe", "one_f_one_b",
]
