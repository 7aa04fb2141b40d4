"""Where a workload's device time goes, from a ``jax.profiler`` trace; JSON.

Reads the trace that ``jax.profiler.trace(DIR)`` writes (``DIR/plugins/profile/RUN/HOST.xplane.pb``
through JAX's own reader, ``jax.profiler.ProfileData``; the ``HOST.trace.json.gz`` beside it when
that reader is missing) and prints, for the kernels of one workload:

- the top kernels by total time, each with a category (conv, GEMM, attention, norm,
  elementwise, copy, other) and its share of the kernel time;
- the kernel count per call;
- the device timeline: span (first kernel start to last kernel end), busy time (the union of
  the kernels' intervals) and idle time (the gaps between them: host and launch gaps), with
  ``busy + idle = span``;
- the achieved TFLOP/s, given the FLOPs of one call (``program_flops``: XLA's cost analysis, else
  the program's products counted from its jaxpr);
- the host's launches per call (runs of kernels of one HLO op: a CUDA graph is one launch),
  how much of the idle time falls between launches rather than inside them, and the largest
  gaps with the ops on either side (``launches``);
- where the host's time goes: its named spans per call, and each jitted function's dispatch
  (``host``).

What a trace holds (checked on JAX 0.10 CPU; the GPU layout is XLA's CUPTI tracer's):

- GPU: kernels and memcpys are events on the ``/device:GPU:N`` planes, one line per CUDA
  stream (``Stream #N(...)``), named by the CUDA kernel, with ``hlo_op`` / ``hlo_module``
  stats. Lines derived from them (``XLA Ops``, ``XLA Modules``, ``Steps``...) are skipped.
- CPU: XLA:CPU runs each HLO op (thunk) on the host's threads (``tf_XLAPjRtCpuClient/...``,
  ``tf_XLAEigen/...``) as an event named by the op, with ``hlo_op`` / ``hlo_module`` /
  ``program_id`` / ``run_id`` stats; a ``while`` op's event encloses its body's ops, so only
  the innermost events count.

Categories come from the compiled HLO when it is given (``--hlo``: ``Compiled.as_text()`` or
XLA's ``*after_optimizations.txt`` dumps): an op is classified by what it (or the computation
a fusion calls) contains; otherwise from the kernel's name.

    python benchmarks/profile_summary.py TRACE_DIR [--calls N] [--flops F] [--hlo FILE_OR_DIR ...]
        [--modules REGEX] [--top 15] [--out FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import os
import re
import sys
from pathlib import Path

CATEGORIES = ("conv", "GEMM", "attention", "norm", "elementwise", "copy", "other")
DERIVED_LINES = ("XLA Ops", "XLA Modules", "XLA TraceMe", "Steps", "Framework Ops", "TensorFlow Ops",
                 "Launch Stats", "Source code", "XLA Async Ops", "Framework Name Scope", "TensorFlow Name Scope")


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One kernel (GPU) or one HLO op's execution (CPU)."""

    name: str  # the CUDA kernel's name (GPU) or the HLO op's (CPU)
    op: str  # the HLO op it ran for ("" when the trace does not say)
    module: str  # the HLO module (the jitted program, e.g. "jit_velocity_call")
    line: str  # the timeline it ran on (a CUDA stream, a host thread)
    start_us: float
    dur_us: float

    @property
    def end_us(self) -> float:
        return self.start_us + self.dur_us


# ---------------------------------------------------------------------------------------------
# Reading a trace
# ---------------------------------------------------------------------------------------------


def trace_run(path) -> Path:
    """The newest run directory under a ``jax.profiler.trace`` directory (or the file's)."""
    path = Path(path)
    if path.is_file():
        return path.parent
    runs = sorted(p.parent for p in path.glob("**/*.xplane.pb"))
    runs = runs or sorted(p.parent for p in path.glob("**/*.trace.json.gz"))
    if not runs:
        raise FileNotFoundError(f"{path}: no *.xplane.pb or *.trace.json.gz (not a jax.profiler.trace directory)")
    return max(runs, key=lambda p: p.name)


