"""Reading diffusers checkpoints strictly, with safetensors + numpy (no torch).

Strict means: unknown config fields, missing tensors, unexpected tensors and mis-shaped
tensors each raise ``ConversionError`` naming the file and the key. Nothing here writes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Iterator, Mapping
from pathlib import Path

import ml_dtypes  # noqa: F401  (registers bfloat16/float8 with numpy so safetensors can return them)
import numpy as np
from safetensors import SafetensorError, safe_open

from streamflow_jax.errors import ConversionError
from streamflow_jax.models.family import WEIGHTS_INDEX_NAME, WEIGHTS_NAME

CONFIG_NAME = "config.json"
# Keys every diffusers config carries that describe the file, not the model.
META_PREFIX = "_"


def read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ConversionError(f"{path}: no such file") from None
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def config_from_dict(cls, raw: Mapping, *, source: Path, ignorable: Mapping | None = None,
                     any_value: frozenset = frozenset()):
    """Builds the family's config dataclass from a diffusers ``config.json``, strictly.

    Args:
        cls: the config dataclass; its field names are the diffusers config keys it understands.
        raw: the parsed ``config.json``.
        source: the file, for messages.
        ignorable: fields the model does not use, with the only value accepted for each.
        any_value: fields that never change the forward pass (generation or training
            settings), accepted with any value.
    """
    fields = {f.name for f in dataclasses.fields(cls)}
    ignorable = dict(ignorable or {})
    kwargs = {}
    for key, value in raw.items():
        if key.startswith(META_PREFIX) or (key in any_value and key not in fields):
            continue
        if key in fields:
            kwargs[key] = tuple(value) if isinstance(value, list) else value
        elif key in ignorable:
            if value != ignorable[key]:
                raise ConversionError(f"{source}: unsupported: {key}={value!r} (only {ignorable[key]!r} is implemented)")
        else:
            raise ConversionError(f"{source}: unknown config field {key!r}={value!r} for {raw.get('_class_name', cls.__name__)}")
    check_config_types(cls, kwargs, source)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConversionError(f"{source}: {e}") from None


# integer fields that may be 0 (every other integer is a count or a size: at least 1)
_INT_ZERO_OK = frozenset({"freq_shift", "downsample_padding", "eos_token_id", "dual_attention_layers"})


def _fits(value, kind, zero_ok: bool) -> bool:
    """Whether a config.json value (lists already tuples) is of the annotated ``kind``."""
    if kind is typing.Any:
        return True
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, k, zero_ok) for k in typing.get_args(kind))
    if kind is type(None):
        return value is None
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool) and value >= (0 if zero_ok else 1)
    if kind is float:
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if kind is str:
        return isinstance(value, str)
    if kind is tuple or origin is tuple:
        if not isinstance(value, tuple):
            return False
        args = typing.get_args(kind)
        if not args:  # a bare tuple: nested per-block lists (SDXL's layers per block), checked by the model
            return True
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_fits(v, args[0], zero_ok) for v in value)
        return len(args) == len(value) and all(_fits(v, k, zero_ok) for v, k in zip(value, args))
    return True  # a kind this check does not know: left to the config class


_NAMES = {int: ("an integer", "integers"), float: ("a number", "numbers"), str: ("a string", "strings"),
          bool: ("true or false", "booleans"), type(None): ("null", "nulls")}


def _describe(kind, plural: bool = False) -> str:
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(k, plural) for k in typing.get_args(kind))
    if kind is tuple or origin is tuple:
        args = typing.get_args(kind)
        inner = f" of {_describe(args[0], True)}" if len(args) == 2 and args[1] is Ellipsis else ""
        return f"lists{inner}" if plural else f"a list{inner}"
    return _NAMES.get(kind, (str(kind), str(kind)))[plural]


def check_config_types(cls, values: Mapping, source) -> None:
    """Refuses a config value that is not of its field's annotated type, naming the file and the
    key: a float where a count belongs (``num_layers: 4.5``), a string, a boolean taken for a
    number, a count below 1 (a size or a count of 0 or less; a few fields may be 0). Without it
    such values fail deep inside the model's construction, with a message about shapes."""
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        kind = hints.get(key)
        if kind is not None and not _fits(value, kind, key in _INT_ZERO_OK):
            want = _describe(kind)
            if "integer" in want:
                want += " (at least 0)" if key in _INT_ZERO_OK else " (a count or a size: at least 1)"
            raise ConversionError(f"{source}: {key} must be {want}, got {json.dumps(value)}")


