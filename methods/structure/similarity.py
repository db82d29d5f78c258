"""Representation similarity between the features of task nodes (CKA and RSA).

Grouping methods decide which task branches may share a layer by asking how similar their
representations are. Every measure here compares two sets of per-sample features ``X`` (n, ...)
and ``Y`` (n, ...) computed on the *same* n inputs; each sample is flattened into a vector.

* `linear_cka` / `rbf_cka`: centered kernel alignment (Kornblith et al., 2019). Plain CKA uses
  the biased HSIC estimator, which is pushed towards 1 when the feature dimension is comparable
  to n, even for unrelated features.
* `debiased_linear_cka`: CKA built on the unbiased HSIC estimator of Song et al. (2012), as in
  Nguyen et al. (2021) and Kornblith's debiased CKA; it is ~0 for independent features at any
  dimension, which is what a merge threshold needs.
* `rsa`: representational similarity analysis, the rank (or linear) correlation between the
  two representational dissimilarity matrices.
* `CKAAccumulator`: the debiased (or plain) linear CKA of K nodes over a whole data set, from
  feature-space statistics that do not grow with the number of batches.
* `minibatch_debiased_cka`: the K x K debiased CKA of one minibatch, differentiable, for use as
  an alignment loss during training.

The analysis functions compute in float64 (CKA of near-identical representations is a ratio of
nearly equal large numbers) and return Python floats.
"""
from __future__ import annotations

import functools
from collections.abc import Hashable, Mapping, Sequence
from typing import Literal

import torch
from scipy.stats import rankdata
from torch import Tensor

from graphsurgeon.errors import GraphSurgeonError

__all__ = [
    "CKAAccumulator",
    "SimilarityError",
    "debiased_linear_cka",
    "global_avg_pool",
    "linear_cka",
    "minibatch_debiased_cka",
    "rbf_cka",
    "rsa",
]

_F64 = torch.float64


class SimilarityError(GraphSurgeonError):
    """Features cannot be compared (wrong shapes, too few samples, no variance)."""


def global_avg_pool(t: Tensor) -> Tensor:
    """Reduce a feature map to one vector per sample by averaging over positions.

    MTSL (and most CKA studies of CNN stages) compare *global-average-pooled* stage outputs:
    flattening a (C, H, W) map would make the feature dimension C*H*W, so the comparison would
    be dominated by where things are rather than what channels encode, would depend on the input
    resolution, and would make the feature-space statistics of `CKAAccumulator` huge. Pooling
    keeps d = C.

    Args:
        t: (B, C, H, W) convolutional map -> mean over H, W; (B, N, C) token sequence -> mean
            over the N tokens; (B, C) -> returned as is.
    """
    if not isinstance(t, Tensor):
        raise SimilarityError(f"global_avg_pool expects a Tensor, got {type(t).__name__}; pass the node's output tensor.")
    if t.ndim == 4:
        return t.mean(dim=(2, 3))
    if t.ndim == 3:
        return t.mean(dim=1)
    if t.ndim == 2:
        return t
    raise SimilarityError(
        f"global_avg_pool got a tensor of shape {tuple(t.shape)}; it handles (B, C, H, W), (B, N, C) "
        "and (B, C) — reshape the feature to one of these first."
    )


def _samples(x: Tensor, name: str) -> Tensor:
    """(n, ...) -> (n, d) float64, detached, with the checks every measure needs."""
    if not isinstance(x, Tensor):
        raise SimilarityError(f"{name} must be a Tensor of shape (n, ...), got {type(x).__name__}; convert it with torch.as_tensor.")
    if x.ndim == 0 or x.shape[0] == 0:
        raise SimilarityError(f"{name} has shape {tuple(x.shape)}; pass features of shape (n, ...) with n >= 1 samples.")
    flat = x.detach().reshape(x.shape[0], -1).to(_F64)
    if flat.shape[1] == 0:
        raise SimilarityError(f"{name} has no features (shape {tuple(x.shape)}); pass a non-empty feature per sample.")
    if not torch.isfinite(flat).all():
        raise SimilarityError(f"{name} contains NaN or inf; check the model for divergence before comparing features.")
    return flat


