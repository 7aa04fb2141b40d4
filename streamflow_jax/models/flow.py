"""``FlowModel``: a converted model (graph definition, weights, config) and its family's facts.

Outer layers ask a ``FlowModel`` for shapes (``latent_shape``, ``cond_shapes``...) and never
read its config fields: the answers come from the family's ``Family`` record.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from streamflow_jax import ops, sampling


def _compute_float(dtype) -> bool:
    """A floating dtype models compute in (float8 is a storage format: quantized weights)."""
    return jnp.issubdtype(dtype, jnp.floating) and jnp.dtype(dtype).itemsize >= 2


def pixels_to_latent(pixels, scale: int, multiple: int = 1, *, what: str = "image size") -> int:
    """An image side in pixels as latent pixels, ``scale`` image pixels each, the one place this
    arithmetic is done (pipelines, export specs, the CLI).

    Raises:
        ValueError: naming ``what``: not a positive integer, or not a multiple of
            ``scale * multiple`` (the latent side must be a multiple of ``multiple``).
    """
    if isinstance(pixels, bool) or not isinstance(pixels, int | np.integer):
        raise ValueError(f"{what} must be an integer number of pixels, got {pixels!r}")
    if pixels < 1:
        raise ValueError(f"{what} must be positive, got {pixels}")
    step = scale * multiple
    if pixels % step:
        raise ValueError(f"{what} {pixels} is not a multiple of {step}")
    return int(pixels) // scale


def abstract_module(family, config) -> nnx.Module:
    """The family's module with shape-only parameters (nothing allocated)."""
    return nnx.eval_shape(lambda: family.module_cls(config))


_SPLITS: dict = {}  # (module class, config) -> (graphdef, abstract state), the newest 32
_SPLITS_KEPT = 32


def abstract_split(family, config) -> tuple[nnx.GraphDef, nnx.State]:
    """``nnx.split(abstract_module(family, config))``, remembered per module class and config.

    Building a module (traced under ``eval_shape``) is most of the time it takes to load or
    convert a small model, and loading builds it twice (the plan, then the model). The graph
    definition is shared (it is immutable); the state is a fresh copy each call, for the
    caller to fill in.
    """
    key = (family.module_cls, config)
    try:
        hit = _SPLITS.get(key)
    except TypeError:  # a config with an unhashable field: nothing remembered
        return nnx.split(abstract_module(family, config))
    if hit is None:
        hit = nnx.split(abstract_module(family, config))
        while len(_SPLITS) >= _SPLITS_KEPT:
            _SPLITS.pop(next(iter(_SPLITS)))
        _SPLITS[key] = hit
    graphdef, state = hit
    return graphdef, jax.tree_util.tree_map(lambda leaf: leaf, state)


def flat_params(tree) -> tuple[dict, object, list[str]]:
    """A nested parameter dict as ``{"a.0.kernel": leaf}``, its treedef, and the names in order.

    The dotted names are the checkpoint-style keys the converters and orbax files use.
    """
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    names = [".".join(str(getattr(k, "key", k)) for k in path) for path, _ in leaves]
    return dict(zip(names, (leaf for _, leaf in leaves))), treedef, names


@jax.jit
def decode_latents(autoencoder, latents):
    """A VAE/TAESD ``FlowModel``'s ``decode_latents``, jitted with the weights as arguments."""
    return autoencoder.module.decode_latents(latents)


@jax.jit
def encode_latents(encoder, images):
    """A VAE/TAESD ``FlowModel``'s ``encode_latents`` (images in [-1, 1] -> scaled latents), jitted."""
    return encoder.module.encode_latents(images)


def velocity_of(module, adapter, x, t, cond):
    """The family's velocity: the module's own, or an adapter's around the module (PeRFlow)."""
    if adapter is not None:
        return adapter.velocity(module, x, t, cond)
    if not hasattr(module, "velocity"):
        raise ValueError(f"{type(module).__name__} predicts noise, not a velocity: load it from its pipeline directory "
                         "(the scheduler config gives its adapter), or sf.load(path, prediction_type='diff_eps'), or "
                         "model.with_adapter(PeRFlowAdapter(...))")
    return module.velocity(x, t, cond)


def _velocity_of_state(graphdef, adapter, switches, state, x, t, cond):
    del switches  # a cache key (ops.trace_switches): read again while tracing
    return velocity_of(nnx.merge(graphdef, state), adapter, x, t, cond)


_velocity = jax.jit(_velocity_of_state, static_argnums=(0, 1, 2))  # without compile options (a CPU)


