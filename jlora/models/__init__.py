"""Reference models built from standard Flax layers.

One Llama-style decoder (:class:`Llama`) whose :class:`LlamaConfig` switches
cover Llama, Mistral, Qwen2/3, Gemma 1/2/3 and Phi-3; :mod:`.registry` maps
Hugging Face ``model_type`` values to each family's config and name maps.
"""
from jlora.models.config import LlamaConfig, RopeScaling, preset
from jlora.models.llama import (KVCache, Llama, abstract_params, head_logits, quantized_init,
                                unboxed_init)
from jlora.models.generate import generate
from jlora.models import registry
