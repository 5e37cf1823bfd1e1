"""The fine-tuning family beside LoRA: each is a trainable tree beside a frozen tree.

- :mod:`.select`: a trainable set by path (full fine-tuning, BitFit, LoRA
  plus norm scales): ``split`` a tree into trainable and frozen, ``join`` back.
- :mod:`.ia3`: IA³, per-feature scales of a layer's outputs or inputs
  (mergeable), an adapter node applied by ``jlora.apply``.
- :mod:`.bottleneck`: bottleneck adapters (Houlsby/Pfeiffer) on a layer's
  output, an adapter node applied by ``jlora.apply`` (not mergeable).
- :mod:`.prompt`: prompt tuning, virtual-token embeddings before the input.
- :mod:`.prefix`: prefix tuning / P-tuning v2, per-layer key/value prefixes.
- :mod:`.dpo`: DPO and IPO losses, the adapter switched off as the reference.
- :mod:`.recipes`: all of them (and LoRA, QLoRA) set up by name, for one trainer.

See docs/methods.md.
"""
from jlora.methods import bottleneck, dpo, ia3, prefix, prompt, recipes, select
from jlora.methods.bottleneck import Bottleneck, init_bottleneck
from jlora.methods.ia3 import IA3, init_ia3
from jlora.methods.prefix import Prefix, init_prefix
from jlora.methods.prompt import Prompt, init_prompt
from jlora.methods.recipes import METHODS, Method, setup
from jlora.methods.select import ALL, BIASES, NORMS, join, split

__all__ = ["select", "split", "join", "ALL", "BIASES", "NORMS",
           "ia3", "IA3", "init_ia3", "bottleneck", "Bottleneck", "init_bottleneck",
           "prompt", "Prompt", "init_prompt", "prefix", "Prefix", "init_prefix",
           "dpo", "recipes", "METHODS", "Method", "setup"]
