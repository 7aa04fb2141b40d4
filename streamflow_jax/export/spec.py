"""Export specs: one per family, the single place where exported shapes are computed.

An ``ExportSpec`` names the velocity graph's inputs and outputs, their dtypes and which axes
are dynamic, and carries the min/opt/max range of every dynamic axis. The ONNX export, the
TensorRT optimization profile and the run-time shape checks all read it.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np

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
        if isinstance(text, int):
            return cls(text, text, text)
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
        """This range divided by ``divisor`` (pixels -> latent), which must divide each value."""
        bad = [v for v in (self.min, self.opt, self.max) if v % divisor]
        if bad:
            raise ValueError(f"{what} {bad} not divisible by {divisor}")
        return Range(self.min // divisor, self.opt // divisor, self.max // divisor)

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


@dataclasses.dataclass(frozen=True)
class ExportSpec:
    """An exported graph's interface: ``velocity(x, t, **cond) -> v`` or ``decode_latents(latents) -> images``.

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
    method: str = "velocity"  # the module method exported: "velocity" or "decode_latents"

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
            ValueError: naming the input, the axis and the allowed range.
        """
        missing = [n for n in self.input_names if n not in feeds]
        extra = [n for n in feeds if n not in self.input_names]
        if missing or extra:
            raise ValueError(f"inputs {sorted(feeds)} do not match the exported graph's {self.input_names}")
        bound: dict[str, int] = {}
        for t in self.inputs:
            value = feeds[t.name]
            shape = tuple(value.shape) if hasattr(value, "shape") else np.shape(value)
            if len(shape) != len(t.shape):
                raise ValueError(f"input {t.name!r}: rank {len(shape)} (shape {shape}), the graph takes "
                                 f"rank {len(t.shape)} {self.describe(t)}")
            for axis, (want, got) in enumerate(zip(t.shape, shape)):
                if isinstance(want, int):
                    if got != want:
                        raise ValueError(f"input {t.name!r}: axis {axis} is {got}, the graph takes {want} "
                                         f"{self.describe(t)}")
                    continue
                if want in bound and bound[want] != got:
                    raise ValueError(f"input {t.name!r}: axis {axis} ({want}) is {got} but another input has "
                                     f"{want}={bound[want]}")
                r = self.dims[want]
                if not r.min <= got <= r.max:
                    raise ValueError(f"input {t.name!r}: {want}={got} is outside the exported profile "
                                     f"[{r.min}, {r.max}]; export again with a wider range")
                if got % self.multiple.get(want, 1):
                    raise ValueError(f"input {t.name!r}: {want}={got} is not a multiple of {self.multiple[want]}")
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
# Family specs: adding a family = adding one function here
# ---------------------------------------------------------------------------------------------


def _sd3_spec(config, *, batch: Range, height: Range, width: Range, text_len: int, dtype: str) -> ExportSpec:
    p = config.patch_size
    limit = config.pos_embed_max_size * p
    for name, r in (("height", height), ("width", width)):
        if r.max > limit:
            raise ValueError(f"latent {name} up to {r.max} exceeds the position table ({limit})")
    c_in, c_out = config.in_channels, config.latent_channels_out
    return ExportSpec(
        class_name="SD3Transformer2DModel",
        inputs=(
            TensorSpec("x", ("B", "H", "W", c_in)),
            TensorSpec("t", ("B",)),
            TensorSpec("encoder_hidden_states", ("B", text_len, config.joint_attention_dim)),
            TensorSpec("pooled_projections", ("B", config.pooled_projection_dim)),
        ),
        outputs=(TensorSpec("v", ("B", "H", "W", c_out)),),
        dims={"B": batch, "H": height, "W": width},
        dtype=dtype,
        multiple={"H": p, "W": p},
    )


def _decoder_spec(config, *, batch: Range, height: Range, width: Range, dtype: str, class_name: str,
                  factor: int) -> ExportSpec:
    c = config.latent_channels
    return ExportSpec(
        class_name=class_name,
        inputs=(TensorSpec("latents", ("B", "H", "W", c)),),
        outputs=(TensorSpec("images", ("B", f"{factor}*H", f"{factor}*W", config.out_channels)),),
        dims={"B": batch, "H": height, "W": width},
        dtype=dtype,
        method="decode_latents",
    )


def _unet_spec(config, *, batch: Range, height: Range, width: Range, text_len: int, dtype: str) -> ExportSpec:
    """Dynamic batch; one latent size per graph: jax2onnx 0.17 cannot trace the UNet's strided
    (downsampling) convolutions over symbolic spatial sizes, so H and W are fixed."""
    down = 2 ** (len(config.block_out_channels) - 1)  # every level halves H and W
    for name, r in (("height", height), ("width", width)):
        if r.min != r.max:
            raise ValueError(f"UNet velocity graphs take one latent {name} (got {r}): jax2onnx cannot trace "
                             "strided convolutions over symbolic sizes; export one graph per size")
        if r.opt % down:
            raise ValueError(f"latent {name} {r.opt} is not a multiple of {down}")
    h, w = height.opt, width.opt
    return ExportSpec(
        class_name="UNet2DConditionModel",
        inputs=(
            TensorSpec("x", ("B", h, w, config.in_channels)),
            TensorSpec("t", ("B",)),
            TensorSpec("encoder_hidden_states", ("B", text_len, config.cross_attention_dim)),
        ),
        outputs=(TensorSpec("v", ("B", h, w, config.out_channels)),),
        dims={"B": batch},
        dtype=dtype,
    )


FAMILY_SPECS = {"SD3Transformer2DModel": _sd3_spec, "UNet2DConditionModel": _unet_spec}


def latent_limit(model) -> int:
    """The largest latent side a family's velocity graph is exported for by default."""
    if model.class_name == "SD3Transformer2DModel":
        return model.config.pos_embed_max_size * model.config.patch_size
    return 2 * model.config.sample_size  # UNet: twice its training size (SD1.5: 1024^2 images)


