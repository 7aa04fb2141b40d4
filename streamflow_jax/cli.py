"""streamflow-jax: convert diffusers checkpoints, generate images, export graphs, benchmark, serve.

Errors a user can fix (bad paths, bad checkpoints, bad arguments) print one line to stderr
and exit with status 1; Ctrl-C prints one line and exits with 130, at any moment (compiled
sampling runs in segments so that it can stop between two). Nothing half-written is left
behind. Every flag is checked before any model is loaded.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from streamflow_jax._version import __version__
from streamflow_jax.errors import ConfigError, ConversionError
from streamflow_jax.schedules import MAX_STEPS, PREDICTIONS, SEED_LIMIT, check_steps

DESCRIPTION = ("Rectified-flow image generators (SD3/SD3.5, Flux.1, PeRFlow/InstaFlow SD1.5 and SDXL) converted from "
               "diffusers checkpoints and compiled with JAX/XLA.")


def _cmd_convert(args) -> int:
    from streamflow_jax.checkpoint import convert

    if args.delta_variant is not None and args.delta is None:
        raise ValueError("--delta-variant goes with --delta DIR")
    prompts = _calibration_file(args)
    out = convert(args.src, args.dst, dtype=args.dtype, progress=not args.quiet,
                  config=_config_overrides(args.config_from), variant=args.variant, delta=args.delta,
                  delta_variant=args.delta_variant, loras=args.lora, allow_nonfinite=args.allow_nonfinite,
                  quantize=args.quantize, calibrate=prompts, calibration_steps=args.calibration_steps)
    print(f"converted {args.src} -> {out}" + (f" ({args.quantize})" if args.quantize and (out / "config.json").is_file()
                                                 else ""))
    record = out / "conversion.json"
    if record.is_file():  # a pipeline: say what happened to each component
        rec = json.loads(record.read_text())
        for name, cls in rec["converted"].items():
            q = rec.get("quantized", {}).get(name)
            c = rec.get("calibrated", {}).get(name)
            c = f", static activation scales from {c['prompts']} prompt(s)" if c else ""
            print(f"  converted {name} ({cls}{', ' + q if q else ''}{c})")
        for name in rec["copied"]:
            print(f"  copied    {name} (configuration only)")
        for name, why in rec["skipped"].items():
            print(f"  skipped   {name}: {why}")
    return 0


def _calibration_file(args) -> list[str] | None:
    """``--calibrate FILE``: its prompts, a line each (blank lines skipped), read before converting."""
    if args.calibrate is None:
        if args.calibration_steps is not None:
            raise ValueError("--calibration-steps goes with --calibrate FILE")
        return None
    if args.quantize != "fp8":
        raise ValueError("--calibrate measures FP8 activation scales: it needs --quantize fp8")
    if args.calibration_steps is not None and not 1 <= args.calibration_steps <= MAX_STEPS:
        raise ValueError(f"--calibration-steps must be in [1, {MAX_STEPS}], got {args.calibration_steps}")
    path = Path(args.calibrate)
    try:
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--calibrate {path}: cannot read it ({e})") from None
    if not prompts:
        raise ValueError(f"--calibrate {path}: no prompt in it (one per line)")
    return prompts


def _config_overrides(path: str | None):
    """``--config-from``: a model directory (its config.json) or a JSON file of config fields;
    a pipeline directory (model_index.json) is passed on as is (a single-file pipeline's configs)."""
    if path is None:
        return None
    from streamflow_jax.converters.common import read_json

    p = Path(path)
    if (p / "model_index.json").is_file():
        return p
    raw = read_json(p / "config.json" if p.is_dir() else p)
    return {k: v for k, v in raw.items() if not k.startswith("_")}


def _mesh(args):
    """``--devices N --strategy S``: tensor parallelism over a (1, N) mesh, the others over (N, 1)."""
    if not args.devices or args.devices == 1 and args.strategy == "replicate":
        return None
    from streamflow_jax.sharding import make_mesh

    n = args.devices
    return make_mesh(n, data=1, model=n) if args.strategy == "tensor" else make_mesh(n, data=n, model=1)


def _check_mesh_flags(args) -> None:
    """``--strategy`` says how ``--devices`` split the model: refused without them (it would
    silently do nothing); then its default, fsdp."""
    if args.strategy is not None and not args.devices:
        raise ValueError(f"--strategy {args.strategy} goes with --devices N (without it the model runs on one device)")
    if (args.devices or 1) > 1 and getattr(args, "backend", "xla") != "xla":
        raise ValueError(f"--devices {args.devices} runs the model over a mesh with XLA; --backend {args.backend} runs "
                         "an exported graph on one device")
    args.strategy = args.strategy or "fsdp"


def _positive(args, *names: str) -> None:
    """Each flag (by dest name) given must be an integer >= 1; named as the user typed it."""
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def _check_common(args) -> None:
    """The flags every sampling command shares, checked before anything is loaded."""
    _positive(args, "devices")
    _check_mesh_flags(args)
    _check_quantize_backend(args)
    _check_export(args)
    if getattr(args, "backend", None) == "onnxruntime" and getattr(args, "dtype", None) == "bfloat16":
        from streamflow_jax.backends.onnxruntime import default_providers

        if "CUDAExecutionProvider" not in default_providers():
            raise ValueError("--backend onnxruntime --dtype bfloat16: ONNX Runtime's CPU provider has no bfloat16 "
                             "kernels (its Conv, for one); use --dtype float32 or float16, or --backend xla")
    if getattr(args, "steps", None) is not None:
        try:
            check_steps(args.steps)
        except ValueError:
            raise ValueError(f"--steps must be in [1, {MAX_STEPS}], got {args.steps}") from None
    seed = getattr(args, "seed", None)
    if seed is not None and not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"--seed must be an integer in [0, 2**32), got {seed}")
    for flag, value in (("--guidance", getattr(args, "guidance", None)), ("--strength", getattr(args, "strength", None))):
        if value is not None and not np.isfinite(value):
            raise ValueError(f"{flag} must be a finite number, got {value}")
        if value is not None and abs(value) > float(np.finfo(np.float32).max):  # it runs in float32, where it is inf
            raise ValueError(f"{flag} {value:g} is beyond float32's range (3.4e38)")
    strength = getattr(args, "strength", None)
    if strength is not None and not 0 < strength <= 1:
        raise ValueError(f"--strength must be in (0, 1], got {strength}")


def _check_export(args) -> None:
    """``--export DIR``: a velocity model's export directory, run by ``--backend`` (not xla);
    its metadata read now, before any weight loads (its files are verified when it opens)."""
    path = getattr(args, "export", None)
    if path is None:
        return
    if args.backend == "xla":
        raise ValueError(f"--export {path} is run by --backend onnxruntime or tensorrt (xla runs the model itself): "
                         "add one")
    from streamflow_jax.errors import ExportError
    from streamflow_jax.export.onnx import read_export_meta

    try:
        _, spec = read_export_meta(path)
    except ExportError as e:
        raise ValueError(f"--export {e}") from None
    if spec.method != "velocity":
        raise ValueError(f"--export {path}: an export of a model's {spec.method}, not of a velocity model (give the "
                         "export of the pipeline's transformer or UNet: streamflow-jax export PIPELINE OUT)")


