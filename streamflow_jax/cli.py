"""``streamflow-jax``: convert a diffusers checkpoint, or generate with the embedded default model.

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


def _cmd_generate(args) -> int:
    import time

    import numpy as np

    from streamflow_jax.eval import digit_accuracy
    from streamflow_jax.pipelines import DIGITS_DIR, DigitsPipeline, image_grid

    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    if args.per_digit < 1:
        raise ValueError(f"--per-digit must be >= 1, got {args.per_digit}")
    t0 = time.perf_counter()
    pipe = DigitsPipeline.from_dir(args.model or DIGITS_DIR, dtype=args.dtype)
    print(f"model: {args.model or 'embedded digits model'} ({pipe.model!r}), converted in {time.perf_counter() - t0:.2f} s")
    labels = np.repeat(np.arange(10), args.per_digit)  # one row per digit
    guidance = None if args.guidance <= 0 else args.guidance
    run = lambda seed: pipe(labels, steps=args.steps, guidance_scale=guidance, seed=seed)  # noqa: E731
    t0 = time.perf_counter()
    run(args.seed + 1)  # first call compiles
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    images = run(args.seed)
    run_s = time.perf_counter() - t0
    image_grid(images, rows=10).save(args.out)
    acc = digit_accuracy(images, labels)
    print(f"first call (compile + run): {compile_s:.2f} s; then {len(labels)} images in {run_s:.3f} s "
          f"= {len(labels) / run_s:.1f} images/s ({args.steps} steps, guidance {args.guidance}, backend {args.backend})")
    print(f"digit accuracy (classifier trained on the real digits): {acc:.1%}")
    print(f"wrote {args.out}")
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

    p = sub.add_parser("generate", help="sample a 10x8 grid of digits from the embedded default model")
    p.add_argument("--model", default=None, help="a digits pipeline directory (default: the embedded one)")
    p.add_argument("--steps", type=int, default=16, help="Euler steps (default 16)")
    p.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale; 0 turns it off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--per-digit", type=int, default=8, help="images per row (default 8)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None)
    p.add_argument("--backend", choices=("xla",), default="xla",
                   help="velocity backend (ONNX Runtime and TensorRT are not implemented yet)")
    p.add_argument("--out", default="digits.png", help="output PNG (default digits.png)")
    p.set_defaults(func=_cmd_generate)
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
