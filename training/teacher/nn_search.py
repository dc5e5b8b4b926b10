"""Nearest-neighbour steps of the NSFP Chamfer loss, on padded batches of point clouds.

Every function returns *indices* only (no gradient); the caller gathers the neighbours and
recomputes squared distances in torch, so gradients flow to both the query and the target
points exactly as with pytorch3d's ``knn_points`` used by the reference NSFP code.

Engines:

* ``brute``: exact, chunked ``torch.cdist`` + argmin on the tensors' own device (the GPU path).
* ``kdtree``: exact, scipy ``cKDTree`` on the CPU (the CPU path: O(P log Q) instead of O(PQ)).
* :class:`DistanceGrid` (``dt``): FastNSF-style (Li et al., ICCV 2023) precomputed distance
  transform of a *fixed* target cloud, looked up with trilinear interpolation (differentiable
  w.r.t. the query). Only usable where the target does not move during the optimisation.

Padding convention: clouds are ``(K, P, 3)`` with a ``(K, P)`` bool mask of real points.
"""
from __future__ import annotations

import math

import numpy as np
import torch

# Bytes of the (K, chunk, Q) distance block in the brute-force search: bounded peak memory on a
# laptop CPU, and few large launches on a GPU (still small next to its memory when 2-4 label
# workers share it).
_BRUTE_BLOCK_BYTES = {'cpu': 64 * 2**20, 'cuda': 1024 * 2**20}


class NNSearchError(ValueError):
    """Bad input to a nearest-neighbour step (names the argument and what was expected)."""


def _check(query: torch.Tensor, qmask: torch.Tensor, target: torch.Tensor, tmask: torch.Tensor) -> None:
    if query.ndim != 3 or query.shape[-1] != 3 or target.ndim != 3 or target.shape[-1] != 3:
        raise NNSearchError(f'query/target must be (K,P,3)/(K,Q,3), got {tuple(query.shape)} / {tuple(target.shape)}')
    if query.shape[0] != target.shape[0] or qmask.shape != query.shape[:2] or tmask.shape != target.shape[:2]:
        raise NNSearchError(f'batch/mask shapes disagree: query {tuple(query.shape)} mask {tuple(qmask.shape)}, '
                            f'target {tuple(target.shape)} mask {tuple(tmask.shape)}')
    if not bool(tmask.any(dim=1).all()):
        raise NNSearchError('every target cloud of the batch needs at least one real point')


