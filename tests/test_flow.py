"""Tests for hawor_tune.data.flow: the pooled optical flow the camera branch reads."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from hawor_tune.data.flow import FLOW_UNITS, clip_flow, flow_path, pair_flow


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
    shifts = [(1.5, -1.0), (3.0, -2.0)]  # a steady motion, as a camera's over a clip
    frames = [base] + [_shifted(base, dx, dy) for dx, dy in shifts]
    flow = clip_flow(frames, focal, grid=4)
    assert flow.shape == (3, 2, 4, 4) and flow.dtype == np.float32
    np.testing.assert_array_equal(flow[0], 0.0)  # frame 0 against itself, by construction
    inner = flow[:, :, 1:3, 1:3]  # away from the borders, where content enters and leaves
    for t, (dx, dy) in enumerate(shifts, start=1):
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


# ---- Pair flows, summed ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("offset,path", [
    (0, []), (1, [(0, 1)]), (3, [(0, 2), (2, 1)]), (8, [(0, 8)]), (15, [(0, 8), (8, 4), (12, 2), (14, 1)]),
    (20, [(0, 8), (8, 8), (16, 4)]),
])
def test_flow_path_takes_the_longest_stride_that_fits(offset, path) -> None:
    assert flow_path(offset) == path


def test_a_clips_flow_is_the_sum_of_pair_flows_along_the_path() -> None:
    base, focal = _texture(seed=2), 150.0
    shifts = [(0.0, 0.0), (0.8, 0.4), (1.6, 0.9), (2.3, 1.5), (3.0, 2.0)]
    grey = [cv2.cvtColor(_shifted(base, dx, dy), cv2.COLOR_RGB2GRAY) for dx, dy in shifts]
    flow = clip_flow(grey, focal, grid=4)
    np.testing.assert_array_equal(flow[3], pair_flow(grey[0], grey[2], focal, 4) + pair_flow(grey[2], grey[3], focal, 4))
    np.testing.assert_array_equal(flow[4], pair_flow(grey[0], grey[4], focal, 4))
    # Summed pair flows give the motion from the clip's first frame.
    for t in (3, 4):
        inner = flow[t, :, 1:3, 1:3].reshape(2, -1).mean(axis=1)
        np.testing.assert_allclose(inner, np.array(shifts[t]) * FLOW_UNITS / focal, atol=0.2 * FLOW_UNITS / focal)


@pytest.mark.parametrize("grid, focal", [(0, 100.0), (4, 0.0)])
def test_pair_flow_names_bad_arguments(grid: int, focal: float) -> None:
    grey = cv2.cvtColor(_texture(), cv2.COLOR_RGB2GRAY)
    with pytest.raises(ValueError, match="grid must be >= 1 and focal > 0"):
        pair_flow(grey, grey, focal, grid)
