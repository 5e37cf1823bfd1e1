"""Writes docs/api.md, the API reference, from the docstrings of ``jlora.__all__``.

  python tools/gen_api.py            # rewrite docs/api.md
  python tools/gen_api.py --check    # exit 1 if docs/api.md is out of date

Modules in ``jlora.__all__`` (``jlora.interop``, ``jlora.peft``) contribute
the public names of their own ``__all__``. tests/test_docs.py checks that
the committed page is what this script writes.
"""
from __future__ import annotations

import argparse
import inspect
import pathlib
import sys
import types

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "api.md"
MODULE_NAMES = {"interop": ("from_hf", "to_hf"),
                "peft": ("load", "save", "read", "export", "params_from_file", "Table",
                         "Function")}

HEADER = '''# API reference

Generated from the docstrings by `python tools/gen_api.py` (the test suite
checks that it is up to date): every name of `jlora.__all__`, the contract's
public surface, and the functions of `jlora.interop` and `jlora.peft`. The
guides explain how the pieces fit together; examples in the docstrings run
as doctests.

```python
import jlora
assert {"LoraConfig", "init_adapter", "apply", "merge", "peft", "summary"} <= set(jlora.__all__)
```
'''


def _signature(obj) -> str:
  try:
    return str(inspect.signature(obj))
  except (TypeError, ValueError):
    return "(...)"


def _entry(qualname: str, obj) -> str:
  kind = "class" if inspect.isclass(obj) else "function" if callable(obj) else "value"
  head = f"### `{qualname}{_signature(obj) if kind != 'value' else ''}`\n\n"
  doc = inspect.getdoc(obj) if kind != "value" else None
  if kind == "value":
    return head + f"```text\n{obj!r}\n```\n"
  if not doc:
    return head + "(no docstring)\n"
  first, _, rest = doc.partition("\n\n")
  out = head + " ".join(first.split()) + "\n"
  if rest.strip():
    out += "\n```text\n" + rest.rstrip() + "\n```\n"
  return out


def generate() -> str:
  sys.path.insert(0, str(ROOT))
  import jlora
  sections = [HEADER]
  plain = [n for n in jlora.__all__ if not isinstance(getattr(jlora, n), types.ModuleType)]
  sections.append("## `jlora`\n")
  sections += [_entry(f"jlora.{n}", getattr(jlora, n)) for n in plain]
  for module_name, names in MODULE_NAMES.items():
    if module_name not in jlora.__all__:
      continue
    module = getattr(jlora, module_name)
    sections.append(f"## `jlora.{module_name}`\n\n" + " ".join(
        (inspect.getdoc(module) or "").partition("\n\n")[0].split()) + "\n")
    sections += [_entry(f"jlora.{module_name}.{n}", getattr(module, n)) for n in names]
  return "\n".join(sections)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--check", action="store_true", help="exit 1 if docs/api.md is out of date")
  args = p.parse_args(argv)
  text = generate()
  if args.check:
    if PAGE.read_text() != text:
      print(f"{PAGE} is out of date: run python tools/gen_api.py", file=sys.stderr)
      return 1
    return 0
  PAGE.write_text(text)
  print(f"wrote {PAGE} ({text.count('### ')} entries)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
