"""A small OpenCV renderer for the synthetic dataset: textured planes ray-cast per pixel (a room behind the
hands), filled, Lambert-shaded triangles drawn far to near over them (painter's algorithm), so several
meshes occlude each other by depth, and cluttered textures.

Projection is the caller's job (it owns the lens model): :func:`draw_meshes` takes camera-frame vertices
for depth and shading and their projected pixels for drawing; :class:`Backdrop` takes every pixel's ray.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

# Fixed-point bits for cv2.fillConvexPoly: vertices keep 1/16 pixel precision.
_SHIFT = 4


def box_mesh(size: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A box centred at the origin with outward-facing triangles.

    Args:
        size: (3,) edge lengths along x, y, z.

    Returns:
        vertices (8, 3) and faces (12, 3), counter-clockwise seen from outside (normals
        ``(v1 - v0) x (v2 - v0)`` point out).
    """
    corners = np.array([[x, y, z] for x in (-0.5, 0.5) for y in (-0.5, 0.5) for z in (-0.5, 0.5)])
    vertices = corners * np.asarray(size, dtype=np.float64)
    quads = [(0, 1, 3, 2), (4, 6, 7, 5), (0, 4, 5, 1), (2, 3, 7, 6), (0, 2, 6, 4), (1, 5, 7, 3)]
    faces = np.array([tri for a, b, c, d in quads for tri in ((a, b, c), (a, c, d))], dtype=np.int64)
    return vertices, faces


def outward_faces(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Faces reordered, if needed, so that ``(v1 - v0) x (v2 - v0)`` points out of the mesh.

    The sign of the enclosed (signed) volume tells the winding; a mesh open at the wrist, like MANO's,
    is closed enough for it.

    Args:
        vertices: (V, 3).
        faces: (F, 3) vertex indices.
    """
    tri = vertices[faces]  # (F, 3, 3)
    volume = np.einsum("fi,fi->", tri[:, 0], np.cross(tri[:, 1], tri[:, 2])) / 6.0
    return faces if volume >= 0 else faces[:, [0, 2, 1]]


@dataclass(frozen=True)
class TexturedPlane:
    """An unbounded flat surface: the world point ``origin + a * u_axis + b * v_axis`` shows the texture at
    column ``a``, row ``b`` (bilinear); past the texture's edges it repeats, mirrored."""

    origin: np.ndarray  # (3,) world position of texel (0, 0), metres
    u_axis: np.ndarray  # (3,) world step of one texel along a row; orthogonal to v_axis
    v_axis: np.ndarray  # (3,) world step of one texel down a column
    texture: np.ndarray  # (h, w, 3) uint8 BGR


class Backdrop:
    """Textured planes, packed once, then drawn for any camera pose by casting every pixel's ray: exact for
    any lens, so a moving camera sees nearer surfaces shift more (parallax).

    Args:
        planes: the surfaces; where two overlap in view, the nearer shows.
    """

    def __init__(self, planes: Sequence[TexturedPlane]) -> None:
        # One atlas for one cv2.remap per frame; each texture padded by a replicated texel so that bilinear
        # reads at its edges stay inside it.
        padded = [cv2.copyMakeBorder(p.texture, 1, 1, 1, 1, cv2.BORDER_REPLICATE) for p in planes]
        self._atlas = np.zeros((sum(t.shape[0] for t in padded), max(t.shape[1] for t in padded), 3), np.uint8)
        self._geometry = []  # per plane: normal, world -> texel dual axes (2, 3), origin, size, atlas row
        row = 0
        for plane, tex in zip(planes, padded):
            self._atlas[row:row + tex.shape[0], :tex.shape[1]] = tex
            u, v = (np.asarray(a, np.float64) for a in (plane.u_axis, plane.v_axis))
            duals = np.stack([u / (u @ u), v / (v @ v)])  # dot with these: metres -> texels
            h, w = plane.texture.shape[:2]
            self._geometry.append((np.cross(u, v), duals, np.asarray(plane.origin, np.float64), (w, h), row + 1))
            row += tex.shape[0]

    def draw(self, rays: np.ndarray, R: np.ndarray, centre: np.ndarray,
             near: float) -> tuple[np.ndarray, np.ndarray]:
        """The planes seen by one camera.

        Args:
            rays: (2, H, W) float32 x/z and y/z of each pixel's camera-frame ray (the inverse lens model).
            R: (3, 3) world-to-camera rotation.
            centre: (3,) camera centre, world.
            near: hits at a depth (camera z) below this are ignored.

        Returns:
            (H, W, 3) uint8 image, black where no plane is met, and (H, W) float32 depth (camera z; inf
            where none).
        """
        x, y = np.asarray(rays, np.float32)  # (H, W) each
        depth = np.full(x.shape, np.inf, np.float32)
        map_x = np.full(x.shape, -8.0, np.float32)  # off the atlas: black
        map_y = map_x.copy()
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            for normal, duals, origin, (w, h), row in self._geometry:
                rel = np.asarray(centre, np.float64) - origin  # (3,) camera centre from the texture origin
                # A camera-frame ray d runs along R^T d in the world: its dot with world vector a is d . (R a).
                n, du, dv = (R @ np.stack([normal, *duals], axis=1)).T.astype(np.float32)  # (3,) each
                s = np.float32(-(rel @ normal)) / (x * n[0] + y * n[1] + n[2])  # (H, W) depth of the hit
                hit = (s > near) & (s < depth)
                tx = np.float32(rel @ duals[0]) + s * (x * du[0] + y * du[1] + du[2])
                ty = np.float32(rel @ duals[1]) + s * (x * dv[0] + y * dv[1] + dv[2])
                map_x = np.where(hit, _mirror(tx, w) + 1, map_x)
                map_y = np.where(hit, _mirror(ty, h) + row, map_y)
                depth = np.where(hit, s, depth)
        image = cv2.remap(self._atlas, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
        return image, depth


def _mirror(t: np.ndarray, n: int) -> np.ndarray:
    """Texel coordinates folded into [-0.5, n - 0.5], the texture repeating mirrored (cv2.BORDER_REFLECT)."""
    q = (t + np.float32(0.5)) * np.float32(0.5 / n)  # in texture periods of 2 n
    q -= np.floor(q)
    q *= np.float32(2 * n)
    q -= np.float32(n)
    np.abs(q, out=q)
    return np.float32(n - 0.5) - q


def draw_meshes(image: np.ndarray, vertices: np.ndarray, uv: np.ndarray, faces: np.ndarray,
                colors: np.ndarray, light: np.ndarray, drawable: np.ndarray, ambient: float = 0.35) -> None:
    """Draw triangles into ``image`` in place, far to near, back faces culled.

    Args:
        image: (H, W, 3) uint8 BGR canvas.
        vertices: (V, 3) camera-frame vertices (z forward), for depth, culling and shading.
        uv: (V, 2) their projections in pixels.
        faces: (F, 3) outward-wound triangles (see :func:`outward_faces`) over all meshes.
        colors: (F, 3) base BGR colour per triangle.
        light: (3,) unit vector towards the light, camera frame.
        drawable: (V,) False for vertices whose projection is meaningless (behind the camera or outside
            the lens model's valid field); triangles touching one are skipped.
        ambient: share of the colour that unlit faces keep.
    """
    tri = vertices[faces]  # (F, 3, 3)
    normal = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])  # (F, 3)
    centre = tri.mean(axis=1)  # (F, 3)
    # The camera sits at the origin: a face is seen from its front when its normal points back at it.
    front = np.einsum("fi,fi->f", normal, centre) < 0
    pix = uv[faces]  # (F, 3, 2)
    h, w = image.shape[:2]
    on_screen = ((pix[..., 0].max(1) >= 0) & (pix[..., 0].min(1) < w) & (pix[..., 1].max(1) >= 0)
                 & (pix[..., 1].min(1) < h))
    keep = front & on_screen & drawable[faces].all(axis=1)
    if not keep.any():
        return
    normal, centre, pix, colors = normal[keep], centre[keep], pix[keep], colors[keep]
    unit = normal / np.maximum(np.linalg.norm(normal, axis=1, keepdims=True), 1e-12)
    shade = ambient + (1.0 - ambient) * np.clip(unit @ light, 0.0, 1.0)  # (F,) Lambert
    shaded = np.clip(colors * shade[:, None], 0, 255).tolist()
    order = np.argsort(-centre[:, 2], kind="stable")  # far first; near triangles paint over them
    points = np.round(pix * (1 << _SHIFT)).astype(np.int32)  # (F, 3, 2) fixed point
    for i in order.tolist():
        cv2.fillConvexPoly(image, points[i], shaded[i], cv2.LINE_8, _SHIFT)


