"""Converted checkpoints on disk: ``config.json`` + an orbax ``params/`` directory in parts.

``convert`` plans the conversion from the files' headers (every key and shape checked first),
then reads, converts and writes the parameters a part at a time (about ``PART_BYTES`` each) as
separate orbax items ``params/part-NNN``: a 24 GB checkpoint never has to be in memory at
once, and bf16 stays bf16. It writes into a partial sibling directory renamed
into place at the end (``fsutil.atomic_dir``), so a failed or interrupted conversion leaves
nothing behind. ``load`` restores a part at a time through host memory onto the default
device (or, given a mesh, straight into each weight's shards), or converts a diffusers
directory in memory.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import json
import logging
import shutil
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from streamflow_jax._version import __version__
from streamflow_jax.converters import (
    CONVERTER_VERSION,
    ConversionPlan,
    DeltaSource,
    class_name_of,
    plan,
    plan_source,
    resolve_dtype,
)
from streamflow_jax import ops, schedules
from streamflow_jax.converters import parse_config
from streamflow_jax.converters.common import check_config_types, check_model_source, read_json, weights_file
from streamflow_jax.converters.lora import component_prefixes, lora_deltas, lora_keys, read_lora_file
from streamflow_jax.errors import ConfigError, ConversionError
from streamflow_jax.fsutil import atomic_dir, interrupts_held
from streamflow_jax.lora import apply_loras, merged_deltas, parse_loras
from streamflow_jax.models import FAMILIES, VELOCITY_COMPONENTS, FlowModel, abstract_split, family_of, flat_params
from streamflow_jax.sharding import STRATEGIES, attention_heads, check_mesh, placement, shard, warn_replicated

PARAMS_DIR = "params"
PARTS_INDEX = "parts.json"
PART_BYTES = 256 << 20  # parameters per orbax item: the conversion's working set is a few times this
ROOT_FILE_LIMIT = 16 << 20  # pipeline-root files copied by convert (configs, conditioning tables)
META_KEY = "streamflow_jax"  # present in our config.json, absent from diffusers'


@contextlib.contextmanager
def _checkpointer():
    """orbax's ``StandardCheckpointer`` (orbax imported on first use), with the root logger left
    as it was: absl's logging, which orbax logs through, calls ``logging.basicConfig()`` when the
    root logger has no handler, after which an application's own ``basicConfig`` does nothing."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        import orbax.checkpoint as ocp

        with ocp.StandardCheckpointer() as ckpt:
            yield ckpt
    finally:
        root.handlers[:] = [h for h in root.handlers if h in handlers]
        root.setLevel(level)


# ---------------------------------------------------------------------------------------------
# Writing in parts
# ---------------------------------------------------------------------------------------------


def part_names(names: Iterable[str], nbytes: Callable[[str], int], limit: int | None = None) -> list[list[str]]:
    """Consecutive parameters packed into parts of about ``limit`` bytes (``PART_BYTES``)."""
    limit = PART_BYTES if limit is None else limit
    parts, current, size = [], [], 0
    for name in names:
        if current and size >= limit:
            parts.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes(name)
    if current:
        parts.append(current)
    return parts


RELEASE_BYTES = 64 << 20  # parts at least this large hand their memory back before the next