def _pair(x: Tensor, y: Tensor, min_n: int, what: str) -> tuple[Tensor, Tensor]:
    xs, ys = _samples(x, "X"), _samples(y, "Y")
    if xs.shape[0] != ys.shape[0]:
        raise SimilarityError(
            f"X has {xs.shape[0]} samples but Y has {ys.shape[0]}; compute both features on the same inputs."
        )
    if xs.shape[0] < min_n:
        raise SimilarityError(f"{what} needs at least {min_n} samples, got {xs.shape[0]}; pass more samples.")
    return xs, ys.to(xs.device)


def _ratio(cross: Tensor, self_x: Tensor, self_y: Tensor, what: str) -> float:
    """cross / sqrt(self_x * self_y), refusing an undefined (zero-variance) denominator."""
    for value, name in ((self_x, "X"), (self_y, "Y")):
        if not value > 0:
            raise SimilarityError(
                f"{what}: {name} has no (estimated) variance across the samples, so the similarity is undefined; "
                "pass features that vary across samples (not a constant or dead activation), or more samples."
            )
    return float(cross / torch.sqrt(self_x * self_y))


def _center(x: Tensor) -> Tensor:
    return x - x.mean(dim=0, keepdim=True)


def linear_cka(X: Tensor, Y: Tensor) -> float:
    """Linear CKA with the (biased) HSIC estimator: ||Xcᵀ Yc||² / (||Xcᵀ Xc|| ||Ycᵀ Yc||).

    Invariant to orthogonal transforms and isotropic scaling of either side, in [0, 1]. It is
    computed in feature space when the features are narrower than n, otherwise through n x n
    Gram matrices, so neither a wide feature nor a large n costs a quadratic blow-up.
    """
    xs, ys = _pair(X, Y, 2, "linear_cka")
    xc, yc = _center(xs), _center(ys)
    n = xs.shape[0]
    if n <= max(xc.shape[1], yc.shape[1]):
        k, m = xc @ xc.T, yc @ yc.T
        return _ratio((k * m).sum(), (k * k).sum(), (m * m).sum(), "linear_cka")
    return _ratio(
        (xc.T @ yc).square().sum(), (xc.T @ xc).square().sum(), (yc.T @ yc).square().sum(), "linear_cka"
    )


def _median_distance(x: Tensor) -> Tensor:
    """Median Euclidean distance between distinct samples (the usual RBF bandwidth heuristic)."""
    i, j = torch.triu_indices(x.shape[0], x.shape[0], offset=1, device=x.device)
    return torch.cdist(x, x)[i, j].median()


def _rbf_gram(x: Tensor, sigma: float | None, name: str) -> Tensor:
    if sigma is None:
        bandwidth = _median_distance(x)
        if not bandwidth > 0:
            raise SimilarityError(
                f"rbf_cka: more than half of the sample pairs of {name} coincide, so the median-distance "
                "bandwidth is 0; pass an explicit sigma > 0 or samples that differ."
            )
    else:
        bandwidth = torch.as_tensor(sigma, dtype=_F64)
    return torch.exp(-torch.cdist(x, x).square() / (2 * bandwidth**2))


def rbf_cka(X: Tensor, Y: Tensor, sigma: float | None = None) -> float:
    """CKA with Gaussian kernels exp(-||a - b||² / (2 sigma²)).

    Args:
        sigma: kernel width used for both X and Y. ``None`` picks each side's own median
            pairwise distance, which makes the measure invariant to isotropic scaling of either
            representation (the width scales with the features).
    """
    if sigma is not None and (isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not 0 < sigma < float("inf")):
        raise SimilarityError(f"rbf_cka: sigma must be a finite number > 0 or None, got {sigma!r}; pass e.g. sigma=1.0.")
    xs, ys = _pair(X, Y, 2, "rbf_cka")
    n = xs.shape[0]
    h = torch.eye(n, dtype=_F64, device=xs.device) - 1.0 / n
    k = h @ _rbf_gram(xs, sigma, "X") @ h
    m = h @ _rbf_gram(ys, sigma, "Y") @ h
    return _ratio((k * m).sum(), (k * k).sum(), (m * m).sum(), "rbf_cka")


