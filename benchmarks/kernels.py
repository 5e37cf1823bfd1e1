"""Summarise a ``jax.profiler`` perfetto trace: device time per kernel name.

  python3 benchmarks/kernels.py PROFILE_DIR [--top 30] [--steps 3]

Reads every ``perfetto_trace.json.gz`` under PROFILE_DIR (train_step.py
--profile writes one of 3 steps) and prints the kernels and copies on the
device's "Stream" threads with the largest total time per step, their share
and their count per step.
"""
import argparse
import collections
import gzip
import json
import pathlib


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument("folder")
  ap.add_argument("--top", type=int, default=30)
  ap.add_argument("--steps", type=int, default=3)
  args = ap.parse_args(argv)
  for path in sorted(pathlib.Path(args.folder).rglob("perfetto_trace.json.gz")):
    data = json.load(gzip.open(path))
    events = data["traceEvents"] if isinstance(data, dict) else data
    names = {e["pid"]: e["args"].get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    device = {pid for pid, n in names.items() if "/device:" in n}
    threads = {(e["pid"], e["tid"]): e["args"].get("name", "") for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    streams = {k for k, n in threads.items() if k[0] in device and n.startswith("Stream")}
    total = collections.Counter()
    count = collections.Counter()
    for e in events:
      if e.get("ph") == "X" and (e["pid"], e.get("tid")) in streams:
        total[e["name"]] += e.get("dur", 0.0)
        count[e["name"]] += 1
    all_us = sum(total.values())
    print(f"{path}: {len(total)} kernels, {all_us / args.steps / 1e3:.2f} ms device time a step")
    for name, us in total.most_common(args.top):
      print(f"{us / args.steps / 1e3:8.3f} ms {100 * us / all_us:5.1f}% "
            f"x{count[name] // args.steps:<4d} {name[:110]}")


if __name__ == "__main__":
  main()
