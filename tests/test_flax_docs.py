"""The python blocks of docs/flax.md run, in order, in one namespace.

(Kept small; the page's own asserts check its claims.)"""
import pathlib
import re

DOC = pathlib.Path(__file__).resolve().parent.parent / "docs" / "flax.md"


def test_flax_page_runs():
  blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
  assert len(blocks) >= 5
  namespace: dict = {}
  for i, block in enumerate(blocks):
    exec(compile(block, f"{DOC.name}[block {i}]", "exec"), namespace)
  assert namespace["trained"]["up_proj"]["kernel"].a.shape == (16, 4)
