"""Hugging Face interop: safetensors checkpoints and PEFT adapters (being built: issue 5)."""