def _events_from_xplane(run: Path):
    from jax.profiler import ProfileData

    for pb in sorted(run.glob("*.xplane.pb")):
        for plane in ProfileData.from_file(str(pb)).planes:
            for line in plane.lines:
                for ev in line.events:
                    yield plane.name, line.name, ev.name, ev.start_ns / 1e3, ev.duration_ns / 1e3, dict(ev.stats)


def _events_from_json(run: Path):
    for js in sorted(run.glob("*.trace.json.gz")):
        events = json.load(gzip.open(js))["traceEvents"]
        planes = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
        lines = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
                 if e.get("ph") == "M" and e.get("name") == "thread_name"}
        for e in events:
            if e.get("ph") == "X":
                yield (planes.get(e["pid"], ""), lines.get((e["pid"], e.get("tid")), ""), e["name"],
                       float(e["ts"]), float(e.get("dur", 0.0)), e.get("args", {}))


def read_events(path, source: str = "auto") -> tuple[str, list[tuple]]:
    """``(source, [(plane, line, name, start_us, dur_us, stats)])`` of a trace directory's newest
    run; ``source``: ``"xplane"`` (JAX's reader), ``"json"`` or ``"auto"`` (xplane if it reads)."""
    run = trace_run(path)
    if source in ("auto", "xplane") and list(run.glob("*.xplane.pb")):
        try:
            return "xplane", list(_events_from_xplane(run))
        except Exception:  # a JAX without ProfileData, or one whose reader differs: the JSON
            if source == "xplane" or not list(run.glob("*.trace.json.gz")):
                raise
    return "json", list(_events_from_json(run))


def _innermost(kernels: list[Kernel]) -> list[Kernel]:
    """Drops events that enclose another on the same line (a CPU ``while`` around its body)."""
    out = []
    by_line: dict[str, list[Kernel]] = {}
    for k in kernels:
        by_line.setdefault(k.line, []).append(k)
    for ks in by_line.values():
        ks.sort(key=lambda k: (k.start_us, -k.dur_us))
        for i, k in enumerate(ks):
            nxt = ks[i + 1] if i + 1 < len(ks) else None
            if nxt is None or nxt.start_us >= k.end_us:
                out.append(k)
    return sorted(out, key=lambda k: k.start_us)


def device_kernels(events: list[tuple]) -> tuple[str, list[Kernel]]:
    """``(device, kernels)``: the GPU planes' stream events if there are any ("gpu"), else the
    host's XLA op events ("cpu")."""
    gpu = [e for e in events if e[0].startswith("/device:GPU")]
    if gpu:
        streams = [e for e in gpu if e[1].startswith("Stream")]
        chosen = streams or [e for e in gpu if e[1] not in DERIVED_LINES]
        device = "gpu"
    else:
        chosen = [e for e in events if e[0].startswith("/host") and "hlo_op" in e[5] and not e[2].startswith("end:")]
        device = "cpu"
    kernels = [Kernel(name=name, op=str(stats.get("hlo_op", "")), module=str(stats.get("hlo_module", "")),
                      line=f"{plane}/{line}", start_us=start, dur_us=dur)
               for plane, line, name, start, dur, stats in chosen]
    return device, _innermost(kernels)


# ---------------------------------------------------------------------------------------------
# Categories
# ---------------------------------------------------------------------------------------------