def variant_names(names: tuple[str, str], variant: str | None) -> tuple[str, str]:
    """The (single file, shard index) names of a variant, as diffusers and transformers save
    them: ``diffusion_pytorch_model.fp16.safetensors``, ``...safetensors.index.fp16.json``."""
    if not variant:
        return names
    single, index = names
    return (single.replace(".safetensors", f".{variant}.safetensors"),
            index.replace(".index.json", f".index.{variant}.json"))


def weights_file(directory: Path, variant: str | None = None) -> TensorSource:
    """The one weights file of a directory, whatever its name (a delta checkpoint's
    ``diffusion_pytorch_model.v0-1.safetensors``); with several, ``variant`` picks
    ``*.{variant}.safetensors`` (or a sharded variant's index)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ConversionError(f"{directory}: not a directory")
    files = sorted(p for p in directory.glob("*.safetensors"))
    indexes = sorted(directory.glob("*.index*.json"))
    if variant is not None:
        chosen = [p for p in files if p.name.endswith(f".{variant}.safetensors")]
        if len(chosen) == 1:
            return TensorSource.for_file(chosen[0])
        index = [p for p in indexes if p.name.endswith(f".index.{variant}.json")]
        if len(index) == 1:
            stem = index[0].name.split(".safetensors.index")[0]
            return TensorSource.for_dir(directory, (f"{stem}.safetensors", f"{stem}.safetensors.index.json"), variant)
        raise ConversionError(f"{directory}: no weights of variant {variant!r} (found {', '.join(p.name for p in files)})")
    if len(files) == 1 and not indexes:
        return TensorSource.for_file(files[0])
    if not files:
        raise ConversionError(f"{directory}: no .safetensors file")
    raise ConversionError(f"{directory}: several weights files ({', '.join(p.name for p in files)}); name the "
                          "variant to use")


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what its header says (nothing read yet)."""

    path: Path
    shape: tuple[int, ...]
    dtype: str


