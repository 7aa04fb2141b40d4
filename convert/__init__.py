"""Checkpoint readers: diffusers/transformers directories and single files -> our parameters, strictly.

This package reads files; what the keys and config fields mean is each family's ``KeyMap``
(and its ``CheckpointLayout`` s for single files), declared beside its model (``models/*.py``).
It is imported as ``streamflow_jax.converters`` (``streamflow_jax/converters`` is a link to this
folder, see the README's Layout); users call ``streamflow_jax.convert`` / ``streamflow_jax.load``
or ``streamflow-jax convert``.

Conversion is planned before any tensor is read: every source key is matched to one module
parameter and every shape checked against it from the files' headers (``plan``). The plan
then reads the tensors in groups (``ConversionPlan.read``), so a checkpoint never has to be
held twice in memory.
"""

from __future__ import annotations

import dataclasses
import operator
import re
from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from streamflow_jax.errors import ConversionError
from streamflow_jax.models import FAMILIES, FlowModel, abstract_split, family_of, flat_params

from .common import (
    CONFIG_NAME,
    TensorSource,
    weights_file,
    check_model_source,
    config_from_dict,
    map_tensor,
    mapped_shape,
    read_json,
)

# Bumped whenever converted output changes meaning; stored in every converted config.json.
CONVERTER_VERSION = 2
DTYPES = {"float32": np.float32, "bfloat16": jax.numpy.bfloat16, "float16": np.float16}

__all__ = ["CONVERTER_VERSION", "ConversionError", "ConversionPlan", "class_name_of", "convert_diffusers",
           "convert_tensors", "plan", "plan_source", "read_config", "resolve_dtype"]


def resolve_dtype(dtype):
    """``None`` (keep the checkpoint's), a name from ``DTYPES``, or one of those as a numpy/jax
    dtype; anything else (int8, float64, FP8: ``sf.quantize`` makes FP8 models) is refused."""
    if dtype is None:
        return None
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ConversionError(f"unsupported dtype {dtype!r} (choose from {', '.join(DTYPES)})")
        return np.dtype(DTYPES[dtype])
    try:
        resolved = np.dtype(dtype)
    except TypeError:
        resolved = None
    if resolved is None or resolved not in {np.dtype(d) for d in DTYPES.values()}:
        raise ConversionError(f"unsupported dtype {dtype!r} (choose from {', '.join(DTYPES)})")
    return resolved


def class_name_of(raw: dict) -> str | None:
    """diffusers writes ``_class_name``; transformers writes ``architectures``. A name that is
    not a string comes back as its repr, which no family has (the caller says so)."""
    if raw.get("_class_name"):
        name = raw["_class_name"]
    else:
        arch = raw.get("architectures")
        name = arch[0] if isinstance(arch, list) and arch else None
    return name if name is None or isinstance(name, str) else repr(name)


def _family(raw: dict, source: str):
    class_name = class_name_of(raw)
    if class_name not in FAMILIES:
        raise ConversionError(f"{source}: unsupported model class {class_name!r} "
                              f"(supported: {', '.join(sorted(FAMILIES))})")
    return family_of(class_name)


def parse_config(raw: dict, *, source: str, config_source: str | None = None):
    """``(family, config)`` of a raw diffusers/transformers config dict, strictly.

    ``config_source`` names where the config came from in messages (default
    ``SOURCE/config.json``).
    """
    family = _family(raw, source)
    keys = family.keys
    if keys.prepare_config is not None:
        raw = keys.prepare_config(raw)
    config = config_from_dict(family.config_cls, raw, source=config_source or f"{source}/{CONFIG_NAME}",
                              ignorable=keys.ignorable, any_value=keys.any_value)
    return family, config


def read_config(model_dir):
    """``(family, config)`` of a diffusers model directory, without reading its weights."""
    model_dir = Path(model_dir)
    return parse_config(read_json(model_dir / CONFIG_NAME), source=str(model_dir))


# ---------------------------------------------------------------------------------------------
# Sources: what tensors there are, under the diffusers keys
# ---------------------------------------------------------------------------------------------


