"""Time grids, and the scheduler record they come from.

A grid is an array of RF sigmas from 1 (noise) down to 0 (data), ``[S+1]`` per schedule. Each
function reproduces the grid that the matching diffusers pipeline builds (a parity test
against diffusers' scheduler settles every detail). ``stack`` pads grids of different lengths
into one ``[S+1, B]`` grid for a batch whose elements follow different schedules.

``Scheduler`` is a pipeline's ``scheduler/scheduler_config.json``, parsed once and strictly by
``read_scheduler`` (flow matching with a static or a resolution-dependent shift; PeRFlow with
its windows and training betas; a base model's scheduler with a PeRFlow override). Pipelines
take the record and read no raw field; every default is written once, here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from streamflow_jax.errors import ConfigError, is_real_dtype, is_real_number

NUM_TRAIN_TIMESTEPS = 1000
MAX_STEPS = 1000  # a grid's most steps: past the 1000 training timesteps no model sees a new time
DEFAULT_STRENGTH = 0.6  # image-to-image: diffusers' img2img pipelines' default strength
SEED_LIMIT = 2**32  # seeds are integers in [0, 2**32): the stream engine makes noise from uint32 seeds
SCHEDULER_FILE = Path("scheduler") / "scheduler_config.json"

# Stable Diffusion's training noise schedule (the betas PeRFlow's windows are built on)
BETA_START, BETA_END, BETA_SCHEDULE = 0.00085, 0.012, "scaled_linear"
BETA_SCHEDULES = ("scaled_linear", "linear")
PREDICTIONS = ("diff_eps", "ddim_eps", "velocity")  # PeRFlow (eps in disguise) and InstaFlow
TIME_SHIFTS = ("exponential", "linear")


def check_steps(num_steps) -> int:
    """``num_steps`` as an int in ``[1, MAX_STEPS]``, or a ValueError saying which bound."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int | np.integer):
        raise ValueError(f"steps must be an integer, got {num_steps!r}")
    if not 1 <= num_steps <= MAX_STEPS:
        raise ValueError(f"steps must be in [1, {MAX_STEPS}], got {num_steps}")
    return int(num_steps)


def _number(name: str, value, positive: bool = False) -> float:
    """A finite real number (positive where ``positive``), or a ValueError naming it."""
    if not is_real_number(value) or not math.isfinite(float(value)) or positive and float(value) <= 0:
        raise ValueError(f"{name} must be a {'positive' if positive else 'finite'} number, got {value!r}")
    return float(value)


def _time_shift_kind(kind) -> str:
    if kind not in TIME_SHIFTS:
        raise ValueError(f"time_shift must be one of {', '.join(TIME_SHIFTS)}, got {kind!r}")
    return kind


def _checked_grid(sigmas: np.ndarray, what: str) -> np.ndarray:
    """``[S+1]`` float32 sigmas ending in 0, refused unless they run down from at most 1 to 0
    (a shift or ``mu`` far outside what schedulers use makes NaN, inf or a grid past [0, 1])."""
    grid = np.append(np.asarray(sigmas, np.float32), np.float32(0.0))
    if not (np.isfinite(grid).all() and grid.max() <= 1 and grid.min() >= 0 and np.all(np.diff(grid) <= 0)
            and grid[0] > 0):
        raise ValueError(f"{what} gives no grid from 1 down to 0 (it makes {grid[:4].tolist()}...); use values "
                         "schedulers use")
    return grid