@jax.tree_util.register_pytree_node_class
class FlowModel:
    """A converted model: NNX graph definition + parameter state + its config and family.

    It is a pytree whose leaves are the parameters, so it can be passed into ``jax.jit``
    (weights become arguments, not constants baked into the compiled program).

    Attributes:
        class_name: the diffusers class (``"SD3Transformer2DModel"``).
        config: the family's config dataclass.
        family: the ``Family`` record.
        adapter: how a network that predicts something else becomes a velocity (PeRFlow).
    """

    def __init__(self, class_name: str, config, graphdef, state, adapter=None, *, family):
        self.class_name = class_name
        self.config = config
        self.family = family
        self.graphdef = graphdef
        self.state = state
        self.adapter = adapter

    @classmethod
    def from_params(cls, family, config, params: dict, class_name: str | None = None) -> FlowModel:
        """Builds the model from a nested dict of arrays shaped like the module's state."""
        graphdef, state = abstract_split(family, config)
        # device arrays, so that jitted calls do not copy host weights on every call
        nnx.replace_by_pure_dict(state, jax.tree_util.tree_map(jnp.asarray, params))
        return cls(class_name or family.class_names[0], config, graphdef, state, family=family)

    # -- what the family says about this config ------------------------------------------------

    @property
    def latent_channels(self) -> int | None:
        return self.family.latent_channels(self.config)

    @property
    def latent_multiple(self) -> int:
        """Latent height and width must be multiples of this."""
        return self.family.latent_multiple(self.config)

    @property
    def max_latent(self) -> int | None:
        """The largest latent side the model takes (None: unbounded)."""
        return self.family.max_latent(self.config)

    @property
    def text_len(self) -> int | None:
        """The default text length ``L`` of its conditioning (text encoders: of their ids)."""
        return self.family.text_len(self.config)

    @property
    def scale_factor(self) -> int:
        """Autoencoders: image pixels per latent pixel."""
        return self.family.scale_factor(self.config)

    def latent_shape(self, height: int | None = None, width: int | None = None) -> tuple[int, int, int]:
        """``(H, W, C)`` of one latent, sides in latent pixels (default: the family's)."""
        side = self.family.default_latent(self.config)
        h, w = side if height is None else int(height), side if width is None else int(width)
        m = self.latent_multiple
        for name, v in (("height", h), ("width", w)):
            if v < 1 or v % m:
                raise ValueError(f"latent {name} {v} is not a positive multiple of {m} ({self.family.name})")
            if self.max_latent is not None and v > self.max_latent:
                raise ValueError(f"latent {name} {v} exceeds the largest the {self.family.name} model takes "
                                 f"({self.max_latent})")
        return (h, w, self.latent_channels)

    def cond_shapes(self, text_len: int | None = None) -> dict[str, tuple[int, ...]]:
        """Per-element shapes (no batch axis) of the ``cond`` dict ``velocity`` takes."""
        return self.family.conditioning(self.config, self.text_len if text_len is None else int(text_len))

    # -- running -------------------------------------------------------------------------------

    @property
    def dtype(self):
        """The dtype of the floating-point parameters (the compute dtype; FP8 storage of a
        quantized model's weights, see ``quantize``, is not one)."""
        return next(x.dtype for x in jax.tree_util.tree_leaves(self.state) if _compute_float(x.dtype))

    @property
    def module(self) -> nnx.Module:
        """The NNX module with these parameters (for direct calls and inspection)."""
        return nnx.merge(self.graphdef, self.state)

    def velocity(self, x: jax.Array, t: jax.Array, cond: dict[str, Any]) -> jax.Array:
        """RF velocity. ``x``: ``[B, H, W, C]``; ``t``: ``[B]`` sigma in [0, 1]; ``cond``: dict of
        ``[B, ...]`` arrays. Returns ``[B, H, W, C]`` in ``x``'s dtype. Jitted; usable under jit.

        A ``t`` given on the host (numbers, numpy) outside [0, 1] is refused: diffusers'
        timesteps (0 to 1000) are ``t * 1000``, and the model would run on them without a word.
        (Device arrays are not read back for the check.)"""
        x = jnp.asarray(x)
        if not isinstance(t, jax.Array):
            host = np.asarray(t, np.float64)
            if host.size and not (np.isfinite(host).all() and 0 <= host.min() and host.max() <= 1):
                raise ValueError(f"t must be the flow's time in [0, 1] (sigma; diffusers' timesteps / 1000), got "
                                 f"values in [{host.min():g}, {host.max():g}]")
        t = jnp.asarray(t, jnp.float32)
        self.check_call(x, t, cond)
        t = jnp.broadcast_to(t, (x.shape[0],))
        options = ops.compiler_options()  # a GPU's GEMM choice (ops.gemm_choice); none inside a caller's trace
        call = _velocity if options is None else ops.jitted(_velocity_of_state, options, static_argnums=(0, 1, 2))
        return call(self.graphdef, self.adapter, ops.trace_switches(), self.state, x, t, dict(cond))

    def check_call(self, x, t, cond, x_name: str = "x") -> None:
        """The shapes of a velocity call (static: checked while tracing too), each named with
        what this model takes, before they fail inside its layers with a message about them."""
        if x.ndim != 4:
            raise ValueError(f"{x_name} must be NHWC [B, H, W, C], got shape {x.shape}")
        b, c = x.shape[0], self.latent_channels
        if c is not None and x.shape[3] != c:
            raise ValueError(f"{x_name} has {x.shape[3]} channels (shape {x.shape}); {self.class_name} takes {c}")
        if t.shape not in ((), (b,)):
            raise ValueError(f"t has shape {t.shape}; expected one time per element, [B={b}] (or a scalar)")
        if not isinstance(cond, dict):
            raise ValueError(f"cond must be a dict of [B, ...] arrays, got {type(cond).__name__}")
        text = cond.get("encoder_hidden_states")
        want = self.cond_shapes(jnp.shape(text)[1] if text is not None and jnp.ndim(text) >= 2 else None)
        missing, extra = sorted(set(want) - set(cond)), sorted(set(cond) - set(want))
        if missing or extra:
            what = "; ".join(([f"cond lacks {', '.join(map(repr, missing))}"] if missing else [])
                             + ([f"cond has {', '.join(map(repr, extra))}, not an input of this model"] if extra
                                else []))
            raise ValueError(f"{what} ({self.class_name} takes {', '.join(map(repr, sorted(want)))})")
        for name, shape in want.items():
            got = tuple(jnp.shape(cond[name]))
            if got != (b, *shape):
                raise ValueError(f"cond[{name!r}] has shape {got}; {self.class_name} takes {(b, *shape)} here "
                                 "(the batch, then per element)")

    def noise_to(self, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
        """``x0`` (``[B, H, W, C]`` latents) noised to time ``t`` (``[B]``) with ``noise``, as
        this model's forward process defines it: the rectified flow's ``(1 - t) x0 + t noise``,
        or the adapter's (PeRFlow: the training diffusion's marginal)."""
        if jnp.shape(x0) != jnp.shape(noise):
            raise ValueError(f"x0 has shape {jnp.shape(x0)} and noise {jnp.shape(noise)}: they must be equal")
        if jnp.shape(t) not in ((), jnp.shape(x0)[:1]):
            raise ValueError(f"t has shape {jnp.shape(t)}; expected one time per element, [B={jnp.shape(x0)[0]}]")
        if self.adapter is not None and hasattr(self.adapter, "noise_to"):
            return self.adapter.noise_to(x0, noise, t)
        return sampling.noise_to(x0, noise, t)

    def with_adapter(self, adapter) -> FlowModel:
        """The same weights with a velocity adapter (``models.perflow.PeRFlowAdapter``)."""
        return self._replace(adapter=adapter)

    def with_conv_layout(self, layout: str) -> FlowModel:
        """The same model with its convolution kernels stored as ``layout``: ``"HWIO"`` (as
        converted and saved) or ``"OHWI"`` (``[out, kh, kw, in]``, the filter layout cuDNN
        takes: compiled for an H200, every HWIO kernel is transposed again at every call,
        ``benchmarks/hlo_gpu.py``). The numbers are the same. ``self`` when nothing changes;
        ``sf.save`` writes HWIO whatever the model holds. The stream engine applies
        ``$STREAMFLOW_JAX_CONV_LAYOUT`` (``ops.conv_layout_choice``) to its models."""
        from streamflow_jax.models.layers import relayout_convs

        module = self.module
        if not relayout_convs(module, layout):
            return self
        graphdef, state = nnx.split(module)
        return self._replace(graphdef=graphdef, state=state)

    @property
    def scanned(self) -> bool:
        """Whether runs of its repeated blocks are scanned (``with_scanned_blocks``)."""
        from streamflow_jax.models.layers import has_scanned_blocks

        return self.family.scan_blocks is not None and has_scanned_blocks(self.module)

    def with_scanned_blocks(self, scan: bool = True) -> FlowModel:
        """The same model with each run of identical repeated blocks (the lists its family's
        ``scan_blocks`` names: SD3's and Flux's transformer blocks, SDXL's depth-10
        transformers, T5's encoder blocks) run as one ``lax.scan`` over their weights stacked on a leading axis
        (``scan=False``: unrolled again, each block its own weights). The numbers are the same;
        XLA compiles one block body per run instead of every block (Flux.1-dev: 57 blocks as
        2 bodies, SD3-medium: 24 as 1 plus the last). ``self`` when nothing changes.

        Stacking copies the blocks' weights once (for a moment both copies are held). Saving,
        exporting, quantizing, calibrating, LoRAs and sharding see the blocks unrolled, as
        checkpoints name them; ``sf.load`` and the stream engine apply ``$STREAMFLOW_JAX_SCAN_BLOCKS``
        (``ops.scan_blocks_choice``).
        """
        from streamflow_jax.models.layers import has_scanned_blocks, scan_block_lists, unscan_block_lists

        pattern = self.family.scan_blocks
        if pattern is None:
            return self
        module = self.module
        if scan == has_scanned_blocks(module):
            return self
        if not (scan_block_lists(module, pattern) if scan else unscan_block_lists(module)):
            return self
        graphdef, state = nnx.split(module)
        return self._replace(graphdef=graphdef, state=state)

    def unrolled_edit(self, edit) -> FlowModel:
        """``edit(model)`` (a ``FlowModel`` to a ``FlowModel``) applied to this model with its
        blocks unrolled (checkpoint names, per-block weights), its result scanned again when
        this model was: for the transforms that walk layers by name (quantizing, LoRAs...)."""
        if not self.scanned:
            return edit(self)
        return edit(self.with_scanned_blocks(False)).with_scanned_blocks(True)

    def astype(self, dtype) -> FlowModel:
        """A copy with floating-point parameters cast to ``dtype`` (FP8 weights stay FP8)."""
        try:
            ok = _compute_float(jnp.dtype(dtype)) and jnp.dtype(dtype).itemsize <= 4
        except TypeError:
            ok = False
        if not ok:
            raise ValueError(f"astype: {dtype!r} is not a dtype models compute in (float32, bfloat16, float16)")
        cast = lambda a: a.astype(dtype) if _compute_float(a.dtype) else a  # noqa: E731
        return self._replace(state=jax.tree_util.tree_map(cast, self.state))

    def _replace(self, **changes) -> FlowModel:
        fields = dict(class_name=self.class_name, config=self.config, graphdef=self.graphdef, state=self.state,
                      adapter=self.adapter, family=self.family)
        return FlowModel(**{**fields, **changes})

    def config_dict(self) -> dict:
        return dataclasses.asdict(self.config)

    def fingerprint(self) -> str:
        """SHA-256 of the class, config, adapter and every parameter (name, dtype, shape, bytes).

        Keys caches of exported graphs and engines; computed once per model object. A model with
        its blocks scanned has its unrolled form's (it exports the same graph).
        """
        if getattr(self, "_fingerprint", None) is None:
            h = hashlib.sha256(self.class_name.encode())
            h.update(json.dumps(self.config_dict(), sort_keys=True).encode())
            h.update(repr(self.adapter).encode())
            state = self.with_scanned_blocks(False).state
            leaves = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(state))[0]
            for path, leaf in leaves:
                a = np.asarray(leaf)
                h.update(f"{jax.tree_util.keystr(path)}|{a.dtype}|{a.shape}".encode())
                h.update(np.ascontiguousarray(a).tobytes())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def tree_flatten(self):
        # the trace-time switches are part of the structure: a jitted function taking the model
        # traces again when one changes (ops.trace_switches)
        return (self.state,), (self.class_name, self.config, self.graphdef, self.adapter, self.family,
                               ops.trace_switches())

    @classmethod
    def tree_unflatten(cls, aux, children):
        class_name, config, graphdef, adapter, family, _ = aux
        return cls(class_name, config, graphdef, children[0], adapter, family=family)

    def __repr__(self):
        leaves = jax.tree_util.tree_leaves(self.state)
        n = sum(x.size for x in leaves)
        fp8 = sum(x.size for x in leaves if "float8" in str(x.dtype))  # quantize's FP8 weights
        return (f"FlowModel({self.class_name}, {n / 1e6:.1f}M params, {self.dtype}"
                + (f", {fp8 / 1e6:.1f}M of them FP8" if fp8 else "") + ")")