def _use_export(args, target) -> None:
    """``--export``: ``target`` (a pipeline or a velocity model) runs its velocity calls from it."""
    if getattr(args, "export", None) is None:
        return
    from streamflow_jax import backends

    try:
        if hasattr(target, "use_export"):
            target.use_export(args.export, args.backend)
        else:
            backends.use_export(target, args.export, args.backend)
    except ValueError as e:
        raise ValueError(f"--export {e}") from None


def _check_quantize_backend(args) -> None:
    """``--quantize fp8 --backend tensorrt`` needs a checkpoint with calibrated FP8 scales
    (``convert --quantize fp8 --calibrate``): refused before loading anything else."""
    if getattr(args, "quantize", None) and getattr(args, "backend", None) == "tensorrt":
        from streamflow_jax.checkpoint import saved_activation_scales
        from streamflow_jax.quantization import TENSORRT_REFUSAL

        model = getattr(args, "model", None)
        if model is None or saved_activation_scales(model) != "static":
            raise ValueError(f"--quantize {args.quantize} --backend tensorrt: {TENSORRT_REFUSAL}")


def _check_taesd(args) -> None:
    """``--taesd``: a directory to load, refused before the pipeline's other components load."""
    if args.taesd is not None:
        from streamflow_jax.pipelines.images import check_taesd

        try:
            check_taesd(args.taesd)
        except ConfigError as e:
            raise ValueError(f"--taesd {e}") from None


