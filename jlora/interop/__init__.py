"""Hugging Face interop: safetensors checkpoints and PEFT adapters (being built: issue 5)."""
from jlora.interop.hf import from_hf, to_hf
