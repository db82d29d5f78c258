"""Dense targets derived from other targets: semantic edges and depth-based normals.

Deriving them lets every dense dataset offer the same task set (segmentation, depth,
normals, edges) even when a release ships only labels and depth.
"""
from __future__ import annotations

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


def normals_from_depth(depth: Tensor) -> Tensor:
    """Unit surface normals (3, H, W) from a depth map (1, H, W); invalid depth is <= 0.

    The depth map is treated as a surface z = d(x, y) over the pixel grid (x right,
    y down, z along the viewing direction, one unit per pixel). With the central
    differences d_x = (d(x+1, y) - d(x-1, y)) / 2 and d_y likewise (one-sided at the
    image border), the normal facing the camera is

        n = (d_x, d_y, -1) / ||(d_x, d_y, -1)||

    This is an orthographic approximation: it ignores the focal length, so slanted
    surfaces come out with the right orientation in the image but a tilt that is off
    by a depth-dependent factor. That is fine for an auxiliary task that must follow
    the scene geometry, not for comparing against released ground-truth normals.
    Pixels whose depth, or any 4-neighbour's depth, is invalid get the zero vector,
    which the normal loss and metrics treat as "no label".
    """
    if depth.dim() != 3 or depth.shape[0] != 1 or min(depth.shape[1:]) < 2:
        raise DataError(f"normals_from_depth got a depth map of shape {tuple(depth.shape)}; "
                        "pass a (1, H, W) map with H, W >= 2.")
    d = depth[0].float()
    grad_y, grad_x = torch.gradient(d)
    normal = F.normalize(torch.stack([grad_x, grad_y, -torch.ones_like(d)]), dim=0)
    valid = (d > 0).float()[None, None]
    # A pixel is usable only if it and its 4-neighbours are valid: min-pool with a cross.
    padded = F.pad(valid, (1, 1, 1, 1), mode="replicate")[0, 0]
    usable = (padded[1:-1, 1:-1] * padded[:-2, 1:-1] * padded[2:, 1:-1]
              * padded[1:-1, :-2] * padded[1:-1, 2:]) > 0
    return normal * usable
