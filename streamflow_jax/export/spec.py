"""Export specs: the single place where exported shapes are computed, from each family's record.

An ``ExportSpec`` names an exported graph's inputs and outputs, their dtypes and which axes are
dynamic, and carries the min/opt/max range of every dynamic axis. The ONNX export, the TensorRT
optimization profile and the run-time shape checks all read it. Three kinds of graph, one per
family kind (``export_spec`` picks): a velocity field's ``velocity`` (``velocity_spec``), an
autoencoder's ``decode_latents`` (``autoencoder_spec``) and a text encoder's ``encode``
(``text_encoder_spec``).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np

from streamflow_jax.errors import ShapeError, check_count
from streamflow_jax.models.flow import pixels_to_latent

# ---------------------------------------------------------------------------------------------
# Ranges and tensors
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Range:
    """min/opt/max of one dynamic axis (TensorRT's optimization-profile triple)."""

    min: int
    opt: int
    max: int

    def __post_init__(self):
        if not 1 <= self.min <= self.opt <= self.max:
            raise ValueError(f"need 1 <= min <= opt <= max, got {self.min}:{self.opt}:{self.max}")

    @classmethod
    def parse(cls, text: str | int | Range) -> Range:
        """``"1:4:8"`` (min:opt:max), ``"1:8"`` (opt = max) or ``"4"`` (fixed)."""
        if isinstance(text, Range):
            return text
        if isinstance(text, bool) or not isinstance(text, int | np.integer | str) or text == "":
            raise ValueError(f"expected an integer or min:opt:max integers, got {text!r}")
        if isinstance(text, int | np.integer):
            return cls(int(text), int(text), int(text))
        try:
            parts = [int(p) for p in str(text).split(":")]
        except ValueError:
            raise ValueError(f"expected min:opt:max integers, got {text!r}") from None
        if len(parts) == 1:
            parts = parts * 3
        elif len(parts) == 2:
            parts = [parts[0], parts[1], parts[1]]
        elif len(parts) != 3:
            raise ValueError(f"expected min:opt:max, got {text!r}")
        return cls(*parts)

    def scaled(self, divisor: int, what: str) -> Range:
        """This range of image pixels in latent pixels (``divisor`` pixels each; see
        ``models.pixels_to_latent``)."""
        return Range(*(pixels_to_latent(v, divisor, what=what) for v in (self.min, self.opt, self.max)))

    def __str__(self):
        return f"{self.min}:{self.opt}:{self.max}"


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One graph input or output; a string in ``shape`` names a dynamic axis, or (outputs
    only) a multiple of one, ``"8*H"``."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str = "float32"


def dim_value(dim: int | str, bound: dict[str, int]) -> int:
    """A concrete axis size: an int, a bound axis name, or ``"K*NAME"``."""
    if isinstance(dim, int):
        return dim
    factor, _, name = dim.rpartition("*")
    return (int(factor) if factor else 1) * bound[name]


EXPORT_DTYPES = ("float32", "float16", "bfloat16")  # compute dtypes a graph carries inside


@dataclasses.dataclass(frozen=True)
class ExportSpec:
    """An exported graph's interface: ``velocity(x, t, **cond) -> v``, ``decode_latents(latents) -> images``
    or ``encode(ids) -> last_hidden_state``.

    Attributes:
        class_name: the diffusers class of the model.
        inputs: in graph order (velocity: ``x``, ``t``, then the conditioning entries).
        outputs: ``v`` (velocity) or ``images`` (decoders).
        dims: every dynamic axis name -> its ``Range``.
        dtype: the compute dtype carried inside the graph (inputs and outputs stay float32;
            norms, softmax and timestep embeddings run in float32 islands).
        multiple: axis name -> the value every size of that axis must be a multiple of.
    """

    class_name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    dims: dict[str, Range]
    dtype: str = "float32"
    multiple: dict[str, int] = dataclasses.field(default_factory=dict)
    method: str = "velocity"  # the module method exported: "velocity", "decode_latents" or "encode"

    def __post_init__(self):
        if self.dtype not in EXPORT_DTYPES:
            raise ValueError(f"export dtype {self.dtype!r}: choose from {', '.join(EXPORT_DTYPES)}")

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def cond_names(self) -> list[str]:
        """The conditioning inputs of a velocity graph (everything after ``x`` and ``t``)."""
        return [t.name for t in self.inputs[2:]] if self.method == "velocity" else []

    def shape_at(self, tensor: TensorSpec, which: str) -> tuple[int, ...]:
        """The concrete shape of ``tensor`` at the ``"min"``, ``"opt"`` or ``"max"`` corner."""
        return tuple(getattr(self.dims[d], which) if isinstance(d, str) else d for d in tensor.shape)

    def profile(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """TensorRT optimization profile: input name -> (min, opt, max) shapes."""
        return {t.name: tuple(self.shape_at(t, w) for w in ("min", "opt", "max")) for t in self.inputs}

    def check(self, feeds: dict[str, Any]) -> dict[str, int]:
        """Validates inputs (arrays, or anything with ``.shape``) against the spec.

        Returns the dynamic axes' values.

        Raises:
            ShapeError: naming the input, the axis and the allowed range.
        """
        missing = [n for n in self.input_names if n not in feeds]
        extra = [n for n in feeds if n not in self.input_names]
        if missing or extra:
            raise ShapeError(f"inputs {sorted(feeds)} do not match the exported graph's {self.input_names}")
        bound: dict[str, int] = {}
        for t in self.inputs:
            value = feeds[t.name]
            shape = tuple(value.shape) if hasattr(value, "shape") else np.shape(value)
            if len(shape) != len(t.shape):
                raise ShapeError(f"input {t.name!r}: rank {len(shape)} (shape {shape}), the graph takes "
                                 f"rank {len(t.shape)} {self.describe(t)}")
            for axis, (want, got) in enumerate(zip(t.shape, shape)):
                if isinstance(want, int):
                    if got != want:
                        raise ShapeError(f"input {t.name!r}: axis {axis} is {got}, the graph takes {want} "
                                         f"{self.describe(t)}")
                    continue
                if want in bound and bound[want] != got:
                    raise ShapeError(f"input {t.name!r}: axis {axis} ({want}) is {got} but another input has "
                                     f"{want}={bound[want]}")
                r = self.dims[want]
                if not r.min <= got <= r.max:
                    raise ShapeError(f"input {t.name!r}: {want}={got} is outside the exported profile "
                                     f"[{r.min}, {r.max}]; export again with a wider range")
                if got % self.multiple.get(want, 1):
                    raise ShapeError(f"input {t.name!r}: {want}={got} is not a multiple of {self.multiple[want]}")
                bound[want] = got
        return bound

    def describe(self, t: TensorSpec) -> str:
        return "[" + ", ".join(str(d) for d in t.shape) + "]"

    def to_json(self) -> dict:
        return {
            "class_name": self.class_name,
            "inputs": [dataclasses.asdict(t) for t in self.inputs],
            "outputs": [dataclasses.asdict(t) for t in self.outputs],
            "dims": {k: [r.min, r.opt, r.max] for k, r in self.dims.items()},
            "dtype": self.dtype,
            "multiple": self.multiple,
            "method": self.method,
        }

    @classmethod
    def from_json(cls, data: dict) -> ExportSpec:
        tensors = lambda items: tuple(TensorSpec(d["name"], tuple(d["shape"]), d["dtype"]) for d in items)  # noqa: E731
        return cls(data["class_name"], tensors(data["inputs"]), tensors(data["outputs"]),
                   {k: Range(*v) for k, v in data["dims"].items()}, data["dtype"], dict(data.get("multiple", {})),
                   data.get("method", "velocity"))

    def key(self) -> str:
        """A stable string of everything that changes the exported graph or an engine built from it."""
        return json.dumps(self.to_json(), sort_keys=True)


# ---------------------------------------------------------------------------------------------
# Specs from a model's Family record
# ---------------------------------------------------------------------------------------------


def _check_side(model, name: str, r: Range) -> None:
    fam, m, limit = model.family, model.latent_multiple, model.max_latent
    if limit is not None and r.max > limit:
        raise ValueError(f"latent {name} up to {r.max} exceeds the largest the {fam.name} model takes ({limit})")
    if not fam.dynamic_spatial and r.min != r.max:
        raise ValueError(f"{fam.name} velocity graphs take one latent {name} (got {r}): jax2onnx cannot trace "
                         "strided convolutions over symbolic sizes; export one graph per size")
    bad = [v for v in (r.min, r.opt, r.max) if v % m]
    if bad:
        raise ValueError(f"latent {name} {bad} not a multiple of {m} ({fam.name})")


def build_velocity_spec(model, *, batch: Range, height: Range, width: Range, text_len: int | None,
                        dtype: str) -> ExportSpec:
    """The velocity graph's spec: ``x [B, H, W, C]``, ``t [B]``, then the family's conditioning
    ``[B, ...]`` in its declared order; ``v [B, H, W, C]`` out. H and W are symbolic where the
    family exports them so, else fixed at ``opt``."""
    fam = model.family
    for name, r in (("height", height), ("width", width)):
        _check_side(model, name, r)
    c = model.latent_channels
    dims, multiple = {"B": batch}, {}
    if fam.dynamic_spatial:
        hw = ("H", "W")
        dims.update(H=height, W=width)
        multiple = {"H": model.latent_multiple, "W": model.latent_multiple}
    else:
        hw = (height.opt, width.opt)
    cond = [TensorSpec(k, ("B", *shape)) for k, shape in model.cond_shapes(text_len).items()]
    return ExportSpec(
        class_name=model.class_name,
        inputs=(TensorSpec("x", ("B", *hw, c)), TensorSpec("t", ("B",)), *cond),
        outputs=(TensorSpec("v", ("B", *hw, c)),),
        dims=dims,
        dtype=dtype,
        multiple=multiple,
    )


def latent_range(model, size: int) -> Range:
    """The latent side range an on-demand export covers: everything the model takes where the
    graph can be dynamic, the one size where it cannot."""
    if not model.family.dynamic_spatial:
        return Range(size, size, size)
    m = model.latent_multiple
    return Range(m, size, max(size, model.max_latent or model.family.profile_latent(model.config) or 2 * size))


def _check_pixels(model, px: Range, scale: int) -> None:
    """``_check_side``'s refusals of an image-side range in pixels, said in pixels (``scale``
    pixels per latent pixel), as ``--resolution`` was given."""
    fam, m, limit = model.family, model.latent_multiple * scale, model.max_latent
    if limit is not None and px.max > limit * scale:
        raise ValueError(f"resolution up to {px.max} px exceeds the largest the {fam.name} model takes "
                         f"({limit * scale} px: {limit} latent pixels of {scale})")
    if not fam.dynamic_spatial and px.min != px.max:
        raise ValueError(f"{fam.name} velocity graphs take one resolution (got {px}): jax2onnx cannot trace strided "
                         "convolutions over symbolic sizes; export one graph per size")
    bad = [v for v in (px.min, px.opt, px.max) if v % m]
    if bad:
        raise ValueError(f"resolution {bad[0]} px is not a multiple of {m} ({fam.name}: {model.latent_multiple} "
                         f"latent pixels of {scale})")


def _side(model, resolution, latent, scale: int) -> Range:
    if resolution is not None and latent is not None:
        raise ValueError("give resolution (pixels) or latent, not both")
    if resolution is not None:
        return Range.parse(resolution).scaled(scale, "resolution")
    return Range.parse(latent if latent is not None else model.family.default_latent(model.config))


def export_spec(model, *, batch=None, resolution=None, latent=None, latent_scale: int | None = None,
                text_len: int | None = None, dtype: str | None = None) -> ExportSpec:
    """The export spec of a model's graph, by its family's kind: a velocity field's ``velocity``,
    an autoencoder's ``decode_latents``, a text encoder's ``encode`` (arguments as theirs; the
    ones a kind does not take must be left out)."""
    kind = model.family.kind
    given = {"resolution": resolution, "latent": latent, "latent_scale": latent_scale, "text_len": text_len}
    takes = {"autoencoder": ("resolution", "latent", "latent_scale"), "text_encoder": ("text_len",)}.get(kind, given)
    unused = [name for name, value in given.items() if value is not None and name not in takes]
    if unused:
        raise ValueError(f"{', '.join(unused)}: not an input of {'an' if kind[0] in 'aeiou' else 'a'} {kind}'s graph "
                         f"({model.class_name}); leave "
                         f"{'it' if len(unused) == 1 else 'them'} out")
    batch = _DEFAULT_BATCH[kind] if batch is None else batch
    if kind == "autoencoder":
        if latent_scale is not None and latent_scale != model.scale_factor:
            raise ValueError(f"latent scale {latent_scale} (--latent-scale): this {model.class_name} turns each latent "
                             f"pixel into {model.scale_factor} x {model.scale_factor} pixels; leave it out")
        return autoencoder_spec(model, batch=batch, resolution=resolution, latent=latent, dtype=dtype)
    if kind == "text_encoder":
        return text_encoder_spec(model, batch=batch, text_len=text_len, dtype=dtype)
    return velocity_spec(model, batch=batch, resolution=resolution, latent=latent, latent_scale=latent_scale,
                         text_len=text_len, dtype=dtype)


_DEFAULT_BATCH = {"autoencoder": "1:1:4", "text_encoder": "1:1:4", "velocity": "1:1:8"}


def velocity_spec(model, *, batch="1:1:8", resolution=None, latent=None, latent_scale: int | None = None,
                  text_len: int | None = None, dtype: str | None = None) -> ExportSpec:
    """The export spec of a velocity model's ``velocity`` graph.

    Args:
        model: a velocity ``FlowModel``.
        batch: ``Range`` or ``"min:opt:max"`` of the batch axis (count CFG's doubled batch).
        resolution: image side in pixels, ``"min:opt:max"``; divided by ``latent_scale``.
        latent: latent side directly (instead of ``resolution``); default: the family's.
        latent_scale: pixels per latent pixel (default: the family's, 8 for the SD/SD3/Flux
            VAEs; a pipeline in pixel space, as the embedded digits model, has 1).
        text_len: text tokens ``L`` (fixed in the graph; default: the family's).
        dtype: compute dtype inside the graph (default: the model's).
    """
    if model.family.kind != "velocity":
        raise ValueError(f"{model.class_name} is not a velocity model (export_spec picks its graph)")
    for name, value in (("latent_scale", latent_scale), ("text_len", text_len)):
        if value is not None:
            check_count(name, value)
    longest = model.family.max_text_len
    if text_len is not None and longest is not None and text_len > longest:
        prefix = model.family.text_prefix
        raise ValueError(f"text_len {text_len} is longer than any text the {model.family.name} pipelines feed "
                         f"({longest}" + (f": {prefix} CLIP tokens, then T5's {longest - prefix} at most)"
                                          if prefix else ": T5's max_sequence_length at most)"))
    scale = model.family.latent_scale if latent_scale is None else latent_scale
    if resolution is not None and latent is None:
        _check_pixels(model, Range.parse(resolution), scale)
    side = _side(model, resolution, latent, scale)
    return build_velocity_spec(model, batch=Range.parse(batch), height=side, width=side, text_len=text_len,
                               dtype=dtype or str(np.dtype(model.dtype)))


def autoencoder_spec(model, *, batch="1:1:4", resolution=None, latent=None, dtype: str | None = None) -> ExportSpec:
    """The export spec of a VAE/TAESD ``decode_latents``: scaled latents in, images out.

    Args:
        batch: ``"min:opt:max"`` of the batch axis.
        resolution: image side in pixels, ``"min:opt:max"`` (divided by the decoder's factor).
        latent: latent side directly (default: the family's, SD1.5's 64).
    """
    f, c = model.scale_factor, model.latent_channels
    side = _side(model, resolution, latent, f)
    return ExportSpec(
        class_name=model.class_name,
        inputs=(TensorSpec("latents", ("B", "H", "W", c)),),
        outputs=(TensorSpec("images", ("B", f"{f}*H", f"{f}*W", model.family.image_channels(model.config))),),
        dims={"B": Range.parse(batch), "H": side, "W": side},
        dtype=dtype or str(np.dtype(model.dtype)),
        method="decode_latents",
    )


def text_encoder_spec(model, *, batch="1:1:4", text_len: int | None = None, dtype: str | None = None) -> ExportSpec:
    """The export spec of a text encoder (CLIP, T5): ``ids [B, L]`` int32 in, its last hidden
    state ``[B, L, D]`` out (float32); ``L`` fixed (default: the family's text length)."""
    import jax

    length = model.text_len if text_len is None else check_count("text_len", text_len)
    out = jax.eval_shape(lambda m, ids: m.module(ids)["last_hidden_state"], model,
                         jax.ShapeDtypeStruct((1, length), np.int32))
    return ExportSpec(
        class_name=model.class_name,
        inputs=(TensorSpec("ids", ("B", length), "int32"),),
        outputs=(TensorSpec("last_hidden_state", ("B", length, out.shape[-1])),),
        dims={"B": Range.parse(batch)},
        dtype=dtype or str(np.dtype(model.dtype)),
        method="encode",
    )
