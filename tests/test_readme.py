"""The README's examples that run as written: each ``python`` block that needs no model of the
user's own (paths like ``converted/sd3``) runs here verbatim, in a scratch directory, so the
README cannot drift from the API it documents."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _fenced() -> list[tuple[str, str]]:
    """``(language, text)`` of each fenced block, fences paired in order."""
    blocks, lang, lines = [], None, []
    for line in README.read_text().splitlines():
        if line.startswith("```"):
            if lang is None:
                lang, lines = line[3:].strip(), []
            else:
                blocks.append((lang, "\n".join(lines) + "\n"))
                lang = None
        elif lang is not None:
            lines.append(line)
    assert lang is None, "an unclosed fence in the README"
    return blocks


def _blocks() -> list[str]:
    return [text for lang, text in _fenced() if lang == "python"]


def test_the_readme_has_python_examples():
    assert len(_blocks()) >= 10


def test_digits_example_runs_as_written(tmp_path):
    """The embedded model's example: it prints the accuracy of its 40 digits and saves a grid."""
    (block,) = [b for b in _blocks() if "DigitsPipeline.load()" in b]
    run = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    accuracy = float(run.stdout.strip().splitlines()[-1])
    assert accuracy >= 0.9, run.stdout  # 16 steps at guidance 3: 100% in CI
    from PIL import Image

    with Image.open(tmp_path / "grid.png") as grid:  # image_grid: 10 rows of 4 tiles 64 px wide, 2 px gaps
        assert grid.size == (4 * 66 + 2, 10 * 66 + 2)


def test_every_sf_call_in_the_readme_exists():
    """Blocks that need the user's checkpoints are not run; every ``sf.NAME(`` they call is there."""
    import streamflow_jax as sf

    names = sorted({n for b in _blocks() for n in re.findall(r"\bsf\.([A-Za-z_][\w.]*)\(", b)})
    assert len(names) >= 8, names
    for name in names:
        obj = sf
        for part in name.split("."):
            obj = getattr(obj, part, None)
            assert obj is not None, f"the README calls sf.{name}, which the library does not have"
        assert callable(obj), name


def test_every_flag_in_the_cli_synopsis_exists():
    """The README's CLI synopsis (the block of ``streamflow-jax`` lines) names only flags that the
    parser of that subcommand takes."""
    from streamflow_jax.cli import build_parser

    synopsis = next(text for lang, text in _fenced() if text.startswith("streamflow-jax --version"))
    commands = {}
    for line in synopsis.splitlines():
        if line.startswith("streamflow-jax "):
            current = line.split()[1]
        commands.setdefault(current, set()).update(re.findall(r"(?<![\w-])(--[a-z][\w-]*|-q)\b", line))
    subparsers = next(a for a in build_parser()._actions if a.choices and "generate" in a.choices).choices
    assert {"convert", "generate", "export", "bench", "serve"} <= set(commands)
    for command, flags in commands.items():
        if command.startswith("--"):
            continue
        known = {o for a in subparsers[command]._actions for o in a.option_strings}
        assert flags <= known, f"{command}: {sorted(flags - known)} in the README, not in the parser"