def latent_range(model, size: int) -> Range:
    """The latent-side range ``runner_for`` exports for a call at ``size``: the family's whole
    span where the graph can be dynamic (SD3), the one size where it cannot (UNet)."""
    if model.class_name == "SD3Transformer2DModel":
        return Range(model.config.patch_size, size, latent_limit(model))
    return Range(size, size, size)
# decoders: class -> pixels per latent pixel
DECODER_FACTORS = {
    "AutoencoderKL": lambda cfg: 2 ** (len(cfg.block_out_channels) - 1),
    "AutoencoderTiny": lambda cfg: 2 ** (len(cfg.decoder_block_out_channels) - 1),
}

DEFAULT_TEXT_LEN = {"SD3Transformer2DModel": 333,  # 77 CLIP + 256 T5 tokens, StableDiffusion3Pipeline's default
                    "UNet2DConditionModel": 77}


def velocity_spec(model, *, batch="1:1:8", resolution=None, latent=None, latent_scale: int = 8,
                  text_len: int | None = None, dtype: str | None = None) -> ExportSpec:
    """The export spec of ``model``'s velocity graph, from user-facing limits.

    Args:
        model: a ``FlowModel``.
        batch: ``Range`` or ``"min:opt:max"`` of the batch axis (count CFG's doubled batch).
        resolution: image side in pixels, ``"min:opt:max"``; divided by ``latent_scale``.
        latent: latent side directly (instead of ``resolution``); default: the config's sample_size.
        latent_scale: pixels per latent pixel (8 for the SD3/SD1.5/Flux VAEs, 1 in pixel space).
        text_len: text tokens (fixed in the graph).
        dtype: compute dtype inside the graph (default: the model's).
    """
    if model.class_name in DECODER_FACTORS:
        return decoder_spec(model, batch=batch, resolution=resolution, latent=latent, dtype=dtype)
    build = FAMILY_SPECS.get(model.class_name)
    if build is None:
        raise ValueError(f"no export spec for {model.class_name} "
                         f"(exportable: {', '.join([*FAMILY_SPECS, *DECODER_FACTORS])})")
    if resolution is not None and latent is not None:
        raise ValueError("give resolution (pixels) or latent, not both")
    if resolution is not None:
        side = Range.parse(resolution).scaled(latent_scale, "resolution")
    else:
        side = Range.parse(latent if latent is not None else model.config.sample_size)
    text_len = DEFAULT_TEXT_LEN[model.class_name] if text_len is None else int(text_len)
    dtype = dtype or str(np.dtype(model.dtype))
    return build(model.config, batch=Range.parse(batch), height=side, width=side, text_len=text_len, dtype=dtype)


def decoder_spec(model, *, batch="1:1:4", resolution=None, latent=None, dtype: str | None = None) -> ExportSpec:
    """The export spec of a VAE / TAESD decoder (``decode_latents``: scaled latents -> images).

    Args:
        batch: ``"min:opt:max"`` of the batch axis.
        resolution: image side in pixels, ``"min:opt:max"`` (divided by the decoder's factor).
        latent: latent side directly (default ``64``, SD1.5's 512^2).
    """
    factor = DECODER_FACTORS[model.class_name](model.config)
    if resolution is not None and latent is not None:
        raise ValueError("give resolution (pixels) or latent, not both")
    side = Range.parse(resolution).scaled(factor, "resolution") if resolution is not None else Range.parse(latent or 64)
    return _decoder_spec(model.config, batch=Range.parse(batch), height=side, width=side,
                         dtype=dtype or str(np.dtype(model.dtype)), class_name=model.class_name, factor=factor)