def _hsic_unbiased(grams: Tensor) -> Tensor:
    """Unbiased HSIC (Song et al., 2012) between every pair of (K, n, n) Gram matrices -> (K, K).

    With K̃ = K with its diagonal zeroed:
    HSIC_u = [tr(K̃L̃) + (1ᵀK̃1)(1ᵀL̃1) / ((n-1)(n-2)) - 2/(n-2) · 1ᵀK̃L̃1] / (n(n-3)).
    """
    n = grams.shape[-1]
    tilde = grams * (1 - torch.eye(n, dtype=grams.dtype, device=grams.device))
    flat = tilde.reshape(tilde.shape[0], -1)
    rows = tilde.sum(dim=2)
    totals = rows.sum(dim=1)
    trace_term = flat @ flat.T
    return (trace_term + torch.outer(totals, totals) / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (rows @ rows.T)) / (
        n * (n - 3)
    )


def debiased_linear_cka(X: Tensor, Y: Tensor) -> float:
    """Linear CKA built on the unbiased HSIC estimator; ~0 for independent features.

    Needs n >= 4. Unlike `linear_cka` it is not confined to [0, 1]: for unrelated features it
    scatters around 0, which is the point — plain CKA of two random d-dimensional features is
    about d / (n + d) rather than 0. Features are centered first; the estimator is exactly
    invariant to that, and it avoids cancellation when activations have a large mean.
    Uses n x n Gram matrices; for data sets too large for that, use `CKAAccumulator`.
    """
    xs, ys = _pair(X, Y, 4, "debiased_linear_cka")
    xc, yc = _center(xs), _center(ys)
    hsic = _hsic_unbiased(torch.stack([xc @ xc.T, yc @ yc.T]))
    return _ratio(hsic[0, 1], hsic[0, 0], hsic[1, 1], "debiased_linear_cka")


def _pearson(a: Tensor, b: Tensor) -> float:
    ac, bc = a - a.mean(), b - b.mean()
    return _ratio((ac * bc).sum(), (ac * ac).sum(), (bc * bc).sum(), "rsa")


def _rdm_upper(x: Tensor, name: str) -> Tensor:
    """Upper triangle of the representational dissimilarity matrix 1 - corr(sample_a, sample_b)."""
    if x.shape[1] < 2:
        raise SimilarityError(
            f"rsa: {name} has a single feature, so the correlation between samples is undefined; "
            "pass features with at least 2 dimensions."
        )
    centered = x - x.mean(dim=1, keepdim=True)
    norms = centered.norm(dim=1, keepdim=True)
    if not (norms > 0).all():
        raise SimilarityError(
            f"rsa: some samples of {name} are constant across features, so their correlation is undefined; "
            "drop those samples or compare non-constant features."
        )
    unit = centered / norms
    i, j = torch.triu_indices(x.shape[0], x.shape[0], offset=1, device=x.device)
    return (1.0 - unit @ unit.T)[i, j]


def rsa(X: Tensor, Y: Tensor, method: Literal["spearman", "pearson"] = "spearman") -> float:
    """Correlation between the dissimilarity structures of two representations.

    Each representation is summarised by its RDM, 1 - Pearson correlation between every pair
    of samples; the result is the Spearman (default, robust to monotone distortions of the
    dissimilarities) or Pearson correlation between the two RDMs' upper triangles. Needs n >= 3.
    """
    if method not in ("spearman", "pearson"):
        raise SimilarityError(f"rsa: unknown method {method!r}; use 'spearman' or 'pearson'.")
    xs, ys = _pair(X, Y, 3, "rsa")
    a, b = _rdm_upper(xs, "X"), _rdm_upper(ys, "Y")
    if method == "spearman":
        a = torch.from_numpy(rankdata(a.cpu().numpy())).to(_F64)
        b = torch.from_numpy(rankdata(b.cpu().numpy())).to(_F64)
    return _pearson(a, b)


