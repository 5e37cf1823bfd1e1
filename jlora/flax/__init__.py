"""Running Flax models with adapters (being built: issue 3)."""
from jlora import adapter as _adapter


def init_adapter(key, params, cfg, *, model=None, args=(), kwargs=None, return_base=False):
  """See :func:`jlora.adapter.init_adapter`; with ``model`` the layers are traced (being built)."""
  if model is not None:
    raise NotImplementedError("tracing is being built")
  return _adapter.init_adapter(key, params, cfg, return_base=return_base)


def apply(model, variables, adapter, *args, rngs=None, **kwargs):
  raise NotImplementedError("being built")