_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s+(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_OPCODE = re.compile(r"\s([a-z][a-z0-9\-]*)\(")
# one name, or a braced list of them (``condition=%a, body=%b``: two attributes, not a list)
_CALLS = re.compile(r"(?:calls|to_apply|body|condition|branch_computations|called_computations)="
                    r"(\{[^}]*\}|%?[\w.\-]+)")
_TARGET = re.compile(r'custom_call_target="([^"]+)"')
_MOVES = {"parameter", "constant", "copy", "copy-start", "copy-done", "transpose", "bitcast", "reshape",
          "broadcast", "slice", "dynamic-slice", "dynamic-update-slice", "concatenate", "pad", "gather",
          "scatter", "tuple", "get-tuple-element", "iota", "reverse", "bitcast-convert"}
_CONTROL = {"while", "conditional", "call", "async-start", "async-done", "send", "recv", "infeed", "outfeed",
            "rng", "rng-bit-generator", "sort", "all-reduce", "all-gather", "all-to-all", "collective-permute"}


def _classify(opcodes: set[str], targets: set[str]) -> str:
    opcodes = opcodes - {"fusion"}  # a fusion is what it fuses
    target = " ".join(targets).lower()
    if re.search(r"fmha|flash|attention", target):
        return "attention"
    if "convolution" in opcodes or re.search(r"conv", target):
        return "conv"
    if opcodes & {"dot", "ragged-dot"} or re.search(r"gemm|matmul|cublas", target):
        return "GEMM"
    if opcodes & {"reduce", "reduce-window"}:
        # the softmax of XLA's attention (exp(x - max) / sum); not a norm fused with a SiLU or a
        # GELU (exponential too, with an rsqrt), nor an activation's amax for FP8 (an abs)
        softmax = {"exponential", "subtract", "divide"} <= opcodes and not opcodes & {"rsqrt", "abs"}
        return "attention" if softmax else "norm"
    if opcodes & _CONTROL or targets:
        return "other"
    if opcodes <= _MOVES:
        return "copy"
    return "elementwise"


_KIND = re.compile(r'"kind":"([^"]+)"')
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')


def parse_hlo(text: str) -> tuple[str, str, dict[str, list[dict]]]:
    """``(module name, entry computation, {computation: [instruction]})`` of one HLO module's
    text. An instruction is a dict: ``name``, ``type`` (its shape's text), ``op``, ``operands``
    (their names), ``called`` (computations it calls), ``target`` (a custom call's) and
    ``kind`` (a fusion's backend kind, compiled GPU programs), ``trip`` (a while loop's known
    trip count, or None)."""
    module = re.match(r"\s*HloModule\s+([\w.\-]+)", text)
    comps: dict[str, list[dict]] = {}
    entry, current = "", None
    for raw in text.splitlines():
        if raw.startswith("}"):
            current = None
            continue
        m = _COMPUTATION.match(raw)
        if m and not raw.startswith(" "):
            current = comps.setdefault(m[1], [])
            entry = m[1] if raw.startswith("ENTRY") else entry
            continue
        m = _INSTRUCTION.match(raw)
        if m and current is not None:
            rest = " " + m[2]
            op = _OPCODE.search(rest)
            # the operands, without the comments XLA puts among them (``/*index=5*/``, every fifth)
            args = re.sub(r"/\*.*?\*/", " ", rest[op.end():].split(")", 1)[0]) if op else ""
            target, kind, trip = _TARGET.search(rest), _KIND.search(rest), _TRIP.search(rest)
            current.append({
                "name": m[1], "type": rest[:op.start()].strip() if op else "", "op": op[1] if op else "",
                "operands": [a.strip().lstrip("%").split()[-1] for a in args.split(",") if a.strip()],
                "called": [c.strip().lstrip("%") for g in _CALLS.findall(rest) for c in g.strip("{}").split(",")
                           if c.strip()],
                "target": target[1] if target else None, "kind": kind[1] if kind else None,
                "trip": int(trip[1]) if trip else None})
    return (module[1] if module else ""), entry, comps


def hlo_op_categories(text: str) -> tuple[str, dict[str, str]]:
    """``(module name, {op name: category})`` of one HLO module's text (op names are unique
    within a module; a fusion is classified by the computations it calls, recursively)."""
    module, _, parsed = parse_hlo(text)
    return module, op_categories(parsed)


def op_categories(parsed: dict[str, list[dict]]) -> dict[str, str]:
    """``{op name: category}`` of a module's computations as ``parse_hlo`` returns them."""
    comps = {c: [(i["name"], i["op"], i["called"], i["target"]) for i in insts] for c, insts in parsed.items()}

    cache: dict[str, tuple[set, set]] = {}

    def contents(comp: str, seen=()) -> tuple[set, set]:
        if comp in cache:
            return cache[comp]
        ops, targets = set(), set()
        for _, opcode, calls, target in comps.get(comp, []):
            ops.add(opcode)
            if target:
                targets.add(target)
            for c in calls:
                if c not in seen:
                    o, t = contents(c, seen + (comp,))
                    ops |= o
                    targets |= t
        cache[comp] = (ops, targets)
        return ops, targets

    table = {}
    for insts in comps.values():
        for name, opcode, calls, target in insts:
            if opcode in ("while", "conditional", "call") and calls:
                table[name] = "other"
                continue
            ops, targets = {opcode}, {target} if target else set()
            for c in calls:
                o, t = contents(c)
                ops |= o
                targets |= t
            table[name] = _classify(ops, targets)
    return table


_NAME_RULES = [
    ("attention", r"fmha|flash|attention|softmax"),
    ("conv", r"conv|implicit_gemm|winograd|dgrad|wgrad"),
    ("GEMM", r"gemm|matmul|cublas|cutlass|xmma|nvjet|dot"),
    ("norm", r"norm|reduce|reduction"),
    ("copy", r"copy|transpose|memcpy|memset|concatenate|dynamic.update.slice|slice|pad|gather|scatter"),
    ("elementwise", r"fusion|loop|elementwise|convert|add|multiply|wrapped"),
]


def categorize(kernel: Kernel, tables: dict[str, dict[str, str]]) -> str:
    """The kernel's category: from its module's HLO when known, else from its name."""
    table = tables.get(kernel.module)
    if table is None and len(tables) == 1 and not kernel.module:
        table = next(iter(tables.values()))
    if table and kernel.op in table:
        return table[kernel.op]
    name = kernel.name.lower()
    return next((cat for cat, rx in _NAME_RULES if re.search(rx, name)), "other")


def _hlo_texts(paths):
    """The HLO texts among ``paths``: texts, files, or dump directories (their
    ``*after_optimizations.txt``)."""
    for p in paths:
        if isinstance(p, str) and p.lstrip().startswith("HloModule"):
            yield p
        elif Path(p).is_dir():
            yield from (f.read_text() for f in sorted(Path(p).glob("*after_optimizations.txt")))
        else:
            yield Path(p).read_text()


def load_hlo_texts(paths) -> dict[str, dict[str, str]]:
    """``{module: {op: category}}`` from HLO texts, files, or dump directories (their
    ``*after_optimizations.txt``; a module compiled twice keeps its latest dump's ops and adds
    the others')."""
    tables: dict[str, dict[str, str]] = {}
    for text in _hlo_texts(paths):
        module, table = hlo_op_categories(text)
        tables[module] = {**tables.get(module, {}), **table}
    return tables


# entry instructions that launch nothing of their own (a loop's or call's body ops run under their own names)
_NO_KERNEL_OPS = {"parameter", "bitcast", "get-tuple-element", "tuple", "constant", "after-all", "partition-id",
                  "replica-id", "while", "conditional", "call", "opt-barrier", ""}


def hlo_entry_ops(paths) -> dict[str, list[set[str]]]:
    """``{module: [{op name}, ...]}``: the entry computation's instructions that launch work of
    their own (fusions, library calls, unfused ops), one set per compiled program of that name
    (a jitted function compiled for several shapes dumps one each), from the same texts as
    ``load_hlo_texts``."""
    out: dict[str, list[set[str]]] = {}
    for text in _hlo_texts(paths):
        module, entry, comps = parse_hlo(text)
        out.setdefault(module, []).append({i["name"] for i in comps.get(entry, []) if i["op"] not in _NO_KERNEL_OPS})
    return out


def op_coverage(kernels: list[Kernel], entry_ops: dict[str, list[set[str]]], top: int = 8) -> dict:
    """Per module, how many of its entry ops the trace shows a kernel of, and some it never
    shows: a check on the trace itself (a tracer that drops records shows idle time where
    kernels ran). Of a module's programs (one per compiled shape) the one the trace ran is
    taken: the one sharing the most op names with its kernels. Not answerable inside CUDA
    graphs, whose kernels carry the graph's op name (``command_buffer_N``): such modules say so."""
    out = {}
    for module, variants in sorted(entry_ops.items()):
        seen = {k.op for k in kernels if k.module == module}
        if not seen or not variants:
            continue
        ops = max(variants, key=lambda v: (len(v & seen), -len(v)))
        if any(op.startswith("command_buffer") for op in seen):
            out[module] = {"hlo_ops": len(ops), "note": "kernels inside CUDA graphs carry the graph's name"}
            continue
        missing = sorted(ops - seen)
        out[module] = {"hlo_ops": len(ops), "seen": len(ops & seen), "missing": len(missing),
                       "missing_examples": missing[:top]}
    return out


# ---------------------------------------------------------------------------------------------
# The summary
# ---------------------------------------------------------------------------------------------


def timeline(kernels: list[Kernel]) -> dict:
    """Span, busy (union of the intervals), idle (the gaps) of a set of kernels, in us."""
    if not kernels:
        return {"span_us": 0.0, "busy_us": 0.0, "idle_us": 0.0, "gaps": []}
    merged: list[list[float]] = []
    for k in sorted(kernels, key=lambda k: k.start_us):
        if merged and k.start_us <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], k.end_us)
        else:
            merged.append([k.start_us, k.end_us])
    gaps = [b[0] - a[1] for a, b in zip(merged, merged[1:])]
    span = merged[-1][1] - merged[0][0]
    busy = sum(b - a for a, b in merged)
    return {"span_us": span, "busy_us": busy, "idle_us": span - busy, "gaps": gaps}


