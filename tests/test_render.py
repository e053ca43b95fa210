"""The renderer: textured planes ray-cast with parallax, meshes in painter's order by depth with back faces
culled and Lambert shading."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from hawor_tune.data.render import (
    Backdrop,
    TexturedPlane,
    box_mesh,
    clutter_background,
    draw_meshes,
    outward_faces,
)

K = np.array([[50.0, 0.0, 31.5], [0.0, 50.0, 31.5], [0.0, 0.0, 1.0]])
TOWARDS_CAMERA = np.array([0.0, 0.0, -1.0])


def _draw(vertices, faces, colors, light=TOWARDS_CAMERA, ambient=0.35):
    uv, _ = cv2.projectPoints(vertices.reshape(-1, 1, 3), np.zeros(3), np.zeros(3), K, None)
    image = np.zeros((64, 64, 3), np.uint8)
    draw_meshes(image, vertices, uv.reshape(-1, 2), faces, np.asarray(colors, np.float64), light,
                np.ones(len(vertices), bool), ambient)
    return image


@pytest.mark.parametrize("near_first", [True, False])
def test_nearer_mesh_covers_the_farther_one_whatever_the_list_order(near_first):
    near_v, near_f = box_mesh(np.array([0.2, 0.2, 0.2]))
    far_v, far_f = box_mesh(np.array([0.8, 0.8, 0.2]))
    near_v, far_v = near_v + [0, 0, 1.0], far_v + [0, 0, 1.5]
    red, blue = [0.0, 0.0, 255.0], [255.0, 0.0, 0.0]
    meshes = [(near_v, near_f, red), (far_v, far_f, blue)]
    if not near_first:
        meshes.reverse()
    vertices = np.concatenate([m[0] for m in meshes])
    faces = np.concatenate([meshes[0][1], meshes[1][1] + len(meshes[0][0])])
    colors = np.concatenate([np.repeat([m[2]], len(m[1]), axis=0) for m in meshes])
    image = _draw(vertices, faces, colors)
    assert tuple(image[32, 32]) == (0, 0, 255)  # centre: the near box, lit head-on
    assert tuple(image[32, 20]) == (255, 0, 0)  # beside it: the far box
    assert tuple(image[1, 1]) == (0, 0, 0)  # outside both: untouched


def test_faces_turned_away_are_not_drawn():
    v = np.array([[-0.2, -0.2, 1.0], [0.2, -0.2, 1.0], [0.0, 0.2, 1.0]])
    facing = np.array([[0, 2, 1]])  # (v1 - v0) x (v2 - v0) points to -z, at the camera
    assert _draw(v, facing, [[200.0, 200.0, 200.0]])[32, 32].any()
    assert not _draw(v, facing[:, [0, 2, 1]], [[200.0, 200.0, 200.0]]).any()


@pytest.mark.parametrize("light,expected", [
    (TOWARDS_CAMERA, 200.0),  # head-on: full colour
    (np.array([0.0, -np.sqrt(0.5), -np.sqrt(0.5)]), 200.0 * (0.35 + 0.65 * np.sqrt(0.5))),  # 45 degrees
    (np.array([1.0, 0.0, 0.0]), 200.0 * 0.35),  # grazing: ambient only
])
def test_lambert_shading(light, expected):
    v = np.array([[-0.2, -0.2, 1.0], [0.2, -0.2, 1.0], [0.0, 0.2, 1.0]])
    image = _draw(v, np.array([[0, 2, 1]]), [[200.0, 200.0, 200.0]], light)
    assert abs(float(image[32, 32, 0]) - expected) <= 1.0


def test_outward_faces_fixes_inverted_winding_and_backdrop_is_deterministic():
    v, f = box_mesh(np.array([1.0, 2.0, 3.0]))
    tri = v[f]
    normals = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    assert np.all(np.einsum("fi,fi->f", normals, tri.mean(axis=1)) > 0)  # box faces point out
    assert np.array_equal(outward_faces(v, f), f)
    assert np.array_equal(outward_faces(v, f[:, [0, 2, 1]]), f)
    a = clutter_background(np.random.default_rng(1), 40, 30)
    assert a.shape == (30, 40, 3) and a.dtype == np.uint8 and a.std() > 10
    assert np.array_equal(a, clutter_background(np.random.default_rng(1), 40, 30))


# A pinhole camera looking level (OpenCV axes, y down) over a floor FLOOR_DROP metres below it; the horizon
# lies above the image (principal point row -20), so every row sees the floor, nearer further down.
F, CX, CY, W, H = 100.0, 79.5, -20.0, 160, 100
FLOOR_DROP = 0.3


def _rays() -> np.ndarray:
    u, v = np.meshgrid(np.arange(W, dtype=np.float64), np.arange(H, dtype=np.float64))
    return np.stack([(u - CX) / F, (v - CY) / F]).astype(np.float32)  # (2, H, W)


def _floor(texture: np.ndarray, texel: float = 0.002) -> TexturedPlane:
    return TexturedPlane(origin=np.array([-0.6, FLOOR_DROP, 0.0]), u_axis=np.array([texel, 0.0, 0.0]),
                         v_axis=np.array([0.0, 0.0, texel]), texture=texture)


def _row_shift(a: np.ndarray, b: np.ndarray) -> float:
    """The horizontal shift d (pixels, 0.02 steps) that best explains row b as row a moved: b(u) = a(u - d)."""
    u = np.arange(a.size, dtype=np.float64)
    inner = u[20:-20]
    shifts = np.arange(-12.0, 4.0, 0.02)
    errors = [np.abs(b[20:-20] - np.interp(inner - d, u, a)).mean() for d in shifts]
    return float(shifts[int(np.argmin(errors))])


def test_a_sideways_step_shifts_each_floor_row_by_its_disparity():
    # Pure translation t along x, no rotation: a floor point at depth Z moves by -F t / Z pixels, and on a
    # level floor Z = FLOOR_DROP / y, y = (v - CY) / F, so row v moves by -t (v - CY) / FLOOR_DROP.
    noise = np.random.default_rng(0).integers(0, 256, (600, 600, 3)).astype(np.uint8)
    backdrop = Backdrop([_floor(cv2.GaussianBlur(noise, (0, 0), 3))])
    step = 0.02
    a, depth = backdrop.draw(_rays(), np.eye(3), np.zeros(3), near=0.05)
    b, _ = backdrop.draw(_rays(), np.eye(3), np.array([step, 0.0, 0.0]), near=0.05)
    rows = np.arange(H)
    np.testing.assert_allclose(depth[:, 80], FLOOR_DROP * F / (rows - CY), rtol=1e-5)
    ga, gb = (cv2.cvtColor(i, cv2.COLOR_BGR2GRAY).astype(np.float64) for i in (a, b))
    measured = np.array([_row_shift(ga[v], gb[v]) for v in (5, 30, 55, 80)])
    expected = -step * (np.array([5, 30, 55, 80]) - CY) / FLOOR_DROP  # -1.67 ... -6.67 px
    np.testing.assert_allclose(measured, expected, atol=0.15)
    assert np.all(np.diff(measured) < -1.0)  # nearer rows move more


def test_the_nearer_plane_hides_the_farther_one():
    floor = _floor(np.full((10, 10, 3), (0, 200, 0), np.uint8))
    wall = TexturedPlane(origin=np.array([-1.0, -1.0, 0.8]), u_axis=np.array([0.01, 0.0, 0.0]),
                         v_axis=np.array([0.0, 0.01, 0.0]), texture=np.full((10, 10, 3), (200, 0, 0), np.uint8))
    for planes in ([floor, wall], [wall, floor]):
        image, depth = Backdrop(planes).draw(_rays(), np.eye(3), np.zeros(3), near=0.05)
        floor_depth = FLOOR_DROP * F / (np.arange(H) - CY)  # (H,) the floor's depth per row
        np.testing.assert_allclose(depth[:, 80], np.minimum(floor_depth, 0.8), rtol=1e-5)
        behind = floor_depth > 0.81  # rows where the wall is in front
        assert np.all(image[behind, 80] == (200, 0, 0)) and np.all(image[floor_depth < 0.79, 80] == (0, 200, 0))
    # Looking up, away from both: nothing is hit.
    image, depth = Backdrop([floor]).draw(-_rays() - [[[0.0]], [[1.0]]], np.eye(3), np.zeros(3), near=0.05)
    assert not image.any() and np.isinf(depth).all()
