"""Tests for hawor_tune.data.flow: the pooled optical flow the camera branch reads."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from hawor_tune.data.flow import FLOW_UNITS, clip_flow


def _texture(size: int = 128, seed: int = 0) -> np.ndarray:
    """A smooth random RGB texture (blurred noise): DIS needs gradients everywhere."""
    noise = np.random.default_rng(seed).uniform(0, 255, (size, size, 3)).astype(np.float32)
    return np.clip(cv2.GaussianBlur(noise, (0, 0), 2.0) * 3 - 255, 0, 255).astype(np.uint8)


def _shifted(image: np.ndarray, dx: float, dy: float) -> np.ndarray:
    """The image moved by (dx, dy) pixels: content at x lands at x + dx."""
    A = np.array([[1.0, 0.0, dx], [0.0, 1.0, dy]])
    return cv2.warpAffine(image, A, image.shape[1::-1], flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


def test_a_shifted_frame_gives_its_shift_in_focal_units() -> None:
    base, focal = _texture(), 200.0
    frames = [base, _shifted(base, 3.0, -2.0), _shifted(base, -1.5, 1.0)]
    flow = clip_flow(frames, focal, grid=4)
    assert flow.shape == (3, 2, 4, 4) and flow.dtype == np.float32
    np.testing.assert_array_equal(flow[0], 0.0)  # frame 0 against itself, by construction
    inner = flow[:, :, 1:3, 1:3]  # away from the borders, where content enters and leaves
    for t, (dx, dy) in enumerate([(3.0, -2.0), (-1.5, 1.0)], start=1):
        expected = np.array([dx, dy]) * FLOW_UNITS / focal
        np.testing.assert_allclose(inner[t].reshape(2, -1).mean(axis=1), expected, atol=0.15 * FLOW_UNITS / focal)


def test_flow_scales_with_one_over_the_focal_length() -> None:
    base = _texture(seed=1)
    frames = [base, _shifted(base, 2.0, 0.0)]
    np.testing.assert_allclose(clip_flow(frames, 100.0, grid=2), 2 * clip_flow(frames, 200.0, grid=2), rtol=1e-6)


def test_a_single_frame_has_zero_flow() -> None:
    np.testing.assert_array_equal(clip_flow([_texture()], 100.0, grid=3), np.zeros((1, 2, 3, 3), np.float32))


@pytest.mark.parametrize("grid, focal", [(0, 100.0), (4, 0.0), (4, -1.0)])
def test_bad_arguments_are_named(grid: int, focal: float) -> None:
    with pytest.raises(ValueError, match="grid must be >= 1 and focal > 0"):
        clip_flow([_texture(), _texture()], focal, grid)