def clutter_background(rng: np.random.Generator, width: int, height: int, patches: tuple[int, int] = (3, 9),
                       patch_size: tuple[float, float] = (0.05, 0.4)) -> np.ndarray:
    """A random (H, W, 3) uint8 BGR backdrop: a colour gradient, blotchy noise, rectangles, fine grain.

    Args:
        rng: the random source.
        width, height: size in pixels.
        patches: range (low inclusive, high exclusive) of the number of translucent rectangles.
        patch_size: range of their sides, as a share of the backdrop's width and height.
    """
    a, b = rng.uniform(20, 235, (2, 3))
    angle = rng.uniform(0, 2 * math.pi)
    y, x = np.mgrid[0:height, 0:width]
    s = (x * math.cos(angle) + y * math.sin(angle)) / max(width, height)
    s = (s - s.min()) / max(s.max() - s.min(), 1e-9)
    image = a + s[..., None] * (b - a)  # (H, W, 3)
    blotches = cv2.resize(rng.normal(0, 1, (6, 6, 3)), (width, height), interpolation=cv2.INTER_CUBIC)
    image += 30.0 * blotches
    # A few translucent patches (things on a table), not a wall of high-contrast clutter: the hands stay
    # the most salient thing in view, as in egocentric manipulation footage.
    for _ in range(int(rng.integers(*patches))):
        w, h = rng.uniform(*patch_size, 2) * (width, height)
        x0, y0 = rng.uniform(0, 1, 2) * (width, height) - (w / 2, h / 2)
        alpha = rng.uniform(0.2, 0.6)
        x0i, y0i = max(0, int(x0)), max(0, int(y0))
        x1i, y1i = min(width, int(x0 + w)), min(height, int(y0 + h))
        image[y0i:y1i, x0i:x1i] = (1 - alpha) * image[y0i:y1i, x0i:x1i] + alpha * rng.uniform(0, 255, 3)
    image += rng.normal(0, 5, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)