def _shift(sigmas: np.ndarray, shift: float) -> np.ndarray:
    """SD3's static time shift, ``shift*s / (1 + (shift-1)*s)``."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def _time_shift(sigmas: np.ndarray, mu: float, kind: str = "exponential") -> np.ndarray:
    """The resolution-dependent shift: ``e^mu / (e^mu + (1/s - 1))`` (``"linear"``: ``mu`` for ``e^mu``)."""
    mu = _number("mu", mu)
    try:
        m = math.exp(mu) if _time_shift_kind(kind) == "exponential" else mu
    except OverflowError:
        raise ValueError(f"mu={mu:g}: e^mu overflows; use values schedulers use") from None
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return m / (m + (1 / sigmas - 1))


def flow_match(num_steps: int = 28, shift: float = 3.0, *, mu: float | None = None,
               time_shift: str = "exponential") -> np.ndarray:
    """The SD3/SD3.5 pipeline's grid (``FlowMatchEulerDiscreteScheduler.set_timesteps``).

    With a static shift the scheduler first shifts its 1000 training sigmas (in float32),
    spaces ``num_steps`` points between the largest and the smallest of them, and shifts those
    again: the SD3 pipeline applies the shift twice, and so does this function. With ``mu``
    (``use_dynamic_shifting``) the training sigmas stay unshifted and the resolution-dependent
    shift is applied once.

    Args:
        num_steps: S, the number of Euler steps.
        shift: the scheduler config's ``shift`` (3.0 for SD3 and SD3.5).
        mu: the resolution-dependent shift (``flux_mu``), for configs with dynamic shifting.
        time_shift: the config's ``time_shift_type`` (with ``mu``).

    Returns:
        ``[S+1]`` float32 sigmas, from 1.0 down to a final 0.
    """
    num_steps = check_steps(num_steps)
    shift = _number("shift", shift, positive=True)
    n = NUM_TRAIN_TIMESTEPS
    train = np.linspace(1, n, n, dtype=np.float32)[::-1] / n
    if mu is None:
        train = _shift(train, shift)
    sigma_max, sigma_min = float(train[0]), float(train[-1])
    sigmas = np.linspace(sigma_max * n, sigma_min * n, num_steps) / n
    sigmas = _shift(sigmas, shift) if mu is None else _time_shift(sigmas, mu, time_shift)
    return _checked_grid(sigmas, f"mu={mu!r} ({time_shift})" if mu is not None else f"shift={shift:g}")


def flux_mu(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
            base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """Flux's resolution-dependent shift ``mu``, linear in the image token count."""
    for name, value in (("image_seq_len", image_seq_len), ("base_seq_len", base_seq_len),
                        ("max_seq_len", max_seq_len), ("base_shift", base_shift), ("max_shift", max_shift)):
        _number(name, value)
    if max_seq_len == base_seq_len:
        raise ValueError(f"max_seq_len and base_seq_len are both {max_seq_len}: mu's line needs two points")
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


def flux(num_steps: int = 28, image_seq_len: int = 4096, *, shift: float | None = None,
         time_shift: str = "exponential", **mu_kwargs) -> np.ndarray:
    """The Flux pipeline's grid: ``linspace(1, 1/S, S)`` under the resolution-dependent shift
    (``use_dynamic_shifting``, dev), or under a static ``shift`` when one is given (schnell's
    config: shift 1, i.e. none).

    Args:
        num_steps: S.
        image_seq_len: image tokens, ``(H/16) * (W/16)`` for an ``H x W`` image.
        shift: a static shift instead of the resolution-dependent one.
        time_shift: the config's ``time_shift_type``.
        **mu_kwargs: override ``flux_mu``'s defaults (the scheduler config's shift fields).

    Returns:
        ``[S+1]`` float32 sigmas ending in 0.
    """
    num_steps = check_steps(num_steps)
    sigmas = np.linspace(1.0, 1.0 / num_steps, num_steps).astype(np.float32)
    if shift is not None:
        return _checked_grid(_shift(sigmas, _number("shift", shift, positive=True)), f"shift={shift:g}")
    mu = flux_mu(image_seq_len, **mu_kwargs)
    return _checked_grid(_time_shift(sigmas, mu, time_shift), f"image_seq_len={image_seq_len!r} (mu={mu:g})")


def stack(grids: Sequence[np.ndarray]) -> np.ndarray:
    """One ``[S+1, B]`` grid from B grids of possibly different lengths.

    A shorter grid is padded by repeating its last time, i.e. with zero-length Euler steps
    that leave the sample unchanged.
    """
    grids = [np.asarray(g, np.float32) for g in grids]
    if not grids:
        raise ValueError("stack needs at least one grid")
    for i, g in enumerate(grids):
        if g.ndim != 1 or g.shape[0] < 2:
            raise ValueError(f"grid {i} must be 1-D with at least 2 times, got shape {g.shape}")
        if not (np.isfinite(g).all() and np.all(np.diff(g) <= 0)):
            raise ValueError(f"grid {i} must be finite times running down, got {g.tolist()[:6]}")
    length = max(g.shape[0] for g in grids)
    return np.stack([np.pad(g, (0, length - g.shape[0]), mode="edge") for g in grids], axis=1)


