"""PeRFlow / InstaFlow: an SD1.5 or SDXL UNet turned into a velocity field, per element.

PeRFlow (piecewise rectified flow) splits t in [1, 0] into K windows; inside a window the
network's output (``diff_eps`` or ``ddim_eps``, an epsilon in disguise) determines where the
window ends, and the velocity is the straight line there. ``velocity`` prediction (InstaFlow)
is used as is. Every per-element quantity (window, alphas, coefficients) is computed for one
element's ``t`` and lifted with ``vmap``; the UNet takes the whole batch and a ``[B]``
timestep. The formulas are PeRFlow's (Yan et al., 2024, piecewise rectified flow).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from streamflow_jax import schedules
from streamflow_jax.models import unet

WINDOW_EPS = 1e-4  # a t within this of a window's end belongs to the next window


def window_index(t: jax.Array, ends: jax.Array) -> jax.Array:
    """The window of one time: the first (counting down from t=1) whose end is below
    ``t - 1e-4``; the last window for t at or near 0. ``ends`` decreases, so that is the
    count of ends at or above ``t - 1e-4``."""
    return jnp.minimum(jnp.sum(ends >= t - WINDOW_EPS), ends.shape[0] - 1)


@dataclasses.dataclass(frozen=True)
class PeRFlowAdapter:
    """Turns ``UNet2DConditionModel`` outputs into RF velocities (``FlowModel.adapter``).

    Attributes:
        prediction_type: ``"diff_eps"``, ``"ddim_eps"`` or ``"velocity"`` (from the pipeline's
            ``scheduler/scheduler_config.json``, or given).
        num_windows: K, the PeRFlow time windows.
        beta_start, beta_end, beta_schedule: the training noise schedule the alphas come from
            (the scheduler config's; Stable Diffusion's by default).
    """

    prediction_type: str = "diff_eps"
    num_windows: int = 4
    beta_start: float = schedules.BETA_START
    beta_end: float = schedules.BETA_END
    beta_schedule: str = schedules.BETA_SCHEDULE

    def __post_init__(self):
        if self.prediction_type not in schedules.PREDICTIONS:
            raise ValueError(f"unsupported: prediction_type={self.prediction_type!r} (supported: "
                             f"{', '.join(schedules.PREDICTIONS)})")
        if self.num_windows < 1:
            raise ValueError(f"num_windows must be >= 1, got {self.num_windows}")
        self.alphas()  # checks the schedule

    @classmethod
    def from_scheduler(cls, scheduler: schedules.Scheduler) -> PeRFlowAdapter:
        """The adapter a pipeline's scheduler record describes (its prediction, windows, betas)."""
        if not scheduler.perflow:
            raise ValueError(f"{scheduler.class_name} is not a PeRFlow/InstaFlow scheduler (no prediction_type)")
        return cls(scheduler.prediction_type, scheduler.num_time_windows, scheduler.beta_start, scheduler.beta_end,
                   scheduler.beta_schedule)

    def alphas(self):
        """The training schedule's cumulative alphas, ``[1000]`` float32."""
        return schedules.alphas_cumprod(self.beta_start, self.beta_end, self.beta_schedule)

    def coefficients(self, t: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """For one scalar ``t``: ``(lambda_t, eta_t, t_e)`` with ``x_end = lambda_t*x + eta_t*eps``."""
        # float32 constants: jax2onnx traces with float64 enabled, where numpy's float64 windows
        # would make the coefficients float64 (a float64 subgraph, and a truncation warning)
        starts, ends = (jnp.asarray(a, jnp.float32) for a in schedules.perflow_windows(self.num_windows))
        ac = jnp.asarray(self.alphas(), jnp.float32)
        k = window_index(t, ends)
        t_s, t_e = starts[k], ends[k]
        a_s = ac[(t_s * 1000).astype(jnp.int32) - 1]
        a_e = ac[jnp.maximum((t_e * 1000).astype(jnp.int32) - 1, 0)]
        if self.prediction_type == "diff_eps":
            gamma = jnp.sqrt(a_s / a_e)
            lam_s, eta_s = 1 / gamma, -jnp.sqrt(1 - gamma**2) / gamma
        else:  # ddim_eps
            lam_s = jnp.sqrt(a_e / a_s)
            eta_s = jnp.sqrt(1 - a_e) - jnp.sqrt(a_e / a_s * (1 - a_s))
        denom = lam_s * (t - t_s) + (t_e - t)
        return lam_s * (t_e - t_s) / denom, eta_s * (t_e - t) / denom, t_e

    def noise_to(self, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
        """The sample at time ``t`` (``[B]``): PeRFlow's windows end on the training diffusion's
        marginals, ``sqrt(a) x0 + sqrt(1 - a) noise`` with ``a`` the cumulative alpha at
        ``int(t * 1000)`` (image-to-image starts there)."""
        ac = jnp.asarray(self.alphas(), jnp.float32)
        n = schedules.NUM_TRAIN_TIMESTEPS
        a = ac[jnp.clip((jnp.asarray(t, jnp.float32) * n).astype(jnp.int32) - 1, 0, n - 1)]
        a = a.reshape(a.shape + (1,) * (x0.ndim - 1)).astype(x0.dtype)
        return jnp.sqrt(a) * x0 + jnp.sqrt(1 - a) * noise

    def velocity(self, unet_module, x: jax.Array, t: jax.Array, cond: dict) -> jax.Array:
        """``x`` ``[B, H, W, C]``, ``t`` ``[B]`` -> ``[B, H, W, C]``; ``cond["encoder_hidden_states"]``
        ``[B, S, D]`` and the UNet's added conditions by name (SDXL: ``text_embeds`` ``[B, E]``,
        ``time_ids`` ``[B, 6]``). The UNet sees its integer timestep ``int(t * 1000)``
        (``models.unet.timestep``)."""
        added = {k: v for k, v in cond.items() if k != "encoder_hidden_states"}
        out = unet_module(x, unet.timestep(t), cond["encoder_hidden_states"], **added).astype(jnp.float32)
        if self.prediction_type == "velocity":
            return out.astype(x.dtype)
        lam, eta, t_e = jax.vmap(self.coefficients)(t.astype(jnp.float32))  # [B] each
        bcast = lambda a: a.reshape(-1, 1, 1, 1)  # noqa: E731
        x32 = x.astype(jnp.float32)
        x_end = bcast(lam) * x32 + bcast(eta) * out
        # t_e - t is 0 only at t = 0, a grid's padding (zero-length steps after a shorter grid
        # ended): the window is over, x_end = x exactly, and the velocity 0 (not 0/0)
        # (ones_like, not the literal 1: jax2onnx 0.17's where promotes a Python scalar to float64)
        dt = t_e - t
        return ((x_end - x32) / bcast(jnp.where(dt == 0, jnp.ones_like(dt), dt))).astype(x.dtype)