def _check_out(path: str) -> Path:
    """``--out``: an image file whose directory exists and whose extension Pillow writes."""
    out = Path(path)
    if out.is_dir():
        raise ValueError(f"--out {path}: a directory; give an image file, e.g. {out / 'out.png'}")
    if out.suffix.lower() not in Image.registered_extensions():
        raise ValueError(f"--out {path}: unknown image extension {out.suffix!r} (e.g. .png, .jpg, .webp)")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise ValueError(f"--out {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise ValueError(f"--out {path}: cannot write there")
    return out


def _check_out_format(path: str, mode: str) -> None:
    """``--out``'s format can hold a ``mode`` image (``L``: the digits, ``RGB``: prompt
    pipelines): a 2x2 image of that mode written to memory. Pillow reads formats it cannot
    write (.psd), has stubs for others (.h5) and writes some in one mode only (.xbm); each
    failed after sampling."""
    fmt = Image.registered_extensions()[Path(path).suffix.lower()]
    try:
        Image.new(mode, (2, 2)).save(io.BytesIO(), format=fmt)
    except Exception as e:  # noqa: BLE001 - Pillow's KeyError, OSError, ValueError, NotImplementedError...
        why = "Pillow cannot write it" if isinstance(e, KeyError) else f"{type(e).__name__}: {e}"
        raise ValueError(f"--out {path}: cannot write {'grey' if mode == 'L' else 'RGB'} images as {fmt} ({why}); "
                         "use .png, .jpg or .webp") from None


def _check_model_dir(path: str | None) -> None:
    """``generate --model``: an existing directory, a digits model or a pipeline (a converted
    single model, such as a transformer alone, cannot make images)."""
    if path is None:
        return
    p = Path(path)
    if not p.exists():
        raise ValueError(f"--model {path}: no such file or directory")
    if not p.is_dir():
        raise ValueError(f"--model {path}: not a directory (give a digits or prompt pipeline directory)")
    if not ((p / "conditioning.safetensors").is_file() or (p / "model_index.json").is_file()):
        single = (p / "config.json").is_file()
        raise ValueError(f"--model {path}: " + ("a single model, not a pipeline (no model_index.json): generate needs "
                                                "the whole pipeline directory; bench times a single model"
                                                if single else "neither a pipeline (no model_index.json) nor a digits "
                                                "model (no conditioning.safetensors)"))


def _check_ticks_per_call(args) -> None:
    """``--ticks-per-call`` (``_positive`` has refused 0 and below): at most the engine's limit,
    and only with the XLA backend, before anything loads."""
    from streamflow_jax.stream import MAX_TICKS_PER_CALL

    if args.ticks_per_call is not None and args.ticks_per_call > MAX_TICKS_PER_CALL:
        raise ValueError(f"--ticks-per-call must be at most {MAX_TICKS_PER_CALL}, got {args.ticks_per_call}")
    if (args.ticks_per_call or 1) > 1 and args.backend != "xla":
        raise ValueError(f"--ticks-per-call {args.ticks_per_call} goes with --backend xla (a compiled scan of "
                         f"ticks); --backend {args.backend} runs one tick a call")


def _is_digits_model(path: str | None) -> bool:
    return path is None or (Path(path) / "conditioning.safetensors").is_file()


def _cmd_generate(args) -> int:
    _check_common(args)
    _positive(args, "slots", "streams", "per_digit", "ticks_per_call")
    for name, default in (("slots", 16), ("streams", 1), ("ticks_per_call", None)):  # --stream's; refused
        if getattr(args, name) is not None and not args.stream:  # without it, not ignored
            raise ValueError(f"--{name.replace('_', '-')} goes with --stream")
        setattr(args, name, default if getattr(args, name) is None else getattr(args, name))
    _check_ticks_per_call(args)
    _check_out(args.out)
    if args.image is not None and not args.image.strip():
        raise ValueError("--image: an empty path (give an image file, or leave --image out)")
    if args.strength is not None and not args.image:
        raise ValueError("--strength is for image-to-image: give --image too")
    _check_model_dir(args.model)
    if args.image:  # read now, before any model is loaded
        from streamflow_jax.pipelines.images import read_image

        args.image = read_image(args.image, f"--image {args.image}")
    else:
        args.image = None
    digits = _is_digits_model(args.model)
    _check_out_format(args.out, "L" if digits else "RGB")
    if digits:
        return _generate_digits(args)
    return _generate_prompts(args)


def _generate_digits(args) -> int:
    from streamflow_jax.pipelines import DIGITS_DIR, DigitsPipeline, image_grid

    for flag, value in (("--prompt", args.prompt), ("--height", args.height), ("--width", args.width),
                        ("--taesd", args.taesd), ("--prediction-type", args.prediction_type),
                        ("--windows", args.windows), ("--variant", args.variant), ("--lora", args.lora),
                        ("--max-sequence-length", args.max_sequence_length)):
        if value is not None and value != []:
            raise ValueError(f"{flag} is for prompt pipelines; the digits model makes 16x16 digits from class labels "
                             "(give --model PIPELINE_DIR for prompts)")
    steps = 16 if args.steps is None else args.steps
    guidance = DigitsPipeline.resolve_guidance(args.guidance)
    negative = _digits_negative(args, guidance)  # before loading
    t0 = time.perf_counter()
    pipe = DigitsPipeline.load(args.model or DIGITS_DIR, dtype=args.dtype, mesh=_mesh(args), strategy=args.strategy)
    if args.quantize:
        pipe.model = _quantize(pipe.model, args.quantize)
    _use_export(args, pipe)
    print(f"model: {args.model or 'embedded digits model'} ({pipe.model!r}), loaded in {time.perf_counter() - t0:.2f} s")
    labels = np.repeat(np.arange(10), args.per_digit)  # one row per digit
    image = None
    if args.image is not None:  # one input digit, redrawn as every class
        image = np.asarray(args.image.convert("L").resize((16, 16), Image.Resampling.BILINEAR), np.float32)[None] / 255
    if args.stream:
        run = lambda seed: pipe.stream(labels, steps=steps, guidance_scale=args.guidance, seed=seed,  # noqa: E731
                                       slots_per_stream=args.slots, streams=args.streams, backend=args.backend,
                                       image=image, strength=args.strength, negative_label=negative,
                                       ticks_per_call=args.ticks_per_call)
    else:
        run = lambda seed: pipe(labels, steps=steps, guidance_scale=args.guidance, seed=seed,  # noqa: E731
                                backend=args.backend, image=image, strength=args.strength, negative_label=negative,
                                progress=not args.quiet)
    t0 = time.perf_counter()
    run((args.seed + 1) % 2**32)  # first call compiles
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    images = run(args.seed)
    run_s = time.perf_counter() - t0
    _write_image(image_grid(images, rows=10), args.out)
    scale = "off" if not guidance.cfg else f"{guidance.scale:g}"
    print(f"first call (compile + run): {compile_s:.2f} s; then {len(labels)} images in {run_s:.3f} s "
          f"= {len(labels) / run_s:.1f} images/s ({steps} steps, guidance {scale}, backend {args.backend}"
          + (f", stream engine {args.streams} x {args.slots} slots" if args.stream else ", one batch") + ")")
    try:
        from streamflow_jax.eval import digit_accuracy  # scikit-learn: an optional extra (make demo has it)

        print(f"digit accuracy (classifier trained on the real digits): {digit_accuracy(images, labels):.1%}")
    except ImportError:
        print("digit accuracy: not measured (pip install scikit-learn, or the demo extra, to see it)")
    print(f"wrote {args.out}")
    return 0


def _digits_negative(args, guidance) -> int | None:
    """``--negative-prompt`` for the digits model: a digit, the class guidance steers away from
    (as the server takes it), refused where guidance is off; None: the null class."""
    if not args.negative_prompt:
        return None
    from streamflow_jax.pipelines.base import negative_prompt_problem
    from streamflow_jax.pipelines.digits import DEFAULT_GUIDANCE, NULL_CLASS, prompt_label

    try:
        label = prompt_label(args.negative_prompt)
    except ValueError as e:
        raise ValueError(f"--negative-prompt: {e}") from None
    text = args.negative_prompt.strip()
    if (why := negative_prompt_problem(text, guidance, default=DEFAULT_GUIDANCE, name="the digits model")) is not None:
        raise ValueError(f"--negative-prompt: {why}")
    return None if label == NULL_CLASS else label


def _quantize(model, kind: str):
    from streamflow_jax.quantization import quantized

    return quantized(model, kind)  # a checkpoint converted with --quantize is FP8 already


def _generate_prompts(args) -> int:
    """``generate --model PIPELINE --prompt ...``: a prompt pipeline (class from model_index.json)."""
    from streamflow_jax.pipelines import Pipeline, pipeline_class

    if not args.prompt:
        raise ValueError(f"{args.model}: a prompt pipeline (no conditioning.safetensors, so not a digits model "
                         "directory): give --prompt TEXT")
    if args.per_digit != 8:
        raise ValueError("--per-digit is for the digits model; give one --prompt per image")
    cls = pipeline_class(args.model)  # a directory that is no pipeline fails here, before loading
    _check_negative_prompt_early(cls, args)
    _check_taesd(args)
    kwargs = {"dtype": args.dtype}
    for name, value in (("taesd", args.taesd), ("prediction_type", args.prediction_type),
                        ("num_time_windows", args.windows), ("variant", args.variant), ("loras", args.lora)):
        if value is not None:
            kwargs[name] = value
    pipe = Pipeline.from_diffusers(args.model, mesh=_mesh(args), strategy=args.strategy, **kwargs)
    if args.quantize:
        pipe.model = _quantize(pipe.model, args.quantize)
    _use_export(args, pipe)
    if args.max_sequence_length is not None:  # said with the flag, before any work
        try:
            pipe.model_text_len(args.max_sequence_length)
        except ValueError as e:
            raise ValueError(f"--max-sequence-length {args.max_sequence_length}: {e}") from None
    guidance = pipe.resolve_guidance(args.guidance)  # refuses NaN/inf before any work
    if (args.height is not None or args.width is not None) and args.image is None:  # said with the flag
        try:
            pipe.latent_shape(args.height, args.width)
        except ValueError as e:
            flag = "--width" if "width" in str(e) and "height" not in str(e) else "--height"
            raise ValueError(f"{flag} {args.width if flag == '--width' else args.height}: {e}") from None
    negative = "" if args.negative_prompt is None else args.negative_prompt
    if (why := pipe.negative_prompt_problem(negative, guidance)) is not None:
        raise ValueError(f"--negative-prompt: {why}")
    t0 = time.perf_counter()
    image = args.image.convert("RGB") if args.image is not None else None
    if args.stream:
        images = _stream_prompts(pipe, args, image, negative)
    else:
        images = pipe(args.prompt, steps=args.steps, guidance_scale=args.guidance, seed=args.seed,
                      negative_prompt=negative, backend=args.backend, height=args.height, width=args.width,
                      max_sequence_length=args.max_sequence_length, image=image, strength=args.strength,
                      progress=not args.quiet)
    elapsed = time.perf_counter() - t0
    row = Image.fromarray(np.concatenate([np.asarray(im) for im in images], axis=1))
    _write_image(row, args.out)
    scale = guidance.kind if guidance.scale is None else f"{guidance.kind} {guidance.scale:g}"
    print(f"{len(images)} image(s) in {elapsed:.2f} s (first call includes compilation; guidance {scale}); "
          f"wrote {args.out}")
    return 0


def _check_negative_prompt_early(cls, args) -> None:
    """``--negative-prompt`` where nothing would read it, refused from the pipeline class and the
    flags, before the (possibly tens of GB of) weights load; the loaded pipeline checks again
    (``negative_prompt_problem``), exactly."""
    from streamflow_jax.pipelines.base import negative_prompt_problem
    from streamflow_jax.sampling import Guidance

    if not args.negative_prompt:
        return
    if cls.cfg_mode == "none":  # Flux.1: dev's scale is the model's input, schnell takes none
        why = (f"negative prompt {args.negative_prompt!r:.80} is ignored: Flux.1 runs no unconditional branch (dev "
               "takes the guidance scale as a model input, schnell takes none)")
    else:
        guidance = Guidance.resolve(args.guidance, mode="cfg", default=cls.default_guidance)
        why = negative_prompt_problem(args.negative_prompt, guidance, default=cls.default_guidance, name=cls.__name__)
    if why is not None:
        raise ValueError(f"--negative-prompt: {why}")


def _stream_prompts(pipe, args, image, negative: str = "") -> list:
    """``generate --stream`` for a prompt pipeline: one request per prompt through ``PromptStream``,
    each starting from its row of the batch path's noise, so both paths give the same images."""
    from streamflow_jax.pipelines import PromptStream

    guided = pipe.resolve_guidance(args.guidance).cfg
    height, width = args.height, args.width
    if image is not None:  # a side not given is the image's, as the batch path takes it
        width, height = image.size[0] if width is None else width, image.size[1] if height is None else height
    stream = PromptStream(pipe, slots_per_stream=args.slots, streams=args.streams, guidance=guided,
                          height=height, width=width, backend=args.backend,
                          max_sequence_length=args.max_sequence_length, ticks_per_call=args.ticks_per_call)
    noise = np.asarray(pipe.noise(len(args.prompt), stream.latent_shape, args.seed))
    ids = [stream.submit(prompt, steps=args.steps, noise=row, guidance_scale=args.guidance, image=image,
                         strength=args.strength, negative_prompt=negative) for prompt, row in zip(args.prompt, noise)]
    results = stream.run()
    for i, prompt in zip(ids, args.prompt):
        if isinstance(results[i], Exception):
            raise ValueError(f"prompt {prompt!r}: {results[i]}")
    return [results[i] for i in ids]


def pipeline_facts(path: Path) -> tuple[int | None, int | None]:
    """(latent scale, text length) a pipeline directory implies, where it implies them: its
    autoencoder's scale (1 for a pipeline without one: pixel space) and the digits model's
    conditioning table's text length. Converted and diffusers directories alike."""
    from safetensors import safe_open

    from streamflow_jax.checkpoint import read_model_config

    scale = text_len = None
    if (path / "vae" / "config.json").is_file():
        family, config = read_model_config(path / "vae")
        scale = family.scale_factor(config)
    elif (path / "model_index.json").is_file():
        scale = 1  # a pipeline without an autoencoder works in pixel space
    cond = path / "conditioning.safetensors"
    if cond.is_file():
        with safe_open(cond, framework="numpy") as f:
            text_len = f.get_slice("encoder_hidden_states").get_shape()[1]
    return scale, text_len


def _load_for_graph(args, path: Path, **kwargs):
    """The model ``export`` and ``bench`` run: a pipeline's velocity model with its adapter (a
    PeRFlow UNet: from the scheduler, or --prediction-type/--windows), or any model directory."""
    from streamflow_jax.checkpoint import load

    model = load(path, prediction_type=args.prediction_type, num_time_windows=args.windows, **kwargs)
    if model.family.predicts != "velocity" and model.adapter is None:
        raise ValueError(f"{path}: {model.class_name} predicts noise, and nothing says how to make it a velocity "
                         "field: give --prediction-type diff_eps|ddim_eps|velocity (and --windows N), or a pipeline "
                         "directory whose scheduler is PeRFlow's")
    return model


def _cmd_export(args) -> int:
    from streamflow_jax.export import export_onnx, export_spec
    from streamflow_jax.errors import ExportError
    from streamflow_jax.export.onnx import ONNX_NAME, check_opset
    from streamflow_jax.export.spec import Range

    _positive(args, "latent_scale", "text_len")
    _check_quantize_backend(args)
    for flag, value in (("--batch", args.batch), ("--resolution", args.resolution)):
        if value is not None:  # checked again against the model once loaded; the form now
            try:
                Range.parse(value)
            except ValueError as e:
                raise ValueError(f"{flag} {value}: {e}") from None
    try:
        check_opset(args.opset)
    except ExportError as e:
        raise ValueError(f"--{e}") from None
    for flag, value in (("--tensorrt", args.tensorrt), ("--compute-capability", args.compute_capability),
                        ("--opt-level", args.opt_level)):
        if value is not None and args.backend != "tensorrt":
            raise ValueError(f"{flag} goes with --backend tensorrt")
    if args.compute_capability is not None and not args.compute_capability.strip():
        raise ValueError("--compute-capability is empty: give CC[,CC...], e.g. 8.6,12.0, or leave it out")
    args.opt_level = 3 if args.opt_level is None else args.opt_level
    if not 0 <= args.opt_level <= 5:
        raise ValueError(f"--opt-level must be in [0, 5] (TensorRT's builder optimization levels), got {args.opt_level}")
    if args.backend == "tensorrt":
        from streamflow_jax.backends.tensorrt import tensorrt_flavour

        # fail before exporting when TensorRT is missing or the targets are wrong (an FP8 graph's
        # are checked again once exported: compute capability 8.9 and later)
        flavour = tensorrt_flavour(args.tensorrt)
        flavour.targets(args.compute_capability)
    from streamflow_jax.fsutil import check_destination

    check_destination(args.out)  # a taken output is refused before the model loads, not after
    path = Path(args.model)
    scale_hint, text_hint = pipeline_facts(path) if path.is_dir() else (None, None)
    model = _load_for_graph(args, path, progress=not args.quiet)
    if args.quantize:
        model = _quantize(model, args.quantize)
    if args.backend == "tensorrt":
        from streamflow_jax.quantization import TENSORRT_REFUSAL, activation_scales

        if activation_scales(model) == "dynamic":  # a checkpoint converted with --quantize fp8 alone
            raise ValueError(f"{path}: {TENSORRT_REFUSAL}")
    try:
        spec = export_spec(model, batch=args.batch, resolution=args.resolution,
                           latent_scale=args.latent_scale or (scale_hint if model.family.kind == "velocity" else None),
                           text_len=args.text_len or (text_hint if model.family.kind == "velocity" else None),
                           dtype=args.dtype)
    except ValueError as e:  # against the model: said with the flag it is about
        for word, flag, value in (("resolution", "--resolution", args.resolution),
                                  ("text_len", "--text-len", args.text_len)):
            if word in str(e) and value is not None:
                raise ValueError(f"{flag} {value}: {e}") from None
        raise
    if args.backend == "tensorrt":  # what the flags and the model say already, before exporting
        from streamflow_jax.quantization import is_quantized

        targets = flavour.targets(args.compute_capability, fp8=is_quantized(model))
        if "7.5" in targets and spec.dtype != "float16":
            raise ValueError(f"--compute-capability 7.5 (Turing) builds float16 graphs only, and this one computes in "
                             f"{spec.dtype}: add --dtype float16, or leave 7.5 out")
    entry: dict = {}
    dims = ", ".join(f"{k} {v}" for k, v in spec.dims.items())

    def say_exported() -> None:
        print(f"exported {model.class_name} {spec.method} -> {Path(args.out).absolute() / ONNX_NAME} ({dims}, "
              f"{spec.dtype}, opset {args.opset})", flush=True)

    if args.backend == "tensorrt":
        from streamflow_jax.backends.tensorrt import export_engine, local_gpu

        def build(graph) -> None:  # in the partial directory: the export appears with its engine, or not at all
            say_exported()  # the graph is done; the engine build begins
            try:  # TensorRT-RTX needs no GPU to build; running is another matter, said below
                entry.update(export_engine(graph, flavour=flavour, targets=args.compute_capability,
                                           opt_level=args.opt_level, progress=not args.quiet))
            except Exception as e:
                raise ValueError(f"the TensorRT engine was not built, so {args.out} is not written: {e}") from None

    exported = export_onnx(model, spec, args.out, opset=args.opset, progress=not args.quiet,
                           before_commit=build if args.backend == "tensorrt" else None,
                           before_commit_desc="building the TensorRT engine")
    if args.backend != "tensorrt":
        say_exported()
    if args.backend == "onnxruntime" and spec.dtype == "bfloat16":
        from streamflow_jax.backends.onnxruntime import default_providers

        if "CUDAExecutionProvider" not in default_providers():  # written for another machine, maybe
            print("note: ONNX Runtime's CPU provider here cannot run it (no bfloat16 kernels, its Conv for one); "
                  "ONNX Runtime with CUDA or TensorRT can, or export with --dtype float32 or float16")
    if args.backend == "tensorrt":
        print(f"{entry['flavour']} {entry['version']} engine -> {exported.path / entry['engine']} "
              f"({entry['engine_bytes'] / 2**20:.1f} MiB, compute capability {', '.join(entry['targets'])}, "
              f"built in {entry['build_seconds']:.1f} s)")
        reason = flavour.cannot_run(entry["targets"], local_gpu())
        if reason:
            print(f"note: it cannot run on this machine: {reason}")
    return 0


def _cmd_bench(args) -> int:
    _check_common(args)
    _positive(args, "batch", "repeats", "latent", "text_len")
    import jax
    import jax.numpy as jnp

    from streamflow_jax import schedules
    from streamflow_jax.backends import sample
    from streamflow_jax.pipelines import DIGITS_DIR

    path = Path(args.model) if args.model else DIGITS_DIR
    _, text_hint = pipeline_facts(path) if path.is_dir() else (None, None)
    mesh = _mesh(args)
    model = _load_for_graph(args, path, mesh=mesh, strategy=args.strategy)
    if model.family.kind != "velocity":
        raise ValueError(f"{path}: bench samples a velocity model, got {model.class_name}")
    if args.quantize:
        model = _quantize(model, args.quantize)
    _use_export(args, model)
    try:
        shape = model.latent_shape(args.latent, args.latent)
    except ValueError as e:
        raise ValueError(f"--latent {args.latent}: {e}") from None
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((args.batch, *shape), dtype=np.float32)
    cond = {k: rng.standard_normal((args.batch, *s), dtype=np.float32)
            for k, s in model.cond_shapes(args.text_len or text_hint).items()}
    grid = schedules.flow_match(args.steps)
    if mesh is not None:
        from streamflow_jax.sharding import shard_batch

        noise, cond = shard_batch((noise, cond), mesh)
    run = lambda: jax.block_until_ready(sample(model, noise, grid, cond, backend=args.backend))  # noqa: E731
    t0 = time.perf_counter()
    run()
    first = time.perf_counter() - t0
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    mean = sum(times) / len(times)
    print(json.dumps({"model": str(path), "backend": args.backend, "batch": args.batch, "latent": shape[0],
                      "steps": args.steps, "first_call_s": round(first, 6),
                      "sample_s": round(mean, 6),  # microseconds: a GPU's 1.2 ms call kept 2 digits at 4 decimals
                      "images_per_s": round(args.batch / mean, 2), "device": str(jax.devices()[0]),
                      "devices": args.devices or 1, "strategy": args.strategy if args.devices else None,
                      "quantize": _quantization_of(model), "dtype": str(jnp.dtype(model.dtype))}))
    return 0


def _quantization_of(model) -> str | None:
    """What ``bench`` reports of a model's FP8: ``fp8`` (dynamic activation scales) or
    ``fp8-static`` (calibrated), whether ``--quantize`` or the checkpoint made it; None: not FP8."""
    from streamflow_jax.quantization import activation_scales

    scales = activation_scales(model)
    return None if scales is None else ("fp8-static" if scales == "static" else "fp8")


def _cmd_serve(args) -> int:
    """``serve [MODEL]``: the OpenAI-style images API, the realtime stream and the page (streamflow_jax.serve)."""
    _positive(args, "devices", "slots", "streams", "max_n", "max_steps", "replicas", "frames_in_flight", "max_streams",
              "ticks_per_call")
    _check_ticks_per_call(args)
    _check_mesh_flags(args)
    _check_quantize_backend(args)
    _check_export(args)
    if args.max_steps > MAX_STEPS:
        raise ValueError(f"--max-steps must be in [1, {MAX_STEPS}], got {args.max_steps}")
    if args.max_queue < 0:
        raise ValueError(f"--max-queue must be >= 0, got {args.max_queue}")
    if not (np.isfinite(args.timeout) and args.timeout > 0):
        raise ValueError(f"--timeout must be a positive number of seconds, got {args.timeout}")
    if not 0 <= args.port < 65536:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    if args.model is not None and not Path(args.model).is_dir():
        raise ValueError(f"{args.model}: not a directory (give a digits or prompt pipeline directory)")
    _check_taesd(args)
    try:
        from streamflow_jax.serve.models import parse_size
        try:
            parse_size(args.size)
        except ValueError as e:
            raise ValueError(f"--{e}") from None  # "--size must be WIDTHxHEIGHT ..."
        import starlette, uvicorn  # noqa: E401, F401  the serve extra
    except ImportError as e:
        raise ValueError(f"serving needs the serve extra (pip install 'streamflow-jax[serve]'): {e}") from None
    load = dict(model=args.model, slots_per_stream=args.slots, streams=args.streams, backend=args.backend,
                size=args.size, dtype=args.dtype, taesd=args.taesd, prediction_type=args.prediction_type,
                num_time_windows=args.windows, variant=args.variant, loras=args.lora, strategy=args.strategy,
                quantize=args.quantize, export=args.export, ticks_per_call=args.ticks_per_call)
    options = dict(max_queue=args.max_queue, max_n=args.max_n, max_steps=args.max_steps, timeout=args.timeout,
                   frames_in_flight=args.frames_in_flight, max_streams=args.max_streams)
    name = Path(args.model).name if args.model else "digits"
    if args.replicas is not None:
        try:
            import ray  # noqa: F401  the ray extra
        except ImportError as e:
            raise ValueError(f"--replicas needs the ray extra (pip install 'streamflow-jax[ray]'): {e}") from None
        from streamflow_jax.serve.ray_serve import serve_ray

        return serve_ray({**load, "devices": args.devices}, options, replicas=args.replicas, host=args.host,
                         port=args.port, name=name)
    from streamflow_jax.serve.app import create_app
    from streamflow_jax.serve.server import bind, serve

    sock = bind(args.host, args.port)  # a port in use is said now, not after loading and compiling
    try:
        app = create_app(mesh=_mesh(args), **load, **options)
    except BaseException:
        sock.close()
        raise
    return serve(app, host=args.host, port=args.port, name=name, log_level=args.log_level,
                 access_log=args.access_log, sock=sock)


def _mesh_flags(p) -> None:
    p.add_argument("--devices", type=int, default=None, help="run on this many devices (a mesh; see --strategy)")
    p.add_argument("--strategy", choices=("fsdp", "tensor", "replicate"), default=None,
                   help="with --devices: how weights are split (default fsdp; fsdp and replicate split batches over "
                        "the devices, tensor splits heads and hidden units)")


def _adapter_flags(p) -> None:
    p.add_argument("--prediction-type", choices=PREDICTIONS, default=None,
                   help="PeRFlow/InstaFlow UNets: what the UNet predicts, overriding the scheduler config's (a PeRFlow "
                        "UNet shipped with its base model's scheduler)")
    p.add_argument("--windows", type=int, default=None,
                   help="PeRFlow: time windows (default: the scheduler config's, or 4)")


def _pipeline_load_flags(p) -> None:
    """``generate``'s and ``serve``'s: how a prompt pipeline loads (``Pipeline.from_diffusers``)."""
    p.add_argument("--variant", default=None,
                   help="a diffusers pipeline directory's *.VARIANT.safetensors weights (e.g. fp16), as "
                        "from_pretrained(variant=)")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="merge a LoRA into the components its keys name as the pipeline loads (a file, or "
                        "diffusers' save_lora_weights directory; repeat for several, summed)")


