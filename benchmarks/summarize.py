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
    return "\n".join(lines)


if __name__ == "__main__":
    print("\n\n".join(summarize(p) for p in sys.argv[1:]))
