"""Tests for hawor_tune.data.flow: the pooled optical flow the camera branch reads."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from hawor_tune.data.flow import FLOW_UNITS, cached_clip_flows, clip_flow


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


# ---- The flow cache ---------------------------------------------------------------------------------------

SHAPE = (3, 2, 2, 4, 4)


def _counting(calls: list[int]):
    """A compute function that records which clips it was asked for; clip i's flow is all i."""
    def compute(i: int) -> np.ndarray:
        calls.append(i)
        return np.full(SHAPE[1:], float(i), dtype=np.float32)
    return compute


def test_cached_flows_are_computed_once_and_reused(tmp_path) -> None:
    calls: list[int] = []
    first = cached_clip_flows(tmp_path, name="train", key={"clips": [1, 2, 3]}, shape=SHAPE, compute=_counting(calls))
    again = cached_clip_flows(tmp_path, name="train", key={"clips": [1, 2, 3]}, shape=SHAPE, compute=_counting(calls))
    assert calls == [0, 1, 2]  # the second call read the file
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(again[:, 0, 0, 0, 0], [0.0, 1.0, 2.0])
    assert len(list(tmp_path.glob("flow-train-*.npy"))) == 1


def test_other_clips_get_their_own_file(tmp_path) -> None:
    calls: list[int] = []
    cached_clip_flows(tmp_path, name="train", key={"clips": [1, 2, 3]}, shape=SHAPE, compute=_counting(calls))
    cached_clip_flows(tmp_path, name="train", key={"clips": [1, 2, 4]}, shape=SHAPE, compute=_counting(calls))
    assert calls == [0, 1, 2, 0, 1, 2]
    assert len(list(tmp_path.glob("flow-train-*.npy"))) == 2


def test_a_damaged_flow_cache_is_rebuilt(tmp_path) -> None:
    calls: list[int] = []
    cached_clip_flows(tmp_path, name="val", key="k", shape=SHAPE, compute=_counting(calls))
    (path,) = tmp_path.glob("flow-val-*.npy")
    path.write_bytes(path.read_bytes()[:200])  # cut short, as by a full disk outside the atomic write
    flows = cached_clip_flows(tmp_path, name="val", key="k", shape=SHAPE, compute=_counting(calls))
    assert calls == [0, 1, 2, 0, 1, 2]
    np.testing.assert_array_equal(flows[:, 0, 0, 0, 0], [0.0, 1.0, 2.0])


def test_an_unwritable_cache_folder_falls_back_to_no_cache(tmp_path, monkeypatch) -> None:
    import hawor_tune.data.flow as flow

    def refuse(path, writer):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(flow, "atomic_write", refuse)  # root may write anywhere, so the refusal is simulated
    calls: list[int] = []
    assert cached_clip_flows(tmp_path, name="val", key="k", shape=SHAPE, compute=_counting(calls)) is None
    assert not list(tmp_path.glob("flow-val-*.npy"))
