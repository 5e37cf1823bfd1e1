"""Regular expressions from files, matched in time linear in the text.

PEFT's ``adapter_config.json`` holds regular expressions (``target_modules``
as a string, the keys of ``rank_pattern`` and ``alpha_pattern``). Python's
``re`` backtracks, so a downloaded key such as ``(.*.*)*Z`` can take hours
on one module name. Here a pattern is parsed by Python's own parser (so it
means exactly what ``re`` would make of it) and run as an automaton over sets
of states, whose transitions are cached (a lazily built DFA): each character
of the text costs at most one pass over the pattern's instructions.

Backreferences, lookaround, possessive and atomic groups, word boundaries
and inline flags other than verbose are refused (they are not regular, or
PEFT adapters do not use them). ``$`` matches at the end of the text only.

Example:
  >>> fullmatch(r"(.*\\.)?(q_proj|v_proj)", "model.layers.0.self_attn.q_proj")
  True
  >>> fullmatch("(.*.*)*Z", "a" * 500)   # instant; re.fullmatch would not return
  False
"""
from __future__ import annotations

import functools
import re
from re import _constants as K
from re import _parser as P

from jlora.errors import ConfigError, short

MAX_PATTERN = 2000
"""Longest pattern accepted, in characters."""
MAX_PROGRAM = 20_000
"""Most automaton instructions one pattern may compile to (bounded repeats unrolled)."""
_CACHE_LIMIT = 50_000

_CATEGORIES = {
    K.CATEGORY_DIGIT: str.isdecimal, K.CATEGORY_NOT_DIGIT: lambda c: not c.isdecimal(),
    K.CATEGORY_SPACE: str.isspace, K.CATEGORY_NOT_SPACE: lambda c: not c.isspace(),
    K.CATEGORY_WORD: lambda c: c.isalnum() or c == "_",
    K.CATEGORY_NOT_WORD: lambda c: not (c.isalnum() or c == "_"),
}
_REFUSED_FLAGS = re.IGNORECASE | re.MULTILINE | re.ASCII | re.LOCALE


class _Unsupported(Exception):
  pass


def _class_pred(items):
  """A predicate for a ``[...]`` set from the parser's items."""
  negate, tests = False, []
  for op, av in items:
    if op is K.NEGATE:
      negate = True
    elif op is K.LITERAL:
      tests.append(lambda c, x=chr(av): c == x)
    elif op is K.RANGE:
      tests.append(lambda c, lo=av[0], hi=av[1]: lo <= ord(c) <= hi)
    elif op is K.CATEGORY and av in _CATEGORIES:
      tests.append(_CATEGORIES[av])
    else:
      raise _Unsupported(f"character class item {op}")
  return lambda c: any(t(c) for t in tests) != negate


class _Program:
  """Instructions: ("char", pred), ("split", x, y), ("jmp", x), ("assert", "begin"|"end"), ("match",)."""

  def __init__(self, dotall: bool):
    self.code: list[tuple] = []
    self.dotall = dotall

  def add(self, *ins) -> int:
    if len(self.code) >= MAX_PROGRAM:
      raise _Unsupported(f"more than {MAX_PROGRAM} automaton states")
    self.code.append(ins)
    return len(self.code) - 1

  def patch(self, at: int, *ins) -> None:
    self.code[at] = ins

  def emit(self, items) -> None:
    for op, av in items:
      self.emit_one(op, av)

  def emit_one(self, op, av) -> None:
    if op is K.LITERAL:
      self.add("char", lambda c, x=chr(av): c == x)
    elif op is K.NOT_LITERAL:
      self.add("char", lambda c, x=chr(av): c != x)
    elif op is K.ANY:
      self.add("char", (lambda c: True) if self.dotall else (lambda c: c != "\n"))
    elif op is K.IN:
      self.add("char", _class_pred(av))
    elif op is K.SUBPATTERN:
      _, add_flags, del_flags, body = av
      if add_flags & _REFUSED_FLAGS or del_flags:
        raise _Unsupported("inline flags")
      self.emit(body)
    elif op is K.BRANCH:
      self.branch(av[1])
    elif op in (K.MAX_REPEAT, K.MIN_REPEAT):
      self.repeat(*av)
    elif op is K.AT and av in (K.AT_BEGINNING, K.AT_BEGINNING_STRING):
      self.add("assert", "begin")
    elif op is K.AT and av in (K.AT_END, K.AT_END_STRING):
      self.add("assert", "end")
    else:
      raise _Unsupported(str(op).lower())

  def branch(self, alternatives) -> None:
    jumps = []
    for i, alt in enumerate(alternatives):
      if i < len(alternatives) - 1:
        split = self.add("split", None, None)
        self.emit(alt)
        jumps.append(self.add("jmp", None))
        self.patch(split, "split", split + 1, len(self.code))
      else:
        self.emit(alt)
    for j in jumps:
      self.patch(j, "jmp", len(self.code))

  def repeat(self, lo: int, hi, body) -> None:
    if lo > 1000 or (hi != K.MAXREPEAT and hi > 1000):
      raise _Unsupported("a repeat count above 1000")
    for _ in range(lo):
      self.emit(body)
    if hi == K.MAXREPEAT:
      split = self.add("split", None, None)
      self.emit(body)
      self.add("jmp", split)
      self.patch(split, "split", split + 1, len(self.code))
      return
    splits = []
    for _ in range(hi - lo):
      splits.append(self.add("split", None, None))
      self.emit(body)
    for s in splits:
      self.patch(s, "split", s + 1, len(self.code))


