"""The mesh renderer: painter's order by depth, back faces culled, Lambert shading."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from hawor_tune.data.render import box_mesh, clutter_background, draw_meshes, outward_faces

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