def _release_memory() -> None:
    """Hands freed memory back to the system between parts: glibc keeps the arenas of the many
    large arrays a part allocates, and without a trim a conversion's resident size grows by a
    part's size every few parts (measured: 3.2 GB vs 0.3 GB for a 1.4 GB checkpoint)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def _write_config(out: Path, class_name: str, config, dtype: str, source: str | None,
                  quantization: dict | None = None, adapter: dict | None = None) -> None:
    data = {"_class_name": class_name, **dataclasses.asdict(config)}
    data[META_KEY] = {"version": __version__, "converter_version": CONVERTER_VERSION, "dtype": dtype,
                      "source": source}
    if quantization:
        data[META_KEY]["quantization"] = quantization
    if adapter:
        data[META_KEY]["adapter"] = adapter
    (out / "config.json").write_text(json.dumps(data, indent=2) + "\n")


def _write_parts(out: Path, parts: Iterator[dict[str, np.ndarray]], progress: bool, total: int, label: str) -> str:
    """Saves each dict of arrays as its own orbax item ``params/part-NNN``, indexes them (names
    and dtypes, so that loading can place every array before reading it) and returns the dtype
    most of the parameters have (FP8 weights aside: their compute dtype is the others')."""
    params = out / PARAMS_DIR
    params.mkdir(parents=True)
    index, dtypes, counts = {}, {}, {}
    with _checkpointer() as ckpt, tqdm(total=total, desc=label, unit="tensor", disable=not progress) as bar:
        for i, arrays in enumerate(parts):
            name = f"part-{i:03d}"
            with interrupts_held():  # orbax writes on background threads: Ctrl-C waits for them
                ckpt.save(params / name, arrays)
                ckpt.wait_until_finished()
            index[name] = list(arrays)
            for k, a in arrays.items():
                dtypes[k] = str(a.dtype)
                counts[str(a.dtype)] = counts.get(str(a.dtype), 0) + a.size
            bar.update(len(arrays))
            large = sum(a.nbytes for a in arrays.values()) >= RELEASE_BYTES
            del arrays
            if large:  # a small part leaves little behind; the release costs ~0.4 s (a full gc)
                _release_memory()
    (params / PARTS_INDEX).write_text(json.dumps({"format": 2, "parts": index, "dtypes": dtypes}) + "\n")
    compute = {k: v for k, v in counts.items() if not k.startswith("float8")} or counts  # FP8 is storage
    return max(compute, key=compute.get) if compute else "float32"


def _fp8_layers_of(p: ConversionPlan) -> list[str]:
    """The linear layers ``quantize(model, "fp8")`` would make FP8 in the planned model."""
    from streamflow_jax.quantization import fp8_layer_names

    pattern = p.family.fp8_linears
    if pattern is None:
        raise ConversionError(f"{p.source}: no FP8 rule for the {p.family.name} family ({p.class_name}); "
                              "quantize it after loading: sf.quantize(model, 'fp8', include=REGEX)")
    graphdef, state = abstract_split(p.family, p.config)
    return fp8_layer_names(nnx.merge(graphdef, state), pattern)


def _quantized_parts(parts: Iterator[dict[str, np.ndarray]], layers: list[str]) -> Iterator[dict[str, np.ndarray]]:
    """Each part with the chosen layers' kernels as FP8 weights and scales (``Fp8Linear``'s)."""
    from streamflow_jax.quantization import quantize_kernel

    kernels = {f"{name}.kernel": name for name in layers}
    for arrays in parts:
        out = {}
        for key, a in arrays.items():
            if key in kernels:
                out[f"{kernels[key]}.weight"], out[f"{kernels[key]}.weight_scale"] = quantize_kernel(a)
            else:
                out[key] = a
        yield out


def _quantization_record(layers: list[str], static: bool = False, attention: bool = False) -> dict | None:
    """``config.json``'s record of a quantized model: its FP8 layers (and static activation
    scales, and static FP8 attention scales), which ``load`` restores it with; None for a
    float model."""
    if not layers:
        return None
    return {"mode": "fp8", "layers": list(layers), **({"activation_scales": "static"} if static else {}),
            **({"attention_scales": "static"} if attention else {})}


def _write_plan(p: ConversionPlan, out: Path, cast, source: str | None, progress: bool,
                fp8_layers: list[str] = ()) -> None:
    """Converts and writes a planned model part by part (never all of it in memory); the
    ``fp8_layers`` (``_fp8_layers_of``) as ``sf.quantize`` makes them (loaded quantized)."""
    out.mkdir(parents=True, exist_ok=True)
    layers = list(fp8_layers)
    groups = part_names(list(p.targets), lambda n: p.nbytes(n, cast))
    parts = (dict(p.read(g, cast)) for g in groups)
    dtype = _write_parts(out, _quantized_parts(parts, layers) if layers else parts, progress,
                         len(p.targets) + len(layers), f"converting {Path(p.source).name or p.source}")
    _write_config(out, p.class_name, p.config, dtype, source, _quantization_record(layers))


def save(model: FlowModel, dst, *, source: str | None = None, progress: bool = False) -> Path:
    """Writes ``model`` to a new directory ``dst`` atomically (partial dir + rename), in parts
    (``progress``: a bar over its tensors).

    A quantized model (``sf.quantize``) is written as it is, FP8 weights included, with its FP8
    layers listed in ``config.json``; ``load`` restores it quantized. A model's velocity adapter
    (PeRFlow's: prediction type, windows, training schedule) is written there too, and ``load``
    puts it back (``prediction_type`` / ``num_time_windows`` given to ``load`` override it).
    """
    from streamflow_jax.quantization import activation_scales, attention_scales, quantized_layers

    if not isinstance(model, FlowModel):
        raise ValueError(f"save takes a FlowModel (sf.load(...)), got {type(model).__name__}")
    dst = Path(dst).absolute()
    model = model.with_scanned_blocks(False).with_conv_layout("HWIO")  # as checkpoints hold them
    flat, _, names = flat_params(nnx.to_pure_dict(model.state))
    layers = quantized_layers(model)
    quantization = _quantization_record(layers, static=bool(layers) and activation_scales(model) == "static",
                                        attention=bool(layers) and attention_scales(model) == "static")
    with atomic_dir(dst) as tmp:
        groups = part_names(names, lambda n: flat[n].nbytes)
        dtype = _write_parts(tmp, ({n: np.asarray(flat[n]) for n in g} for g in groups), progress, len(names),
                             f"saving {dst.name}")
        _write_config(tmp, model.class_name, model.config, dtype, source,
                      quantization, _adapter_record(model.adapter))
    return dst


def _adapter_record(adapter) -> dict | None:
    """What ``save`` writes of a velocity adapter: PeRFlow's fields (another adapter is the
    caller's code: not written, with a warning)."""
    from streamflow_jax.models.perflow import PeRFlowAdapter

    if adapter is None:
        return None
    if not isinstance(adapter, PeRFlowAdapter):
        warnings.warn(f"{type(adapter).__name__} is not saved (only PeRFlowAdapter is): attach it again after "
                      "sf.load with model.with_adapter(...)", stacklevel=3)
        return None
    return {"class": "PeRFlowAdapter", **dataclasses.asdict(adapter)}


def convert(src, dst, *, dtype=None, progress: bool = True, config: dict | None = None, variant: str | None = None,
            delta=None, delta_variant: str | None = None, loras=None, allow_nonfinite: bool = False,
            quantize: str | None = None, calibrate=None, calibration_steps: int | None = None) -> Path:
    """Converts a diffusers model or pipeline directory (or a single file) into a streamflow-jax directory.

    Args:
        src: a diffusers model directory (``config.json`` + safetensors, sharded or not; a
            transformers ``model.safetensors`` for text encoders), a single safetensors file in
            a published layout (Black Forest Labs' Flux), or a pipeline directory
            (``model_index.json``): every supported component is converted into ``dst/NAME``,
            configuration-only components (scheduler, tokenizer) and small root files are
            copied, the others are skipped, and ``dst/conversion.json`` lists which was which.
        dst: output directory: new, or an empty one. Written atomically.
        dtype: ``None`` keeps the checkpoint's dtype; or ``"float32"``, ``"bfloat16"``, ``"float16"``.
        progress: show a progress bar over tensors.
        config: config fields overriding the model's (a single file cannot say everything); for
            a single-file pipeline checkpoint (SD 1.x/2.x in the original LDM layout, SDXL in
            the SGM layout), the
            diffusers pipeline directory whose configs and tokenizer it takes.
        variant: read the ``*.{variant}.safetensors`` weights (``"fp16"``...), of every component.
        delta: a directory of weight differences to add (``W = W_base + dW``, in float32, then
            cast): to the model, or to a pipeline's velocity model (its ``unet``, PeRFlow's delta
            weights). Its keys must match exactly.
        delta_variant: which weights file of ``delta``, when it holds several.
        loras: LoRA files to merge (``file``, ``(file, scale)`` or ``"file:scale"``; summed):
            into the model, or into each pipeline component their keys name (a key that fits
            no component's weight is an error).
        allow_nonfinite: convert weights with NaN or inf values (by default an error naming
            the tensor: such a model samples NaN).
        quantize: ``"fp8"``: write the velocity model (a pipeline's transformer or unet) as
            ``sf.quantize(model, "fp8")`` makes it, e4m3 weights with scales, part by part (LoRAs
            and deltas merged first); ``load`` restores it quantized. Other components keep
            ``dtype``.
        calibrate: with ``quantize="fp8"`` and a pipeline: prompts (a list of strings) the
            converted pipeline generates, at ``calibration_steps`` (default: the pipeline's),
            to measure static activation scales (``PromptPipeline.calibrate``); the velocity
            model is written with them (TensorRT builds it). Nothing is written if it fails.

    Returns:
        The output path.

    Raises:
        ConversionError: the source does not fit (the message names the file and the key).
    """
    src, dst = Path(src), Path(dst).absolute()
    cast = resolve_dtype(dtype)
    _check_delta_variant(delta, delta_variant)
    if quantize is not None and quantize != "fp8":
        raise ConversionError(f"unsupported quantization mode {quantize!r} (supported: fp8)")
    if calibrate is not None:
        prompts = _calibration_prompts(calibrate, quantize, src, config, calibration_steps)
        with atomic_dir(dst) as tmp:
            staged = convert(src, tmp / "converted", dtype=dtype, progress=progress, config=config, variant=variant,
                             delta=delta, delta_variant=delta_variant, loras=loras, allow_nonfinite=allow_nonfinite,
                             quantize=quantize)
            calibrate_converted(staged, prompts, steps=calibration_steps, progress=progress)
            for item in staged.iterdir():
                item.rename(tmp / item.name)
            staged.rmdir()
        return dst
    reading = dict(variant=variant, delta=delta, delta_variant=delta_variant)
    if src.is_file() and isinstance(config, str | Path) and (Path(config) / "model_index.json").is_file():
        if variant is not None:
            raise ConversionError(f"{src}: variant={variant!r} picks files in a directory; a single file is read as is")
        return _convert_single_file_pipeline(src, dst, Path(config), cast, progress, delta=delta,
                                             delta_variant=delta_variant, loras=loras, allow_nonfinite=allow_nonfinite,
                                             quantize=quantize)
    if isinstance(config, str | Path):
        raise ConversionError(f"{config}: config is a dict of fields, or for a single-file pipeline checkpoint a "
                              "diffusers pipeline directory (model_index.json)")
    if src.is_file() or (src / "config.json").is_file():
        if not src.is_file():
            check_model_source(src)
        p, _ = plan_source(src, config=config, **reading)  # everything checked before dst is touched
        p.allow_nonfinite = allow_nonfinite
        if loras:
            p.deltas = merged_deltas(p.family, p.config, p.targets, loras, strict_other=True)
        layers = _fp8_layers_of(p) if quantize else ()  # a family without a rule: refused before dst
        with atomic_dir(dst) as tmp:
            _write_plan(p, tmp, cast, str(src.absolute()), progress, layers)
        return dst
    check_model_source(src)
    if config is not None:
        raise ConversionError(f"{src}: config= overrides one model's fields; this is a pipeline: convert its "
                              "component directory with config=, or edit that component's config.json")
    components = pipeline_components(src)
    refuse_missing_components(src, components)
    velocity = [n for n, kind in components.items() if kind in FAMILIES and FAMILIES[kind].kind == "velocity"]
    if delta is not None and not velocity:
        raise ConversionError(f"{src}: a delta goes to a pipeline's velocity model (its unet), and this pipeline "
                              "has none")
    if quantize and not velocity:
        raise ConversionError(f"{src}: quantize={quantize!r} applies to a pipeline's velocity model (transformer or "
                              "unet), and this pipeline has none")
    plans = {name: plan_source(src / name, variant=component_variant(src, name, variant),
                               delta=delta if name in velocity[:1] else None, delta_variant=delta_variant)[0]
             for name, kind in components.items() if kind != "config-only" and not kind.startswith("skip:")}
    for p in plans.values():
        p.allow_nonfinite = allow_nonfinite
    if loras:
        _lora_into_components(plans, loras)
    fp8 = {name: _fp8_layers_of(plans[name]) for name in velocity if quantize}
    with atomic_dir(dst) as tmp:
        record = {"converted": {}, "copied": [], "skipped": {}}
        if fp8:
            record["quantized"] = {name: quantize for name in fp8}
        for name, kind in components.items():
            if kind == "config-only":
                shutil.copytree(src / name, tmp / name)
                record["copied"].append(name)
            elif kind.startswith("skip:"):
                record["skipped"][name] = kind.removeprefix("skip: ")
            else:
                _write_plan(plans[name], tmp / name, cast, str((src / name).absolute()), progress, fp8.get(name, ()))
                record["converted"][name] = kind
        if not record["converted"]:
            raise ConversionError(f"{src}: no supported component ({record['skipped']})")
        for f in sorted(src.iterdir()):  # model_index.json and small side files; not root-level checkpoints
            if f.is_file() and f.stat().st_size <= ROOT_FILE_LIMIT:
                shutil.copy(f, tmp / f.name)
            elif f.is_file():
                record["skipped"][f.name] = f"root-level file over {_size(ROOT_FILE_LIMIT)}"
        (tmp / "conversion.json").write_text(json.dumps(record, indent=2) + "\n")
    return dst


def _size(n: int) -> str:
    return f"{n / 2**20:g} MiB" if n >= 2**20 else f"{n / 2**10:g} KiB"


def _lora_into_components(plans: dict[str, ConversionPlan], loras) -> None:
    """Each LoRA key into the component it names; one that fits none is an error."""
    for path, scale in parse_loras(loras):
        tensors, metadata = read_lora_file(path)
        left = set(tensors) - {k for k in tensors if k.endswith(".alpha")}
        prefixes = component_prefixes()
        unnamed = [k for k in left if not any(_names_component(k, c, prefixes) for c in prefixes)]
        if unnamed:
            raise ConversionError(f"{path}: LoRA key(s) name no pipeline component (e.g. {sorted(unnamed)[0]!r}; "
                                  "expected unet., transformer., text_encoder... or kohya's lora_unet_/lora_te_): "
                                  "merge it into one model with sf.load(..., loras=...)")
        for name, p in plans.items():
            deltas, _ = lora_deltas(p.family, p.config, p.targets,
                                    {k: v for k, v in tensors.items() if k in left or k.endswith(".alpha")},
                                    metadata, name, source=f"{path} ({name})", scale=scale)
            for k, d in deltas.items():
                p.deltas[k] = p.deltas.get(k, 0) + d
            taken = {k for k in left if _names_component(k, name, prefixes)}
            left -= taken
        if left:
            raise ConversionError(f"{path}: LoRA key(s) for no component of this pipeline: {sorted(left)[:5]}")


def _names_component(key: str, component: str, prefixes: dict[str, tuple[str, ...]]) -> bool:
    return key.startswith(f"{component}.") or any(key.startswith(p) for p in prefixes.get(component, ()))


def component_variant(pipeline_dir, name: str, variant: str | None) -> str | None:
    """The weights variant a pipeline component reads, by diffusers' rule for
    ``from_pretrained(variant=)``: a component with ``*.{variant}.*`` weight files reads them,
    one without reads its default weights (a VAE swapped in, a T5 shipped once); a pipeline none
    of whose components has them is an error."""
    if variant is None:
        return None
    root = Path(pipeline_dir)

    def has(d: Path) -> bool:
        return d.is_dir() and any(f".{variant}." in f.name for f in d.iterdir() if f.is_file())

    if has(root / name):
        return variant
    if not any(has(d) for d in root.iterdir() if d.is_dir()):
        raise ConversionError(f"{root}: variant={variant!r}, and no component has such weights "
                              f"(*.{variant}.safetensors)")
    return None


def loras_by_component(loras, present: Iterable[str] | None = None) -> dict[str, list[tuple[Path, float]]]:
    """A pipeline's LoRA files (``loras=`` as ``convert`` takes them) by the components their
    keys name (``unet.``/``transformer.``/``text_encoder_2.``..., or kohya's ``lora_unet_``/
    ``lora_te1_``...), among the pipeline's components ``present`` (default: any): what
    ``Pipeline.from_diffusers(loras=)`` merges into each component it loads. A key that names
    no component (of ``present``) is an error, as in ``convert``."""
    prefixes = component_prefixes()
    present = set(prefixes) if present is None else set(present) & set(prefixes)
    out: dict[str, list[tuple[Path, float]]] = {}
    for path, scale in parse_loras(loras):
        keys = [k for k in lora_keys(path) if not k.endswith(".alpha")]
        unnamed = [k for k in keys if not any(_names_component(k, c, prefixes) for c in prefixes)]
        if unnamed:
            raise ConversionError(f"{path}: LoRA key(s) name no pipeline component (e.g. {sorted(unnamed)[0]!r}; "
                                  "expected unet., transformer., text_encoder... or kohya's lora_unet_/lora_te_): "
                                  "merge it into one model with sf.load(..., loras=...)")
        elsewhere = [k for k in keys if not any(_names_component(k, c, prefixes) for c in present)]
        if elsewhere:  # kohya's lora_unet_ names a UNet or a transformer: one of them will do
            named = sorted(c for c in prefixes if _names_component(elsewhere[0], c, prefixes))
            raise ConfigError(f"{path}: LoRA key(s) for {' or '.join(named)} (e.g. {elsewhere[0]!r}), which this "
                              f"pipeline does not have (its components: {', '.join(sorted(present))})")
        for component in sorted(present):
            if any(_names_component(k, component, prefixes) for k in keys):
                out.setdefault(component, []).append((path, scale))
    return out


def saved_activation_scales(path) -> str | None:
    """How the FP8 model saved at ``path`` (a converted model, or a converted pipeline's velocity
    component) scales its activations: ``"static"``, ``"dynamic"``, or None (not FP8, or not a
    converted checkpoint). Reads ``config.json`` files only."""
    path = Path(path)
    configs = [path / "config.json", *sorted(path.glob("*/config.json"))] if path.is_dir() else []
    for cfg in configs:
        try:
            meta = json.loads(cfg.read_text()).get(META_KEY)
        except (OSError, ValueError, AttributeError):
            continue
        quantization = meta.get("quantization") if isinstance(meta, dict) else None
        if isinstance(quantization, dict):
            return "static" if quantization.get("activation_scales") == "static" else "dynamic"
    return None


def _calibration_prompts(calibrate, quantize, src: Path, config, steps) -> list[str]:
    """``convert``'s ``calibrate`` (and ``calibration_steps``), checked before anything is written."""
    from streamflow_jax.pipelines.base import check_prompts

    if quantize != "fp8":
        raise ConversionError("calibrate measures FP8 activation scales: it needs quantize='fp8'")
    pipeline = (src / "model_index.json").is_file() or (
        src.is_file() and isinstance(config, str | Path) and (Path(config) / "model_index.json").is_file())
    if not pipeline:
        raise ConversionError(f"{src}: calibrate runs prompts through a pipeline (model_index.json), and this is a "
                              "single model; quantize it and call sf.calibrate(model, run) with your own inputs")
    try:
        if steps is not None:
            schedules.check_steps(steps)
    except ValueError as e:
        raise ConversionError(f"calibration_steps: {e}") from None
    from streamflow_jax.pipelines.base import pipeline_class

    pipeline_dir = src if src.is_dir() else Path(config)
    try:  # what loading the converted pipeline to calibrate it reads: refused now, not after converting
        pipeline_class(pipeline_dir)
        schedules.read_scheduler(pipeline_dir)
    except ConfigError as e:
        raise ConversionError(f"calibrate runs the converted pipeline, and it would not load: {e}") from None
    try:
        return check_prompts(calibrate)
    except ValueError as e:
        raise ConversionError(f"calibrate: {e}") from None


def calibrate_converted(path, prompts, *, steps: int | None = None, progress: bool = False) -> str:
    """Calibrates the FP8 velocity model of the converted pipeline at ``path`` in place
    (``PromptPipeline.calibrate`` on ``prompts``) and records it in ``conversion.json``.
    Returns the component's name."""
    import os

    from streamflow_jax.pipelines import Pipeline

    path = Path(path)
    record_path = path / "conversion.json"
    record = json.loads(record_path.read_text())
    names = list(record.get("quantized", {}))
    if len(names) != 1:
        raise ConversionError(f"{path}: calibration needs a pipeline whose velocity model is quantized (FP8)")
    name = names[0]
    pipe = Pipeline.from_diffusers(path)
    pipe.calibrate(prompts, steps=steps, progress=progress)
    meta = json.loads((path / name / "config.json").read_text()).get(META_KEY, {})
    staged = save(pipe.model, path / f".{name}.calibrated", source=meta.get("source"))
    old = path / f".{name}.uncalibrated"
    os.rename(path / name, old)
    os.rename(staged, path / name)
    shutil.rmtree(old)
    record["calibrated"] = {name: {"prompts": len(prompts), "steps": steps}}
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    return name


def _convert_single_file_pipeline(src: Path, dst: Path, pipeline_dir: Path, cast, progress: bool, *,
                                  delta=None, delta_variant: str | None = None, loras=None,
                                  allow_nonfinite: bool = False, quantize: str | None = None) -> Path:
    """A whole pipeline in one file (the LDM layout of SD 1.x/2.x, ``model.diffusion_model.*``,
    ``first_stage_model.*``, ``cond_stage_model.transformer.*`` or OpenCLIP's ``cond_stage_model.model.*``;
    SDXL's SGM layout with ``conditioner.embedders.N.*``; see ``models.sd_ldm``): each component's tensors are
    mapped to diffusers keys and converted with the configs of ``pipeline_dir`` (as diffusers'
    ``from_single_file(config=...)``), whose configuration-only parts (tokenizer, scheduler,
    ``model_index.json``) are copied. A ``delta`` goes to the UNet, ``loras`` to the components
    their keys name, as for a pipeline directory."""
    from streamflow_jax.converters.ldm import ldm_pipeline_sources  # read only for single files

    sources = ldm_pipeline_sources(src, pipeline_dir)  # {component: (raw config, source)}, all checked
    refuse_missing_components(pipeline_dir, exclude=sources)  # the file's own components are not missing
    if delta is not None:
        if "unet" not in sources:
            raise ConversionError(f"{src}: a delta goes to the unet, and this file holds none")
        raw, base = sources["unet"]
        sources["unet"] = raw, DeltaSource(base, weights_file(delta, delta_variant), source=f"{src} + delta {delta}")
    plans = {name: plan(raw, source, source=f"{src} ({name})") for name, (raw, source) in sources.items()}
    for p in plans.values():
        p.allow_nonfinite = allow_nonfinite
    if loras:
        _lora_into_components(plans, loras)
    fp8 = {name: _fp8_layers_of(p) for name, p in plans.items() if quantize and p.family.kind == "velocity"}
    with atomic_dir(dst) as tmp:
        record = {"converted": {}, "copied": [], "skipped": {}}
        if fp8:
            record["quantized"] = {name: quantize for name in fp8}
        for name, p in plans.items():
            _write_plan(p, tmp / name, cast, f"{src.absolute()} ({name})", progress, fp8.get(name, ()))
            record["converted"][name] = p.class_name
        for name, kind in pipeline_components(pipeline_dir).items():
            if name in plans:  # written from the single file (a configs-only directory lists it as config-only)
                continue
            if kind == "config-only":
                shutil.copytree(pipeline_dir / name, tmp / name)
                record["copied"].append(name)
            else:
                record["skipped"][name] = "not in the single file" if not kind.startswith("skip:") else kind[6:]
        shutil.copy(pipeline_dir / "model_index.json", tmp / "model_index.json")
        (tmp / "conversion.json").write_text(json.dumps(record, indent=2) + "\n")
    return dst


# components a prompt pipeline runs on: named in model_index.json and absent, the download is
# incomplete (diffusers' from_pretrained refuses it too); others (safety checker, feature
# extractor, image encoder) are not used here and may be left out
NEEDED_COMPONENTS = ("transformer", "unet", "vae", "text_encoder", "tokenizer", "scheduler")


def refuse_missing_components(src: Path, components: dict[str, str] | None = None, exclude=(),
                              error: type[ValueError] = ConversionError) -> None:
    """Raises ``error`` naming every component a pipeline runs on that ``model_index.json``
    names and ``src`` lacks (``pipeline_components``' ``missing`` kind; ``exclude``: names
    supplied elsewhere): an incomplete download, refused by convert and by the pipelines'
    loader (an SD3 without its T5 directory sampled with zeros for T5's embeddings)."""
    components = pipeline_components(src) if components is None else components
    missing = [kind.removeprefix("missing: ") for name, kind in components.items()
               if kind.startswith("missing: ") and name not in exclude]
    if missing:
        raise error(f"{src}: " + "; ".join(missing))


def pipeline_components(src: Path) -> dict[str, str]:
    """Each component of a pipeline directory: its class (convertible), ``"config-only"``
    (no weights: scheduler, tokenizer, feature extractor), ``"missing: reason"`` (one the
    pipeline runs on, named in ``model_index.json`` and absent), or ``"skip: reason"``."""
    index = read_json(src / "model_index.json")
    out = {}
    # components are [library, class] pairs; other entries are pipeline settings
    # (requires_safety_checker, force_zeros_for_empty_prompt...), not components
    names = [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and len(v) == 2]
    for name in sorted(names):
        sub = src / name
        weights = sorted(p.name for p in sub.glob("*.safetensors")) if sub.is_dir() else []
        if not sub.is_dir() and index[name] == [None, None]:
            out[name] = "skip: none in this pipeline ([null, null] in model_index.json)"
        elif not sub.is_dir() and name.startswith(NEEDED_COMPONENTS):
            out[name] = (f"missing: model_index.json names {name} ({index[name][1]}) and {sub} does not exist "
                         "(an incomplete download? a pipeline without it lists it as [null, null])")
        elif not sub.is_dir():
            out[name] = "skip: not present"
        elif not weights and not any(sub.glob("*.bin")):
            out[name] = "config-only"
        elif not weights:
            out[name] = "skip: only .bin (pickle) weights; safetensors needed"
        elif not (sub / "config.json").is_file():
            out[name] = "skip: no config.json"
        else:
            cls = class_name_of(read_json(sub / "config.json"))
            out[name] = cls if cls in FAMILIES else f"skip: unsupported class {cls}"
    return out


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def _component_dir(path: Path, component: str | None) -> Path:
    """A pipeline directory's component (default: its velocity model); any other path as is."""
    if (path / "model_index.json").is_file() and not (path / "config.json").is_file():
        if component is None:
            component = next((c for c in VELOCITY_COMPONENTS if (path / c / "config.json").is_file()), None)
            if component is None:
                raise ConversionError(f"{path}: pipeline has no {' or '.join(VELOCITY_COMPONENTS)}; name a component")
        if not (path / component).is_dir():
            raise ConversionError(f"{path}: no component {component!r}")
        return path / component
    return path


def _restore(params_dir: Path, shapes: dict, place: Callable | None) -> dict[str, jax.Array]:
    """Restores every parameter straight into an array placed by ``place(name, abstract)``; with
    no ``place``, a part at a time into host memory and then onto the default device, as
    ``FlowModel.from_params`` places a diffusers checkpoint's weights (uncommitted arrays: one
    set of compiled programs serves a model however it was loaded, and what it computes)."""
    index_file = params_dir / PARTS_INDEX
    if not index_file.is_file():
        raise ConversionError(f"{params_dir}: no {PARTS_INDEX} (written by an older streamflow-jax, or incomplete); "
                              "convert the checkpoint again")
    with _checkpointer() as ckpt:
        index = json.loads(index_file.read_text())
        listed = {n: part for part, names in index["parts"].items() for n in names}
        if set(listed) != set(shapes):
            odd = sorted(set(listed) ^ set(shapes))[:5]
            raise ConversionError(f"{params_dir}: parameters do not match the model (differing keys {odd})")
        out = {}
        for part, names in index["parts"].items():
            targets = {}
            for n in names:
                abstract = jax.ShapeDtypeStruct(shapes[n].shape, np.dtype(index["dtypes"][n]))
                targets[n] = (np.empty(abstract.shape, abstract.dtype) if place is None else
                              jax.ShapeDtypeStruct(abstract.shape, abstract.dtype, sharding=place(n, abstract)))
            restored = ckpt.restore(params_dir / part, targets)
            out.update(restored if place is not None else {n: jnp.asarray(a) for n, a in restored.items()})
        return out


def load(path, dtype=None, *, component: str | None = None, progress: bool = False,
         config: dict | None = None, sharding: Callable[[str, jax.ShapeDtypeStruct], object] | None = None,
         variant: str | None = None, delta=None, delta_variant: str | None = None, loras=None,
         mesh=None, strategy: str = "fsdp", prediction_type: str | None = None, num_time_windows: int | None = None,
         scheduler: schedules.Scheduler | None = None, allow_nonfinite: bool = False) -> FlowModel:
    """Loads a converted directory, or converts a diffusers directory (or single file) in memory.

    Args:
        path: a directory written by ``convert``, a diffusers model/pipeline directory, or a
            single safetensors file in a published layout.
        dtype: cast floating-point parameters to this dtype (``None`` keeps them).
        component: for a pipeline directory, which one (default: its velocity model, the
            ``transformer`` or ``unet``).
        config: config fields overriding a diffusers directory's or a single file's.
        sharding: ``(parameter name, abstract array) -> jax.sharding.Sharding`` placing each
            restored weight (default: the default device, as a diffusers directory's weights).
        variant, delta, delta_variant: as ``convert``'s, for a diffusers directory.
        loras: LoRA files merged into the loaded model (``file``, ``(file, scale)`` or
            ``"file:scale"``); the file's keys for ``component`` (default: the model's). Or a
            mapping of components to such lists (``loras_by_component``): this component's.
        mesh, strategy: place the weights on a ``("data", "model")`` mesh (``sharding.make_mesh``)
            by ``"replicate"``, ``"fsdp"`` or ``"tensor"``: a converted directory is restored
            straight into each weight's shards, never whole on one device or the host.
        prediction_type, num_time_windows: a model that predicts noise (a PeRFlow UNet) becomes a
            velocity field through the adapter its pipeline's scheduler describes; these override
            the scheduler config (PeRFlow's hub layout ships its base model's scheduler), or,
            for a UNet directory without a pipeline, say what it predicts.
        scheduler: the scheduler record to take the adapter from, instead of reading it.
        allow_nonfinite: convert weights with NaN or inf values (an error otherwise).

    With ``$STREAMFLOW_JAX_SCAN_BLOCKS=on`` the model comes back with its repeated blocks
    scanned (``FlowModel.with_scanned_blocks``; a measurement switch, ``ops.scan_blocks_choice``).
    """
    scan = ops.scan_blocks_choice()  # a bad value is refused before anything is read
    if sharding is not None and mesh is not None:  # one was ignored, which one by the source's kind
        raise ValueError("give sharding= (each weight's placement) or mesh= (with strategy=), not both")
    if strategy not in STRATEGIES:  # also without a mesh: a misspelt strategy is not silently unused
        raise ValueError(f"unknown strategy {strategy!r} (choose from {', '.join(STRATEGIES)})")
    if mesh is not None:
        check_mesh(mesh)
    if component is not None and (Path(path) / "model_index.json").is_file() \
            and not (Path(path) / component / PARAMS_DIR).is_dir():  # a diffusers pipeline (converted: refused later)
        variant = component_variant(path, component, variant)  # diffusers' rule for a pipeline's components
    if component is not None and not loras and not (Path(path) / "model_index.json").is_file():
        raise ConversionError(f"{path}: not a pipeline directory (no model_index.json), so component={component!r} "
                              "names nothing (with loras=, it names the LoRA files' component); load the model "
                              "directory itself")
    model = _load(path, dtype, component=component, progress=progress, config=config, sharding=sharding,
                  variant=variant, delta=delta, delta_variant=delta_variant, mesh=mesh, strategy=strategy,
                  allow_nonfinite=allow_nonfinite)
    if isinstance(loras, Mapping):  # a pipeline's files by component (loras_by_component): this one's keys
        if mine := loras.get(component or model.family.component):
            with warnings.catch_warnings():  # the files' other keys are for the pipeline's other components
                warnings.filterwarnings("ignore", message=r".*LoRA key\(s\) are for other components")
                model = apply_loras(model, mine, component=component)
    elif loras:
        model = apply_loras(model, loras, component=component)
    model = _with_adapter(model, Path(path), scheduler, prediction_type, num_time_windows)
    return model.with_scanned_blocks() if scan else model


def _with_adapter(model: FlowModel, path: Path, scheduler, prediction_type, num_time_windows) -> FlowModel:
    """A noise-predicting model with the velocity adapter of its scheduler (see ``load``)."""
    overrides = prediction_type is not None or num_time_windows is not None
    if model.family.predicts == "velocity":
        if overrides:
            raise ConfigError(f"{path}: prediction_type and num_time_windows (--prediction-type, --windows) apply to "
                              f"UNets run as PeRFlow/InstaFlow, not to {model.class_name}")
        return model
    from streamflow_jax.models.perflow import PeRFlowAdapter  # the one adapter there is

    if scheduler is None:
        pipeline = (path / "model_index.json").is_file()
        if pipeline and (path / schedules.SCHEDULER_FILE).is_file():
            raw = read_json(path / schedules.SCHEDULER_FILE)
            if not overrides and raw.get("_class_name") in schedules.BASE_SCHEDULERS:
                return model  # a base model's scheduler: no adapter unless asked (velocity() says how)
            scheduler = schedules.read_scheduler(path, prediction_type=prediction_type,
                                                 num_time_windows=num_time_windows)
        elif (saved := _saved_adapter(path)) is not None:  # written by save()
            changes = {k: v for k, v in (("prediction_type", prediction_type), ("num_windows", num_time_windows))
                       if v is not None}
            try:
                return model.with_adapter(dataclasses.replace(saved, **changes))
            except ValueError as e:
                raise ConfigError(f"{path}: {e}") from None
        elif overrides:
            scheduler = schedules.parse_scheduler({"_class_name": "PeRFlowScheduler"}, prediction_type=prediction_type,
                                                  num_time_windows=num_time_windows, source=str(path))
        else:
            return model
    if not scheduler.perflow:
        raise ConfigError(f"{path}: {model.class_name} predicts noise, and the scheduler {scheduler.class_name} gives "
                          "no PeRFlow/InstaFlow prediction_type to make it a velocity field")
    return model.with_adapter(PeRFlowAdapter.from_scheduler(scheduler))


def _saved_adapter(path: Path):
    """The velocity adapter ``save`` wrote into ``path/config.json``, or None."""
    from streamflow_jax.models.perflow import PeRFlowAdapter

    cfg = path / "config.json"
    raw = read_json(cfg) if cfg.is_file() else {}
    saved = raw.get(META_KEY, {}).get("adapter") if isinstance(raw.get(META_KEY), dict) else None
    if saved is None:
        return None
    fields = {f.name for f in dataclasses.fields(PeRFlowAdapter)}
    if not isinstance(saved, dict) or saved.get("class") != "PeRFlowAdapter" or not set(saved) - {"class"} <= fields:
        raise ConfigError(f"{cfg}: {META_KEY}.adapter is not a PeRFlowAdapter record: {saved!r}")
    try:
        return PeRFlowAdapter(**{k: v for k, v in saved.items() if k != "class"})
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{cfg}: {META_KEY}.adapter: {e}") from None


def read_model_config(path) -> tuple[object, object]:
    """``(family, config)`` of a model directory, converted (our ``config.json``) or diffusers'."""
    path = Path(path)
    raw = read_json(path / "config.json")
    if META_KEY in raw:
        family = family_of(raw.get("_class_name"))
        fields = {f.name for f in dataclasses.fields(family.config_cls)}
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items() if k in fields}
        check_config_types(family.config_cls, values, path / "config.json")
        return family, family.config_cls(**values)
    return parse_config(raw, source=str(path))