class DictSource:
    """A mapping of diffusers keys to arrays, read like a ``TensorSource``."""

    def __init__(self, tensors):
        self._tensors = tensors

    def keys(self):
        return list(self._tensors)

    def shape(self, key):
        return tuple(np.shape(self._tensors[key]))

    def items(self, keys):
        for key in keys:
            yield key, np.asarray(self._tensors[key])


class DeltaSource:
    """Base tensors plus a delta checkpoint's, key for key: ``W = W_base + dW`` added in
    float32 and cast back to the base tensor's dtype (PeRFlow's delta weights)."""

    def __init__(self, base, delta, *, source: str):
        self.base, self.delta = base, delta
        base_keys, delta_keys = set(base.keys()), set(delta.keys())
        if base_keys != delta_keys:
            only = sorted(base_keys - delta_keys)
            extra = sorted(delta_keys - base_keys)
            first = f"{only[0]!r} has no delta" if only else f"delta {extra[0]!r} matches no weight"
            raise ConversionError(f"{source}: the delta's keys differ from the model's ({first}; "
                                  f"{len(only)} without a delta, {len(extra)} deltas without a weight): a delta for "
                                  "another architecture?")
        for key in base.keys():
            if tuple(base.shape(key)) != tuple(delta.shape(key)):
                raise ConversionError(f"{source}: delta {key!r} has shape {tuple(delta.shape(key))}, the weight "
                                      f"{tuple(base.shape(key))}")

    def keys(self):
        return self.base.keys()

    def shape(self, key):
        return self.base.shape(key)

    def items(self, keys):
        deltas = dict(self.delta.items(list(keys)))  # the same group of keys: one part's worth at a time
        for key, w in self.base.items(keys):
            yield key, (w.astype(np.float32) + deltas.pop(key).astype(np.float32)).astype(w.dtype)


class MappedSource:
    """Tensors of one file seen under other keys, each read whole or transformed on read (rows
    of a fused tensor, a 1x1 convolution reshaped to a linear weight)."""

    def __init__(self, tensors: TensorSource, parts: dict[str, tuple[str, tuple[int, ...] | None, object]]):
        self.tensors = tensors
        self._parts = parts  # key -> (file key, shape after the transform or None, transform or None)

    def keys(self) -> list[str]:
        return list(self._parts)

    def shape(self, key: str) -> tuple[int, ...]:
        file_key, shape, _ = self._parts[key]
        return tuple(self.tensors.shape(file_key)) if shape is None else shape

    def items(self, keys):
        wanted: dict[str, list[str]] = {}
        for key in keys:
            wanted.setdefault(self._parts[key][0], []).append(key)
        for file_key, array in self.tensors.items(list(wanted)):
            for key in wanted[file_key]:
                transform = self._parts[key][2]
                yield key, array if transform is None else transform(array)


class LayoutSource(MappedSource):
    """A single file in a published layout, seen under the diffusers keys its tensors become."""

    def __init__(self, tensors: TensorSource, layout, prefix: str):
        parts = {}
        for file_key in tensors.keys():
            shape = tuple(tensors.shape(file_key))
            for key, rows in layout.parts(file_key[len(prefix):], shape):
                if rows is None:
                    parts[key] = (file_key, None, None)
                else:
                    n = len(range(*rows.indices(shape[0]))) if isinstance(rows, slice) else len(rows)
                    parts[key] = (file_key, (n, *shape[1:]), operator.itemgetter(rows))
        super().__init__(tensors, parts)