@torch.no_grad()
def nn_brute(query: torch.Tensor, qmask: torch.Tensor, target: torch.Tensor, tmask: torch.Tensor) -> torch.Tensor:
    """Index (K, P) of the nearest real target point of every query point (exact, any device)."""
    _check(query, qmask, target, tmask)
    K, P, _ = query.shape
    Q = target.shape[1]
    block = _BRUTE_BLOCK_BYTES.get(query.device.type, _BRUTE_BLOCK_BYTES['cpu'])
    chunk = max(1, min(P, block // max(1, 4 * K * Q)))
    out = torch.empty((K, P), dtype=torch.long, device=query.device)
    big = torch.finfo(query.dtype).max
    pad = (~tmask)[:, None, :]
    # On a GPU the matmul formulation of cdist is several times faster; centring both clouds on
    # the target's mean keeps its cancellation error (~|x|^2 * 1e-7) far below the centimetre
    # scale that decides a neighbour. The exact distance is recomputed by the caller anyway.
    use_mm = query.device.type != 'cpu'
    if use_mm:
        centre = (target * tmask[..., None]).sum(1, keepdim=True) / tmask.sum(1).clamp(min=1)[:, None, None]
        query, target = query - centre, target - centre
    mode = 'use_mm_for_euclid_dist' if use_mm else 'donot_use_mm_for_euclid_dist'
    for s in range(0, P, chunk):
        d = torch.cdist(query[:, s:s + chunk], target, compute_mode=mode)
        d = d.masked_fill(pad, big)
        out[:, s:s + chunk] = d.argmin(dim=2)
    return out


@torch.no_grad()
def nn_kdtree(query: torch.Tensor, qmask: torch.Tensor, target: torch.Tensor, tmask: torch.Tensor) -> torch.Tensor:
    """Same contract as :func:`nn_brute`, with scipy's cKDTree (CPU; a device tensor round-trips)."""
    from scipy.spatial import cKDTree

    _check(query, qmask, target, tmask)
    q_np = query.detach().cpu().numpy()
    t_np = target.detach().cpu().numpy()
    qm = qmask.cpu().numpy()
    tm = tmask.cpu().numpy()
    out = np.zeros(qm.shape, dtype=np.int64)
    for k in range(q_np.shape[0]):
        t_idx = np.flatnonzero(tm[k])
        tree = cKDTree(t_np[k, t_idx])
        q_idx = np.flatnonzero(qm[k])
        if len(q_idx):
            _, j = tree.query(q_np[k, q_idx], k=1)
            out[k, q_idx] = t_idx[j]
    return torch.from_numpy(out).to(query.device)


NN_ENGINES = {'brute': nn_brute, 'kdtree': nn_kdtree}


def gather_sq_dist(query: torch.Tensor, target: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Squared distance (K, P) from each query to ``target[k, idx[k, p]]``, differentiable in both."""
    nb = torch.gather(target, 1, idx.unsqueeze(-1).expand(-1, -1, 3))
    return ((query - nb) ** 2).sum(-1)


class DistanceGrid:
    """Distance transform of fixed target clouds, one 3-D grid per batch element.

    Values are *exact* Euclidean distances from grid vertices to the nearest target point
    (cKDTree), so the only approximation is the trilinear interpolation between vertices
    (error bounded by ~voxel/2 near a point, vanishing away from it). Vertices farther than
    ``max_dist`` from every point hold ``max_dist``: the NSFP loss truncates those anyway, so
    only a band around the cloud is ever queried (FastNSF, Li et al. ICCV 2023, sec. 3).
    Queries outside the grid read the border value, i.e. "far": truncated, zero gradient.
    """

    def __init__(self, targets: list[np.ndarray], voxel: float, max_dist: float, device: str | torch.device):
        from scipy.spatial import cKDTree

        if voxel <= 0 or max_dist <= 0:
            raise NNSearchError(f'voxel and max_dist must be > 0, got {voxel}, {max_dist}')
        margin = max_dist + voxel
        self.voxel = float(voxel)
        self.max_dist = float(max_dist)
        lows, dims, grids = [], [], []
        for t in targets:
            t = np.asarray(t, dtype=np.float64)
            if t.ndim != 2 or t.shape[1] != 3 or len(t) == 0:
                raise NNSearchError(f'target cloud must be (Q>0, 3), got {t.shape}')
            lo = t.min(0) - margin
            n = np.ceil((t.max(0) + margin - lo) / voxel).astype(np.int64) + 1
            lows.append(lo)
            dims.append(n)
        shape = np.max(np.stack(dims), axis=0)
        for t, lo in zip(targets, lows):
            t = np.asarray(t, dtype=np.float64)
            tree = cKDTree(t)
            grid = np.full(tuple(shape), self.max_dist, dtype=np.float32)
            # Only vertices within max_dist of a point matter. Blocks of r voxels (r*voxel >= max_dist)
            # that hold a point, plus their 26 neighbours, cover that band; the rest of the box
            # (mostly empty space in a lidar sweep) keeps the "far" value without a query.
            r = max(1, int(math.ceil(max_dist / voxel)))
            blocks = np.unique(np.floor((t - lo) / (voxel * r)).astype(np.int64), axis=0)
            offs = np.stack(np.meshgrid(*[np.arange(-1, 2)] * 3, indexing='ij'), -1).reshape(-1, 3)
            blocks = np.unique((blocks[:, None, :] + offs[None]).reshape(-1, 3), axis=0)
            inner = np.stack(np.meshgrid(*[np.arange(r)] * 3, indexing='ij'), -1).reshape(-1, 3)
            band = (blocks[:, None, :] * r + inner[None]).reshape(-1, 3)
            band = band[np.all((band >= 0) & (band < shape), axis=1)]
            d, _ = tree.query(lo + band * voxel, k=1, distance_upper_bound=self.max_dist)
            grid[band[:, 0], band[:, 1], band[:, 2]] = np.minimum(d, self.max_dist)
            grids.append(grid)
        # grid_sample wants (K, C, D, H, W) with the last grid coordinate indexing D: store z,y,x.
        g = np.stack(grids).transpose(0, 3, 2, 1)[:, None]
        self.grid = torch.from_numpy(np.ascontiguousarray(g)).to(device)
        self.low = torch.tensor(np.stack(lows), dtype=torch.float32, device=device)
        self.extent = torch.tensor((shape - 1) * voxel, dtype=torch.float32, device=device)

    def distance(self, query: torch.Tensor) -> torch.Tensor:
        """Interpolated distance (K, P) to the nearest target point, differentiable w.r.t. query."""
        u = (query - self.low[:, None, :]) / self.extent * 2.0 - 1.0
        out = torch.nn.functional.grid_sample(self.grid, u[:, None, None], mode='bilinear',
                                              padding_mode='border', align_corners=True)
        return out[:, 0, 0, 0]
