"""Prints a benchmark JSON file (or several) as a short table: one line per result row.

    python benchmarks/summarize.py benchmarks/results/sd3_gpu.json [...]
"""

from __future__ import annotations

import json
import sys


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def summarize(path: str) -> str:
    try:
        data = json.loads(open(path).read())
    except (OSError, json.JSONDecodeError) as e:
        return f"{path}: no result ({e})"
    lines = [f"== {data.get('benchmark', path)}: {data.get('model', data.get('preset', ''))} "
             f"on {data.get('env', {}).get('device', '?')}"]
    rows = data.get("results", [])
    keys = list(dict.fromkeys(k for r in rows for k in r))
    if keys:
        lines.append(" | ".join(keys))
        lines += [" | ".join(_fmt(r.get(k, "")) for k in keys) for r in rows]
    for k, v in data.get("ratios", {}).items():
        lines.append(f"{k}: {_fmt(v)}")
    if not rows:  # a benchmark of named sections (serve_gpu: generations, realtime): their figures
        lines += [f"{k}: {_fmt(v)}" for key, value in data.items() if key not in SKIP
                  for k, v in _leaves(key, value)]
    return "\n".join(lines)


SKIP = ("benchmark", "model", "preset", "env", "results", "ratios", "runs")


def _leaves(key: str, value) -> list[tuple[str, object]]:
    """``("a.b.c", scalar)`` for every scalar under ``value`` (short lists of scalars as one)."""
    if isinstance(value, dict):
        return [leaf for k, v in value.items() for leaf in _leaves(f"{key}.{k}", v)]
    if isinstance(value, list):
        return [(key, value)] if len(value) <= 8 and all(not isinstance(v, dict | list) for v in value) else []
    return [(key, value)]


if __name__ == "__main__":
    print("\n\n".join(summarize(p) for p in sys.argv[1:]))
