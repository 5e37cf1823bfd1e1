"""Reads RESULT lines (and the PEFT anchor's lines) from stdin; prints one short row each."""
import json
import sys

KEYS = ("step_s", "pipelined_tokens_per_s", "tokens_per_s", "peak_gib", "compile_s", "loss",
        "max_rel_gap", "vs_merged", "replace_ms", "remove_and_add_ms")
for line in sys.stdin:
  line = line.strip()
  if not line:
    continue
  head, _, rest = line.partition(" ")
  try:
    r = json.loads(rest)
  except ValueError:
    print(line[:200])
    continue
  if head == "RESULTS":
    continue
  name = r.get("variant") or r.get("what") or head
  extra = r.get("adapters", "")
  vals = " ".join(f"{k}={r[k]}" for k in KEYS if k in r)
  print(f"{head if head != 'RESULT' else ''}{name} {extra} {vals}"[:220])
