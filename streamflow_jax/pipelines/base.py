"""What every pipeline shares: the ``Pipeline`` factory and prompt -> image sampling.

``Pipeline.from_diffusers(path, **kwargs)`` picks the pipeline class from the directory's
``model_index.json`` ``_class_name`` (as diffusers' ``DiffusionPipeline`` does) and passes the
keyword arguments through. A prompt pipeline (``PromptPipeline``) says how prompts become
conditioning and which grid of its scheduler record it samples; the guidance rule, noise,
image-to-image, sampling and decoding are here.
"""

from __future__ import annotations

import inspect
import json
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from streamflow_jax import backends, schedules
from streamflow_jax.backends.cache import enable_compilation_cache
from streamflow_jax.checkpoint import refuse_missing_components
from streamflow_jax.errors import ConfigError
from streamflow_jax.models import decode_latents, encode_latents, pixels_to_latent
from streamflow_jax.pipelines.images import check_output_type, check_taesd, images_to_array, to_float_images, to_uint8
from streamflow_jax.sampling import Guidance, check_seed, per_element_rule, seeded_noise
from streamflow_jax.sharding import shard_batch

PIPELINES: dict[str, type] = {}  # model_index.json _class_name -> pipeline class


def register(*class_names: str):
    """Class decorator: the pipeline class that ``Pipeline.from_diffusers`` picks for these names."""

    def wrap(cls):
        for name in class_names:
            PIPELINES[name] = cls
        return cls

    return wrap


def pipeline_class(path) -> type:
    """The pipeline class a directory's ``model_index.json`` names."""
    index = Path(path) / "model_index.json"
    if not index.is_file():
        raise ConfigError(f"{path}: no model_index.json (not a diffusers pipeline directory)")
    try:
        name = json.loads(index.read_text()).get("_class_name")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise ConfigError(f"{index}: not a valid JSON object ({e})") from None
    if not isinstance(name, str) or name not in PIPELINES:
        raise ConfigError(f"{index}: unsupported pipeline class {name!r} (supported: {', '.join(sorted(PIPELINES))})")
    return PIPELINES[name]


# diffusers' from_pretrained keywords, and what this library takes instead
DIFFUSERS_LOAD_KEYWORDS = {
    "torch_dtype": "dtype= (e.g. jnp.bfloat16 or 'bfloat16')",
    "use_safetensors": "weights are always read from safetensors: drop it",
    "low_cpu_mem_usage": "drop it: weights are read straight into place",
    "device_map": "mesh= (sf.make_mesh) places the weights on devices",
    "loras": "this pipeline takes no LoRAs; a model's merge with sf.load(..., loras=) or sf.apply_loras",
    "revision": "a local directory only: there is no hub here",
    "cache_dir": "a local directory only: there is no hub here",
    "token": "a local directory only: there is no hub here",
}


def _refuse_load_keywords(klass, kwargs: dict) -> None:
    """A ``TypeError`` naming ``from_diffusers`` (not the class's ``load``) for each keyword the
    class does not take, with this library's name for diffusers' (``torch_dtype`` -> ``dtype``)."""
    params = inspect.signature(klass.load).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        known = set(params) - {"cls", "path"}  # a load that passes the rest on (SDXL's micro-conditioning)
        unknown = [k for k in kwargs if k not in known and k in DIFFUSERS_LOAD_KEYWORDS]
    else:
        unknown = [k for k in kwargs if k not in params]
    if unknown:
        hints = [f"{k!r} ({DIFFUSERS_LOAD_KEYWORDS[k]})" if k in DIFFUSERS_LOAD_KEYWORDS else repr(k) for k in unknown]
        takes = ", ".join(k for k, p in params.items()
                          if k not in ("cls", "path") and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD))
        raise TypeError(f"from_diffusers() for {klass.__name__} got unexpected keyword argument(s) "
                        f"{', '.join(hints)} (it takes: {takes})")