def perflow_windows(num_windows: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """PeRFlow's K equal time windows: ``(starts, ends)``, from t=1 down to t=0."""
    if isinstance(num_windows, bool) or not isinstance(num_windows, int | np.integer) \
            or not 1 <= num_windows <= MAX_STEPS:
        raise ValueError(f"num_windows must be an integer in [1, {MAX_STEPS}], got {num_windows!r}")
    edges = np.linspace(1.0, 0.0, num_windows + 1)
    return edges[:-1].astype(np.float32), edges[1:].astype(np.float32)


def perflow(num_steps: int = 4, num_windows: int = 4) -> np.ndarray:
    """PeRFlow's inference grid: steps spread over the K windows (the first ``S mod K``
    windows get one more), ``linspace(t_s, t_e, n, endpoint=False)`` inside each, then 0.

    ``num_steps < num_windows`` is raised to ``num_windows`` (every window needs a step).

    Returns:
        ``[S+1]`` float32 times from 1 to 0.
    """
    num_steps = check_steps(num_steps)
    starts, ends = perflow_windows(num_windows)
    steps = max(num_steps, num_windows)
    per_window = [steps // num_windows + (1 if k < steps % num_windows else 0) for k in range(num_windows)]
    times = [np.linspace(s, e, n, endpoint=False) for s, e, n in zip(starts.astype(np.float64),
                                                                      ends.astype(np.float64), per_window)]
    return np.append(np.concatenate(times), 0.0).astype(np.float32)


@functools.lru_cache(maxsize=8)
def alphas_cumprod(beta_start: float = BETA_START, beta_end: float = BETA_END,
                   beta_schedule: str = BETA_SCHEDULE) -> np.ndarray:
    """A training noise schedule's cumulative alphas, ``[1000]`` float32: ``scaled_linear``
    ``linspace(sqrt(b0), sqrt(b1))^2`` (Stable Diffusion's) or ``linear`` ``linspace(b0, b1)``."""
    if beta_schedule == "scaled_linear":
        betas = np.linspace(beta_start**0.5, beta_end**0.5, NUM_TRAIN_TIMESTEPS, dtype=np.float64) ** 2
    elif beta_schedule == "linear":
        betas = np.linspace(beta_start, beta_end, NUM_TRAIN_TIMESTEPS, dtype=np.float64)
    else:
        raise ValueError(f"unsupported: beta_schedule={beta_schedule!r} (supported: {', '.join(BETA_SCHEDULES)})")
    return np.cumprod(1.0 - betas).astype(np.float32)


def strength_values(strength, n: int) -> list[float]:
    """``n`` image-to-image strengths as Python floats, from one number or ``n`` numbers, each
    in (0, 1]; a ValueError names what is wrong (a string or a bool, the wrong count, a value
    outside the range)."""
    arr = np.asarray(strength)
    if not is_real_dtype(arr.dtype):  # bools and strings too; bfloat16 is a float
        raise ValueError(f"strength must be a number in (0, 1], got {strength!r}")
    if arr.ndim > 1 or arr.ndim == 1 and arr.shape[0] != n:
        raise ValueError(f"strength has shape {arr.shape}; expected one number or one per image ({n})")
    values = [float(s) for s in np.broadcast_to(arr.astype(np.float64), (n,))]
    for s in values:
        if not 0 < s <= 1:  # NaN fails too
            raise ValueError(f"strength must be in (0, 1], got {s}")
    return values


def truncate(grid, strength: float) -> np.ndarray:
    """The tail of a grid an image-to-image run samples: diffusers' img2img rule (SD3, Flux):
    of ``S`` steps, the last ``int(min(S * strength, S))`` or so, exactly
    ``grid[int(max(S - min(S * strength, S), 0)):]``, computed in Python floats as diffusers
    does (in float32, 5 steps at strength 0.6 would keep 4 steps instead of 3). Its first time is
    where the input image is noised to.

    Args:
        grid: ``[S+1]`` times from 1 down to 0.
        strength: in (0, 1]: 1 keeps the whole grid (the image is replaced by noise), small
            values keep a few last steps (the image barely changes).
    """
    grid = np.asarray(grid, np.float32)
    if grid.ndim != 1 or grid.shape[0] < 2 or not np.all(np.diff(grid) <= 0):
        raise ValueError(f"truncate takes one [S+1] grid running down, got shape {grid.shape}")
    if np.ndim(strength):
        raise ValueError(f"strength must be one number in (0, 1] here, got shape {np.shape(strength)}")
    strength = strength_values(strength, 1)[0]
    steps = grid.shape[0] - 1
    start = int(max(steps - min(steps * strength, steps), 0))
    if start >= steps:
        raise ValueError(f"strength {strength} keeps no step of {steps}; raise it or the step count")
    return grid[start:]


# ---------------------------------------------------------------------------------------------
# The scheduler record
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Scheduler:
    """A pipeline's schedule: what its ``scheduler_config.json`` says, with the defaults of the
    diffusers/PeRFlow classes written once.

    Attributes:
        class_name: the config's ``_class_name``.
        shift: static time shift (flow matching).
        use_dynamic_shifting: the shift depends on the image token count (``flux_mu``).
        base_image_seq_len, max_image_seq_len, base_shift, max_shift: ``flux_mu``'s line.
        time_shift_type: ``"exponential"`` or ``"linear"`` (dynamic shifting).
        prediction_type: PeRFlow's ``diff_eps`` / ``ddim_eps`` or InstaFlow's ``velocity``;
            None for a flow-matching scheduler.
        num_time_windows: PeRFlow's K.
        beta_start, beta_end, beta_schedule: the training noise schedule (PeRFlow's alphas).
    """

    class_name: str = "FlowMatchEulerDiscreteScheduler"
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    base_shift: float = 0.5
    max_shift: float = 1.15
    time_shift_type: str = "exponential"
    prediction_type: str | None = None
    num_time_windows: int = 4
    beta_start: float = BETA_START
    beta_end: float = BETA_END
    beta_schedule: str = BETA_SCHEDULE

    def __post_init__(self):
        if not self.shift > 0:
            raise ValueError(f"shift must be > 0, got {self.shift}")
        if self.time_shift_type not in TIME_SHIFTS:
            raise ValueError(f"unsupported: time_shift_type={self.time_shift_type!r} (supported: {TIME_SHIFTS})")
        if self.prediction_type not in (None, *PREDICTIONS):
            raise ValueError(f"unsupported: prediction_type={self.prediction_type!r} (supported: "
                             f"{', '.join(PREDICTIONS)})")
        if isinstance(self.num_time_windows, bool) or not isinstance(self.num_time_windows, int) \
                or self.num_time_windows < 1:
            raise ValueError(f"num_time_windows must be an integer >= 1, got {self.num_time_windows!r}")
        alphas_cumprod(self.beta_start, self.beta_end, self.beta_schedule)  # checks the betas

    @property
    def perflow(self) -> bool:
        """A piecewise (PeRFlow/InstaFlow) schedule over a noise-predicting UNet."""
        return self.prediction_type is not None

    def mu(self, image_seq_len: int) -> float:
        """The resolution-dependent shift for ``image_seq_len`` image tokens."""
        return flux_mu(image_seq_len, self.base_image_seq_len, self.max_image_seq_len, self.base_shift,
                       self.max_shift)

    def flow_match_grid(self, steps: int, image_seq_len: int | None = None) -> np.ndarray:
        """The SD3 pipeline's grid (``set_timesteps(steps)``); ``image_seq_len`` for dynamic shifting."""
        if not self.use_dynamic_shifting:
            return flow_match(steps, self.shift)
        if image_seq_len is None:
            raise ValueError("this scheduler shifts by resolution (use_dynamic_shifting): give image_seq_len")
        return flow_match(steps, mu=self.mu(image_seq_len), time_shift=self.time_shift_type)

    def flux_grid(self, steps: int, image_seq_len: int) -> np.ndarray:
        """The Flux pipeline's grid (``set_timesteps(sigmas=linspace(1, 1/S, S), mu=...)``)."""
        if not self.use_dynamic_shifting:
            return flux(steps, shift=self.shift)
        return flux(steps, image_seq_len, time_shift=self.time_shift_type, base_seq_len=self.base_image_seq_len,
                    max_seq_len=self.max_image_seq_len, base_shift=self.base_shift, max_shift=self.max_shift)

    def perflow_grid(self, steps: int) -> np.ndarray:
        """PeRFlow's grid over this scheduler's windows; fewer steps than windows are raised
        to one per window (``perflow``), with a ``UserWarning``."""
        if isinstance(steps, int | np.integer) and not isinstance(steps, bool) and 1 <= steps < self.num_time_windows:
            warnings.warn(f"steps={steps} is below the {self.num_time_windows} PeRFlow time windows: running "
                          f"{self.num_time_windows} steps (one per window)", stacklevel=2)
        return perflow(steps, self.num_time_windows)


# Fields of each class a config may hold: name -> (the values accepted, or None: any value of
# the default's type), checked by read_scheduler. Defaults are the record's.
_FLOW_MATCH_FIELDS = {
    "num_train_timesteps": (NUM_TRAIN_TIMESTEPS,), "shift": None, "use_dynamic_shifting": None,
    "base_shift": None, "max_shift": None, "base_image_seq_len": None, "max_image_seq_len": None,
    "time_shift_type": None, "invert_sigmas": (False,), "shift_terminal": (None, 0, 0.0),
    "use_karras_sigmas": (False,), "use_exponential_sigmas": (False,), "use_beta_sigmas": (False,),
    "stochastic_sampling": (False,),
}
_PERFLOW_FIELDS = {
    "num_train_timesteps": (NUM_TRAIN_TIMESTEPS,), "beta_start": None, "beta_end": None, "beta_schedule": None,
    "trained_betas": (None,), "set_alpha_to_one": "any", "prediction_type": None, "t_noise": (1, 1.0),
    "t_clean": (0, 0.0), "num_time_windows": None,
}
# the SD1.x/2.x schedulers a PeRFlow UNet may be shipped with (PeRFlow's hub layout): with a
# prediction_type override only their betas are read
BASE_SCHEDULERS = ("PNDMScheduler", "DDIMScheduler", "DDPMScheduler", "EulerDiscreteScheduler",
                   "EulerAncestralDiscreteScheduler", "LMSDiscreteScheduler", "DPMSolverMultistepScheduler",
                   "DPMSolverSinglestepScheduler", "UniPCMultistepScheduler", "HeunDiscreteScheduler",
                   "KDPM2DiscreteScheduler", "DEISMultistepScheduler", "LCMScheduler", "TCDScheduler")
_RECORD_FIELDS = {f.name for f in dataclasses.fields(Scheduler)}


def _checked(raw: dict, fields: dict, where: str) -> dict:
    """The record's fields from ``raw``: unknown fields and unsupported values are errors."""
    out = {}
    for key, value in raw.items():
        if key.startswith("_"):
            continue
        if key not in fields:
            raise ConfigError(f"{where}: unknown field {key!r} for {raw.get('_class_name')}")
        allowed = fields[key]
        if allowed not in (None, "any") and value not in allowed:
            raise ConfigError(f"{where}: unsupported: {key}={value!r} (supported: {', '.join(map(repr, allowed))})")
        if key in _RECORD_FIELDS:
            default = Scheduler.__dataclass_fields__[key].default
            if allowed is None and default is not None and value is not None and not _same_kind(value, default):
                raise ConfigError(f"{where}: {key}={value!r} is not a {type(default).__name__}")
            out[key] = value
    return out


def _same_kind(value, default) -> bool:
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int | float):
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, type(default))


