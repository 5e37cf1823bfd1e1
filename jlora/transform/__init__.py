"""LoRA as a transformation of a function (see ``interpret.py`` for the rules).

``adapt(fn, params, adapter)`` runs any JAX function of a parameter tree with
an adapter; ``learn`` records how a function uses each of its weights.
"""
from jlora.transform.api import adapt, learn, slots

__all__ = ["adapt", "learn", "slots"]