def _single_file_source(path: Path, overrides: dict | None):
    """``(raw config, source)`` of a single safetensors file in a published layout."""
    tensors = TensorSource.for_file(path)
    keys = tensors.keys()
    for family in dict.fromkeys(FAMILIES.values()):
        for layout in family.keys.layouts:
            for prefix in ("", *layout.prefixes):
                stripped = {k[len(prefix):] for k in keys if k.startswith(prefix)}
                if len(stripped) == len(keys) and layout.detect(stripped):
                    source = LayoutSource(tensors, layout, prefix)
                    shapes = {k[len(prefix):]: tensors.shape(k) for k in keys}
                    try:
                        raw = {**layout.config(shapes), **(overrides or {})}
                    except KeyError as e:
                        raise ConversionError(f"{path}: {layout.name} layout without tensor {e}") from None
                    return raw, source
    if any(k.startswith("model.diffusion_model.") for k in keys):  # a whole SD 1.x/2.x/SDXL checkpoint
        raise ConversionError(f"{path}: an SD 1.x/2.x/SDXL single file in the LDM/SGM layout "
                              "(model.diffusion_model.*): it converts as a pipeline with the configs of a diffusers "
                              "pipeline directory, convert FILE OUT --config-from PIPELINE_DIR "
                              "(sf.convert(file, out, config=PIPELINE_DIR))")
    raise ConversionError(f"{path}: a single file in no known layout (known: "
                          f"{', '.join(lay.name for f in dict.fromkeys(FAMILIES.values()) for lay in f.keys.layouts)}"
                          "); give a diffusers model directory instead")


def plan_source(src, *, config: dict | None = None, variant: str | None = None, delta=None,
                delta_variant: str | None = None) -> tuple[ConversionPlan, dict]:
    """The plan for a model directory or a single file, and the raw config it came from.

    Args:
        src: a diffusers/transformers model directory, or a single safetensors file in a
            published layout (e.g. Black Forest Labs' Flux file).
        config: config fields that override what the directory says or the file implies
            (a single file cannot say everything, e.g. a non-published head size's rotary axes).
        variant: read ``*.{variant}.safetensors`` (e.g. ``fp16``), sharded or not.
        delta: a directory of weight differences with the same keys (``W = W_base + dW``).
        delta_variant: which of the delta directory's weights files, when it has several.
    """
    src = Path(src)
    if src.is_file():
        raw, source = _single_file_source(src, config)
        about = f"{src} (its config, implied by the tensors' shapes{' and the given fields' if config else ''})"
    else:
        model_dir = _find_supported_dir(src)
        raw = {**read_json(model_dir / CONFIG_NAME), **(config or {})}
        source = TensorSource.for_dir(model_dir, _family(raw, str(model_dir)).keys.weights, variant)
        about = None
    if delta is not None:
        source = DeltaSource(source, weights_file(delta, delta_variant), source=f"{src} + delta {delta}")
    return plan(raw, source, source=str(src), config_source=about), raw


# ---------------------------------------------------------------------------------------------
# Plans
# ---------------------------------------------------------------------------------------------


def _target_for(key: str, targets: dict) -> str | None:
    """The Flax parameter path a (renamed) diffusers key fills, or None."""
    if key in targets:
        return key
    prefix, _, leaf = key.rpartition(".")
    if leaf == "weight":
        for alt in ("kernel", "scale"):
            if f"{prefix}.{alt}" in targets:
                return f"{prefix}.{alt}"
    return None


