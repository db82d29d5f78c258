"""Dense targets derived from other targets: semantic edges and depth-based normals.

Deriving them lets every dense dataset offer the MTSL paper's task set (segmentation,
depth, normals, edges, auto-encoding) even when a release ships only labels and depth;
docs/datasets.md says which dataset derives what.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from graphsurgeon.data.errors import DataError
from graphsurgeon.data.tasks import IGNORE_INDEX


def edges_from_labels(labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Semantic edge map of a label map (..., H, W): 1 edge, 0 not, `ignore_index` unknown.

    A pixel is an edge if any of its 4-neighbours (up, down, left, right; pixels outside
    the image do not count) carries a different *known* label, so both sides of a class
    boundary are marked and edges are two pixels thick. Borders with unlabelled pixels
    are not edges, because where an unlabelled region ends is not a semantic boundary,
    and unlabelled pixels are themselves `ignore_index` in the result.

    MTSL (NeurAI-Lab/MTSL, `extract_semantic_contours`) computes the same kind of
    target on the fly from the segmentation label, as "3×3 dilation != 3×3 erosion" of
    the label map; that uses the 8-neighbourhood and treats the unlabelled value as a
    class of its own. We use 4-neighbours and skip unlabelled pixels instead: thinner
    edges along diagonals and no edges invented around unlabelled regions.
    """
    labels = labels.long()
    known = labels != ignore_index
    edge = torch.zeros_like(labels, dtype=torch.bool)
    for dim in (-1, -2):
        n = labels.shape[dim]
        a, b = labels.narrow(dim, 0, n - 1), labels.narrow(dim, 1, n - 1)
        differs = (a != b) & known.narrow(dim, 0, n - 1) & known.narrow(dim, 1, n - 1)
        edge.narrow(dim, 0, n - 1).logical_or_(differs)
        edge.narrow(dim, 1, n - 1).logical_or_(differs)
    return torch.where(known, edge.long(), torch.full_like(labels, ignore_index))


@dataclass(frozen=True)
class Camera:
    """Pinhole intrinsics (pixels) of a camera at the image size `height` × `width`.

    Preprocessed releases store images resized from the sensor's frames, so `at` rescales
    the intrinsics to the size of the array at hand (pixel centres at i + 0.5).
    """

    fx: float
    fy: float
    cx: float
    cy: float
    height: int
    width: int

    def at(self, height: int, width: int) -> Camera:
        """The same camera for frames resized to `height` × `width`."""
        sy, sx = height / self.height, width / self.width
        return Camera(self.fx * sx, self.fy * sy, (self.cx + 0.5) * sx - 0.5, (self.cy + 0.5) * sy - 0.5,
                      height, width)


def depth_from_inverse(inverse: Tensor) -> Tensor:
    """Depth, up to one unknown factor, from inverse depth (disparity); 0 stays 'missing'.

    Stereo disparity is baseline·focal / depth, so 1 / disparity is depth in units of
    baseline·focal. Surface normals do not depend on that factor (scaling every 3-D point
    by a constant leaves every surface direction as it was).
    """
    valid = inverse > 0
    return torch.where(valid, 1 / torch.where(valid, inverse, torch.ones_like(inverse)), torch.zeros_like(inverse))


def normals_from_depth(depth: Tensor, camera: Camera | None = None) -> Tensor:
    """Unit surface normals (3, H, W) from a depth map (1, H, W); invalid depth is <= 0.

    Axes: x right, y down, z along the viewing direction (the camera frame); normals face
    the camera, so a wall straight ahead is (0, 0, -1).

    With a `camera`, every pixel (u, v) is back-projected to the 3-D point
    P = d(u, v) · ((u - cx) / fx, (v - cy) / fy, 1), and the normal is the cross product of
    the surface's two tangents, n ∝ ∂P/∂v × ∂P/∂u, the derivatives taken as central
    differences (one-sided at the border). Both differences join points of the surface,
    so on a plane the normal is exact; on curved surfaces and across depth edges it is
    smoothed over three pixels. This is how the MTSL code derives normals for Cityscapes
    (from depth and the camera; it uses kornia's `depth_to_normals` there).

    Without a camera the map is treated as a surface z = d(x, y) over the pixel grid (one
    unit per pixel): n ∝ (∂d/∂x, ∂d/∂y, -1). That orthographic approximation ignores the
    focal length, so tilts come out right in direction but off in amount by a
    depth-dependent factor: good enough for an auxiliary task, not for comparing against
    measured normals.

    Limits either way: depth sensors are noisy at range and along edges, and differences
    amplify that noise, so derived normals are rougher than released (smoothed, fitted)
    ones; a depth edge between two objects yields a slanted "surface" between them.
    Pixels whose depth, or any 4-neighbour's depth, is invalid get the zero vector, which
    the normal loss and metrics treat as "no label".
    """
    if depth.dim() != 3 or depth.shape[0] != 1 or min(depth.shape[1:]) < 2:
        raise DataError(f"normals_from_depth got a depth map of shape {tuple(depth.shape)}; "
                        "pass a (1, H, W) map with H, W >= 2.")
    d = depth[0].float()
    if camera is None:
        grad_y, grad_x = torch.gradient(d)
        normal = F.normalize(torch.stack([grad_x, grad_y, -torch.ones_like(d)]), dim=0)
    else:
        h, w = d.shape
        if (camera.height, camera.width) != (h, w):
            raise DataError(f"normals_from_depth got a camera for {camera.height}×{camera.width} frames and a "
                            f"{h}×{w} depth map; pass camera.at({h}, {w}).")
        v, u = torch.meshgrid(torch.arange(h, dtype=d.dtype), torch.arange(w, dtype=d.dtype), indexing="ij")
        points = d * torch.stack([(u - camera.cx) / camera.fx, (v - camera.cy) / camera.fy, torch.ones_like(d)])
        tangent_v, tangent_u = torch.gradient(points, dim=(1, 2))
        normal = F.normalize(torch.linalg.cross(tangent_v, tangent_u, dim=0), dim=0)
    valid = (d > 0).float()[None, None]
    # A pixel is usable only if it and its 4-neighbours are valid: min-pool with a cross.
    padded = F.pad(valid, (1, 1, 1, 1), mode="replicate")[0, 0]
    usable = (padded[1:-1, 1:-1] * padded[:-2, 1:-1] * padded[2:, 1:-1]
              * padded[1:-1, :-2] * padded[1:-1, 2:]) > 0
    return normal * usable