class CKAAccumulator:
    """Whole-data-set linear CKA between K nodes in O(d²) memory, whatever the number of batches.

    The n x n Gram matrices never exist. Every term of the HSIC estimators expands into sums
    over samples of feature-space quantities; with rows x_a of node i, y_a of node j, s = Σ_a x_a,
    C = Σ_a x_a y_aᵀ and the per-sample squared norms ‖x_a‖², ‖y_a‖²:

    * tr(K̃L̃)  = Σ_{a≠b} (x_a·x_b)(y_a·y_b)          = ‖C‖²_F - Σ_a ‖x_a‖²‖y_a‖²
    * 1ᵀK̃1    = Σ_{a≠b} x_a·x_b                      = ‖s_x‖² - Σ_a ‖x_a‖²
    * 1ᵀK̃L̃1  = Σ_a (x_a·s_x - ‖x_a‖²)(y_a·s_y - ‖y_a‖²)
              = s_xᵀ C s_y - s_x·(Σ_a ‖y_a‖² x_a) - s_y·(Σ_a ‖x_a‖² y_a) + Σ_a ‖x_a‖²‖y_a‖²

    The totals s are only known at the end, so the products with s are not accumulated;
    instead the moments they multiply — C, Σ_a ‖y_a‖² x_a and Σ_a ‖x_a‖²‖y_a‖² — are, and s
    is applied in `matrix`. Plain CKA needs only C and s (centered cross-covariance
    C - s_x s_yᵀ / n). All K nodes are stacked into one feature row F = [x¹ | … | xᴷ] of width
    D = Σ d_i, so one update is a D x D product FᵀF plus FᵀZ and ZᵀZ for the (b, K) matrix Z of
    per-node squared norms.

    Both estimators are exactly invariant to shifting a node's features by a constant vector,
    so every batch is shifted by the first batch's mean before accumulating: raw moments of
    post-ReLU features with a large mean would otherwise cancel catastrophically.

    Args:
        debiased: the default estimator of `matrix` (unbiased HSIC; ``False`` for plain CKA).
    """

    def __init__(self, debiased: bool = True) -> None:
        self.debiased = debiased
        self._nodes: tuple[Hashable, ...] | None = None
        self._dims: tuple[int, ...] = ()
        self._n = 0

    @property
    def nodes(self) -> tuple[Hashable, ...]:
        """Node ids in the order of `matrix`'s rows (list positions when updated with lists)."""
        return self._nodes or ()

    @property
    def num_samples(self) -> int:
        """Samples accumulated so far (the n of the estimators)."""
        return self._n

    def _rows(self, features: Mapping[Hashable, Tensor] | Sequence[Tensor]) -> tuple[tuple[Hashable, ...], list[Tensor]]:
        if isinstance(features, Mapping):
            keys = tuple(features)
            values = [features[k] for k in keys]
        elif isinstance(features, Sequence) and not isinstance(features, (str, bytes)):
            keys = tuple(range(len(features)))
            values = list(features)
        else:
            raise SimilarityError(
                f"CKAAccumulator.update expects a mapping node_id -> Tensor(b, ...) or a list of tensors, "
                f"got {type(features).__name__}; wrap the features in a dict."
            )
        if not keys:
            raise SimilarityError("CKAAccumulator.update got no features; pass at least one node's batch.")
        if self._nodes is not None and keys != self._nodes:
            raise SimilarityError(
                f"CKAAccumulator.update got nodes {list(keys)} but was started with {list(self._nodes)}; "
                "pass the same nodes in the same order every batch."
            )
        rows = [_samples(v, f"features[{k!r}]") for k, v in zip(keys, values)]
        sizes = {r.shape[0] for r in rows}
        if len(sizes) != 1:
            raise SimilarityError(
                f"CKAAccumulator.update got batches of different sizes {sorted(sizes)}; "
                "every node's features must come from the same inputs."
            )
        dims = tuple(r.shape[1] for r in rows)
        if self._nodes is not None and dims != self._dims:
            raise SimilarityError(
                f"CKAAccumulator.update got feature widths {dims} but was started with {self._dims}; "
                "flatten (or pool) each node's features the same way every batch."
            )
        return keys, rows

    def update(self, features: Mapping[Hashable, Tensor] | Sequence[Tensor]) -> None:
        """Add one batch: ``{node_id: Tensor(b, ...)}`` (or a list), all from the same b inputs."""
        keys, rows = self._rows(features)
        f = torch.cat([r.to(rows[0].device) for r in rows], dim=1)
        if self._nodes is None:
            self._start(keys, tuple(r.shape[1] for r in rows), f)
        f = f.to(self._shift.device) - self._shift
        z = torch.stack([(f[:, sl] ** 2).sum(dim=1) for sl in self._slices], dim=1)
        self._gram += f.T @ f
        self._sum += f.sum(dim=0)
        self._weighted += f.T @ z
        self._norm_gram += z.T @ z
        self._norm_sum += z.sum(dim=0)
        self._n += f.shape[0]

    def _start(self, keys: tuple[Hashable, ...], dims: tuple[int, ...], first: Tensor) -> None:
        self._nodes, self._dims = keys, dims
        width, k = first.shape[1], len(dims)
        self._shift = first.mean(dim=0)
        zeros = functools.partial(torch.zeros, dtype=_F64, device=first.device)
        self._gram, self._sum = zeros(width, width), zeros(width)
        self._weighted, self._norm_gram, self._norm_sum = zeros(width, k), zeros(k, k), zeros(k)
        ends = torch.tensor(dims).cumsum(0).tolist()
        self._slices = [slice(end - d, end) for d, end in zip(dims, ends)]
        self._blocks = zeros(k, width)
        for i, sl in enumerate(self._slices):
            self._blocks[i, sl] = 1.0

    def _reshift(self, shift: Tensor) -> None:
        """Re-express the statistics around ``shift`` instead of the current shift, exactly.

        With f' = f + δ (δ = old shift − new shift), u_k = δ_k·f_k and c_k = ‖δ_k‖² per node,
        z' = z + 2u + c, and every new moment is a combination of the stored ones: Σf uᵀ = G Mᵀ
        and Σu uᵀ = M G Mᵀ with G = Σ f fᵀ and M the (K, D) block-diagonal layout of δ, and
        Σz uᵀ = (M W)ᵀ with W = Σ f zᵀ. No third moment is needed.
        """
        delta = self._shift - shift.to(self._shift)
        n = float(self._n)
        m = self._blocks * delta  # (K, D): row k holds δ_k in node k's block
        c = self._blocks @ delta.square()
        u_sum = m @ self._sum
        z_u = (m @ self._weighted).T  # Σ z uᵀ
        u_u = m @ self._gram @ m.T
        norm_sum = self._norm_sum + 2 * u_sum + n * c
        self._norm_gram = (
            self._norm_gram
            + 2 * (z_u + z_u.T)
            + 4 * u_u
            + torch.outer(self._norm_sum, c)
            + torch.outer(c, self._norm_sum)
            + 2 * (torch.outer(u_sum, c) + torch.outer(c, u_sum))
            + n * torch.outer(c, c)
        )
        self._weighted = self._weighted + 2 * self._gram @ m.T + torch.outer(self._sum, c) + torch.outer(delta, norm_sum)
        self._gram = (
            self._gram + torch.outer(delta, self._sum) + torch.outer(self._sum, delta) + n * torch.outer(delta, delta)
        )
        self._sum = self._sum + n * delta
        self._norm_sum = norm_sum
        self._shift = shift.to(self._shift).clone()

    def all_reduce(self) -> CKAAccumulator:
        """Sum the statistics of every rank of the process group into every rank's accumulator.

        A collective (no-op in one process): each rank updates with its own share of the
        samples, then calls this once; afterwards `matrix` is the CKA over all ranks' samples.
        Only the O(D²) statistics travel, never activations. Each rank shifted its features by
        its own first batch's mean, so every rank first re-expresses its statistics around rank
        0's shift (`_reshift`, exact) and then one flat float64 buffer is summed. Every rank
        must have updated at least once, with the same nodes.
        """
        from graphsurgeon.training import distributed

        if not distributed.is_distributed():
            return self
        if self._nodes is None:
            raise SimilarityError(
                f"CKAAccumulator.all_reduce on rank {distributed.rank()} before any update; give every rank "
                "at least one batch (fewer samples than ranks?)."
            )
        shift = self._shift.clone()
        distributed.broadcast_tensors([shift])
        self._reshift(shift)
        parts = [self._gram, self._sum, self._weighted, self._norm_gram, self._norm_sum]
        flat = torch.cat([p.reshape(-1) for p in parts] + [torch.tensor([float(self._n)], dtype=_F64, device=shift.device)])
        distributed.all_reduce_sum(flat)
        offset = 0
        for p in parts:
            p.copy_(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
        self._n = round(float(flat[-1]))
        return self

    def _block_sums(self, m: Tensor) -> Tensor:
        """(D, D) -> (K, K) sums over each pair of nodes' feature blocks."""
        return self._blocks @ m @ self._blocks.T

    def matrix(self, debiased: bool | None = None) -> Tensor:
        """Pairwise CKA (K, K) float64 over everything seen so far, rows in `nodes` order."""
        debiased = self.debiased if debiased is None else debiased
        n = self._n
        if n < (4 if debiased else 2):
            raise SimilarityError(
                f"CKAAccumulator has seen {n} samples; {'debiased' if debiased else 'plain'} CKA needs at least "
                f"{4 if debiased else 2} — call update with more batches first."
            )
        s = self._sum
        if debiased:
            trace = self._block_sums(self._gram.square()) - self._norm_gram
            totals = self._blocks @ s.square() - self._norm_sum
            s_weighted = self._blocks @ (s[:, None] * self._weighted)
            row_products = (
                self._block_sums(torch.outer(s, s) * self._gram) - s_weighted - s_weighted.T + self._norm_gram
            )
            hsic = (trace + torch.outer(totals, totals) / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * row_products) / (
                n * (n - 3)
            )
        else:
            hsic = self._block_sums((self._gram - torch.outer(s, s) / n).square())
        scale = hsic.diagonal()
        if not (scale > 0).all():
            dead = [self._nodes[i] for i in torch.nonzero(scale <= 0).flatten().tolist()]
            raise SimilarityError(
                f"CKAAccumulator: nodes {dead} have no (estimated) variance across the samples, so their CKA is "
                "undefined; drop them or accumulate more samples."
            )
        root = scale.sqrt()
        return hsic / torch.outer(root, root)


def minibatch_debiased_cka(features: Sequence[Tensor], dtype: torch.dtype | None = None) -> Tensor:
    """Differentiable K x K debiased linear CKA of one minibatch, for alignment losses.

    Gradients flow into every feature tensor. Each (b, ...) tensor is flattened per sample and
    centered (the estimator is invariant to centering, and it keeps float32 from cancelling
    large raw Gram entries), then all pairs are evaluated at once from the K Gram matrices.

    Args:
        features: K tensors (b, ...) computed on the same b >= 4 inputs.
        dtype: compute dtype; ``None`` keeps the features' (promoted) floating dtype, so a
            float32 training step stays float32.

    A node whose self-HSIC estimate is not positive (dead or constant features) gets similarity
    0 to everything, with zero gradient, instead of NaN poisoning the loss.
    """
    if isinstance(features, Tensor) or not isinstance(features, Sequence) or not features:
        raise SimilarityError("minibatch_debiased_cka expects a non-empty list of tensors (b, ...); pass [f1, f2, ...].")
    if not all(isinstance(f, Tensor) and f.ndim >= 1 for f in features):
        raise SimilarityError("minibatch_debiased_cka: every feature must be a Tensor of shape (b, ...); check the list.")
    sizes = {f.shape[0] for f in features}
    if len(sizes) != 1:
        raise SimilarityError(
            f"minibatch_debiased_cka got batch sizes {sorted(sizes)}; all features must come from the same inputs."
        )
    b = sizes.pop()
    if b < 4:
        raise SimilarityError(f"minibatch_debiased_cka needs a batch of at least 4 samples, got {b}; use a larger batch.")
    if dtype is None:
        dtype = functools.reduce(torch.promote_types, [f.dtype for f in features])
        if not dtype.is_floating_point:
            dtype = torch.get_default_dtype()
    flat = [_center(f.reshape(b, -1).to(dtype)) for f in features]
    hsic = _hsic_unbiased(torch.stack([x @ x.T for x in flat]))
    scale = hsic.diagonal()
    alive = scale > 0
    root = torch.where(alive, scale, torch.ones_like(scale)).sqrt()
    cka = hsic / torch.outer(root, root)
    return torch.where(torch.outer(alive, alive), cka, torch.zeros_like(cka))
