"""``streamflow-jax``: convert | generate.

Errors a user can fix (bad paths, bad checkpoints, bad arguments) print one line to stderr
and exit with status 1; nothing half-written is left behind.
"""

from __future__ import annotations

import argparse
import sys

from streamflow_jax.converters.common import ConversionError


def _cmd_convert(args) -> int:
    from streamflow_jax.checkpoint import convert

    out = convert(args.src, args.dst, dtype=args.dtype, progress=not args.quiet)
    print(f"converted {args.src} -> {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamflow-jax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="convert a diffusers model or pipeline directory")
    p.add_argument("src", help="diffusers model directory (config.json + safetensors) or pipeline directory")
    p.add_argument("dst", help="output directory (must not exist; written atomically)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="cast floating-point parameters (default: keep the checkpoint's dtype)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConversionError, ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"streamflow-jax {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
