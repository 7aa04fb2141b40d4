"""Reading diffusers checkpoints strictly, with safetensors + numpy (no torch).

Strict means: unknown config fields, missing tensors, unexpected tensors and mis-shaped
tensors each raise ``ConversionError`` naming the file and the key. Nothing here writes.
"""

from __future__ import annotations

import dataclasses
import json
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
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConversionError(f"{source}: {e}") from None


class TensorSource:
    """The tensors of one model directory, single-file or sharded, read lazily.

    ``names`` is the (single file, shard index) pair to look for: diffusers' by default,
    ``("model.safetensors", "model.safetensors.index.json")`` for transformers models.
    """

    def __init__(self, model_dir: Path, names: tuple[str, str] = (WEIGHTS_NAME, WEIGHTS_INDEX_NAME)):
        self.model_dir = Path(model_dir)
        single = self.model_dir / names[0]
        index = self.model_dir / names[1]
        self._where: dict[str, Path] = {}
        if single.is_file():
            for key in self._keys_of(single):
                self._where[key] = single
        elif index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ConversionError(f"{index}: missing 'weight_map'")
            shards = sorted(set(weight_map.values()))
            for shard in shards:
                path = self.model_dir / shard
                if not path.is_file():
                    raise ConversionError(f"{index}: shard {shard!r} does not exist")
                for key in self._keys_of(path):
                    self._where[key] = path
            listed = set(weight_map)
            if listed != set(self._where):
                diff = sorted(listed ^ set(self._where))
                raise ConversionError(f"{index}: weight_map disagrees with the shards' contents on {diff[:5]}")
        else:
            found = sorted(p.name for p in self.model_dir.glob("*.safetensors"))
            raise ConversionError(
                f"{self.model_dir}: no {names[0]} or {names[1]}"
                + (f" (found {', '.join(found)})" if found else "")
            )

    @staticmethod
    def _keys_of(path: Path) -> list[str]:
        try:
            with safe_open(path, framework="numpy") as f:
                return list(f.keys())
        except (SafetensorError, OSError) as e:
            raise ConversionError(f"{path}: unreadable safetensors file ({e})") from None

    def keys(self) -> list[str]:
        return list(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        with safe_open(self._where[key], framework="numpy") as f:
            return tuple(f.get_slice(key).get_shape())

    def items(self, keys: list[str]) -> Iterator[tuple[str, np.ndarray]]:
        """Yields ``(key, array)`` in the given order, opening each file once per run of keys."""
        by_file: dict[Path, list[str]] = {}
        for key in keys:
            by_file.setdefault(self._where[key], []).append(key)
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
    if not (src / CONFIG_NAME).is_file() and not (src / "model_index.json").is_file():
        raise ConversionError(f"{src}: no {CONFIG_NAME} or model_index.json (not a diffusers directory)")


def map_tensor(key: str, array: np.ndarray, target_shape: tuple[int, ...], target_name: str) -> np.ndarray:
    """Turns one PyTorch tensor into the layout of its Flax counterpart.

    ``kernel`` targets are Linear (``[out, in] -> [in, out]``) or Conv
    (``[O, I, kh, kw] -> [kh, kw, I, O]``); everything else keeps its layout.
    """
    if target_name == "kernel":
        if array.ndim == 2:
            array = array.T
        elif array.ndim == 4:
            array = array.transpose(2, 3, 1, 0)
    if tuple(array.shape) != tuple(target_shape):
        raise ConversionError(f"tensor {key!r}: shape {tuple(array.shape)} does not fit the model's {tuple(target_shape)}")
    return np.ascontiguousarray(array)