def launches(kernels: list[Kernel], calls: int) -> dict | None:
    """The host's launches as the device timeline shows them, and where its idle time falls.

    Consecutive kernels of one HLO op (of one module) are one launch: a CUDA graph
    (``command_buffer_N``) launches many kernels at once, a cuDNN convolution or a fusion outside
    any graph one or a few. Each gap between consecutive kernels is either inside a launch (the
    device's own, between a graph's kernels) or between two launches (the host's launch latency,
    or the host not having launched the next yet): host-bound work shows its idle time between
    launches. None when the trace names no op.
    """
    if not any(k.op for k in kernels):
        return None
    ordered = sorted(kernels, key=lambda k: k.start_us)
    runs, graph_runs, in_graphs, within, between = 1, 0, 0, 0.0, 0.0
    largest: list[tuple[float, Kernel, Kernel]] = []
    inside: list[tuple[float, Kernel, Kernel]] = []
    end = ordered[0].end_us
    for prev, k in zip(ordered, ordered[1:]):
        gap = max(0.0, k.start_us - end)
        end = max(end, k.end_us)
        if (k.module, k.op) != (prev.module, prev.op):
            runs += 1
            between += gap
            largest.append((gap, prev, k))
        else:
            within += gap
            inside.append((gap, prev, k))
    for k_prev, k in zip([None] + ordered, ordered):
        if k.op.startswith("command_buffer"):
            in_graphs += 1
            graph_runs += k_prev is None or (k_prev.module, k_prev.op) != (k.module, k.op)
    largest.sort(key=lambda g: -g[0])
    where = lambda k: f"{k.module}:{k.op}" if k.module else k.op  # noqa: E731
    return {"per_call": round(runs / calls, 1), "graphs_per_call": round(graph_runs / calls, 1),
            "kernels_in_graphs_per_call": round(in_graphs / calls, 1),
            "idle_between_launches_us": round(between, 2), "idle_within_launches_us": round(within, 2),
            "largest_gaps": [{"us": round(g, 2), "after": where(a), "before": where(b)} for g, a, b in largest[:5]],
            "gaps_within_launches": gap_histogram([g for g, _, _ in inside], calls),
            "largest_gaps_within": [{"us": round(g, 2), "launch": where(a), "after": a.name[:80], "before": b.name[:80]}
                                    for g, a, b in sorted(inside, key=lambda g: -g[0])[:5]]}