def _betas(raw: dict, where: str) -> dict:
    """Only a base scheduler's training betas (what a PeRFlow override keeps of it)."""
    if raw.get("num_train_timesteps", NUM_TRAIN_TIMESTEPS) != NUM_TRAIN_TIMESTEPS:
        raise ConfigError(f"{where}: unsupported: num_train_timesteps={raw['num_train_timesteps']}")
    if raw.get("trained_betas") is not None:
        raise ConfigError(f"{where}: unsupported: trained_betas (a table of betas)")
    return _checked({k: raw[k] for k in ("beta_start", "beta_end", "beta_schedule") if k in raw},
                    _PERFLOW_FIELDS, where)


# the override PeRFlow's instructions give for a pipeline class shipped with its base model's
# scheduler (what an error suggests): SD1.5's UNets predict diff_eps, SDXL's ddim_eps
PERFLOW_PREDICTION = {"StableDiffusionPipeline": "diff_eps", "StableDiffusionXLPipeline": "ddim_eps"}


def parse_scheduler(raw: dict, *, prediction_type: str | None = None, num_time_windows: int | None = None,
                    source: str = "scheduler_config.json", suggested: str = "diff_eps") -> Scheduler:
    """The ``Scheduler`` a scheduler config dict describes, strictly.

    Args:
        raw: the config (``_class_name`` and its fields).
        prediction_type, num_time_windows: a PeRFlow override, as PeRFlow's own instructions
            give for a UNet shipped with its base model's scheduler
            (``PeRFlowScheduler.from_config(config, prediction_type="diff_eps", num_time_windows=4)``):
            of a base model's scheduler only the training betas are kept.
        source: names the config in messages.
        suggested: the ``prediction_type`` a refusal suggests (``PERFLOW_PREDICTION``: the
            pipeline class's; SDXL's is ``ddim_eps``, and SD1.5's ``diff_eps`` ran there
            without an error, making other images).

    Raises:
        ConfigError: naming the file and the field (an unknown field, an unsupported value, a
            scheduler that is not a rectified flow without an override).
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: not a JSON object")
    name = raw.get("_class_name")
    override = {}
    if prediction_type is not None:
        if prediction_type not in PREDICTIONS:
            raise ConfigError(f"prediction_type {prediction_type!r}: not one of {', '.join(PREDICTIONS)}")
        override["prediction_type"] = prediction_type
    if num_time_windows is not None:
        if isinstance(num_time_windows, bool) or not isinstance(num_time_windows, int | np.integer) \
                or num_time_windows < 1:
            raise ConfigError(f"num_time_windows (--windows) must be an integer >= 1, got {num_time_windows!r}")
        override["num_time_windows"] = int(num_time_windows)
    if name == "FlowMatchEulerDiscreteScheduler":
        if override:
            raise ConfigError(f"{source}: a {name} is a rectified flow already; prediction_type and "
                              "num_time_windows (--prediction-type, --windows) apply to PeRFlow UNets")
        fields = _checked(raw, _FLOW_MATCH_FIELDS, source)
    elif name == "PeRFlowScheduler":
        fields = {"prediction_type": "ddim_eps", **_checked(raw, _PERFLOW_FIELDS, source), **override}
    elif name in BASE_SCHEDULERS:
        if "prediction_type" not in override:
            raise ConfigError(
                f"{source}: {name} (prediction_type={raw.get('prediction_type')!r}) is not a rectified flow; "
                f"supported: diff_eps, ddim_eps (PeRFlow), velocity (InstaFlow). For a PeRFlow UNet shipped with its "
                f"base model's scheduler, give it: Pipeline.from_diffusers(path, prediction_type={suggested!r}, "
                f"num_time_windows=4), or --prediction-type {suggested} --windows 4")
        fields = {**_betas(raw, source), **override}
    else:
        raise ConfigError(f"{source}: unsupported scheduler class {name!r} (supported: "
                          f"FlowMatchEulerDiscreteScheduler, PeRFlowScheduler, or a base model's scheduler with a "
                          f"PeRFlow override)")
    try:
        return Scheduler(class_name=name, **fields)
    except ValueError as e:
        raise ConfigError(f"{source}: {e}") from None


def read_scheduler(pipeline_dir, *, prediction_type: str | None = None,
                   num_time_windows: int | None = None) -> Scheduler:
    """``PIPELINE/scheduler/scheduler_config.json`` as a ``Scheduler`` (see ``parse_scheduler``;
    a refusal suggests the override of the class ``PIPELINE/model_index.json`` names)."""
    path = Path(pipeline_dir) / SCHEDULER_FILE
    if not path.is_file():
        raise ConfigError(f"{path}: missing (the pipeline's scheduler says how to sample it)")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    suggested = "diff_eps"
    with contextlib.suppress(OSError, ValueError, AttributeError):
        index = json.loads((Path(pipeline_dir) / "model_index.json").read_text())
        suggested = PERFLOW_PREDICTION.get(index.get("_class_name"), suggested)
    return parse_scheduler(raw, prediction_type=prediction_type, num_time_windows=num_time_windows, source=str(path),
                           suggested=suggested)