def _export_flag(p) -> None:
    p.add_argument("--export", default=None, metavar="DIR",
                   help="with --backend onnxruntime|tensorrt: run the velocity model from this export directory "
                        "(streamflow-jax export of the same model, loaded the same way) instead of exporting on "
                        "demand; its profile must take the batch (CFG doubles it) and size")


def _quantize_flag(p) -> None:
    p.add_argument("--quantize", choices=("fp8",), default=None,
                   help="fp8: linear weights stored as float8_e4m3fn with scales (sf.quantize)")


def build_parser() -> argparse.ArgumentParser:
    from streamflow_jax.backends import BACKENDS  # the registry (imports JAX)

    parser = argparse.ArgumentParser(prog="streamflow-jax", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    backends = list(BACKENDS)
    backend_help = "; ".join(f"{b.name}: {b.summary}" for b in BACKENDS.values())

    p = sub.add_parser("convert", help="convert a diffusers model or pipeline directory")
    p.add_argument("src", help="diffusers model directory (config.json + safetensors), pipeline directory, or a "
                               "single safetensors file in a published layout (Black Forest Labs' Flux; SD 1.x/2.x "
                               "in the LDM layout, SDXL in the SGM layout, with --config-from)")
    p.add_argument("dst", help="output directory (new, or an empty one; written atomically)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="cast floating-point parameters (default: keep the checkpoint's dtype)")
    p.add_argument("--variant", default=None, help="read *.VARIANT.safetensors weights (e.g. fp16), sharded too")
    p.add_argument("--delta", default=None, metavar="DIR",
                   help="add these weight differences (W + dW, in float32; a pipeline's unet gets them), e.g. "
                        "PeRFlow's delta weights")
    p.add_argument("--delta-variant", default=None, metavar="NAME", help="which weights file of --delta, when it holds several")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="merge a LoRA (diffusers/PEFT or kohya safetensors; repeat for several, summed)")
    p.add_argument("--config-from", default=None, metavar="PATH",
                   help="config fields overriding the source's: a model directory (its config.json) or a JSON file "
                        "(a single file in a published layout cannot say everything); for a single-file SD 1.x/2.x "
                        "or SDXL checkpoint, the diffusers pipeline directory whose configs and tokenizers to use")
    p.add_argument("--quantize", choices=("fp8",), default=None,
                   help="write the velocity model (a pipeline's transformer or unet) with FP8 linear weights, as "
                        "sf.quantize makes them (about half the bytes of bf16 for SD3 and Flux); loaded quantized")
    p.add_argument("--calibrate", default=None, metavar="PROMPTS",
                   help="with --quantize fp8, for a pipeline: a text file of prompts (one per line) the converted "
                        "pipeline generates to measure static activation scales (sf.calibrate; TensorRT builds "
                        "such a model); use prompts like the ones it will serve")
    p.add_argument("--calibration-steps", type=int, default=None, metavar="N",
                   help="steps per calibration prompt (default: the pipeline's)")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="convert weights holding NaN or inf (refused by default, naming the tensor)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("generate", help="digits from the embedded default model, or images from prompts with any "
                                        "prompt pipeline: Flux.1, SD3/SD3.5, PeRFlow/InstaFlow SD1.5, PeRFlow-SDXL "
                                        "(--model DIR --prompt ...)")
    p.add_argument("--model", default=None,
                   help="a prompt pipeline directory (diffusers or converted: Flux, SD3/SD3.5, PeRFlow/InstaFlow "
                        "SD1.5, PeRFlow-SDXL), or a digits pipeline directory (default: the embedded one)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several); needs --model")
    p.add_argument("--negative-prompt", default=None, metavar="TEXT",
                   help="classifier-free guidance's unconditional prompt, for every --prompt (default: none, \"\"); "
                        "refused where guidance is off (--guidance <= 1, PeRFlow's default), is a model input "
                        "(Flux-dev) or is none (Flux-schnell); the digits model: one digit, the class guidance steers away from")
    p.add_argument("--taesd", default=None, metavar="DIR",
                   help="decode with this TAESD directory instead of the pipeline's VAE")
    _adapter_flags(p)
    _pipeline_load_flags(p)
    p.add_argument("--height", type=int, default=None, help="image height in pixels (prompt pipelines)")
    p.add_argument("--width", type=int, default=None, help="image width in pixels (prompt pipelines)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"Euler steps, at most {MAX_STEPS} (default: 16 digits; the pipeline's: 4 PeRFlow and "
                        "schnell, 28 SD3 and Flux-dev)")
    p.add_argument("--max-sequence-length", type=int, default=None,
                   help="T5 tokens for Flux and SD3 (default: the pipeline's; longer prompts are truncated)")
    p.add_argument("--guidance", type=float, default=None,
                   help="guidance scale (default: the pipeline's: 3 digits, off PeRFlow, 7 SD3, 3.5 Flux-dev, whose "
                        "scale is a model input); classifier-free guidance is off at <= 1, as in diffusers")
    p.add_argument("--seed", type=int, default=0, help="noise seed, in [0, 2**32)")
    p.add_argument("--per-digit", type=int, default=8, help="digits model: images per row (default 8)")
    p.add_argument("--image", default=None,
                   help="image-to-image: start from this image (digits: one digit, redrawn as every class)")
    p.add_argument("--strength", type=float, default=None,
                   help="with --image: how far towards noise the image goes, in (0, 1] (default 0.6)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="cast the models' parameters (default: as stored)")
    _quantize_flag(p)
    p.add_argument("--backend", choices=backends, default="xla", help=backend_help)
    _export_flag(p)
    p.add_argument("--stream", action="store_true",
                   help="one request per image through the stream engine instead of one batch")
    p.add_argument("--slots", type=int, default=None, help="with --stream: slots per stream (default 16)")
    p.add_argument("--streams", type=int, default=None, help="with --stream: streams sharing each call (default 1)")
    p.add_argument("--ticks-per-call", type=int, default=None, metavar="K",
                   help="with --stream: ticks planned ahead and run as one compiled call, 1-64 (default "
                        "$STREAMFLOW_JAX_TICKS_PER_CALL, else 1)")
    p.add_argument("--out", default="digits.png", help="output image, checked before generating (default digits.png)")
    _mesh_flags(p)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("export", help="export a model's graph to ONNX (and build a TensorRT engine)")
    p.add_argument("model", help="converted directory, or a diffusers model/pipeline directory (a pipeline: its "
                                 "velocity model, a PeRFlow UNet with its scheduler's adapter)")
    p.add_argument("out", help="export directory (new, or an empty one; written atomically)")
    p.add_argument("--backend", choices=[b for b in backends if BACKENDS[b].exported], default="onnxruntime",
                   help="tensorrt also builds the engine, OUT/model.engine (recorded in OUT/export.json)")
    p.add_argument("--batch", default=None, help="batch min:opt:max, or MIN:MAX, or one value; CFG's doubled batch "
                                                 "included (default 1:1:8; autoencoders and text encoders 1:1:4)")
    p.add_argument("--resolution", default=None,
                   help="image side in pixels, min:opt:max, or MIN:MAX, or one value (default: the model's sample size)")
    p.add_argument("--latent-scale", type=int, default=None,
                   help="pixels per latent pixel (default: from the pipeline's vae/, 1 without one, else the family's)")
    p.add_argument("--text-len", type=int, default=None, help="text tokens fixed in the graph (default per family)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="compute dtype inside the graph (inputs/outputs stay float32; default: the model's)")
    _adapter_flags(p)
    _quantize_flag(p)
    p.add_argument("--opset", type=int, default=23, help="ONNX opset (default 23, the least the export takes)")
    p.add_argument("--opt-level", type=int, default=None,
                   help="with --backend tensorrt: the builder's optimization level, 0-5 (default 3)")
    p.add_argument("--tensorrt", choices=("tensorrt", "tensorrt_rtx"), default=None,
                   help="with --backend tensorrt: the TensorRT flavour (default: $STREAMFLOW_JAX_TENSORRT, else "
                        "tensorrt when installed, else tensorrt_rtx, which builds without a GPU)")
    p.add_argument("--compute-capability", default=None, metavar="CC[,CC...]",
                   help="with --backend tensorrt (TensorRT-RTX): GPU compute capabilities the engine runs on, e.g. 8.6,12.0 "
                        "(default: all TensorRT-RTX offers but Turing's 7.5, which takes float16 graphs only)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("bench", help="time sampling of a model on random inputs with one backend, print JSON")
    p.add_argument("model", nargs="?", default=None,
                   help="a velocity model (transformer or UNet) or pipeline directory (default: the embedded digits model)")
    p.add_argument("--backend", choices=backends, default="xla", help=backend_help)
    _export_flag(p)
    p.add_argument("--batch", type=int, default=4, help="batch size (default 4)")
    p.add_argument("--steps", type=int, default=16, help=f"Euler steps, at most {MAX_STEPS} (default 16)")
    p.add_argument("--latent", type=int, default=None,
                   help="latent side in latent pixels: the image side / the autoencoder's factor, 8 for SD's and "
                        "Flux's VAEs (default: the model's sample size)")
    p.add_argument("--text-len", type=int, default=None, help="text tokens of the random conditioning (default per family)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs after the compiling one; their mean is reported (default 3)")
    _adapter_flags(p)
    _quantize_flag(p)
    _mesh_flags(p)
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("serve", help="serve a model: OpenAI-style images API, realtime image-to-image over a "
                                     "WebSocket, a web page; continuous batching on the stream engine")
    p.add_argument("model", nargs="?", default=None,
                   help="a prompt pipeline directory (diffusers or converted: PeRFlow/InstaFlow SD1.5 and SDXL, "
                        "SD3/SD3.5, Flux) or a digits directory (default: the embedded digits model)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port, printed)")
    p.add_argument("--slots", type=int, default=4, help="engine slots per stream (default 4)")
    p.add_argument("--streams", type=int, default=2,
                   help="streams sharing each engine call: --slots x --streams slots in all, and this many requests "
                        "join per step (default 2)")
    p.add_argument("--ticks-per-call", type=int, default=None, metavar="K",
                   help="engine ticks planned ahead and run as one compiled call, 1-64: fewer host dispatches, "
                        "results K ticks at a time (default $STREAMFLOW_JAX_TICKS_PER_CALL, else 1)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="images that may wait for a slot; beyond, 429 with Retry-After (default 64)")
    p.add_argument("--timeout", type=float, default=120.0,
                   help="a request's deadline in seconds, queue included; then 503 and its slots are freed "
                        "(default 120)")
    p.add_argument("--max-n", type=int, default=10, help="images per request, n (default 10)")
    p.add_argument("--max-steps", type=int, default=100, help="steps per request (default 100)")
    p.add_argument("--frames-in-flight", type=int, default=4,
                   help="realtime: frames of one stream in the engine at once (default 4)")
    p.add_argument("--max-streams", type=int, default=16,
                   help="realtime: streams open at once; one more is closed with code 1013 (default 16)")
    p.add_argument("--size", default=None, help="WIDTHxHEIGHT of every image (default: the model's)")
    p.add_argument("--taesd", default=None, metavar="DIR",
                   help="decode with this TAESD directory instead of the pipeline's VAE")
    _adapter_flags(p)
    _pipeline_load_flags(p)
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="cast the models' parameters (default: as stored)")
    _quantize_flag(p)
    p.add_argument("--backend", choices=backends, default="xla", help=backend_help)
    _export_flag(p)
    _mesh_flags(p)
    p.add_argument("--replicas", type=int, default=None,
                   help="run N replicas as a Ray Serve deployment (local Ray unless RAY_ADDRESS names a cluster)")
    p.add_argument("--log-level", choices=("critical", "error", "warning", "info", "debug"), default="warning",
                   help="the server's log level (default warning)")
    p.add_argument("--access-log", action="store_true", help="log every request (uvicorn's access log)")
    p.set_defaults(func=_cmd_serve)
    return parser


def _write_image(image, out) -> None:
    """Writes ``image`` to ``out`` whole or not at all (``fsutil.write_atomic``), readable as a
    plain ``open()`` would leave it; nothing if a Ctrl-C was recorded on the way."""
    import io

    from PIL import Image

    from streamflow_jax import fsutil

    fsutil.check_interrupted()
    buf = io.BytesIO()
    image.save(buf, format=Image.registered_extensions().get(os.path.splitext(out)[1].lower()))
    umask = os.umask(0)
    os.umask(umask)
    fsutil.write_atomic(out, buf.getvalue(), mode=0o666 & ~umask)


# diffusers' and other tools' spellings of flags, and this CLI's
FLAG_HINTS = {"--num-inference-steps": "--steps", "--guidance-scale": "--guidance", "--cfg": "--guidance",
              "--num-images-per-prompt": "one --prompt per image (repeat it)", "--output": "--out",
              "--torch-dtype": "--dtype", "--lora-scale": "--lora FILE:SCALE"}


def _unknown_flags(parser: argparse.ArgumentParser, extra: list[str]) -> str:
    """``unrecognized arguments: ...`` with what each unknown flag may have meant: this CLI's
    name for another tool's (``--num-inference-steps`` -> ``--steps``), its hyphens for
    underscores, or the closest flag of the command."""
    import difflib

    flags = [o for a in parser._actions for o in a.option_strings]
    hints = []
    for word in extra:
        if not word.startswith("--"):
            continue
        name = word.split("=", 1)[0]
        guess = FLAG_HINTS.get(name.replace("_", "-"))
        if guess is None and name.replace("_", "-") in flags:
            guess = name.replace("_", "-")
        if guess is None:
            close = difflib.get_close_matches(name, flags, n=1, cutoff=0.6)
            guess = close[0] if close else None
        if guess is not None:
            hints.append(f"{name}: {guess}?")
    return f"unrecognized arguments: {' '.join(extra)}" + (f" ({'; '.join(hints)})" if hints else "")


def main(argv: list[str] | None = None) -> int:
    args = None
    try:
        from streamflow_jax import fsutil

        fsutil.take_last_signal()  # one an earlier block of this process recorded is not this command's
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
        if extra:
            words = sys.argv[1:] if argv is None else list(argv)
            before = words[:words.index(args.command)] if args.command in words else []
            if any(w in before for w in extra):  # streamflow-jax --verbose generate: not generate's flag
                parser.error(f"unrecognized arguments: {' '.join(w for w in extra if w in before)} (before the "
                             f"command, only --help and --version; {args.command}'s flags come after it)")
            commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
            command = commands.get(getattr(args, "command", None), parser)
            command.error(_unknown_flags(command, extra))
        from streamflow_jax.backends.cache import enable_compilation_cache

        enable_compilation_cache()
        from streamflow_jax import fsutil, ops

        ops.check_switches()  # a typo in an environment switch, before anything is loaded

        with fsutil.interrupts_recorded():
            try:
                code = args.func(args)
            except Exception:
                # a Ctrl-C that surfaced as another error: an ImportError from it (a module loaded
                # on first use), a native library's own error around it
                if fsutil.interrupted():
                    raise KeyboardInterrupt from None
                raise
            # a Ctrl-C that a callback swallowed: nothing was committed after it (one that came after
            # the output's commit ends here too, the output complete)
            if fsutil.interrupted():
                raise KeyboardInterrupt
        return code
    except KeyboardInterrupt:  # whatever was being written has been removed on the way out
        return _interrupted(args)
    except ImportError as e:
        # Ctrl-C while a module loaded, before the command ran (within it: above)
        if isinstance(e.__cause__, KeyboardInterrupt):
            return _interrupted(args)
        raise
    except MemoryError as e:  # numpy's allocation failures (XLA's are RuntimeErrors, below)
        if args is None:
            raise
        print(f"streamflow-jax {args.command}: error: out of memory ({e or 'an allocation failed'})", file=sys.stderr)
        return 1
    except (ConversionError, ValueError, OSError, RuntimeError, OverflowError) as e:
        if args is None:
            raise
        message = str(e)
        if isinstance(e, RuntimeError) and ("RESOURCE_EXHAUSTED" in message or "Out of memory" in message):
            # XLA's: "INTERNAL: Error dispatching computation: Out of memory allocating N bytes."
            first = message.strip().splitlines()[0] if message.strip() else "an allocation failed"
            message = f"out of memory ({first}): {_MEMORY_HINTS.get(args.command, 'lower the batch or the size')}"
        print(f"streamflow-jax {args.command}: error: {message}", file=sys.stderr)
        return 1


_MEMORY_HINTS = {  # what to lower, per command, after XLA's out-of-memory error
    "generate": "fewer images at once (--per-digit, fewer --prompt), or --stream (a few slots at a time), a "
                "smaller --height/--width, --dtype bfloat16 or --quantize fp8",
    "bench": "a smaller --batch or --latent, --dtype bfloat16 or --quantize fp8",
    "serve": "fewer --slots or --streams, a smaller --size, --dtype bfloat16 or --quantize fp8",
    "export": "a smaller --batch or --resolution maximum (the export traces at the profile's largest shapes)",
    "convert": "convert on a machine with more memory",
}


def _interrupted(args) -> int:
    """The one line after Ctrl-C or SIGTERM, and the exit status 128 + the signal; on a terminal,
    over the line a progress bar may have left unfinished."""
    from streamflow_jax import fsutil

    start = "\r\x1b[K" if sys.stderr.isatty() else ""
    sig = fsutil.take_last_signal()  # SIGTERM too: "terminated", 143
    what = "terminated" if sig == signal.SIGTERM else "interrupted"
    print(f"{start}streamflow-jax{'' if args is None else ' ' + args.command}: {what}", file=sys.stderr)
    return 128 + int(sig)


def run() -> None:
    """The console script: ``main``, then the exit. After Ctrl-C (or SIGTERM) the process ends at
    once, without the interpreter's teardown: an XLA compilation that Ctrl-C interrupted goes on
    in JAX's thread pool, and tearing the interpreter down under it crashes (seen with JAX 0.10
    on the CPU); everything written has been cleaned up before ``main`` returns."""
    code = main()
    if code in (128 + signal.SIGINT, 128 + signal.SIGTERM):  # 130, 143
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