GAP_BUCKETS_US = (2.0, 10.0, 50.0, 200.0)


def gap_histogram(gaps: list[float], calls: int) -> dict:
    """Gaps per call by size (``<2us``, ``2-10us``, ``10-50us``, ``50-200us``, ``>=200us``): the
    count and the total idle time in each. Many small gaps inside a CUDA graph are the graph's
    own per-kernel latency (or the tracer's); a few large ones are waits."""
    edges = (0.0, *GAP_BUCKETS_US, float("inf"))
    names = [f"<{GAP_BUCKETS_US[0]:g}us"] + [f"{a:g}-{b:g}us" for a, b in zip(GAP_BUCKETS_US, GAP_BUCKETS_US[1:])] \
        + [f">={GAP_BUCKETS_US[-1]:g}us"]
    out = {}
    for name, lo, hi in zip(names, edges, edges[1:]):
        sel = [g for g in gaps if lo <= g < hi]
        out[name] = {"count_per_call": round(len(sel) / calls, 1), "us_per_call": round(sum(sel) / calls, 2)}
    return out


def _thread_kind(line: str) -> str:
    """A host line's name without its thread id (``tf_XLAEigen/-1306...`` -> ``tf_XLAEigen``)."""
    return re.sub(r"/-?\d+$", "", line) or line