@dataclasses.dataclass
class ConversionPlan:
    """Which source tensor fills which parameter, checked; nothing read yet.

    Attributes:
        family, config, class_name: the model.
        targets: parameter name -> abstract array (shape, dtype), in the module's order.
        origin: parameter name -> the source key it is read from.
        tensors: the source (``keys``/``shape``/``items``).
        source: names the origin in messages.
    """

    family: object
    config: object
    class_name: str
    targets: dict
    origin: dict[str, str]
    tensors: object
    source: str
    treedef: object = None
    copies: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # more keys for one parameter
    deltas: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # added on read (merged LoRAs)
    allow_nonfinite: bool = False  # NaN/inf weights are an error unless this says they are wanted

    def read(self, names: list[str], cast=None) -> Iterator[tuple[str, np.ndarray]]:
        """Yields ``(parameter name, array)`` for ``names``, in the module's layout, cast to
        ``cast`` where floating point (``None`` keeps each tensor's dtype: bf16 stays bf16;
        float64 becomes float32, what JAX computes in).
        A parameter that several keys fill (a tied embedding saved twice) is read from each,
        and the copies must be equal. A floating-point tensor with NaN or inf values (after
        any delta or LoRA) is an error naming it, unless ``allow_nonfinite``."""
        by_key = {self.origin[n]: n for n in names}
        extra = {k: n for n in names for k in self.copies.get(n, ())}
        first: dict[str, tuple[str, np.ndarray]] = {}
        for key, array in self.tensors.items(list(by_key) + list(extra)):
            name = by_key.get(key) or extra[key]
            array = map_tensor(key, array, self.targets[name].shape, name.rpartition(".")[2])
            if name in self.copies:
                if name not in first:
                    first[name] = (key, array)
                elif not np.array_equal(first[name][1], array):
                    raise ConversionError(f"{self.source}: {first[name][0]!r} and {key!r} both fill {name} "
                                          "but differ")
                if key in extra:  # the copies are only checked; the primary key is the one yielded
                    continue
            floating = jax.numpy.issubdtype(array.dtype, jax.numpy.floating)
            if not floating and jax.numpy.issubdtype(self.targets[name].dtype, jax.numpy.floating):
                raise ConversionError(f"{self.source}: tensor {key!r} is {array.dtype}; {name} is a floating-point "
                                      "weight")
            check = floating and not self.allow_nonfinite
            if check:
                self._check_finite(key, array)
            if name in self.deltas:  # added in float32, back to the tensor's dtype
                with np.errstate(over="ignore", invalid="ignore"):
                    array = (array.astype(np.float32) + self.deltas[name]).astype(array.dtype)
                if check:
                    self._check_finite(key, array, " once the LoRA/delta weights are added",
                                       "lower the LoRA's scale, or check the delta/LoRA file")
            to = cast if cast is not None or array.dtype != np.float64 else np.float32  # JAX computes in <= 32 bits
            if to is not None and floating:
                narrower = jax.numpy.finfo(to).max < jax.numpy.finfo(array.dtype).max
                with np.errstate(over="ignore"):
                    array = array.astype(to)
                if check and narrower:
                    self._check_finite(key, array, f" once cast to {np.dtype(to).name} (past its range)",
                                       "convert to bfloat16 or float32 instead")
            yield name, array

    def _check_finite(self, key: str, array: np.ndarray, when: str = "",
                      fix: str = "to convert it anyway: allow_nonfinite=True (streamflow-jax convert --allow-nonfinite)"):
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        if bad:
            raise ConversionError(f"{self.source}: tensor {key!r} has {bad} non-finite value(s) (NaN or inf){when}; "
                                  f"a model with them samples NaN. {fix[0].upper()}{fix[1:]}")

    def nbytes(self, name: str, cast=None) -> int:
        t = self.targets[name]
        return int(np.prod(t.shape)) * np.dtype(cast or t.dtype).itemsize

    def model(self, cast=None, progress: bool = False) -> FlowModel:
        """Reads everything into a ``FlowModel`` (in memory)."""
        names = list(self.targets)
        values = {}
        with tqdm(total=len(names), desc=f"converting {Path(self.source).name or self.source}", unit="tensor",
                  disable=not progress) as bar:
            for name, array in self.read(names, cast):
                values[name] = array
                bar.update()
        params = jax.tree_util.tree_unflatten(self.treedef, [values[n] for n in names])
        return FlowModel.from_params(self.family, self.config, params, class_name=self.class_name)


def _defaulted(family, config, raw_config: dict) -> str:
    """The config fields the source's config did not set (their defaults were used, as diffusers
    does), for a message about tensors that do not fit: often the reason."""
    absent = [f.name for f in dataclasses.fields(family.config_cls) if f.name not in raw_config]
    if not absent:
        return ""
    shown = ", ".join(f"{name}={getattr(config, name)!r}" for name in absent[:4])
    return f" (the config does not set {shown}{' ...' if len(absent) > 4 else ''}: defaults were used)"


def _check_block_counts(family, config, keys, source: str, raw_config: dict) -> None:
    """More blocks asked for than the file holds (``Family.blocks``), refused before the model
    is built; a file in another layout (no key under the prefix) is left to the full check."""
    for prefix, count in family.blocks(config).items():
        pattern = re.compile(rf"{re.escape(prefix)}\.(\d+)\.")
        found = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
        if found and count > max(found) + 1:
            raise ConversionError(f"{source}: the config asks for {count} blocks in {prefix}, and the file holds "
                                  f"{max(found) + 1}" + _defaulted(family, config, raw_config))