def _quantized_structure(cfg_path, class_name, model_config, fam, graphdef, abstract_state, quantization):
    """The abstract ``(graphdef, state)`` of a model saved quantized (its ``config.json`` lists
    the FP8 layers)."""
    from streamflow_jax.quantization import quantized_structure

    mode, layers, scales, attention = (quantization.get(k) if isinstance(quantization, dict) else None
                                       for k in ("mode", "layers", "activation_scales", "attention_scales"))
    if not (isinstance(layers, list) and layers and all(isinstance(n, str) for n in layers)):
        raise ConversionError(f"{cfg_path}: {META_KEY}.quantization.layers must be a list of layer names")
    abstract = FlowModel(class_name, model_config, graphdef, abstract_state, family=fam)
    try:
        abstract = quantized_structure(abstract, mode, layers, scales or "dynamic", attention)
    except ValueError as e:
        raise ConversionError(f"{cfg_path}: {META_KEY}.quantization: {e}") from None
    return abstract.graphdef, abstract.state


def _check_delta_variant(delta, delta_variant) -> None:
    if delta_variant is not None and delta is None:
        raise ConversionError(f"delta_variant={delta_variant!r} picks a file of delta=, and no delta is given")


def _load(path, dtype, *, component, progress, config, sharding, variant, delta, delta_variant, mesh,
          strategy, allow_nonfinite) -> FlowModel:
    _check_delta_variant(delta, delta_variant)
    path = _component_dir(Path(path), component)
    cfg_path = path / "config.json"
    raw = None
    if path.is_dir() and cfg_path.is_file():
        try:
            raw = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise ConversionError(f"{cfg_path}: not valid JSON ({e})") from None
    if not (isinstance(raw, dict) and META_KEY in raw):
        p, _ = plan_source(path, config=config, variant=variant, delta=delta, delta_variant=delta_variant)
        p.allow_nonfinite = allow_nonfinite
        model = p.model(resolve_dtype(dtype), progress)
        return shard(model, mesh, strategy) if mesh is not None else model
    if variant is not None or delta is not None or config is not None:
        raise ConversionError(f"{path}: already converted; variant, delta and config apply to diffusers directories")
    if not isinstance(raw[META_KEY], dict):
        raise ConversionError(f"{cfg_path}: {META_KEY} must be an object (what convert wrote), got "
                              f"{json.dumps(raw[META_KEY])[:100]}")

    class_name = raw.get("_class_name")
    try:
        fam, model_config = read_model_config(path)
    except ValueError as e:
        raise ConversionError(f"{cfg_path}: {e}") from None
    graphdef, abstract_state = abstract_split(fam, model_config)
    quantization = raw[META_KEY].get("quantization")
    if quantization:  # saved quantized: restore into the quantized structure
        graphdef, abstract_state = _quantized_structure(cfg_path, class_name, model_config, fam, graphdef,
                                                        abstract_state, quantization)
    shapes, treedef, names = flat_params(nnx.to_pure_dict(abstract_state))
    params_dir = (path / PARAMS_DIR).absolute()
    if not params_dir.is_dir():
        raise ConversionError(f"{params_dir}: missing (incomplete converted checkpoint)")
    if sharding is None and mesh is not None:
        heads = attention_heads(nnx.merge(graphdef, abstract_state)) if strategy == "tensor" else None
        sharding = placement(mesh, strategy, fam.logical_axes, heads)  # as shard() places them
    place = sharding
    try:
        flat = _restore(params_dir, shapes, place)
    except ConversionError:
        raise
    except Exception as e:  # orbax raises many types; name the directory and pass the reason on
        raise ConversionError(f"{params_dir}: cannot restore parameters ({type(e).__name__}: {e})") from None
    for n in names:
        if tuple(flat[n].shape) != tuple(shapes[n].shape):
            raise ConversionError(f"{params_dir}: {n!r} has shape {flat[n].shape}, expected {shapes[n].shape}")
    if mesh is not None and getattr(place, "replicated", None):  # as shard() says it
        warn_replicated(class_name, mesh, strategy, place.replicated, len(names), stacklevel=4)
    state = jax.tree_util.tree_unflatten(treedef, [flat[n] for n in names])
    nnx.replace_by_pure_dict(abstract_state, state)
    model = FlowModel(class_name, model_config, graphdef, abstract_state, family=fam)
    cast = resolve_dtype(dtype)
    return model.astype(cast) if cast is not None else model