def host_time(events: list[tuple], calls: int, top: int = 15) -> dict | None:
    """Where the host's time goes in the trace: its named spans (Python functions when the
    Python tracer is on, ``PjitFunction(f)`` dispatches, XLA's and the runtime's own, CUDA
    driver calls where CUPTI records them) grouped by thread kind and name, inclusive times per
    call, longest first; and the dispatch of each jitted function (``PjitFunction(...)``, the
    call on the Python thread: on a GPU it includes launching the program's thunks). Spans of
    XLA:CPU's HLO ops (the CPU's kernels) are left out. None when the trace has no host span."""
    groups: dict[tuple[str, str], list[float]] = {}
    outer_end: dict[tuple[str, str], float] = {}  # a span inside one of its own name (the Python
    # tracer's PjitFunction(f) around the runtime's own) counts once, as the outer one
    for plane, line, name, start, dur, stats in sorted(events, key=lambda e: (e[3], -e[4])):
        if not plane.startswith("/host") or "hlo_op" in stats:
            continue
        if start < outer_end.get((line, name), float("-inf")):
            continue
        outer_end[(line, name)] = start + dur
        groups.setdefault((_thread_kind(line), name), []).append(dur)
    if not groups:
        return None
    ranked = sorted(groups.items(), key=lambda kv: -sum(kv[1]))[:top]
    dispatch = {name[len("PjitFunction("):-1]: durs for (_, name), durs in groups.items()
                if name.startswith("PjitFunction(") and name.endswith(")")}
    return {"top": [{"thread": thread, "name": name, "us_per_call": round(sum(d) / calls, 2),
                     "count_per_call": round(len(d) / calls, 2)} for (thread, name), d in ranked],
            "dispatch_us_per_call": {f: round(sum(d) / calls, 2) for f, d in sorted(dispatch.items())},
            "dispatch_mean_us": {f: round(sum(d) / len(d), 2) for f, d in sorted(dispatch.items())}}