def plan(raw_config: dict, tensors, *, source: str = "<tensors>", config_source: str | None = None
         ) -> ConversionPlan:
    """Matches every source tensor to one parameter and checks every shape, reading only headers.

    Raises:
        ConversionError: an unsupported class or config value, an unexpected, missing or
            mis-shaped tensor (naming the file and the key).
    """
    family, config = parse_config(raw_config, source=source, config_source=config_source)
    class_name = class_name_of(raw_config)
    if not hasattr(tensors, "items"):
        tensors = DictSource(tensors)
    _check_block_counts(family, config, tensors.keys(), source, raw_config)
    _, abstract_state = abstract_split(family, config)
    targets, treedef, _ = flat_params(nnx.to_pure_dict(abstract_state))
    origin, unexpected, copies = {}, [], {}
    for key in tensors.keys():
        target = _target_for(family.keys.rename(key), targets)
        if target is None:
            unexpected.append(key)
        elif target in origin:
            copies.setdefault(target, []).append(key)
        else:
            origin[target] = key
    missing = sorted(set(targets) - set(origin))
    if unexpected:
        raise ConversionError(f"{source}: unexpected tensor(s) {_few(unexpected)} for {class_name}"
                              + _defaulted(family, config, raw_config))
    if missing:
        raise ConversionError(f"{source}: missing tensor(s) {_few(missing)} for {class_name}"
                              + _defaulted(family, config, raw_config))
    for name, key in origin.items():
        got = mapped_shape(tensors.shape(key), name.rpartition(".")[2])
        if got != tuple(targets[name].shape):
            raise ConversionError(f"{source}: tensor {key!r}: shape {got} does not fit the model's "
                                  f"{tuple(targets[name].shape)} ({name})")
    for name, keys in copies.items():
        for key in keys:
            if tuple(tensors.shape(key)) != tuple(tensors.shape(origin[name])):
                raise ConversionError(f"{source}: {origin[name]!r} and {key!r} both fill {name} with different shapes")
    return ConversionPlan(family, config, class_name, targets, origin, tensors, source, treedef, copies)


def convert_diffusers(src, *, dtype=None, progress: bool = True, config: dict | None = None
                      ) -> tuple[FlowModel, dict]:
    """Reads a diffusers model directory (or a single file in a published layout) into a
    ``FlowModel`` in memory, strictly.

    Returns:
        The model and the raw config it came from.

    Raises:
        ConversionError: naming the file and the key of whatever does not fit.
    """
    p, raw = plan_source(src, config=config)
    return p.model(resolve_dtype(dtype), progress), raw


def convert_tensors(raw_config: dict, tensors, *, dtype=None, progress: bool = True,
                    source: str = "<tensors>") -> FlowModel:
    """Converts a diffusers config dict plus its tensors (PyTorch layout) into a ``FlowModel``.

    Args:
        raw_config: the model's ``config.json`` contents (with ``_class_name``).
        tensors: a ``TensorSource``, or a mapping from diffusers key to numpy array (for
            example ``{k: v.float().numpy() for k, v in torch_model.state_dict().items()}``).
        dtype: cast floating-point parameters (``None`` keeps each tensor's dtype).
        source: names the origin in error messages.
    """
    return plan(raw_config, tensors, source=source).model(resolve_dtype(dtype), progress)


def _find_supported_dir(src: Path) -> Path:
    """``src`` as a model directory (pipelines are handled by ``checkpoint.convert``/``load``)."""
    check_model_source(src)
    if not (src / CONFIG_NAME).is_file():
        raise ConversionError(f"{src}: a pipeline directory; convert it with sf.convert or load a component "
                              "with sf.load(path, component=...)")
    return src


def _few(names: list[str], n: int = 5) -> str:
    shown = ", ".join(repr(k) for k in sorted(names)[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")
