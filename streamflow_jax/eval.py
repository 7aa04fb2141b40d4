"""Quality checks no numerical tolerance can fake: a digit classifier for the embedded model.

``digit_accuracy(images, labels)`` is the share of generated digits that a classifier trained
on scikit-learn's real digits (prepared exactly as the embedded model's training data) assigns
to the class they were conditioned on.
"""

from __future__ import annotations

import functools

import numpy as np

IMAGE_SIZE = 16


def upscale2x(images: np.ndarray) -> np.ndarray:
    """Bilinear 2x upscale with half-pixel centres and edge clamping.

    Equal to ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)``, which the
    training script uses (a test checks the two agree). Args: ``[N, h, w]``; returns ``[N, 2h, 2w]``.
    """
    p = np.pad(np.asarray(images, np.float32), ((0, 0), (1, 1), (1, 1)), mode="edge")
    rows = np.empty((p.shape[0], 2 * (p.shape[1] - 2), p.shape[2]), np.float32)
    rows[:, 0::2] = 0.25 * p[:, :-2] + 0.75 * p[:, 1:-1]
    rows[:, 1::2] = 0.75 * p[:, 1:-1] + 0.25 * p[:, 2:]
    out = np.empty((p.shape[0], rows.shape[1], 2 * (p.shape[2] - 2)), np.float32)
    out[:, :, 0::2] = 0.25 * rows[:, :, :-2] + 0.75 * rows[:, :, 1:-1]
    out[:, :, 1::2] = 0.75 * rows[:, :, 1:-1] + 0.25 * rows[:, :, 2:]
    return out


def real_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as the model saw them: ``[1797, 16, 16]`` in [0, 1], ``[1797]`` labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = np.clip(upscale2x(data.images / 8.0 - 1.0), -1, 1)
    return (images + 1) / 2, data.target


@functools.cache
def digit_classifier():
    """An RBF support-vector classifier on the real digits (deterministic; ~97% 5-fold CV)."""
    from sklearn.svm import SVC

    images, labels = real_digits()
    return SVC(C=10.0, gamma="scale").fit(images.reshape(len(images), -1), labels)


def digit_accuracy(images, labels) -> float:
    """Share of ``images`` classified as their ``labels``.

    Args:
        images: ``[N, 16, 16]`` or ``[N, 16, 16, 1]`` grey digits in [0, 1] (white on black).
        labels: ``[N]`` the classes they were conditioned on.
    """
    images = np.asarray(images, np.float32)
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    labels = np.asarray(labels)
    if images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE) or images.shape[0] != labels.shape[0]:
        raise ValueError(f"expected [N, {IMAGE_SIZE}, {IMAGE_SIZE}] images and [N] labels, got {images.shape}, {labels.shape}")
    pred = digit_classifier().predict(np.clip(images, 0, 1).reshape(len(images), -1))
    return float(np.mean(pred == labels))