def component_loras(path, loras) -> dict | None:
    """A pipeline ``load``'s ``loras``: files (as ``sf.convert`` takes them) grouped by the
    components their keys name, for each component's ``sf.load``; a mapping (already grouped)
    as it is; None when there are none. A key for a component the pipeline does not have is an
    error (it would be merged nowhere)."""
    if not loras:
        return None
    if isinstance(loras, Mapping):
        return dict(loras)
    from streamflow_jax.checkpoint import loras_by_component

    path = Path(path)
    try:
        raw = json.loads((path / "model_index.json").read_text())
    except (OSError, ValueError):
        raw = {}
    present = {k for k, v in raw.items() if not k.startswith("_") and isinstance(v, list) and v and v[0] is not None}
    return loras_by_component(loras, present)


class Pipeline:
    """Base class and factory of the pipelines."""

    @classmethod
    def from_diffusers(cls, path, **kwargs) -> Pipeline:
        """A diffusers pipeline directory, or one converted by ``sf.convert``.

        On ``Pipeline`` itself, the class comes from ``model_index.json``'s ``_class_name``
        (``StableDiffusionPipeline`` -> ``PeRFlowPipeline``, ...); on a subclass, that class.
        Keyword arguments (``taesd``, ``dtype``, ``variant``, ...) go to the class's ``load``.
        ``loras`` (files as ``sf.convert`` takes them: ``file``, ``(file, scale)``,
        ``"file:scale"``, or diffusers' ``save_lora_weights`` directory) are merged into the
        components their keys name, as they load (the UNet or transformer and the text
        encoders; ``sf.apply_loras`` for one model later). Turns on the persistent compilation
        cache (``backends.cache.enable_compilation_cache``).
        """
        if not isinstance(path, str | Path):
            raise ValueError(f"from_diffusers takes a directory path, got {type(path).__name__}")
        klass = pipeline_class(path) if cls is Pipeline else cls
        if not kwargs.get("loras", True):
            del kwargs["loras"]  # an empty list (the CLI's default)
        _refuse_load_keywords(klass, kwargs)
        if (Path(path) / "model_index.json").is_file():  # an incomplete download, before any weight is read
            refuse_missing_components(Path(path), error=ConfigError)
        if kwargs.get("taesd") is not None:
            check_taesd(kwargs["taesd"])
        enable_compilation_cache()
        return klass.load(Path(path), **kwargs)

    @classmethod
    def load(cls, path, **kwargs) -> Pipeline:
        raise NotImplementedError(f"{cls.__name__} does not load from a directory")

    def use_export(self, path, backend: str) -> Pipeline:
        """Runs the velocity model from the export directory ``path`` (``streamflow-jax export``
        of this pipeline or its velocity model) whenever this pipeline, or a stream over it, is
        called with ``backend=backend``, instead of exporting on demand
        (``backends.use_export``: the export must be of this very model, loaded the same way,
        and its profile must take the calls: batch, CFG's doubled batch included, and size).
        The text encoders and the autoencoder still run with XLA.

        Returns:
            ``self``.
        """
        backends.use_export(self.model, path, backend)
        self._exports = {**getattr(self, "_exports", {}), backend: path}
        return self

    def check_export(self, backend: str) -> None:
        """Before a call with ``backend``: the export ``use_export`` gave for it is still the
        model's. A model quantized, cast or given LoRAs since is refused (``use_export``'s
        error), not exported on demand behind the user's back."""
        path = getattr(self, "_exports", {}).get(backend)
        if path is not None and backends.given_export(self.model, backend) is None:
            backends.use_export(self.model, path, backend)


def img2img_start(model, x0, noise, grid, strength):
    """Image-to-image: the ``[S'+1, B]`` tail of ``grid`` that ``strength`` keeps (one per
    element when ``strength`` is one per element) and ``x0`` noised to its first time.

    Strengths stay Python floats (``schedules.truncate`` computes as diffusers does: in float32
    5 steps at strength 0.6 would keep 4 steps, not 3)."""
    b = x0.shape[0]
    given = schedules.DEFAULT_STRENGTH if strength is None else strength
    grids = schedules.stack([schedules.truncate(grid, s) for s in schedules.strength_values(given, b)])  # [S'+1, B]
    return model.noise_to(jnp.asarray(x0), jnp.asarray(noise), grids[0]), grids