def summarize(path, *, calls: int | None = None, flops: float | None = None, hlo=(), modules: str | None = None,
              top: int = 15, source: str = "auto") -> dict:
    """The summary of the kernels in a trace (see the module doc).

    Args:
        path: a ``jax.profiler.trace`` directory (its newest run) or a file in a run.
        calls: how many calls of the workload the trace holds (default: the distinct
            ``run_id`` s where the trace records them, else 1).
        flops: FLOPs of one call (``program_flops``), for the achieved TFLOP/s.
        hlo: compiled HLO texts, files or XLA dump directories, for the categories.
        modules: keep only kernels of HLO modules matching this regular expression.
        top: how many kernels to list.
    """
    source, events = read_events(path, source)
    device, kernels = device_kernels(events)
    note = None
    if modules is not None:
        kept = [k for k in kernels if re.search(modules, k.module)]
        if not kept and kernels and not any(k.module for k in kernels):
            note = f"no kernel names its HLO module: all {len(kernels)} kept (filter {modules!r} not applied)"
        else:
            kernels = kept
    if calls is None:
        runs = {(e[5].get("hlo_module"), e[5].get("run_id")) for e in events if "run_id" in e[5] and "hlo_op" in e[5]}
        calls = max(len(runs), 1)
    tables = load_hlo_texts(hlo)
    line = timeline(kernels)
    total = sum(k.dur_us for k in kernels) or 1.0
    cats = {c: {"us": 0.0, "kernels": 0} for c in CATEGORIES}
    groups: dict[str, dict] = {}
    for k in kernels:
        cat = categorize(k, tables)
        cats[cat]["us"] += k.dur_us
        cats[cat]["kernels"] += 1
        g = groups.setdefault(k.name, {"name": k.name, "category": cat, "us": 0.0, "count": 0, "op": k.op})
        g["us"] += k.dur_us
        g["count"] += 1
    for c in cats.values():
        c["share"] = round(c["us"] / total, 4)
        c["us"] = round(c["us"], 2)
    ranked = sorted(groups.values(), key=lambda g: -g["us"])[:top]
    for g in ranked:
        g.update(share=round(g["us"] / total, 4), mean_us=round(g["us"] / g["count"], 2),
                 per_call=round(g["count"] / calls, 2), us=round(g["us"], 2))
    gaps = sorted(line["gaps"], reverse=True)
    out = {
        "trace": str(trace_run(path)), "source": source, "device": device, "calls": calls,
        "kernels": len(kernels), "kernels_per_call": round(len(kernels) / calls, 1),
        "kernel_time_us": round(sum(k.dur_us for k in kernels), 2),
        "span_us": round(line["span_us"], 2), "busy_us": round(line["busy_us"], 2),
        "idle_us": round(line["idle_us"], 2), "per_call_us": round(line["span_us"] / calls, 2),
        "busy_fraction": round(line["busy_us"] / line["span_us"], 4) if line["span_us"] else None,
        "gaps": {"count": len(gaps), "total_us": round(sum(gaps), 2), "largest_us": [round(g, 2) for g in gaps[:5]],
                 "over_10us": sum(g > 10 for g in gaps), "over_100us": sum(g > 100 for g in gaps)},
        "launches": launches(kernels, calls) if kernels else None,
        "host": host_time(events, calls),
        "categories": cats, "top": ranked, "hlo_modules": sorted(tables),
    }
    if hlo:
        out["op_coverage"] = op_coverage(kernels, hlo_entry_ops(hlo))
    if note:
        out["note"] = note
    if flops:
        out["flops_per_call"] = flops
        out["tflops_per_s"] = round(flops * calls / (line["span_us"] * 1e6), 3) if line["span_us"] else None
        out["tflops_per_s_busy"] = round(flops * calls / (line["busy_us"] * 1e6), 3) if line["busy_us"] else None
    return out


