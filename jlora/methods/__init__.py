"""The fine-tuning family beside LoRA: each is a trainable tree beside a frozen tree.

- :mod:`.select`: a trainable set by path (full fine-tuning, BitFit, LoRA
  plus norm scales): ``split`` a tree into trainable and frozen, ``join`` back.
"""
from jlora.methods import select
from jlora.methods.select import ALL, BIASES, NORMS, join, split

__all__ = ["select", "split", "join", "ALL", "BIASES", "NORMS"]
