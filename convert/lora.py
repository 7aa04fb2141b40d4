"""LoRA files -> weight deltas on a model's parameters, strictly.

Two formats, both as safetensors:

- diffusers/PEFT: ``{component}.{module}.lora_A.weight`` ``[r, in(, kh, kw)]`` and
  ``.lora_B.weight`` ``[out, r(, 1, 1)]``; the scale ``lora_alpha / r`` (``/ sqrt(r)`` with
  rsLoRA) from the file's ``lora_adapter_metadata``, per module where ``rank_pattern`` /
  ``alpha_pattern`` say so, or 1 without metadata (diffusers' reading);
- kohya: ``lora_unet_{module with _ for .}.lora_down.weight`` / ``.lora_up.weight`` and
  ``.alpha`` (scale ``alpha / r``); ``lora_te_`` / ``lora_te1_`` / ``lora_te2_`` / ``lora_te3_``
  for the text encoders. Module names are a family's diffusers names, the names of a
  published layout the family reads (Flux's BFL names: a fused ``qkv`` delta is split by rows
  as the layout splits the weight), or the other names its record lists (``Family.lora_names``:
  kohya's SDXL LoRAs name the UNet's LDM/SGM modules, ``lora_unet_input_blocks_4_1_...``).

``delta = scale * (B @ A) * user_scale``, computed on the host in float32 and mapped to our
parameter layout. A LoRA key that matches no weight is an error listing the keys (never a
LoRA that silently does nothing).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

from streamflow_jax.errors import ConversionError
from streamflow_jax.models import FAMILIES

from . import _target_for
from .common import map_tensor

# kohya names text encoders by their pipeline slot, whatever the family (CLIP, T5...)
TEXT_ENCODER_SLOTS = {"text_encoder": ("lora_te_", "lora_te1_"), "text_encoder_2": ("lora_te2_",),
                      "text_encoder_3": ("lora_te3_",)}


def component_prefixes() -> dict[str, tuple[str, ...]]:
    """Each pipeline component -> the kohya key prefixes naming it: a velocity family's from its
    ``Family.lora_prefixes`` (its ``component``), text encoders' by slot."""
    out: dict[str, tuple[str, ...]] = {}
    for family in FAMILIES.values():
        if family.lora_prefixes:
            out[family.component] = tuple(dict.fromkeys(out.get(family.component, ()) + family.lora_prefixes))
    return {**out, **TEXT_ENCODER_SLOTS}
_PEFT = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
_KOHYA = re.compile(r"^(?P<module>lora_[a-z0-9]+_.+)\.(?P<part>lora_down|lora_up)\.weight$")


@dataclasses.dataclass
class LoraModule:
    """One low-rank update: ``down`` (A) ``[r, in, ...]``, ``up`` (B) ``[out, r, ...]``, its scale."""

    name: str  # the module, as the file names it (component prefix stripped)
    down: np.ndarray
    up: np.ndarray
    scale: float
    keys: tuple[str, ...]  # the file's keys, for messages

    def delta(self) -> np.ndarray:
        """``scale * B @ A`` in float32, in PyTorch's layout ``[out, in(, kh, kw)]``."""
        down = self.down.astype(np.float32)
        up = self.up.astype(np.float32)
        r = down.shape[0]  # the halves' shapes are checked where the file is read (lora_modules)
        d = up.reshape(up.shape[0], r) @ down.reshape(r, -1)
        return (self.scale * d).reshape((up.shape[0], *down.shape[1:]))


LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"  # what diffusers' save_lora_weights writes


def lora_file(path) -> Path:
    """The LoRA file ``path`` names: the file, or in a directory (as diffusers'
    ``save_lora_weights`` writes one, and ``load_lora_weights`` takes) its
    ``pytorch_lora_weights.safetensors``, else its only ``*.safetensors``."""
    path = Path(path)
    if path.is_dir():
        if (path / LORA_WEIGHTS_NAME).is_file():
            return path / LORA_WEIGHTS_NAME
        found = sorted(path.glob("*.safetensors"))
        if len(found) != 1:
            raise ConversionError(f"{path}: a directory without {LORA_WEIGHTS_NAME}, holding "
                                  + (f"{len(found)} .safetensors files ({', '.join(p.name for p in found)}): give one"
                                     if found else "no .safetensors file") + " (a LoRA file or its directory)")
        return found[0]
    if not path.is_file():
        raise ConversionError(f"{path}: no such LoRA file")
    return path


