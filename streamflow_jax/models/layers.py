"""Building blocks shared by the families (the only thing families share), NHWC.

Grouped by kind: leaves (linear, conv, norms, embedding), timestep/text embeddings, attention
and feed-forward, adaptive norms and the joint (text + image) transformer block, convolutional
blocks. Attribute names mirror the diffusers checkpoint keys (``to_q``, ``to_out.0``,
``ff.net.2``, ``time_emb_proj``); parameter leaves are
``kernel``/``bias`` on linears and convs (the converter transposes PyTorch's ``weight``) and
``weight``/``bias`` on norms and embeddings, so conversion stays renaming.

Parameters are created as zeros (they are always loaded from a checkpoint), so no module takes
an ``rngs`` argument: the one convention of this package.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from streamflow_jax import ops

# ---------------------------------------------------------------------------------------------
# Leaves
# ---------------------------------------------------------------------------------------------


class Linear(nnx.Module):
    """``x @ kernel + bias`` with ``kernel`` ``[in, out]``, computed in ``x``'s dtype."""

    def __init__(self, din: int, dout: int, *, bias: bool = True):
        self.kernel = nnx.Param(jnp.zeros((din, dout), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((dout,), jnp.float32)) if bias else None

    def __call__(self, x):  # [..., in] -> [..., out]
        y = jnp.matmul(x, self.kernel[...].astype(x.dtype))
        return y if self.bias is None else y + self.bias[...].astype(y.dtype)

    def of_parts(self, parts):  # [..., in_i] each -> [..., out]: self(concatenate(parts, -1))
        """One product per part with its rows of the kernel, summed (``linear_of_concat``)."""
        kernel = self.kernel[...]
        y = sum_of_parts(parts, lambda x, rows: jnp.matmul(x, kernel[rows].astype(x.dtype)))
        return y if self.bias is None else y + self.bias[...].astype(y.dtype)


def sum_of_parts(parts, product):
    """``sum(product(x, rows) for x in parts)``, ``rows`` the slice of the concatenated input's
    features that part ``x`` holds (``of_parts`` of a linear layer)."""
    y, start = None, 0
    for x in parts:
        term = product(x, slice(start, start + x.shape[-1]))
        y, start = term if y is None else y + term, start + x.shape[-1]
    return y


def linear_of_concat(layer, parts):
    """``layer(jnp.concatenate(parts, axis=-1))``, or, where ``ops.concat_product_choice()`` is
    ``"split"`` (and not while exporting), the layer's ``of_parts``: one product per part, no
    concatenated copy."""
    width = sum(x.shape[-1] for x in parts)
    if ops.concat_product_choice() == "split" and not ops.is_exporting() and hasattr(layer, "of_parts"):
        if width != layer_in_features(layer):
            raise ValueError(f"parts of {width} features for a layer of {layer_in_features(layer)}")
        return layer.of_parts(parts)
    return layer(jnp.concatenate(parts, axis=-1))


def layer_in_features(layer) -> int:
    """A linear layer's input width (``Linear``'s kernel is ``[in, out]``, FP8's weight ``[out, in]``)."""
    return layer.kernel.shape[0] if hasattr(layer, "kernel") else layer.weight.shape[1]


def project(x, *linears) -> list:
    """``[linear(x) for linear in linears]``: several projections of one input (queries, keys
    and values).

    FP8 layers with static input scales (``quantization.calibrate``) quantize ``x`` once for all
    of them, with the largest of their scales: calibrated on the same input, the scales are
    equal, so the numbers are those of separate calls, and XLA sees one e4m3 operand, which it
    quantizes once and merges the products of (one GEMM instead of three, as it does for bf16
    and dynamic scales). Separate parameters would hide that the scales are equal. Not while
    exporting: TensorRT takes Q/DQ scales as constants, not computed ones. Flux's single
    blocks pass their MLP's input projection too (``Attention(..., qkv=)``).
    """
    scales = [getattr(layer, "input_scale", None) for layer in linears]
    if len(linears) < 2 or any(s is None for s in scales) or ops.is_exporting():
        return [layer(x) for layer in linears]
    shared = scales[0][...]
    for s in scales[1:]:
        shared = jnp.maximum(shared, s[...])
    return [layer(x, input_scale=shared) for layer in linears]


CONV_LAYOUTS = ("HWIO", "OHWI")


class Conv2d(nnx.Module):
    """2-D convolution, NHWC, kernel ``[kh, kw, in, out]`` (``layout="HWIO"``, as converted) or
    ``[out, kh, kw, in]`` (``"OHWI"``: what cuDNN takes, see ``with_conv_layout``).

    Written on ``lax.conv_general_dilated`` rather than ``nnx.Conv``: jax2onnx 0.17's
    ``nnx.Conv`` converter emits a float32 kernel into half-precision graphs.
    """

    def __init__(self, cin: int, cout: int, kernel: int, *, stride: int = 1, padding: int = 0, bias: bool = True,
                 layout: str = "HWIO"):
        if layout not in CONV_LAYOUTS:
            raise ValueError(f"unsupported conv kernel layout {layout!r} (supported: {', '.join(CONV_LAYOUTS)})")
        shape = (kernel, kernel, cin, cout) if layout == "HWIO" else (cout, kernel, kernel, cin)
        self.kernel = nnx.Param(jnp.zeros(shape, jnp.float32))
        self.bias = nnx.Param(jnp.zeros((cout,), jnp.float32)) if bias else None
        self.stride, self.padding, self.layout = stride, padding, layout

    def __call__(self, x):  # [B, H, W, Cin] -> [B, H', W', Cout]
        p, kernel = self.padding, self.kernel[...].astype(x.dtype)
        pointwise = kernel.shape[1:3] == (1, 1) if self.layout == "OHWI" else kernel.shape[:2] == (1, 1)
        if pointwise and self.stride == 1 and p == 0 and ops.conv1x1_choice() == "dot":
            # the same product over the channels as a GEMM (``ops.conv1x1_choice``); the kernel
            # is a reshape of the stored one ([out, in] read transposed: XLA folds that into the GEMM)
            w = kernel.reshape(kernel.shape[-2:]) if self.layout == "HWIO" else kernel.reshape(kernel.shape[0], -1).T
            y = jnp.matmul(x, w)
        else:
            y = jax.lax.conv_general_dilated(x, kernel, (self.stride, self.stride), ((p, p), (p, p)),
                                             dimension_numbers=("NHWC", self.layout, "NHWC"))
        return y if self.bias is None else y + self.bias[...].astype(y.dtype)


_TO_LAYOUT = {("HWIO", "OHWI"): (3, 0, 1, 2), ("OHWI", "HWIO"): (1, 2, 3, 0)}


def relayout_convs(module: nnx.Module, layout: str) -> int:
    """Stores every ``Conv2d`` kernel of ``module`` (in place) as ``layout``; returns how many
    changed."""
    if layout not in CONV_LAYOUTS:
        raise ValueError(f"unsupported conv kernel layout {layout!r} (supported: {', '.join(CONV_LAYOUTS)})")
    convs = [node for _, node in nnx.iter_graph(module) if isinstance(node, Conv2d) and node.layout != layout]
    for conv in convs:
        kernel = conv.kernel[...]
        lead = kernel.ndim - 4  # a scanned block's kernels are stacked on leading axes
        perm = tuple(range(lead)) + tuple(lead + i for i in _TO_LAYOUT[conv.layout, layout])
        conv.kernel = nnx.Param(jnp.transpose(kernel, perm))
        conv.layout = layout
    return len(convs)


class GroupNorm(nnx.Module):
    def __init__(self, groups: int, channels: int, eps: float = 1e-5):
        self.weight = nnx.Param(jnp.ones((channels,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((channels,), jnp.float32))
        self.groups, self.eps = groups, eps

    def __call__(self, x):  # [B, H, W, C]
        y = ops.group_norm(x, self.groups, self.eps)
        return (y * self.weight[...] + self.bias[...]).astype(x.dtype)


class LayerNorm(nnx.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        self.weight = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32))
        self.eps = eps

    def __call__(self, x):  # [..., D]
        return (ops.layer_norm(x, self.eps) * self.weight[...] + self.bias[...]).astype(x.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        self.weight = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.eps = eps

    def __call__(self, x):  # [..., D] -> [..., D]
        return ops.rms_norm(x, self.weight[...], self.eps)


class Embedding(nnx.Module):
    def __init__(self, num: int, dim: int):
        self.weight = nnx.Param(jnp.zeros((num, dim), jnp.float32))

    def __call__(self, ids):  # [...] int -> [..., D]
        return jnp.take(self.weight[...], ids, axis=0)


class Placeholder(nnx.Module):
    """Holds a list index without parameters (PyTorch's Dropout slots in ``to_out``/``ff.net``)."""

    def __call__(self, x):
        return x


# ---------------------------------------------------------------------------------------------
# Timestep and text embeddings
# ---------------------------------------------------------------------------------------------


class TimestepEmbedding(nnx.Module):
    """``linear_1 -> SiLU -> linear_2`` (also diffusers' ``PixArtAlphaTextProjection`` with SiLU)."""

    def __init__(self, din: int, dout: int):
        self.linear_1 = Linear(din, dout)
        self.linear_2 = Linear(dout, dout)

    def __call__(self, x):
        return self.linear_2(jax.nn.silu(self.linear_1(x)))


class TimeTextEmbedding(nnx.Module):
    """diffusers' ``CombinedTimestepTextProjEmbeddings`` (SD3, Flux-schnell) and, with
    ``guidance``, ``CombinedTimestepGuidanceTextProjEmbeddings`` (guidance-distilled Flux):
    sinusoidal(256) -> MLP for the timestep (and the guidance scale), plus an MLP of the pooled
    text, summed."""

    FREQ_DIM = 256

    def __init__(self, dim: int, pooled_dim: int, *, guidance: bool = False):
        self.timestep_embedder = TimestepEmbedding(self.FREQ_DIM, dim)
        self.guidance_embedder = TimestepEmbedding(self.FREQ_DIM, dim) if guidance else None
        self.text_embedder = TimestepEmbedding(pooled_dim, dim)

    def _embed(self, mlp, values, dtype):  # [B] native values -> [B, D]
        freqs = ops.timestep_embedding(values, self.FREQ_DIM, flip_sin_to_cos=True, downscale_freq_shift=0)
        return mlp(freqs.astype(dtype))

    def __call__(self, timestep, pooled, guidance=None):  # [B], [B, E], [B] | None -> [B, D]
        emb = self._embed(self.timestep_embedder, timestep, pooled.dtype) + self.text_embedder(pooled)
        if self.guidance_embedder is not None:
            emb = emb + self._embed(self.guidance_embedder, guidance, pooled.dtype)
        return emb


# ---------------------------------------------------------------------------------------------
# Attention and feed-forward
# ---------------------------------------------------------------------------------------------


class Attention(nnx.Module):
    """diffusers' ``Attention`` in the forms the families use, ``dim = heads * head_dim``.

    - self-attention: ``attn(x)``;
    - cross-attention (``context_dim``): keys and values from ``attn(x, context)``;
    - joint attention (``joint``, MMDiT/Flux double blocks): text tokens ``context`` get their
      own projections (``add_q_proj``...) and join the image tokens in one attention; returns
      ``(image_out, text_out)`` (``text_out`` None when ``context_pre_only``);
    - ``qk_norm="rms_norm"``: per-head RMSNorm of queries and keys;
    - ``pre_only``: no ``to_out`` (Flux single blocks project outside);
    - ``rope``: rotary embedding ``(cos, sin)`` over the (joint) sequence.
    """

    def __init__(self, dim: int, heads: int, *, context_dim: int | None = None, qkv_bias: bool = False,
                 out_bias: bool = True, qk_norm: str | None = None, eps: float = 1e-6, joint: bool = False,
                 context_pre_only: bool = False, pre_only: bool = False):
        if qk_norm not in (None, "rms_norm"):
            raise ValueError(f"unsupported: qk_norm={qk_norm!r} (supported: None, 'rms_norm')")
        head_dim = dim // heads
        kv_dim = dim if joint or context_dim is None else context_dim
        self.heads, self.joint, self.pre_only = heads, joint, pre_only
        # static FP8 attention scales of q, k, v ([3] float32; quantization.calibrate with
        # attention=True), and, while it runs, ``(run id, name)``: each call reports the amaxes
        self.qkv_scale, self.calibration = nnx.data(None), None
        self.to_q = Linear(dim, dim, bias=qkv_bias)
        self.to_k = Linear(kv_dim, dim, bias=qkv_bias)
        self.to_v = Linear(kv_dim, dim, bias=qkv_bias)
        norm = (lambda: RMSNorm(head_dim, eps)) if qk_norm else (lambda: None)  # noqa: E731
        self.norm_q, self.norm_k = norm(), norm()
        self.to_out = None if pre_only else nnx.List([Linear(dim, dim, bias=out_bias), Placeholder()])
        if joint:
            self.add_q_proj, self.add_k_proj, self.add_v_proj = (Linear(dim, dim, bias=qkv_bias) for _ in range(3))
            self.norm_added_q, self.norm_added_k = norm(), norm()
            self.to_add_out = None if context_pre_only else Linear(dim, dim, bias=out_bias)

    def _heads(self, x, norm):  # [B, L, D] -> [B, L, N, K]
        b, n, d = x.shape
        x = x.reshape(b, n, self.heads, d // self.heads)
        return norm(x) if norm is not None else x

    def __call__(self, x, context=None, rope=None, *, qkv=None):
        """``x`` ``[B, M, D]``, ``context`` ``[B, L, D']`` or None, ``rope`` ``(cos, sin)``
        ``[M', K/2]`` each -> ``[B, M, D]`` (joint: ``([B, M, D], [B, L, D] | None)``).

        ``qkv``: self-attention only, ``x``'s queries, keys and values already projected by
        the caller (``project(x, attn.to_q, attn.to_k, attn.to_v, *more)``: a block that also
        projects ``x`` with layers of its own, so that static FP8 scales quantize ``x`` once
        for all of them)."""
        kv = x if context is None or self.joint else context
        if qkv is not None:
            if self.joint or context is not None:
                raise ValueError("qkv= is for self-attention: this attention projects its context too")
            q, k, v = qkv
        elif kv is x:
            q, k, v = project(x, self.to_q, self.to_k, self.to_v)
        else:
            q, (k, v) = self.to_q(x), project(kv, self.to_k, self.to_v)
        q, k, v = self._heads(q, self.norm_q), self._heads(k, self.norm_k), self._heads(v, None)
        if self.joint:
            # Text tokens first (diffusers' SD3 puts them last; attention does not care about
            # order, and Flux's position ids are text-first too), so that both splits below
            # start at the static text length, and lax.concatenate because jax2onnx 0.17
            # mis-sizes jnp.concatenate of a symbolic and a static axis: together they keep the
            # graph exportable with a symbolic image-token count.
            join = lambda c, i: jax.lax.concatenate([c, i], 1)  # noqa: E731
            cq, ck, cv = project(context, self.add_q_proj, self.add_k_proj, self.add_v_proj)
            q = join(self._heads(cq, self.norm_added_q), q)
            k = join(self._heads(ck, self.norm_added_k), k)
            v = join(self._heads(cv, None), v)
        if rope is not None:
            q, k = ops.apply_rope(q, *rope), ops.apply_rope(k, *rope)
        if self.calibration is not None:
            from streamflow_jax.quantization import record_attention

            record_attention(self.calibration, q, k, v)
        out = ops.attention(q, k, v, fp8_scales=None if self.qkv_scale is None else self.qkv_scale[...])
        out = out.reshape(out.shape[0], out.shape[1], -1)
        if not self.joint:
            return self._out(out)
        n = context.shape[1]
        txt, img = out[:, :n], out[:, n:]
        return self._out(img), (self.to_add_out(txt) if self.to_add_out is not None else None)

    def _out(self, x):
        return x if self.pre_only else self.to_out[0](x)


class GELU(nnx.Module):
    """``proj`` then GELU (tanh approximation, diffusers' ``gelu-approximate``)."""

    def __init__(self, din: int, dout: int):
        self.proj = Linear(din, dout)

    def __call__(self, x):
        return jax.nn.gelu(self.proj(x), approximate=True)


class GEGLU(nnx.Module):
    """``proj`` to twice the width, then ``h * gelu(gate)`` (exact GELU)."""

    def __init__(self, din: int, dout: int):
        self.proj = Linear(din, 2 * dout)

    def __call__(self, x):
        h, gate = jnp.split(self.proj(x), 2, axis=-1)
        return h * jax.nn.gelu(gate, approximate=False)


ACTIVATIONS = {"gelu-approximate": GELU, "geglu": GEGLU}


class FeedForward(nnx.Module):
    """diffusers' ``FeedForward``: ``net.0`` (activation with its projection), ``net.2`` out."""

    def __init__(self, dim: int, *, activation: str = "gelu-approximate", mult: int = 4):
        inner = mult * dim
        self.net = nnx.List([ACTIVATIONS[activation](dim, inner), Placeholder(), Linear(inner, dim)])

    def __call__(self, x):  # [B, L, D] -> [B, L, D]
        return self.net[2](self.net[0](x))


# ---------------------------------------------------------------------------------------------
# Adaptive norms (MMDiT, Flux)
# ---------------------------------------------------------------------------------------------


def modulate(x, shift, scale):
    """``x * (1 + scale) + shift`` with ``[B, D]`` modulation broadcast over tokens."""
    return x * (1 + scale[:, None]) + shift[:, None]


def modulation_input(h, linear):
    """``h`` (``silu(temb)``) as the input of one block's modulation product ``linear(h)``: as
    it is, or, with ``ops.modulation_choice() == "apart"``, passed through an optimization
    barrier with the layer's own bias (its weight if it has none), so that XLA sees a different
    operand in each block and merges no two blocks' products (nor concatenates their weights).
    Not for an FP8 layer with a static input scale: a scale parameter of its own already keeps
    its product apart (a barrier there only splits the quantizing kernels: 75 more on Flux-dev)."""
    if ops.modulation_choice() == "merged" or ops.is_exporting() or getattr(linear, "input_scale", None) is not None:
        return h
    tie = next(p for p in (getattr(linear, name, None) for name in ("bias", "kernel", "weight")) if p is not None)
    h, _ = jax.lax.optimization_barrier((h, tie[...]))
    return h


class AdaLayerNormZero(nnx.Module):
    """Conditioning -> ``n`` modulation vectors; the first two (shift, scale) modulate the
    LayerNorm of the input now, the rest are returned in order.

    n=6: diffusers' ``AdaLayerNormZero`` (rest: gate_msa, shift_mlp, scale_mlp, gate_mlp);
    n=9: ``SD35AdaLayerNormZeroX`` (three more for a second attention);
    n=3: ``AdaLayerNormZeroSingle`` (rest: gate).
    """

    def __init__(self, dim: int, n: int):
        self.linear = Linear(dim, n * dim)
        self.n = n

    def __call__(self, x, emb):  # [B, L, D], [B, D] -> [B, L, D], n-2 x [B, D]
        chunks = jnp.split(self.linear(modulation_input(jax.nn.silu(emb), self.linear)), self.n, axis=-1)
        return modulate(ops.layer_norm(x), chunks[0], chunks[1]), chunks[2:]


class AdaLayerNormContinuous(nnx.Module):
    """Final modulation: note the (scale, shift) chunk order, unlike AdaLayerNormZero."""

    def __init__(self, dim: int):
        self.linear = Linear(dim, 2 * dim)

    def __call__(self, x, emb):  # [B, L, D], [B, D] -> [B, L, D]
        scale, shift = jnp.split(self.linear(modulation_input(jax.nn.silu(emb), self.linear)), 2, axis=-1)
        return modulate(ops.layer_norm(x), shift, scale)


F16_MAX = 65504.0


def clip_f16(x):
    """diffusers clips float16 streams to the float16 range after Flux's blocks (inf -> max)."""
    return jnp.clip(x, -F16_MAX, F16_MAX) if x.dtype == jnp.float16 else x


class JointTransformerBlock(nnx.Module):
    """MMDiT's joint block (SD3/SD3.5) and Flux's double-stream block, which compute the same
    thing: image and text tokens modulated and projected apart, one joint attention, an MLP each.

    Args:
        dim, heads: width and attention heads.
        qk_norm: ``"rms_norm"`` (SD3.5, Flux) or None (SD3).
        context_pre_only: the last SD3 block: the text tokens only feed this block's attention
            (continuous norm, no text output).
        dual_attention: SD3.5's second self-attention of the image tokens (``attn2``), with its
            own three modulation vectors.
        clip_context_f16: Flux: the text stream is clipped to the float16 range after the block.
    """

    def __init__(self, dim: int, heads: int, *, qk_norm: str | None = None, context_pre_only: bool = False,
                 dual_attention: bool = False, clip_context_f16: bool = False):
        self.context_pre_only, self.dual_attention, self.clip_context_f16 = (context_pre_only, dual_attention,
                                                                             clip_context_f16)
        self.norm1 = AdaLayerNormZero(dim, 9 if dual_attention else 6)
        self.norm1_context = AdaLayerNormContinuous(dim) if context_pre_only else AdaLayerNormZero(dim, 6)
        self.attn = Attention(dim, heads, qkv_bias=True, qk_norm=qk_norm, joint=True,
                              context_pre_only=context_pre_only)
        self.attn2 = Attention(dim, heads, qkv_bias=True, qk_norm=qk_norm) if dual_attention else None
        self.ff = FeedForward(dim)
        self.ff_context = None if context_pre_only else FeedForward(dim)

    def __call__(self, x, context, temb, rope=None):
        """``[B, M, D]`` image, ``[B, L, D]`` text, ``[B, D]`` conditioning, rotary ``(cos, sin)``
        or None -> ``([B, M, D], [B, L, D] | None)``."""
        norm_x, mods = self.norm1(x, temb)
        gate_msa, shift_mlp, scale_mlp, gate_mlp = mods[:4]
        if self.context_pre_only:
            norm_c = self.norm1_context(context, temb)
        else:
            norm_c, (c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp) = self.norm1_context(context, temb)

        attn_x, attn_c = self.attn(norm_x, norm_c, rope)
        x_in, x = x, x + gate_msa[:, None] * attn_x
        if self.dual_attention:  # on the block's input, with its own modulation
            shift2, scale2, gate2 = mods[4:]
            x = x + gate2[:, None] * self.attn2(modulate(ops.layer_norm(x_in), shift2, scale2))
        x = x + gate_mlp[:, None] * self.ff(modulate(ops.layer_norm(x), shift_mlp, scale_mlp))

        if self.context_pre_only:
            return x, None
        context = context + c_gate_msa[:, None] * attn_c
        h = modulate(ops.layer_norm(context), c_shift_mlp, c_scale_mlp)
        context = context + c_gate_mlp[:, None] * self.ff_context(h)
        return x, clip_f16(context) if self.clip_context_f16 else context


# ---------------------------------------------------------------------------------------------
# Repeated blocks: unrolled, or scanned (``FlowModel.with_scanned_blocks``)
# ---------------------------------------------------------------------------------------------


def _call_block(block, carry, args):
    return block(*carry, *args) if isinstance(carry, tuple) else block(carry, *args)


def run_blocks(blocks, carry, *args):
    """Runs a list of blocks in order, each ``carry = block(*carry, *args)`` (or ``block(carry,
    *args)`` for a single array), whether the list holds the blocks themselves or, scanned,
    ``ScannedBlocks`` standing for runs of them. Every block list a family names in its
    ``scan_blocks`` pattern must be run through this."""
    for block in blocks:
        carry = block(carry, *args) if isinstance(block, ScannedBlocks) else _call_block(block, carry, args)
    return carry


class ScannedBlocks(nnx.Module):
    """Consecutive blocks of one structure run as one ``lax.scan``: their parameters stacked on
    a new leading axis (``stack`` is the first block holding every block's parameters), so that
    XLA compiles the block once. ``blocks()`` gives them back one by one."""

    def __init__(self, blocks):
        blocks = list(blocks)
        if len(blocks) < 2:
            raise ValueError(f"ScannedBlocks needs two or more blocks, got {len(blocks)}")
        graphdef, first = nnx.split(blocks[0])
        rest = [nnx.split(b)[1] for b in blocks[1:]]
        self.stack = nnx.merge(graphdef, jax.tree_util.tree_map(lambda *a: jnp.stack(a), first, *rest))
        self.length = len(blocks)

    def blocks(self) -> list:
        graphdef, state = nnx.split(self.stack)
        return [nnx.merge(graphdef, jax.tree_util.tree_map(lambda a, i=i: a[i], state)) for i in range(self.length)]

    def __call__(self, carry, *args):
        graphdef, state = nnx.split(self.stack)

        def body(carry, block_state):
            return _call_block(nnx.merge(graphdef, block_state), carry, args), None

        return jax.lax.scan(body, carry, state)[0]


def has_scanned_blocks(module: nnx.Module) -> bool:
    return any(isinstance(node, ScannedBlocks) for _, node in nnx.iter_graph(module))


def _structure(block):
    """What must be equal for two blocks to share a scan: graph and parameter shapes/dtypes."""
    graphdef, state = nnx.split(block)
    leaves, treedef = jax.tree_util.tree_flatten(state)
    return graphdef, treedef, tuple((tuple(a.shape), str(a.dtype)) for a in leaves)


def set_at(module: nnx.Module, path: tuple, new) -> None:
    """Puts ``new`` at ``path`` (from ``nnx.iter_graph``) inside ``module``."""
    parent = module
    for key in path[:-1]:
        parent = parent[int(key)] if isinstance(parent, nnx.List) else getattr(parent, key)
    if isinstance(parent, nnx.List):
        parent[int(path[-1])] = new
    else:
        setattr(parent, path[-1], new)


def _block_lists(module, pattern: str) -> list[tuple[tuple, nnx.List]]:
    import re

    rule = re.compile(pattern)
    return [(path, node) for path, node in nnx.iter_graph(module)
            if isinstance(node, nnx.List) and rule.search(".".join(map(str, path)))]


def scan_block_lists(module: nnx.Module, pattern: str) -> int:
    """Replaces (in place) each run of two or more consecutive blocks of one structure, in the
    block lists whose dotted paths match ``pattern``, by a ``ScannedBlocks``; returns how many
    runs it made."""
    made = 0
    for path, blocks in _block_lists(module, pattern):
        if any(isinstance(b, ScannedBlocks) for b in blocks):
            continue
        runs: list[list] = []
        last = None
        for block in blocks:
            key = _structure(block)
            if runs and key == last:
                runs[-1].append(block)
            else:
                runs.append([block])
            last = key
        if all(len(r) == 1 for r in runs):
            continue
        made += sum(len(r) > 1 for r in runs)
        set_at(module, path, nnx.List([ScannedBlocks(r) if len(r) > 1 else r[0] for r in runs]))
    return made


def unscan_block_lists(module: nnx.Module) -> int:
    """The inverse of ``scan_block_lists`` (in place): every ``ScannedBlocks`` back as its blocks;
    returns how many it undid."""
    undone = 0
    for path, blocks in [(p, n) for p, n in nnx.iter_graph(module) if isinstance(n, nnx.List)]:
        if not any(isinstance(b, ScannedBlocks) for b in blocks):
            continue
        undone += sum(isinstance(b, ScannedBlocks) for b in blocks)
        flat = [x for b in blocks for x in (b.blocks() if isinstance(b, ScannedBlocks) else [b])]
        set_at(module, path, nnx.List(flat))
    return undone


# ---------------------------------------------------------------------------------------------
# Convolutional blocks (UNet, VAE)
# ---------------------------------------------------------------------------------------------


class ResnetBlock2D(nnx.Module):
    """GroupNorm -> SiLU -> conv, twice, with an optional time embedding added in between."""

    def __init__(self, cin: int, cout: int, temb: int | None, groups: int, eps: float):
        self.norm1 = GroupNorm(groups, cin, eps)
        self.conv1 = Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = Linear(temb, cout) if temb else None
        self.norm2 = GroupNorm(groups, cout, eps)
        self.conv2 = Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = Conv2d(cin, cout, 1) if cin != cout else None

    def __call__(self, x, temb=None):  # [B, H, W, Cin], [B, T] | None -> [B, H, W, Cout]
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(jax.nn.silu(temb))[:, None, None, :]
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        return (self.conv_shortcut(x) if self.conv_shortcut is not None else x) + h


class Downsample2D(nnx.Module):
    """Stride-2 3x3 conv; ``padding=0`` pads right and bottom only, as diffusers' VAE."""

    def __init__(self, channels: int, padding: int):
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=padding)

    def __call__(self, x):
        if self.conv.padding == 0:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return self.conv(x)


def upsample_nearest2x(x, size=None):
    """Nearest 2x upsampling, ``[B, H, W, C] -> [B, 2H, 2W, C]``, or to ``size = (H', W')``.

    With a ``size`` that is not plainly twice the input (odd skip sizes, or symbolic sizes in
    an ONNX export) pixel ``i`` copies input pixel ``i // 2``, written as a gather so the
    result has exactly the shape ``size`` names.
    """
    h, w = x.shape[1], x.shape[2]
    if size is None or (isinstance(size[0], int) and isinstance(size[1], int) and tuple(size) == (2 * h, 2 * w)):
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    x = jnp.take(x, jnp.arange(size[0]) // 2, axis=1)
    return jnp.take(x, jnp.arange(size[1]) // 2, axis=2)


class Upsample2D(nnx.Module):
    def __init__(self, channels: int):
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def __call__(self, x, size=None):  # size: the (H, W) of the skip connection it will meet
        return self.conv(upsample_nearest2x(x, size))