class Pattern:
  """A compiled untrusted pattern; ``fullmatch(text)`` costs O(len(text) · states)."""

  def __init__(self, pattern: str, code: list[tuple]):
    self.pattern, self.code = pattern, code
    self._next: dict = {}
    self._accepts: dict = {}
    self.start = frozenset([0])

  def _closure(self, pcs, begin: bool, end: bool) -> frozenset:
    seen, stack, out = set(), list(pcs), set()
    while stack:
      pc = stack.pop()
      if pc in seen:
        continue
      seen.add(pc)
      ins = self.code[pc]
      if ins[0] == "split":
        stack += [ins[1], ins[2]]
      elif ins[0] == "jmp":
        stack.append(ins[1])
      elif ins[0] == "assert":
        if (begin if ins[1] == "begin" else end):
          stack.append(pc + 1)
      else:
        out.add(pc)
    return frozenset(out)

  def _step(self, state: frozenset, ch: str, begin: bool) -> frozenset:
    key = (state, ch, begin)
    nxt = self._next.get(key)
    if nxt is None:
      if len(self._next) > _CACHE_LIMIT:
        self._next.clear()
      nxt = frozenset(pc + 1 for pc in self._closure(state, begin, False)
                      if self.code[pc][0] == "char" and self.code[pc][1](ch))
      self._next[key] = nxt
    return nxt

  def fullmatch(self, text: str) -> bool:
    state = self.start
    for i, ch in enumerate(text):
      state = self._step(state, ch, i == 0)
      if not state:
        return False
    key = (state, not text)
    if key not in self._accepts:
      if len(self._accepts) > _CACHE_LIMIT:
        self._accepts.clear()
      match = len(self.code) - 1
      self._accepts[key] = match in self._closure(state, not text, True)
    return self._accepts[key]


@functools.lru_cache(maxsize=1024)
def _compile(pattern: str) -> Pattern:
  if len(pattern) > MAX_PATTERN:
    raise _Unsupported(f"more than {MAX_PATTERN} characters")
  try:
    parsed = P.parse(pattern)
  except (re.error, RecursionError, OverflowError) as err:
    raise _Unsupported(f"does not compile: {err}") from None
  if parsed.state.flags & _REFUSED_FLAGS & ~re.UNICODE:
    raise _Unsupported("inline flags")
  prog = _Program(bool(parsed.state.flags & re.DOTALL))
  try:
    prog.emit(parsed)
  except RecursionError:
    raise _Unsupported("nested too deeply") from None
  prog.add("match")
  return Pattern(pattern, prog.code)


def why_not(pattern) -> str | None:
  """None if ``pattern`` compiles here, else why not ("does not compile: ..." or "uses ...").

  Example:
    >>> why_not("(a")
    'does not compile: missing ), unterminated subpattern at position 0'
  """
  if not isinstance(pattern, str):
    return "is not a string"
  try:
    _compile(pattern)
  except _Unsupported as err:
    text = str(err)
    return text if text.startswith("does not compile") else f"uses {text}, which is not supported"
  return None


def compile(pattern: str, what: str = "pattern") -> Pattern:  # noqa: A001 (mirrors re.compile)
  """Compiles ``pattern``; ConfigError naming ``what`` if it is not a supported regex.

  Example:
    >>> compile("q_proj|v_proj").fullmatch("v_proj")
    True
  """
  if not isinstance(pattern, str):
    raise ConfigError(f"{what}: {short(pattern, 80)} is not a string")
  why = why_not(pattern)
  if why is not None:
    raise ConfigError(f"{what}: pattern {short(pattern, 120)} {why} (patterns read from files "
                      "are matched in linear time: no backreferences or lookaround)")
  return _compile(pattern)


def fullmatch(pattern: str | Pattern, text: str, what: str = "pattern") -> bool:
  """Whether ``pattern`` matches all of ``text`` (as ``re.fullmatch``, in linear time).

  Example:
    >>> fullmatch(r"layers\.\d+\.(q|v)_proj", "layers.12.v_proj")
    True
  """
  p = pattern if isinstance(pattern, Pattern) else compile(pattern, what)
  return p.fullmatch(text)