def lora_keys(path) -> list[str]:
    """A LoRA file's tensor names, without reading the tensors (``path``: see ``lora_file``)."""
    path = lora_file(path)
    try:
        with safe_open(path, framework="numpy") as f:
            return list(f.keys())
    except (SafetensorError, OSError) as e:
        raise ConversionError(f"{path}: unreadable safetensors file ({e})") from None


def read_lora_file(path) -> tuple[dict[str, np.ndarray], dict]:
    """A LoRA file's tensors (numpy) and metadata (``path``: see ``lora_file``)."""
    path = lora_file(path)
    try:
        with safe_open(path, framework="numpy") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError) as e:
        raise ConversionError(f"{path}: unreadable safetensors file ({e})") from None


def _peft_scales(metadata: dict, component: str, source: str):
    """``module -> scale`` from diffusers' ``lora_adapter_metadata`` (None: no metadata)."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ConversionError(f"{source}: its lora_adapter_metadata is not JSON ({e})") from None
    if not isinstance(meta, dict):
        raise ConversionError(f"{source}: its lora_adapter_metadata must be a JSON object, got {type(meta).__name__}")
    pick = lambda k, default=None: meta.get(f"{component}.{k}", meta.get(k, default))  # noqa: E731
    if pick("use_dora"):
        raise ConversionError(f"{source}: DoRA LoRAs (use_dora) are not supported")

    def number(key, value, positive: bool):  # ranks are positive; an alpha may be any finite number
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                                  or not math.isfinite(value) or positive and value <= 0):
            raise ConversionError(f"{source}: lora_adapter_metadata's {key} must be a "
                                  f"{'positive' if positive else 'finite'} number, got {value!r}")
        return value

    def pattern(key, positive: bool):
        value = pick(key, {}) or {}
        if not isinstance(value, dict):
            raise ConversionError(f"{source}: lora_adapter_metadata's {key} must be an object (module -> value), "
                                  f"got {type(value).__name__}")
        out = {}
        for k, v in value.items():
            try:  # peft reads each key as a regular expression over the module's name (get_pattern_key)
                out[re.compile(rf"(.*\.)?({k})$")] = number(f"{key}[{k!r}]", v, positive)
            except re.error as e:
                raise ConversionError(f"{source}: lora_adapter_metadata's {key} key {k!r} is not a regular "
                                      f"expression peft can read ({e})") from None
        return out

    r, alpha = number("r", pick("r"), True), number("lora_alpha", pick("lora_alpha"), False)
    ranks, alphas = pattern("rank_pattern", True), pattern("alpha_pattern", False)
    rs = bool(pick("use_rslora"))

    def scale(module: str) -> float:
        # peft's rule: the first key matching the whole name, or a dot-separated tail of it
        # ("q_proj" is attn.q_proj's, not attn.add_q_proj's)
        rank = next((v for k, v in ranks.items() if k.match(module)), r)
        a = next((v for k, v in alphas.items() if k.match(module)), alpha)
        if rank is None or a is None:
            return 1.0
        return a / (math.sqrt(rank) if rs else rank)

    return scale


def lora_modules(tensors: dict[str, np.ndarray], metadata: dict, component: str,
                 source: str = "LoRA file") -> tuple[list[LoraModule], list[str]]:
    """The file's updates for ``component`` (``"unet"``, ``"transformer"``, ``"text_encoder"``...)
    and the keys that belong to other components."""
    prefixes = component_prefixes()
    kohya_prefixes = prefixes.get(component, ())
    peft_prefix = f"{component}."
    scales = _peft_scales(metadata, component, source)
    parts: dict[tuple[str, str, str], dict[str, str]] = {}
    adapters: set[str | None] = set()
    others, stray, alphas = [], [], []
    for key, value in tensors.items():
        if not (np.issubdtype(value.dtype, np.floating) or value.dtype.name == "bfloat16"):
            raise ConversionError(f"{source}: LoRA tensor {key!r} is {value.dtype}; LoRA weights are floating point")
        if key.endswith(".alpha"):
            alphas.append(key)
            continue
        m = _KOHYA.match(key)
        if m:
            module = m.group("module")
            prefix = next((p for p in kohya_prefixes if module.startswith(p)), None)
            if prefix is None:
                others.append(key)
                continue
            parts.setdefault(("kohya", module[len(prefix):], module), {})[m.group("part")] = key
            continue
        m = _PEFT.match(key)
        if m:
            module = m.group("module")
            if module.startswith(peft_prefix):
                module = module[len(peft_prefix):]
            elif "." in module and module.split(".", 1)[0] in prefixes:
                others.append(key)
                continue
            adapters.add(m.group("adapter"))
            parts.setdefault(("peft", module, module), {})["lora_down" if m.group("part") == "A" else "lora_up"] = key
            continue
        stray.append(key)
    if stray:
        raise ConversionError(f"{source}: LoRA keys in no known format: {_few(stray)}")
    if len(adapters) > 1:  # one module's halves would be paired across adapters, or one dropped
        names = sorted(str(a) if a is not None else "(unnamed)" for a in adapters)
        raise ConversionError(f"{source}: holds several PEFT adapters ({', '.join(names)}); save one adapter per file")
    kohya_modules = {file_module for fmt, _, file_module in parts if fmt == "kohya"}
    orphans = [k for k in alphas if k[: -len(".alpha")] not in kohya_modules and k.startswith(kohya_prefixes)]
    if orphans:
        raise ConversionError(f"{source}: LoRA alpha key(s) with no lora_down/lora_up beside them: {_few(orphans)}")
    modules = []
    for (fmt, name, file_module), pair in parts.items():
        if set(pair) != {"lora_down", "lora_up"}:
            raise ConversionError(f"{source}: LoRA {file_module}: has {sorted(pair)} but not both halves")
        down, up = tensors[pair["lora_down"]], tensors[pair["lora_up"]]
        if down.ndim < 2 or up.ndim < 2 or up.ndim != down.ndim or any(n != 1 for n in up.shape[2:]):
            raise ConversionError(f"{source}: LoRA {file_module}: down {tuple(down.shape)} and up {tuple(up.shape)} "
                                  "are not [r, in(, kh, kw)] and [out, r(, 1, 1)]")
        r = down.shape[0]
        if r == 0 or up.shape[1] != r:
            raise ConversionError(f"{source}: LoRA {file_module}: down {tuple(down.shape)} and up {tuple(up.shape)} "
                                  f"{'have rank 0' if r == 0 else 'ranks differ'}")
        if fmt == "kohya":
            alpha_key = f"{file_module}.alpha"
            scale = _alpha(tensors[alpha_key], alpha_key, source) / r if alpha_key in tensors else 1.0
        else:
            scale = scales(name) if scales is not None else 1.0
        if not math.isfinite(scale):
            raise ConversionError(f"{source}: LoRA {file_module}: its scale (alpha / rank) {scale} is not finite")
        modules.append(LoraModule(name, down, up, scale, (pair["lora_down"], pair["lora_up"])))
    return modules, others


def _alpha(value: np.ndarray, key: str, source: str) -> float:
    if value.size != 1:
        raise ConversionError(f"{source}: LoRA {key!r} has shape {tuple(value.shape)}; an alpha is one number")
    alpha = float(np.asarray(value, np.float64).reshape(()))
    if not math.isfinite(alpha):
        raise ConversionError(f"{source}: LoRA {key!r} is {alpha}, not a finite number")
    return alpha


def lora_deltas(family, config, targets: dict, tensors: dict[str, np.ndarray], metadata: dict, component: str, *,
                source: str, scale: float = 1.0) -> tuple[dict[str, np.ndarray], list[str]]:
    """Per-parameter deltas (our layout, float32) of one LoRA, and the file's keys that belong
    to other components.

    Args:
        family, config: the model's ``Family`` record and config.
        targets: parameter name -> array or abstract array (for names and shapes).
        tensors, metadata: the LoRA file's (``read_lora_file``).
        component: whose keys to take (``"unet"``, ``"transformer"``, ``"text_encoder"``...).
        scale: multiplies the file's own scales.

    Raises:
        ConversionError: a key that matches no weight of the model (listed), a shape that does
            not fit, a non-finite scale.
    """
    if not math.isfinite(scale):
        raise ConversionError(f"{source}: LoRA scale {scale} is not finite")
    if abs(scale) > float(np.finfo(np.float32).max):  # the deltas are float32: inf
        raise ConversionError(f"{source}: LoRA scale {scale:g} is beyond float32's range")
    modules, others = lora_modules(tensors, metadata, component, source)
    by_underscore = {}  # kohya names: the module path with _ for .
    for name in targets:
        base = name.rpartition(".")[0]
        by_underscore.setdefault(base.replace(".", "_"), base)
    aliases = _aliases(family, config)
    deltas: dict[str, np.ndarray] = {}
    placed_by: dict[str, LoraModule] = {}
    unmatched = []
    for mod in modules:
        placed = _place(mod, family, config, targets, by_underscore, aliases)
        if placed is None:
            unmatched.extend(mod.keys)
            continue
        with np.errstate(over="ignore", invalid="ignore"):
            d_full = mod.delta()
        if not np.isfinite(d_full).all():
            raise ConversionError(f"{source}: LoRA {mod.keys[0]!r} and {mod.keys[1]!r} give non-finite values "
                                  f"(NaN or inf in the file, or past float32 at scale {mod.scale:g})")
        for target, rows in placed:
            if target in placed_by and rows is None:
                raise ConversionError(f"{source}: {placed_by[target].keys[0]!r} and {mod.keys[0]!r} both update "
                                      f"{target} (one module written twice, e.g. in two formats)")
            placed_by[target] = mod
            d = d_full if rows is None else d_full[rows]
            d = map_tensor(f"{mod.name} (LoRA)", d, tuple(targets[target].shape), target.rpartition(".")[2]) * scale
            deltas[target] = deltas.get(target, 0) + d
    if unmatched:
        raise ConversionError(f"{source}: LoRA key(s) match no weight of the {family.name} model: {_few(unmatched)}")
    return deltas, others


def _aliases(family, config) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """The family's other module names (``Family.lora_names``), each also with ``_`` for ``.``
    (kohya): ``(exact names, prefixes longest first)`` -> diffusers names."""
    exact, prefixes = {}, []
    for name, ours in family.lora_names(config).items():
        for spelled in (name, name.replace(".", "_")):
            if name.endswith("."):
                prefixes.append((spelled, ours))
            else:
                exact[spelled] = ours
    return exact, sorted(prefixes, key=lambda p: -len(p[0]))


def _diffusers_names(name: str, by_underscore: dict, aliases) -> list[str]:
    """The diffusers module names a LoRA module name may stand for, most direct first."""
    exact, prefixes = aliases
    names = [name, by_underscore.get(name)]
    if name in exact:
        names.append(exact[name])
    else:
        alias = next((ours + name[len(p):] for p, ours in prefixes if name.startswith(p)), None)
        if alias is not None:  # below a renamed module the names are the family's, maybe with _ for .
            names += [alias, by_underscore.get(alias.replace(".", "_"))]
    return [n for n in names if n is not None]


def _place(mod: LoraModule, family, config, targets: dict, by_underscore: dict, aliases=({}, [])):
    """``[(parameter, rows)]`` the module's delta goes to, or None."""
    for name in _diffusers_names(mod.name, by_underscore, aliases):
        t = _target_for(family.keys.rename(f"{name}.weight"), targets)
        if t is not None:
            return [(t, None)]
    for layout in family.keys.layouts:  # a published layout's names (BFL's double_blocks_0_img_attn_qkv)
        names = {n.replace(".", "_"): n for n in layout.modules(config)}
        name = mod.name if mod.name in names.values() else names.get(mod.name)
        if name is None:
            continue
        shape = (mod.up.shape[0], *mod.down.shape[1:])
        placed = [(_target_for(family.keys.rename(k), targets), rows) for k, rows in layout.parts(f"{name}.weight", shape)]
        if placed and all(t is not None for t, _ in placed):
            return placed
    return None


def _few(names: Iterable[str], n: int = 5) -> str:
    names = sorted(names)
    shown = ", ".join(repr(k) for k in names[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")