MAX_SEQUENCE_LENGTH = 512  # T5 tokens: diffusers' SD3 and Flux pipelines refuse more


def check_text_len(text_len) -> int | None:
    """A ``max_sequence_length`` (None: the pipeline's), or a ValueError: an integer from 1 to
    ``MAX_SEQUENCE_LENGTH``, as diffusers' SD3 and Flux pipelines take."""
    if text_len is None:
        return None
    if isinstance(text_len, bool) or not isinstance(text_len, int | np.integer) \
            or not 1 <= text_len <= MAX_SEQUENCE_LENGTH:
        raise ValueError(f"max_sequence_length must be an integer from 1 to {MAX_SEQUENCE_LENGTH}, got {text_len!r}")
    return int(text_len)


def check_prompts(prompts) -> list[str]:
    prompts = [prompts] if isinstance(prompts, str) else list(prompts) if isinstance(prompts, list | tuple) else None
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a string or a non-empty list of strings")
    return prompts


# diffusers' names for arguments of a pipeline call, and what this library takes instead
DIFFUSERS_KEYWORDS = {
    "prompt": "pass the prompts first: pipe('a cat') or pipe(['a cat', 'a dog'])",
    "prompt_2": "one prompt feeds every text encoder here: pass the prompts first",
    "prompt_3": "one prompt feeds every text encoder here: pass the prompts first",
    "negative_prompt_2": "negative_prompt= feeds every text encoder (where guidance reads one)",
    "negative_prompt_3": "negative_prompt= feeds every text encoder (where guidance reads one)",
    "true_cfg_scale": "Flux runs no classifier-free guidance here: guidance_scale= is Flux-dev's guidance input",
    "num_inference_steps": "steps=",
    "generator": "seed= (an int in [0, 2**32))",
    "latents": "noise= ([B, h, w, C] latents)",
    "num_images_per_prompt": "repeat the prompt in the list: pipe(['a cat'] * 4, seed=...)",
    "prompt_embeds": "prompts are encoded by the pipeline: pass the prompts",
    "return_dict": "output_type= ('pil', 'np' or 'latent'); the call returns the images",
}


def refuse_unknown_keywords(owner: str, given: dict) -> None:
    """A ``TypeError`` naming each keyword a pipeline call does not take, with this library's
    name for diffusers' (``prompt=`` -> the first argument, ``num_inference_steps`` -> ``steps``)."""
    if not given:
        return
    hints = [f"{k!r} ({DIFFUSERS_KEYWORDS[k]})" if k in DIFFUSERS_KEYWORDS else repr(k) for k in given]
    raise TypeError(f"{owner}() got unexpected keyword argument(s) {', '.join(hints)}")


def negative_prompt_problem(negative_prompt, guidance: Guidance, *, mode: str = "cfg", default=None,
                            name: str = "this pipeline") -> str | None:
    """Why a negative prompt would be ignored, or None when it is read (or empty): only
    classifier-free guidance reads one, and ``guidance`` (the resolved request) may have none;
    ``mode`` and ``default`` (the pipeline's guidance mode and default scale) say why. diffusers
    drops such a prompt without a word; the Python API warns, the CLI and the server refuse."""
    given = [negative_prompt] if isinstance(negative_prompt, str) else list(negative_prompt)
    if not any(isinstance(t, str) and t for t in given):
        return None
    if guidance.cfg and np.ndim(guidance.scale) and len(given) == np.size(guidance.scale) > 1:
        # one scale and one negative prompt per prompt: those at <= 1 run no guidance
        unread = [i for i, (t, g) in enumerate(zip(given, np.ravel(guidance.scale))) if t and g <= 1]
        return None if not unread else (f"the negative prompt(s) of prompt(s) {unread} are ignored: their guidance "
                                        "scales are <= 1, where classifier-free guidance is off")
    if guidance.cfg:
        return None
    if mode == "embedded":
        why = ("this model takes the guidance scale as an input (guidance-distilled, like Flux.1-dev) and runs no "
               "unconditional branch")
    elif mode == "none":
        why = "this model takes no guidance (like Flux.1-schnell)"
    else:
        scale = "off by default" if default is None else f"{default:g} by default"
        why = (f"classifier-free guidance is off: it runs at guidance scales above 1 ({scale} for {name}); "
               "give a larger guidance scale to use a negative prompt")
    shown = given[0] if len(set(given)) == 1 else given
    return f"negative prompt {shown!r:.80} is ignored: {why}"


