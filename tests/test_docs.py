"""Every ```python block of docs/*.md runs, and every jlora docstring example passes.

The blocks of one page run in order in one namespace (later blocks use
earlier names). Docstring examples run with doctest in their module's
namespace. Pages and modules are found on disk, so new ones are picked up
without editing this file; a module that fails to import fails its test.
"""
import doctest
import importlib
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
MODULES = sorted(
    ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
    for p in (ROOT / "jlora").rglob("*.py"))
BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)


def python_blocks(text: str) -> list[tuple[int, str]]:
  """``[(first line number, code)]`` of the ```python blocks of a markdown text."""
  return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in BLOCK.finditer(text)]


def test_block_extraction():
  text = "intro\n```python\nx = 1\n```\ntext\n```bash\nls\n```\n```python\ny = x + 1\n```\n"
  assert python_blocks(text) == [(3, "x = 1\n"), (10, "y = x + 1\n")]


def test_there_is_something_to_run():
  assert any(p.name == "concepts.md" for p in PAGES)
  assert {"jlora.adapter", "jlora.lora", "jlora.combining"} <= set(MODULES)


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_docs_page_runs(page):
  blocks = python_blocks(page.read_text())
  assert blocks, f"{page.name} has no ```python block"
  namespace = {"__name__": f"docs_{page.stem}"}
  for line, code in blocks:
    # pad with newlines so tracebacks point at the page's own line numbers
    exec(compile("\n" * (line - 1) + code, str(page), "exec"), namespace)  # noqa: S102


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
  module = importlib.import_module(name)
  finder = doctest.DocTestFinder(exclude_empty=True)
  runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  skipped = []
  for test in finder.find(module, name, globs=dict(vars(module))):
    skipped += [f"{test.name} (line {test.lineno + ex.lineno + 1}): {ex.source.strip()}"
                for ex in test.examples if ex.options.get(doctest.SKIP)]
    runner.run(test)
  # "# doctest: +SKIP" would skip silently (and break the examples after it)
  assert not skipped, "docstring examples must run, but these are marked +SKIP:\n" + "\n".join(skipped)
  result = runner.summarize(verbose=False)
  assert result.failed == 0, f"{result.failed} docstring example(s) of {name} failed (see output)"


def test_modules_import_without_torch():
  """Importing any jlora module must not need PyTorch (it is an optional extra)."""
  code = ("import sys, importlib\n"
          "sys.modules['torch'] = None  # any `import torch` now raises ImportError\n"
          f"for name in {MODULES!r}:\n"
          "  importlib.import_module(name)\n"
          "print('ok')\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"}, timeout=120)
  assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_api_reference_is_up_to_date():
  """docs/api.md is what tools/gen_api.py writes from the docstrings of jlora.__all__."""
  import runpy
  gen = runpy.run_path(str(ROOT / "tools" / "gen_api.py"))
  assert (ROOT / "docs" / "api.md").read_text() == gen["generate"](), (
      "docs/api.md is out of date: run python tools/gen_api.py")


LINK = re.compile(r"\]\(([^)\s]+)\)")


def _anchors(page: pathlib.Path) -> set[str]:
  """GitHub's heading anchors: lower case, punctuation but '-' and '_' dropped, spaces to '-'."""
  out = set()
  for line in page.read_text().splitlines():
    if line.startswith("#"):
      text = line.lstrip("#").strip().lower()
      out.add(re.sub(r"[^\w\- ]", "", text).replace(" ", "-"))
  return out


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_relative_links_resolve(page):
  """Every relative link of README.md and docs/*.md names a file (and heading) that exists."""
  for target in LINK.findall(page.read_text()):
    if target.startswith(("http://", "https://", "mailto:")):
      continue
    path, _, anchor = target.partition("#")
    file = (page.parent / path).resolve() if path else page
    assert file.exists(), f"{page.name}: link to {target!r}: no such file"
    if anchor and file.suffix == ".md":
      assert anchor in _anchors(file), f"{page.name}: link to {target!r}: no such heading"
