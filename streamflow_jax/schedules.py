"""Time grids: arrays of RF sigmas from 1 (noise) down to 0 (data), ``[S+1]`` per schedule.

Each function reproduces the grid that the matching diffusers pipeline builds (a parity test
against diffusers' scheduler settles every detail). ``stack`` pads grids of different lengths
into one ``[S+1, B]`` grid for a batch whose elements follow different schedules.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

NUM_TRAIN_TIMESTEPS = 1000


def _shift(sigmas: np.ndarray, shift: float) -> np.ndarray:
    """SD3's static time shift, ``shift*s / (1 + (shift-1)*s)``."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def flow_match(num_steps: int = 28, shift: float = 3.0) -> np.ndarray:
    """The SD3/SD3.5 pipeline's grid (``FlowMatchEulerDiscreteScheduler.set_timesteps``).

    The scheduler first shifts its 1000 training sigmas (in float32), spaces ``num_steps``
    points between the largest and the smallest of them, and shifts those again: the SD3
    pipeline applies the shift twice, and so does this function.

    Args:
        num_steps: S, the number of Euler steps.
        shift: the scheduler config's ``shift`` (3.0 for SD3 and SD3.5).

    Returns:
        ``[S+1]`` float32 sigmas, from 1.0 down to a final 0.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    n = NUM_TRAIN_TIMESTEPS
    train = np.linspace(1, n, n, dtype=np.float32)[::-1] / n
    train = _shift(train, shift)
    sigma_max, sigma_min = float(train[0]), float(train[-1])
    sigmas = np.linspace(sigma_max * n, sigma_min * n, num_steps) / n
    sigmas = _shift(sigmas, shift).astype(np.float32)
    return np.append(sigmas, np.float32(0.0))


def flux_mu(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
            base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """Flux's resolution-dependent shift ``mu``, linear in the image token count."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


def flux(num_steps: int = 28, image_seq_len: int = 4096, **mu_kwargs) -> np.ndarray:
    """The Flux pipeline's grid: ``linspace(1, 1/S, S)`` under the exponential time shift.

    Args:
        num_steps: S.
        image_seq_len: image tokens, ``(H/16) * (W/16)`` for an ``H x W`` image.
        **mu_kwargs: override ``flux_mu``'s defaults (the scheduler config's shift fields).

    Returns:
        ``[S+1]`` float32 sigmas ending in 0.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    mu = flux_mu(image_seq_len, **mu_kwargs)
    sigmas = np.linspace(1.0, 1.0 / num_steps, num_steps).astype(np.float32)
    sigmas = math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))
    return np.append(sigmas.astype(np.float32), np.float32(0.0))


def stack(grids: Sequence[np.ndarray]) -> np.ndarray:
    """One ``[S+1, B]`` grid from B grids of possibly different lengths.

    A shorter grid is padded by repeating its last time, i.e. with zero-length Euler steps
    that leave the sample unchanged.
    """
    grids = [np.asarray(g, np.float32) for g in grids]
    for i, g in enumerate(grids):
        if g.ndim != 1 or g.shape[0] < 2:
            raise ValueError(f"grid {i} must be 1-D with at least 2 times, got shape {g.shape}")
    length = max(g.shape[0] for g in grids)
    return np.stack([np.pad(g, (0, length - g.shape[0]), mode="edge") for g in grids], axis=1)


def perflow_windows(num_windows: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """PeRFlow's K equal time windows: ``(starts, ends)``, from t=1 down to t=0."""
    if num_windows < 1:
        raise ValueError(f"num_windows must be >= 1, got {num_windows}")
    edges = np.linspace(1.0, 0.0, num_windows + 1)
    return edges[:-1].astype(np.float32), edges[1:].astype(np.float32)


def perflow(num_steps: int = 4, num_windows: int = 4) -> np.ndarray:
    """PeRFlow's inference grid: steps spread over the K windows (the first ``S mod K``
    windows get one more), ``linspace(t_s, t_e, n, endpoint=False)`` inside each, then 0.

    ``num_steps < num_windows`` is raised to ``num_windows`` (every window needs a step).

    Returns:
        ``[S+1]`` float32 times from 1 to 0.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    steps = max(num_steps, num_windows)
    starts, ends = perflow_windows(num_windows)
    per_window = [steps // num_windows + (1 if k < steps % num_windows else 0) for k in range(num_windows)]
    times = [np.linspace(s, e, n, endpoint=False) for s, e, n in zip(starts.astype(np.float64),
                                                                      ends.astype(np.float64), per_window)]
    return np.append(np.concatenate(times), 0.0).astype(np.float32)


def truncate(grid, strength: float) -> np.ndarray:
    """The tail of a grid an image-to-image run samples: diffusers' img2img rule (SD3, Flux):
    of ``S`` steps, the last ``int(min(S * strength, S))`` or so, exactly
    ``grid[int(max(S - min(S * strength, S), 0)):]``. Its first time is where the input image is
    noised to.

    Args:
        grid: ``[S+1]`` times from 1 down to 0.
        strength: in (0, 1]: 1 keeps the whole grid (the image is replaced by noise), small
            values keep a few last steps (the image barely changes).
    """
    grid = np.asarray(grid, np.float32)
    strength = float(strength)
    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    steps = grid.shape[0] - 1
    start = int(max(steps - min(steps * strength, steps), 0))
    if start >= steps:
        raise ValueError(f"strength {strength} keeps no step of {steps}; raise it or the step count")
    return grid[start:]
