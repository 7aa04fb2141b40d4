"""Converted checkpoints on disk: ``config.json`` + an orbax ``params/`` directory.

``convert`` writes into a temporary sibling directory and renames it into place, so a failed
conversion leaves nothing behind. ``load`` takes a converted directory or, converting in
memory, a diffusers one.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from streamflow_jax._version import __version__
from streamflow_jax.converters import CONVERTER_VERSION, class_name_of, convert_diffusers, resolve_dtype
from streamflow_jax.converters.common import check_model_source, read_json
from streamflow_jax.errors import ConversionError
from streamflow_jax.fsutil import atomic_dir
from streamflow_jax.models import FAMILIES, FlowModel, abstract_module, family_of, flat_params

PARAMS_DIR = "params"
VELOCITY_COMPONENTS = ("transformer", "unet")  # what sf.load takes from a pipeline by default
ROOT_FILE_LIMIT = 16 << 20  # pipeline-root files copied by convert (configs, conditioning tables)
META_KEY = "streamflow_jax"  # present in our config.json, absent from diffusers'


def _write_model(model: FlowModel, out: Path, source: str | None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    config = {"_class_name": model.class_name, **dataclasses.asdict(model.config)}
    config[META_KEY] = {
        "version": __version__,
        "converter_version": CONVERTER_VERSION,
        "dtype": str(np.dtype(model.dtype)),
        "source": source,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    flat, _, _ = flat_params(nnx.to_pure_dict(model.state))
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(out / PARAMS_DIR, {k: np.asarray(v) for k, v in flat.items()})


def save(model: FlowModel, dst, *, source: str | None = None) -> Path:
    """Writes ``model`` to a new directory ``dst`` atomically (temporary dir + rename)."""
    dst = Path(dst).absolute()
    with atomic_dir(dst) as tmp:
        _write_model(model, tmp, source)
    return dst


def convert(src, dst, *, dtype=None, progress: bool = True) -> Path:
    """Converts a diffusers model or pipeline directory into a streamflow-jax directory.

    Args:
        src: a diffusers model directory (``config.json`` + safetensors, sharded or not; a
            transformers ``model.safetensors`` for text encoders), or a pipeline directory
            (``model_index.json``): every supported component is converted into ``dst/NAME``,
            configuration-only components (scheduler, tokenizer) and small root files are
            copied, the others are skipped, and ``dst/conversion.json`` lists which was which.
        dst: output directory; must not exist. Written atomically.
        dtype: ``None`` keeps the checkpoint's dtype; or ``"float32"``, ``"bfloat16"``, ``"float16"``.
        progress: show a progress bar over tensors.

    Returns:
        The output path.

    Raises:
        ConversionError: the source does not fit (the message names the file and the key).
    """
    src, dst = Path(src), Path(dst).absolute()
    check_model_source(src)
    if (src / "config.json").is_file():
        with atomic_dir(dst) as tmp:
            model, _ = convert_diffusers(src, dtype=dtype, progress=progress)
            _write_model(model, tmp, str(src.absolute()))
        return dst
    with atomic_dir(dst) as tmp:
        record = {"converted": {}, "copied": [], "skipped": {}}
        for name, kind in pipeline_components(src).items():
            if kind == "config-only":
                shutil.copytree(src / name, tmp / name)
                record["copied"].append(name)
            elif kind.startswith("skip:"):
                record["skipped"][name] = kind.removeprefix("skip: ")
            else:
                model, _ = convert_diffusers(src / name, dtype=dtype, progress=progress)
                _write_model(model, tmp / name, str((src / name).absolute()))
                record["converted"][name] = kind
        if not record["converted"]:
            raise ConversionError(f"{src}: no supported component ({record['skipped']})")
        for f in sorted(src.iterdir()):  # model_index.json and small side files; not root-level checkpoints
            if f.is_file() and f.stat().st_size <= ROOT_FILE_LIMIT:
                shutil.copy(f, tmp / f.name)
            elif f.is_file():
                record["skipped"][f.name] = f"root-level file over {ROOT_FILE_LIMIT >> 20} MiB"
        (tmp / "conversion.json").write_text(json.dumps(record, indent=2) + "\n")
    return dst


def pipeline_components(src: Path) -> dict[str, str]:
    """Each component of a pipeline directory: its class (convertible), ``"config-only"``
    (no weights: scheduler, tokenizer, feature extractor), or ``"skip: reason"``."""
    index = read_json(src / "model_index.json")
    out = {}
    for name in sorted(k for k in index if not k.startswith("_")):
        sub = src / name
        weights = sorted(p.name for p in sub.glob("*.safetensors")) if sub.is_dir() else []
        if not sub.is_dir():
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


def load(path, dtype=None, *, component: str | None = None, progress: bool = False) -> FlowModel:
    """Loads a converted directory, or converts a diffusers directory in memory.

    Args:
        path: a directory written by ``convert``, or a diffusers model/pipeline directory.
        dtype: cast floating-point parameters to this dtype (``None`` keeps them).
        component: for a pipeline directory, which one (default: its ``transformer`` or ``unet``).
    """
    path = Path(path)
    if (path / "model_index.json").is_file() and not (path / "config.json").is_file():
        if component is None:
            component = next((c for c in VELOCITY_COMPONENTS if (path / c / "config.json").is_file()), None)
            if component is None:
                raise ConversionError(f"{path}: pipeline has no {' or '.join(VELOCITY_COMPONENTS)}; name a component")
        if not (path / component).is_dir():
            raise ConversionError(f"{path}: no component {component!r}")
        path = path / component
    cfg_path = path / "config.json"
    raw = None
    if cfg_path.is_file():
        try:
            raw = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise ConversionError(f"{cfg_path}: not valid JSON ({e})") from None
    if not (isinstance(raw, dict) and META_KEY in raw):
        model, _ = convert_diffusers(path, dtype=dtype, progress=progress)
        return model

    class_name = raw.get("_class_name")
    try:
        fam = family_of(class_name)
    except ValueError as e:
        raise ConversionError(f"{cfg_path}: {e}") from None
    fields = {f.name for f in dataclasses.fields(fam.config_cls)}
    config = fam.config_cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items() if k in fields})
    _, abstract_state = nnx.split(abstract_module(fam, config))
    shapes, treedef, names = flat_params(nnx.to_pure_dict(abstract_state))
    params_dir = (path / PARAMS_DIR).absolute()
    if not params_dir.is_dir():
        raise ConversionError(f"{params_dir}: missing (incomplete converted checkpoint)")
    try:
        with ocp.StandardCheckpointer() as ckpt:
            flat = ckpt.restore(params_dir)
    except Exception as e:  # orbax raises many types; name the directory and pass the reason on
        raise ConversionError(f"{params_dir}: cannot restore parameters ({type(e).__name__}: {e})") from None
    if set(flat) != set(names):
        odd = sorted(set(flat) ^ set(names))[:5]
        raise ConversionError(f"{params_dir}: parameters do not match {class_name} (differing keys {odd})")
    for n in names:
        if tuple(flat[n].shape) != tuple(shapes[n].shape):
            raise ConversionError(f"{params_dir}: {n!r} has shape {flat[n].shape}, expected {shapes[n].shape}")
    params = jax.tree_util.tree_unflatten(treedef, [jnp.asarray(flat[n]) for n in names])
    model = FlowModel.from_params(fam, config, params, class_name=class_name)
    cast = resolve_dtype(dtype)
    return model.astype(cast) if cast is not None else model
