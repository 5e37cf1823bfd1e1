"""Hugging Face PEFT LoRA adapters in and out: ``load`` and ``save``.

A PEFT adapter directory holds ``adapter_config.json`` and
``adapter_model.safetensors``; only those two files are ever read (JSON and
safetensors: no pickle, no ``torch.load``). The package's modules, one job each:

- :mod:`.names`: name maps between PEFT's module names and your parameter
  paths (tables, functions, the reference models' maps), and where each
  module's weight lives in ``params``;
- :mod:`.config`: ``adapter_config.json``: validation, PEFT's matching rules,
  translation to and from :class:`jlora.LoraConfig`;
- :mod:`.tensors`: ``adapter_model.safetensors``: keys, layouts, safe reading;
- :mod:`.load`: :func:`load` (and :func:`read`, :func:`params_from_file`);
- :mod:`.save`: :func:`save` (and :func:`export`), written atomically.
"""
from jlora.interop.peft.config import CONFIG_NAME
from jlora.interop.peft.load import load, params_from_file, read
from jlora.interop.peft.names import Function, Table, hf_module_name, jlora_param_path, sites
from jlora.interop.peft.save import export, save
from jlora.interop.peft.tensors import PREFIX, WEIGHTS_NAME, read_tensors, split_keys

__all__ = ["load", "save", "read", "export", "params_from_file", "read_tensors", "split_keys",
           "sites", "hf_module_name", "jlora_param_path", "Table", "Function", "CONFIG_NAME",
           "WEIGHTS_NAME", "PREFIX"]
