"""Reference models built from standard Flax layers (the Llama family)."""
from jlora.models.config import LlamaConfig, RopeScaling, preset
from jlora.models.llama import KVCache, Llama, abstract_params, quantized_init, unboxed_init
from jlora.models.generate import generate