def jaxpr_flops(jaxpr) -> float:
    """FLOPs of the matrix products and convolutions in a (closed) jaxpr, 2 per multiply-add:
    what torch's ``FlopCounterMode`` counts (matmuls, convolutions, attention's two products),
    by walking the program's equations instead of asking XLA. Loops count their body once per
    trip where the trip count is static (``scan``), once where it is not (``while``); a
    ``cond`` counts its costliest branch. Elementwise work is not counted, and every product of
    the program is, used or not (no dead-code elimination: a forward pass has none)."""
    import math

    from jax.extend import core as jcore

    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lc, rc), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            k = math.prod(lhs[d] for d in lc)
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * k
        elif name == "conv_general_dilated":
            lhs, rhs = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
            dn = eqn.params["dimension_numbers"]
            spec = dn.rhs_spec  # (out, in, spatial...)
            per_output = math.prod(rhs[d] for d in spec[1:])  # in/groups x kh x kw
            if any(d > 1 for d in eqn.params.get("lhs_dilation") or ()):
                # a transposed convolution: most of its output's window is the dilation's zeros;
                # count each input element against the kernel, as torch counts conv_transpose
                inputs = lhs[dn.lhs_spec[0]] * math.prod(lhs[d] for d in dn.lhs_spec[2:])
                total += 2.0 * inputs * per_output * rhs[spec[0]]
            else:
                total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * per_output
        subs = [v for v in eqn.params.values() if isinstance(v, (jcore.Jaxpr, jcore.ClosedJaxpr))]
        subs += [b for v in eqn.params.values() if isinstance(v, (tuple, list))
                 for b in v if isinstance(b, (jcore.Jaxpr, jcore.ClosedJaxpr))]
        if name == "cond":
            total += max((jaxpr_flops(b) for b in eqn.params["branches"]), default=0.0)
        elif name == "scan":
            total += eqn.params["length"] * jaxpr_flops(eqn.params["jaxpr"])
        elif name == "while":
            total += jaxpr_flops(eqn.params["body_jaxpr"]) + jaxpr_flops(eqn.params["cond_jaxpr"])
        else:
            total += sum(jaxpr_flops(sub) for sub in subs)
    return total


def program_flops(fn, *args, **kwargs) -> tuple[float | None, str | None]:
    """FLOPs of one ``fn(*args, **kwargs)`` and where they come from: ``"xla"``, XLA's cost
    analysis of the lowered program (elementwise work included), else ``"products"``, the
    program's matrix products and convolutions counted from its jaxpr (``jaxpr_flops``: what
    torch's flop counter counts), which JAX 0.11.2 on CUDA needed. The two differ by the
    elementwise work (a few percent for these models): compare figures of one source.

    Attention is traced with XLA's lowering (``$STREAMFLOW_JAX_ATTENTION=xla``) so that its
    matmuls count: cuDNN's fused attention is a custom call that cost analysis counts as zero.
    JAX's caches are cleared before and after (the switch is read at trace time), so call this
    before compiling the program itself.
    """
    import jax

    from streamflow_jax.ops import ATTENTION_ENV

    saved = os.environ.get(ATTENTION_ENV)
    jax.clear_caches()
    os.environ[ATTENTION_ENV] = "xla"
    try:
        traced = jax.jit(fn).trace(*args, **kwargs)
        try:
            cost = traced.lower().cost_analysis()
        except Exception:  # noqa: BLE001  (a backend without it: the CPU lowering, then the jaxpr)
            cost = None
        if not cost:
            # JAX 0.11 on CUDA has no cost analysis before compiling, and the compiled program's
            # counts cuBLAS GEMMs and cuDNN convolutions (custom calls) as nothing (2026-11-30,
            # H200: 2.95 TFLOP for an SD3-medium call): the same program lowered for the CPU
            # counts every dot and convolution
            try:
                cost = traced.lower(lowering_platforms=("cpu",)).cost_analysis()
            except Exception:  # noqa: BLE001
                cost = None
    finally:
        if saved is None:
            os.environ.pop(ATTENTION_ENV, None)
        else:
            os.environ[ATTENTION_ENV] = saved
        jax.clear_caches()
    if isinstance(cost, (list, tuple)):  # older JAX: one dict per computation
        cost = cost[0] if cost else None
    if cost and "flops" in cost:
        return float(cost["flops"]), "xla"
    # JAX 0.11.2 on CUDA (the H200, 2026-11-30) answered neither way: count the program's
    # products from its jaxpr (matmuls and convolutions, as torch's flop counter does)
    products = jaxpr_flops(traced.jaxpr)
    return (products, "products") if products else (None, None)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("trace", help="a jax.profiler.trace directory")
    p.add_argument("--calls", type=int, default=None)
    p.add_argument("--flops", type=float, default=None, help="FLOPs of one call")
    p.add_argument("--hlo", nargs="*", default=[], help="compiled HLO text files or XLA dump directories")
    p.add_argument("--modules", default=None, help="regular expression over HLO module names")
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    result = summarize(args.trace, calls=args.calls, flops=args.flops, hlo=args.hlo, modules=args.modules,
                       top=args.top)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