class PromptPipeline(Pipeline):
    """Prompt -> image: encode the prompts, sample the velocity model, decode.

    A subclass sets ``model`` (the velocity ``FlowModel``), ``decoder`` (VAE or TAESD),
    ``scheduler`` (its ``schedules.Scheduler`` record) and ``text_len`` (the main text
    encoder's default length), and implements ``encode`` (prompts -> conditioning) and
    ``schedule`` (steps -> the scheduler's grid for this pipeline class).

    Attributes:
        model_classes: the velocity model classes the pipeline runs (its model_index.json's).
        default_steps: Euler steps when ``steps`` is not given.
        default_guidance: guidance scale when not given (None: no guidance).
        cfg_mode: what the pipeline does with a guidance scale when its model takes none as an
            input: ``"cfg"`` (classifier-free guidance) or ``"none"`` (ignored, Flux-schnell).
    """

    model_classes: tuple[str, ...] = ()
    default_steps = 4
    default_guidance: float | None = None
    cfg_mode = "cfg"
    zero_empty_negative = False  # SDXL's force_zeros_for_empty_prompt (see zeroed_if_empty)

    model: Any
    decoder: Any
    scheduler: schedules.Scheduler
    text_len: int
    mesh: Any = None  # set by load(mesh=...): batches are split over its data axis

    # -- what a family's pipeline provides -----------------------------------------------------

    def encode(self, prompts: list[str], text_len: int | None = None) -> dict[str, jax.Array]:
        """Prompts -> conditioning ``{name: [B, ...]}`` (without any guidance entry), the text
        ``text_len`` tokens long where the pipeline allows (``max_sequence_length``)."""
        raise NotImplementedError

    def schedule(self, steps: int, latent_shape: tuple[int, int, int]) -> np.ndarray:
        """The ``[S+1]`` time grid for ``steps`` at this latent size."""
        raise NotImplementedError

    # -- shared --------------------------------------------------------------------------------

    @classmethod
    def check_model(cls, model) -> None:
        """Refuses a velocity model of another class than the pipeline runs."""
        if model.class_name not in cls.model_classes:
            raise ConfigError(f"{cls.__name__} runs {' or '.join(cls.model_classes)}, not {model.class_name}")

    @property
    def guidance_mode(self) -> str:
        """``"embedded"`` when the model takes the scale as an input (Flux-dev), else ``cfg_mode``."""
        return "embedded" if "guidance" in self.model.cond_shapes(1) else self.cfg_mode

    def resolve_guidance(self, guidance_scale=None) -> Guidance:
        """What a requested scale means for this pipeline (``sampling.Guidance.resolve``: None is the
        default; a scalar <= 1 turns classifier-free guidance off, as in diffusers)."""
        return Guidance.resolve(guidance_scale, mode=self.guidance_mode, default=self.default_guidance)

    def negative_prompt_problem(self, negative_prompt, guidance: Guidance) -> str | None:
        """Why ``negative_prompt`` would be ignored under ``guidance``, or None
        (``pipelines.base.negative_prompt_problem``)."""
        return negative_prompt_problem(negative_prompt, guidance, mode=self.guidance_mode,
                                       default=self.default_guidance, name=type(self).__name__)

    @property
    def vae_scale(self) -> int:
        """Image pixels per latent pixel."""
        return self.decoder.scale_factor

    def latent_shape(self, height: int | None = None, width: int | None = None) -> tuple[int, int, int]:
        """``(h, w, C)`` of the latent of an image of ``height x width`` pixels (default: the model's)."""
        m = self.model.latent_multiple
        sides = [None if px is None else pixels_to_latent(px, self.vae_scale, m, what=f"image {name}")
                 for name, px in (("height", height), ("width", width))]
        return self.model.latent_shape(*sides)

    def image_seq_len(self, latent_shape: tuple[int, int, int]) -> int:
        """Image tokens of a latent (what a resolution-dependent shift counts)."""
        m = self.model.latent_multiple
        return (latent_shape[0] // m) * (latent_shape[1] // m)

    def model_text_len(self, text_len: int | None = None) -> int:
        """The conditioning's text length for a main-encoder length ``text_len`` (default: the
        pipeline's), after the family's fixed prefix (SD3's 77 CLIP tokens)."""
        text_len = check_text_len(text_len)
        return self.model.family.text_prefix + (self.text_len if text_len is None else text_len)

    def cond_shapes(self, text_len: int | None = None) -> dict[str, tuple[int, ...]]:
        """Per-request conditioning shapes (the stream engine's ``cond_shapes``)."""
        return self.model.cond_shapes(self.model_text_len(text_len))

    def zeroed_if_empty(self, texts: list[str], cond: dict) -> dict:
        """The unconditional branch's text conditioning: where ``zero_empty_negative`` is set, an
        empty negative prompt is zeros (text states and pooled embedding), not the encoding of ""
        (diffusers' SDXL without a negative prompt, ``force_zeros_for_empty_prompt``); the size
        conditioning (``image_conditioning``'s keys) is left alone."""
        empty = np.array([t == "" for t in texts])
        if not (self.zero_empty_negative and empty.any()):
            return cond
        sized = self.image_conditioning().keys()
        return {k: v if k in sized else jnp.where(empty.reshape(-1, *[1] * (np.ndim(v) - 1)), 0, v)
                for k, v in cond.items()}

    def image_conditioning(self, latent_shape: tuple[int, int, int] | None = None) -> dict[str, np.ndarray]:
        """Conditioning that depends on the latent size ``(h, w, C)`` (None: the model's default)
        instead of the text (SDXL's micro-conditioning time ids), ``{name: array}`` without the
        batch axis, the same for every prompt and for the unconditional branch; none by default."""
        return {}

    def conditioning(self, prompts: list[str], guidance: Guidance, negative_prompt="", text_len=None, *,
                     latent_shape: tuple[int, int, int] | None = None) -> tuple[dict, dict | None, Any]:
        """``(cond, uncond, cfg_scale)`` for ``sample``: an embedded scale goes into ``cond``;
        ``image_conditioning`` of ``latent_shape`` (default: the model's) into both."""
        b = len(prompts)
        sized = {k: jnp.broadcast_to(jnp.asarray(v), (b, *np.shape(v)))
                 for k, v in self.image_conditioning(latent_shape).items()}
        if np.ndim(guidance.scale) and np.shape(guidance.scale) != (b,):
            raise ValueError(f"{np.shape(guidance.scale)[0]} guidance scales for {b} prompts")
        try:
            negative = [negative_prompt] * b if isinstance(negative_prompt, str) else check_prompts(negative_prompt)
        except ValueError:
            raise ValueError(f"negative_prompt must be a string or a list of strings (one per prompt), got "
                             f"{negative_prompt!r:.100}") from None
        if len(negative) != b:
            raise ValueError(f"{len(negative)} negative prompts for {b} prompts")
        if (problem := self.negative_prompt_problem(negative_prompt, guidance)) is not None:
            warnings.warn(problem, UserWarning, stacklevel=3)
        cond = {**self.encode(prompts, text_len), **sized}
        if guidance.kind == "embedded":
            return {**cond, "guidance": jnp.broadcast_to(jnp.asarray(guidance.scale, jnp.float32), (b,))}, None, None
        if not guidance.cfg:
            return cond, None, None
        uncond = {**self.zeroed_if_empty(negative, self.encode(negative, text_len)), **sized}
        return cond, *per_element_rule(cond, uncond, guidance.scale)

    def calibrate(self, prompts, *, steps: int | None = None, guidance_scale=None, headroom: float = 1.0,
                  progress: bool = True) -> PromptPipeline:
        """Makes the velocity model FP8 with static activation scales (``sf.calibrate``),
        measured while this pipeline generates ``prompts``, one at a time (latents only), at
        ``steps`` and ``guidance_scale`` (defaults: the pipeline's). A float model is quantized
        first (``sf.quantize``); a calibrated one is measured anew. Use the prompts, sizes and
        step counts the model will serve: inputs beyond a layer's measured range saturate.

        Returns:
            ``self``, whose ``model`` is the calibrated one.
        """
        import copy

        from tqdm.auto import tqdm

        from streamflow_jax.quantization import calibrate, check_headroom, quantized

        prompts = check_prompts(prompts)  # bad arguments refused before quantizing
        steps = None if steps is None else schedules.check_steps(steps)
        check_headroom(headroom)

        def run(model):
            pipe = copy.copy(self)
            pipe.model = model
            for prompt in tqdm(prompts, desc="calibrating FP8", unit="prompt", disable=not progress):
                pipe(prompt, steps=steps, guidance_scale=guidance_scale, output_type="latent", progress=False)

        self.model = calibrate(quantized(self.model), run, headroom=headroom)
        return self

    def noise(self, n: int, shape: tuple[int, int, int], seed: int = 0, noise=None) -> jax.Array:
        """``[n, h, w, C]`` starting latents: ``sampling.seeded_noise(seed)`` or ``noise`` checked."""
        if noise is None:
            return seeded_noise(seed, (n, *shape))
        if not isinstance(noise, jax.Array | np.ndarray):  # a list, or another library's array (torch's)
            noise = np.asarray(noise)
        want, got = (n, *shape), tuple(np.shape(noise))
        if got != want:
            nchw = len(got) == 4 and got[1] == want[3] != got[3]  # channels second (the size may be read off it)
            raise ValueError(f"noise has shape {got}, expected {want}: [n, h, w, C] latents (NHWC)"
                             + ("; this is NCHW, as diffusers' latents are: transpose it, x.transpose(0, 2, 3, 1)"
                                if nchw else ""))
        dtype = noise.dtype
        if not jnp.issubdtype(dtype, jnp.floating):  # as sf.sample: complex lost its imaginary part
            raise ValueError(f"noise must be real floating-point numbers, got {dtype}")
        return jnp.asarray(noise, jnp.float32)

    def encode_image(self, image, batch: int, height: int | None = None, width: int | None = None) -> jax.Array:
        """Images (PIL or ``[B, H, W, 3]`` in [0, 1]) -> ``[B, h, w, C]`` latents as the model sees
        them (the autoencoder's encoder with its scale and shift); one image serves every prompt.
        ``height``/``width``, where given, must be the images' size (the size comes from them)."""
        arr = images_to_array(image, 3)
        if arr.shape[0] not in (1, batch):
            raise ValueError(f"{arr.shape[0]} images for {batch} prompts")
        size = (arr.shape[1], arr.shape[2])
        if (height is not None and height != size[0]) or (width is not None and width != size[1]):
            asked = f"{height if height is not None else '-'}x{width if width is not None else '-'}"
            raise ValueError(f"height/width {asked} differ from the image's size {size[0]}x{size[1]} "
                             "(image-to-image takes its size from the image: resize it, or leave height/width out)")
        self.latent_shape(*size)  # the size must suit the model
        if not hasattr(self.decoder.module, "encode_latents"):
            raise ValueError(f"{self.decoder.class_name} has no encoder for image-to-image")
        latents = encode_latents(self.decoder, jnp.asarray(arr) * 2 - 1)
        return jnp.broadcast_to(latents, (batch, *latents.shape[1:]))

    def decode(self, latents) -> np.ndarray:
        """``[B, h, w, C]`` latents -> ``[B, H, W, 3]`` uint8 images."""
        return to_uint8(decode_latents(self.decoder, latents))

    def output(self, latents, output_type: str):
        """The sampler's latents as ``output_type``: PIL images, float ``[B, H, W, 3]`` in [0, 1],
        or the latents themselves (NHWC)."""
        if output_type == "latent":
            return np.asarray(latents)
        images = decode_latents(self.decoder, latents)
        if output_type == "np":
            return to_float_images(images)
        return [Image.fromarray(img) for img in to_uint8(images)]

    def __call__(self, prompts=None, *, steps: int | None = None, guidance_scale=None, negative_prompt="",
                 seed: int = 0, noise=None, height: int | None = None, width: int | None = None,
                 max_sequence_length: int | None = None, image=None, strength=None, backend: str = "xla",
                 output_type: str = "pil", progress: bool = True, **unknown):
        """Generates one image per prompt.

        Args:
            prompts: a string or a non-empty list of strings.
            steps: Euler steps (default: the pipeline's; at most ``schedules.MAX_STEPS``).
            guidance_scale: a scalar or one per prompt; classifier-free guidance against
                ``negative_prompt``, or the model's guidance input (Flux-dev). None: the
                pipeline's default; a scalar <= 1 turns classifier-free guidance off, as in
                diffusers (``sampling.Guidance.resolve``).
            negative_prompt: the unconditional prompt of classifier-free guidance (one, or one
                per prompt).
            seed / noise: the starting latents, ``sampling.seeded_noise(seed)`` (seed in
                [0, 2**32)) or ``[B, h, w, C]``.
            height, width: image size in pixels (default: the given noise's, else the model's).
            max_sequence_length: T5 tokens (Flux, SD3; default: the pipeline's); longer
                prompts are truncated with a warning.
            image, strength: image-to-image: start from these images (PIL, paths or ``[B, H, W, 3]``
                in [0, 1]; one for all prompts or one each), encoded and noised to where
                ``strength`` (in (0, 1], default 0.6; a scalar or one per prompt) cuts the
                grid, as diffusers' img2img pipelines do. The size comes from the image.
            backend: a backend name (``backends.BACKENDS``) for the velocity model.
            output_type: ``"pil"`` (list of PIL images), ``"np"`` (float ``[B, H, W, 3]`` in
                [0, 1]) or ``"latent"`` (the sampler's ``[B, h, w, C]`` output, before decoding).
            progress: a progress bar over the steps of runs longer than 2 s.

        Any other keyword is a ``TypeError``; diffusers' names say what to use instead
        (``DIFFUSERS_KEYWORDS``: ``prompt=`` -> the first argument, ``num_inference_steps`` ->
        ``steps``, ``generator`` -> ``seed``).
        """
        refuse_unknown_keywords(type(self).__name__, unknown)
        if prompts is None:
            raise TypeError(f"{type(self).__name__}() needs the prompts: pipe('a cat') or pipe(['a cat', 'a dog'])")
        check_output_type(output_type)
        backends.check_backend(backend)
        self.check_export(backend)
        prompts = check_prompts(prompts)
        steps = schedules.check_steps(self.default_steps if steps is None else steps)
        guidance = self.resolve_guidance(guidance_scale)
        seed = check_seed(seed)
        x0 = None
        if image is not None:
            x0 = self.encode_image(image, len(prompts), height, width)
            shape = tuple(x0.shape[1:])
        elif strength is not None:
            raise ValueError("strength is for image-to-image: give image too")
        elif noise is not None and height is None and width is None and np.ndim(noise) == 4:
            shape = self.model.latent_shape(*np.shape(noise)[1:3])  # the size the given latents have
        else:
            shape = self.latent_shape(height, width)
        x = self.noise(len(prompts), shape, seed, noise)
        grid = self.schedule(steps, shape)
        if x0 is not None:
            x, grid = img2img_start(self.model, x0, x, grid, strength)
        cond, uncond, cfg = self.conditioning(prompts, guidance, negative_prompt, max_sequence_length,
                                              latent_shape=shape)
        if self.mesh is not None:  # the batch over the mesh's data axis (where it divides)
            x, cond, uncond = shard_batch((x, cond, uncond), self.mesh)
        latents = backends.sample(self.model, x, grid, cond, guidance_scale=cfg, uncond=uncond, backend=backend,
                                  progress=progress)
        return self.output(latents, output_type)