class TensorSource:
    """The tensors of safetensors files, listed from their headers and read lazily.

    ``TensorSource.for_dir`` reads a model directory, single-file or sharded (``names`` is the
    (single file, shard index) pair to look for: diffusers' by default, transformers'
    ``model.safetensors`` for text encoders); ``TensorSource.for_file`` one file.
    """

    def __init__(self, where: dict[str, TensorInfo], origin: Path):
        self._where = where
        self.origin = origin

    @classmethod
    def for_file(cls, path) -> TensorSource:
        path = Path(path)
        return cls(cls._headers(path), path)

    @classmethod
    def for_dir(cls, model_dir, names: tuple[str, str] = (WEIGHTS_NAME, WEIGHTS_INDEX_NAME),
                variant: str | None = None) -> TensorSource:
        model_dir = Path(model_dir)
        names = variant_names(names, variant)
        single, index = model_dir / names[0], model_dir / names[1]
        if single.is_file():
            return cls(cls._headers(single), model_dir)
        if not index.is_file():
            found = sorted(p.name for p in model_dir.glob("*.safetensors"))
            stem = Path(names[0]).name.split(".")[0]  # diffusion_pytorch_model, model
            variants = sorted({n[len(stem) + 1:].split(".")[0].split("-")[0] for n in found
                               if variant is None and n.startswith(stem + ".") and n.count(".") >= 2})
            hint = (f"; these are the {' or '.join(variants)} variant's weights: give --variant {variants[0]} "
                    f"(convert, generate, serve; variant={variants[0]!r} to sf.convert, sf.load or "
                    "Pipeline.from_diffusers)" if variants else "")
            raise ConversionError(f"{model_dir}: no {names[0]} or {names[1]}"
                                  + (f" (found {', '.join(found)})" if found else "") + hint)
        weight_map = read_json(index).get("weight_map")
        if weight_map is None:
            raise ConversionError(f"{index}: missing 'weight_map'")
        if not (isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values())):
            raise ConversionError(f"{index}: 'weight_map' must map tensor names to shard file names, got "
                                  f"{json.dumps(weight_map)[:80]}")
        where: dict[str, TensorInfo] = {}
        for shard in sorted(set(weight_map.values())):
            path = model_dir / shard
            if not path.is_file():
                raise ConversionError(f"{index}: shard {shard!r} does not exist")
            for key, info in cls._headers(path).items():
                if key in where:  # the index names one shard; two holding it is a broken checkpoint
                    raise ConversionError(f"{index}: tensor {key!r} is in both {where[key].path.name} and {shard}")
                if weight_map.get(key, shard) != shard:
                    raise ConversionError(f"{index}: weight_map puts {key!r} in {weight_map[key]}, and it is in {shard}")
                where[key] = info
        if set(weight_map) != set(where):
            diff = sorted(set(weight_map) ^ set(where))
            raise ConversionError(f"{index}: weight_map disagrees with the shards' contents on {diff[:5]}")
        return cls(where, model_dir)

    @staticmethod
    def _headers(path: Path) -> dict[str, TensorInfo]:
        try:
            with safe_open(path, framework="numpy") as f:
                out = {}
                for key in f.keys():
                    sl = f.get_slice(key)
                    out[key] = TensorInfo(path, tuple(sl.get_shape()), str(sl.get_dtype()))
                return out
        except (SafetensorError, OSError) as e:
            if path.suffix.lower() not in (".safetensors", ".sft"):  # README.md, an image: a file given where a model goes
                raise ConversionError(f"{path}: not a safetensors file (give a model or pipeline directory, or a "
                                      f".safetensors checkpoint; {e})") from None
            raise ConversionError(f"{path}: unreadable safetensors file ({e})") from None

    def keys(self) -> list[str]:
        return list(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._where[key].shape

    def nbytes(self) -> int:
        """The files' total tensor bytes, from the headers."""
        size = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
        return sum(int(np.prod(t.shape)) * size.get(t.dtype, 4) for t in self._where.values())

    def items(self, keys: list[str]) -> Iterator[tuple[str, np.ndarray]]:
        """Yields ``(key, array)`` for ``keys``, grouped by file: each file is opened (memory
        mapped) once per call and closed after, so its pages do not stay mapped."""
        by_file: dict[Path, list[str]] = {}
        for key in keys:
            by_file.setdefault(self._where[key].path, []).append(key)
        for path, file_keys in by_file.items():
            try:
                with safe_open(path, framework="numpy") as f:
                    for key in file_keys:
                        yield key, f.get_tensor(key)
            except SafetensorError as e:
                raise ConversionError(f"{path}: cannot read tensor ({e})") from None


def check_model_source(src: Path) -> None:
    """Raises unless ``src`` is a directory holding a diffusers model or pipeline."""
    if not src.exists():
        raise ConversionError(f"{src}: no such file or directory")
    if not src.is_dir():
        raise ConversionError(f"{src}: not a directory (expected a diffusers model or pipeline directory)")
    if _converted_by_us(src):
        raise ConversionError(f"{src}: already converted by streamflow-jax; sf.load, generate, bench, export and serve "
                              "take it as it is (a dtype: sf.load(..., dtype=) or --dtype); convert the diffusers "
                              "original to convert again")
    if not (src / CONFIG_NAME).is_file() and not (src / "model_index.json").is_file():
        raise ConversionError(f"{src}: no {CONFIG_NAME} or model_index.json (not a diffusers directory)")


def _converted_by_us(src: Path) -> bool:
    """A directory ``sf.convert`` wrote: a pipeline's ``conversion.json``, or a model whose
    ``config.json`` carries this library's metadata (``checkpoint.META_KEY``)."""
    if (src / "conversion.json").is_file():
        return True
    try:
        return "streamflow_jax" in json.loads((src / CONFIG_NAME).read_text())
    except (OSError, ValueError, TypeError):
        return False


_KERNEL_AXES = {2: (1, 0), 4: (2, 3, 1, 0)}  # Linear [out, in] -> [in, out]; Conv [O, I, kh, kw] -> [kh, kw, I, O]


def mapped_shape(shape: tuple[int, ...], target_name: str) -> tuple[int, ...]:
    """The shape a PyTorch tensor of ``shape`` has once in its Flax counterpart's layout."""
    axes = _KERNEL_AXES.get(len(shape)) if target_name == "kernel" else None
    return tuple(shape[a] for a in axes) if axes else tuple(shape)


def map_tensor(key: str, array: np.ndarray, target_shape: tuple[int, ...], target_name: str) -> np.ndarray:
    """Turns one PyTorch tensor into the layout of its Flax counterpart.

    ``kernel`` targets are Linear (``[out, in] -> [in, out]``) or Conv
    (``[O, I, kh, kw] -> [kh, kw, I, O]``); everything else keeps its layout.
    """
    axes = _KERNEL_AXES.get(array.ndim) if target_name == "kernel" else None
    if axes:
        array = array.transpose(axes)
    if tuple(array.shape) != tuple(target_shape):
        raise ConversionError(f"tensor {key!r}: shape {tuple(array.shape)} does not fit the model's {tuple(target_shape)}")
    return np.ascontiguousarray(array)
