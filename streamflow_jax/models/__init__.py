"""Model families and the loaded-model handle ``FlowModel``.

A family is one diffusers class name mapped to a config dataclass and a root NNX module that
has ``velocity(x, t, cond)``. New families register here (and in ``convert/``).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from streamflow_jax.models.clip import CLIPTextConfig, CLIPTextModel
from streamflow_jax.models.mmdit import SD3Config, SD3Transformer2DModel
from streamflow_jax.models.taesd import AutoencoderTiny, TinyConfig
from streamflow_jax.models.unet import UNet2DConditionModel, UNetConfig
from streamflow_jax.models.vae import AutoencoderKL, VAEConfig


class Family(NamedTuple):
    name: str  # short name used in messages and the CLI
    config_cls: type
    module_cls: type


FAMILIES: dict[str, Family] = {
    "SD3Transformer2DModel": Family("sd3", SD3Config, SD3Transformer2DModel),
    "UNet2DConditionModel": Family("unet", UNetConfig, UNet2DConditionModel),
    "AutoencoderKL": Family("vae", VAEConfig, AutoencoderKL),
    "AutoencoderTiny": Family("taesd", TinyConfig, AutoencoderTiny),
    "CLIPTextModel": Family("clip", CLIPTextConfig, CLIPTextModel),
    "CLIPTextModelWithProjection": Family("clip", CLIPTextConfig, CLIPTextModel),
}


def family_of(class_name: str) -> Family:
    try:
        return FAMILIES[class_name]
    except KeyError:
        raise ValueError(
            f"unsupported model class {class_name!r} (supported: {', '.join(sorted(FAMILIES))})"
        ) from None


def abstract_module(class_name: str, config) -> nnx.Module:
    """The family's module with shape-only parameters (nothing allocated)."""
    fam = family_of(class_name)
    return nnx.eval_shape(lambda: fam.module_cls(config, rngs=nnx.Rngs(0)))


def flat_params(tree) -> tuple[dict, object, list[str]]:
    """A nested parameter dict as ``{"a.0.kernel": leaf}``, its treedef, and the names in order.

    The dotted names are the checkpoint-style keys the converters and orbax files use.
    """
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    names = [".".join(str(getattr(k, "key", k)) for k in path) for path, _ in leaves]
    return dict(zip(names, (leaf for _, leaf in leaves))), treedef, names


@jax.jit
def decode_latents(decoder, latents):
    """A VAE/TAESD ``FlowModel``'s ``decode_latents``, jitted with the weights as arguments."""
    return decoder.module.decode_latents(latents)


def velocity_of(module, adapter, x, t, cond):
    """The family's velocity: the module's own, or an adapter's around the module (PeRFlow)."""
    if adapter is not None:
        return adapter.velocity(module, x, t, cond)
    if not hasattr(module, "velocity"):
        raise ValueError(f"{type(module).__name__} is not a velocity field by itself; give it an adapter, "
                         "e.g. model.with_adapter(PeRFlowAdapter('diff_eps'))")
    return module.velocity(x, t, cond)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _velocity(graphdef, adapter, state, x, t, cond):
    return velocity_of(nnx.merge(graphdef, state), adapter, x, t, cond)


@jax.tree_util.register_pytree_node_class
class FlowModel:
    """A converted model: NNX graph definition + parameter state + its diffusers config.

    It is a pytree whose leaves are the parameters, so it can be passed into ``jax.jit``
    (weights become arguments, not constants baked into the compiled program).

    Attributes:
        class_name: the diffusers class (``"SD3Transformer2DModel"``).
        config: the family's config dataclass.
    """

    def __init__(self, class_name: str, config, graphdef, state, adapter=None):
        self.class_name = class_name
        self.config = config
        self.graphdef = graphdef
        self.state = state
        self.adapter = adapter  # e.g. PeRFlowAdapter: how a UNet's output becomes a velocity

    @classmethod
    def from_params(cls, class_name: str, config, params: dict) -> FlowModel:
        """Builds the model from a nested dict of arrays shaped like the module's state."""
        graphdef, state = nnx.split(abstract_module(class_name, config))
        # device arrays, so that jitted calls do not copy host weights on every call
        nnx.replace_by_pure_dict(state, jax.tree_util.tree_map(jnp.asarray, params))
        return cls(class_name, config, graphdef, state)

    @property
    def family(self) -> str:
        return family_of(self.class_name).name

    @property
    def dtype(self):
        """The dtype of the floating-point parameters (the compute dtype)."""
        return next(x.dtype for x in jax.tree_util.tree_leaves(self.state) if jnp.issubdtype(x.dtype, jnp.floating))

    @property
    def module(self) -> nnx.Module:
        """The NNX module with these parameters (for direct calls and inspection)."""
        return nnx.merge(self.graphdef, self.state)

    def velocity(self, x: jax.Array, t: jax.Array, cond: dict[str, Any]) -> jax.Array:
        """RF velocity. ``x``: ``[B, H, W, C]``; ``t``: ``[B]`` sigma in [0, 1]; ``cond``: dict of
        ``[B, ...]`` arrays. Returns ``[B, H, W, C]`` in ``x``'s dtype. Jitted; usable under jit."""
        x = jnp.asarray(x)
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],))
        return _velocity(self.graphdef, self.adapter, self.state, x, t, dict(cond))

    def with_adapter(self, adapter) -> FlowModel:
        """The same weights with a velocity adapter (``models.perflow.PeRFlowAdapter``)."""
        return FlowModel(self.class_name, self.config, self.graphdef, self.state, adapter)

    def astype(self, dtype) -> FlowModel:
        """A copy with floating-point parameters cast to ``dtype``."""
        cast = lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a  # noqa: E731
        return FlowModel(self.class_name, self.config, self.graphdef, jax.tree_util.tree_map(cast, self.state),
                         self.adapter)

    def config_dict(self) -> dict:
        return dataclasses.asdict(self.config)

    def fingerprint(self) -> str:
        """SHA-256 of the class, config, adapter and every parameter (name, dtype, shape, bytes).

        Keys caches of exported graphs and engines; computed once per model object.
        """
        if getattr(self, "_fingerprint", None) is None:
            h = hashlib.sha256(self.class_name.encode())
            h.update(json.dumps(self.config_dict(), sort_keys=True).encode())
            h.update(repr(self.adapter).encode())
            leaves = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(self.state))[0]
            for path, leaf in leaves:
                a = np.asarray(leaf)
                h.update(f"{jax.tree_util.keystr(path)}|{a.dtype}|{a.shape}".encode())
                h.update(np.ascontiguousarray(a).tobytes())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def tree_flatten(self):
        return (self.state,), (self.class_name, self.config, self.graphdef, self.adapter)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(aux[0], aux[1], aux[2], children[0], aux[3])

    def __repr__(self):
        n = sum(x.size for x in jax.tree_util.tree_leaves(self.state))
        return f"FlowModel({self.class_name}, {n / 1e6:.1f}M params, {self.dtype})"
