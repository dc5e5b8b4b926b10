"""Rigid-object teacher: one rigid motion per moving object, everything else static.

Why: NSFP's Chamfer objective snaps a point to the nearest point of the next sweep, so an object that
moves more than its own point spacing (real vehicles move 1-3 m between sweeps) is pulled onto the
wrong surface and keeps only part of its motion (issue #13). Registering whole objects with an
initialisation found by voting over candidate translations, as ICP-Flow (Lin & Caesar, CVPR 2024)
does, survives large displacements. This is our own implementation of that idea:

1. **Clusters** of each sweep: connected components of occupied voxels (``voxel_xy_m`` x
   ``voxel_z_m``, 26-connected) over the non-ground points (ground removed and range cropped by
   :func:`zeroflow_ros.core.preprocess.prepare_pair`). Clusters longer than ``max_extent_m``
   (buildings, fences, rows of parked cars) are static; tiny ones (< ``min_points``) too.
2. **Translation voting** per cluster of sweep t: every (subsampled) point votes for the bird's-eye
   displacement to every point of sweep t+1 within the reach of the fastest plausible object
   (``max_speed_mps``), restricted to *object-sized* clusters of t+1 (walls would out-vote a car
   driving along them). The votes are binned (``vote_bin_m``), box-smoothed, and the strongest
   peaks are the initial translations; the zero translation is always a candidate too.
3. **Registration**: point-to-point ICP with yaw + 3-D translation (vehicles do not roll or pitch
   between sweeps; four degrees of freedom keep thin, partial views from tilting), trimmed
   correspondences with a shrinking distance gate, from each initial translation. Correspondences
   come from the object-sized points of t+1.
4. **Acceptance**: the best candidate's truncated mean distance to sweep t+1 (all points) must beat
   the static hypothesis (identity) by ``min_gain_ratio`` and ``min_gain_m``, with at least
   ``min_inlier_frac`` of the object within ``inlier_m`` of sweep t+1, a plausible speed and yaw
   rate, and a displacement of at least ``min_motion_m`` (slower objects are within the noise of
   point-to-point registration and are called static). An accepted object's points get
   ``R p + t - p``; every other point gets 0 (pure ego motion).

**Heights.** Registration and fit costs use coordinates whose height is scaled by ``z_weight``:
lidar rings cross an object at different heights in the two sweeps (the range changed), so
point-to-point distances in 3-D carry up to half a ring spacing of pure sampling noise (0.3-1 m on
a 16/32-beam sensor at 20-40 m) that would swamp the fit; objects move in the ground plane.

Input/output as :func:`zeroflow_training.teacher.nsfp.run_nsfp`: ``pc0`` (sweep t, ego0) and ``pc1``
(sweep t+1 brought into ego0), both ground-removed; returns *residual* flow (N,3) float32 and an
info dict. Everything is numpy/scipy on one core; no torch.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

import numpy as np


class RigidError(ValueError):
    """Bad input or configuration of the rigid teacher (names the argument and what was expected)."""


@dataclass(frozen=True)
class RigidConfig:
    """Every constant of the rigid teacher (see the module docstring for the role of each)."""

    voxel_xy_m: float = 0.4        # clustering voxel, horizontal
    link_cells: int = 1            # voxels up to this many cells apart in x/y are linked
    voxel_z_m: float = 1.0         # vertical: lidar rings on a far car are far apart vertically
    min_points: int = 8            # smaller clusters are static (too few points to register)
    max_extent_m: float = 20.0     # longer than an articulated bus: static structure
    max_speed_mps: float = 40.0    # plausibility gate and reach of the voting
    max_yaw_rate: float = 1.5      # rad/s; a car turning at 25 m/s on a 30 m radius turns 0.83 rad/s
    max_dz_m: float = 0.4          # vertical motion per sweep (a 10 % grade at 40 m/s); more is a bad match
    min_yaw_extent_m: float = 1.5  # smaller objects (pedestrians, poles) get translation only
    max_stolen_frac: float = 0.5   # of the matched t+1 points already explained by other clusters of t
    frame_dt_s: float = 0.1        # sweep interval when the caller gives none (AV2: 10 Hz)
    vote_bin_m: float = 0.2        # translation histogram cell
    vote_src: int = 128             # points of the cluster that vote
    vote_dst: int = 1500           # points of sweep t+1 voted for (random subset of the reach)
    vote_peaks: int = 4            # strongest histogram peaks tried as initial translations
    icp_points: int = 300          # points of the cluster registered (the motion then moves all)
    icp_iters: int = 20
    icp_gate_m: tuple[float, float] = (0.8, 0.25)  # correspondence gate, from first to last iteration
    inlier_m: float = 0.25         # truncation of the fit cost, and the inlier distance
    min_inlier_frac: float = 0.5   # of the cluster within inlier_m of sweep t+1 after the motion
    min_gain_ratio: float = 0.7    # moved cost <= ratio * static cost
    big_m: float = 6.0             # clusters longer than this (walls more often than buses) ...
    big_gain_ratio: float = 0.6    # ... need moved cost <= this * static cost
    min_gain_m: float = 0.02       # and at least this much lower (m)
    min_motion_m: float = 0.05     # smaller displacements are static (registration noise)
    adopt_m: float = 1.0           # an unaccepted fragment this close to a mover may take its motion
    adopt_gain_ratio: float = 0.8  # if it fits it better than standing still by this factor
    refine_max_m: float = 0.5      # point-to-line refinement may move the result at most this far
    z_weight: float = 0.3          # heights are scaled by this for matching (see "Heights" above)
    vacate_m: float = 0.5          # sweep t+1 points this close to the object's old place ...
    max_left_frac: float = 0.3     # ... and not explained by its new place: more (x cluster size) = static
    flat_long_m: tuple[float, float] = (6.0, 1.3)  # longer than [0] and lower than [1] m: infrastructure
    follow_tol_m: float = 0.3      # a motion this close to the sensor's own ("moving with us") ...
    follow_max_extent_m: float = 8.0  # ... is believed only for objects up to this long ...
    follow_gain_ratio: float = 0.5    # ... that it explains this decisively (see register_cluster)
    seed: int = 0

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in ('icp_gate_m', 'flat_long_m'):
                ok = len(v) == 2 and all(np.isfinite(x) and x > 0 for x in v)
            elif f.name in ('seed', 'link_cells'):
                ok = isinstance(v, (int, np.integer))
            else:
                ok = isinstance(v, (int, float, np.number)) and np.isfinite(v) and v > 0
            if not ok:
                raise RigidError(f'RigidConfig.{f.name}: expected a positive number'
                                 f'{" pair" if f.name in ("icp_gate_m", "flat_long_m") else ""}, got {v!r}')
        if self.min_inlier_frac > 1 or self.min_gain_ratio > 1:
            raise RigidError(f'RigidConfig: min_inlier_frac and min_gain_ratio must be <= 1, got '
                             f'{self.min_inlier_frac}, {self.min_gain_ratio}')

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> 'RigidConfig':
        """Build from a plain dict; unknown keys raise and list the valid ones."""
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        extra = sorted(set(d) - known)
        if extra:
            raise RigidError(f'RigidConfig: unknown keys {extra}; valid: {sorted(known)}')
        for k in ('icp_gate_m', 'flat_long_m'):
            if k in d:
                d[k] = tuple(float(v) for v in d[k])
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out['icp_gate_m'] = list(self.icp_gate_m)
        out['flat_long_m'] = list(self.flat_long_m)
        return out


# ----------------------------------------------------------------------------------------------
# clustering

def _forward_offsets(reach_xy: int) -> np.ndarray:
    r = range(-reach_xy, reach_xy + 1)
    return np.array([(dx, dy, dz) for dx in r for dy in r for dz in (-1, 0, 1) if (dx, dy, dz) > (0, 0, 0)],
                    dtype=np.int64)


def voxel_clusters(points: np.ndarray, cell_xy: float, cell_z: float, reach_xy: int = 1) -> np.ndarray:
    """(N,) cluster id (0..K-1) of every point: connected components of occupied voxels.

    Two voxels are linked when they differ by at most ``reach_xy`` cells in x and in y and by at most
    one cell in z (``reach_xy=1``: 26-connectivity).
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    n = len(points)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    ijk = np.floor(np.asarray(points, dtype=np.float64)[:, :3] / (cell_xy, cell_xy, cell_z)).astype(np.int64)
    ijk -= ijk.min(axis=0) - reach_xy  # >= reach, so every neighbour offset stays >= 0
    dims = ijk.max(axis=0) + reach_xy + 1
    key = (ijk[:, 0] * dims[1] + ijk[:, 1]) * dims[2] + ijk[:, 2]
    vox, point_vox = np.unique(key, return_inverse=True)
    rows, cols = [], []
    for d in _forward_offsets(reach_xy):
        nb = vox + (d[0] * dims[1] + d[1]) * dims[2] + d[2]
        j = np.searchsorted(vox, nb)
        j = np.minimum(j, len(vox) - 1)
        hit = vox[j] == nb
        rows.append(np.flatnonzero(hit))
        cols.append(j[hit])
    r = np.concatenate(rows)
    c = np.concatenate(cols)
    graph = coo_matrix((np.ones(len(r), dtype=np.int8), (r, c)), shape=(len(vox), len(vox)))
    _, comp = connected_components(graph, directed=False)
    return comp[point_vox.reshape(-1)].astype(np.int64)


def _groups(labels: np.ndarray) -> list[np.ndarray]:
    """Split point indices by label (one index array per label)."""
    if len(labels) == 0:
        return []
    order = np.argsort(labels, kind='stable')
    cut = np.flatnonzero(np.diff(labels[order])) + 1
    return np.split(order, cut)


def _extent_xy(points: np.ndarray) -> float:
    xy = points[:, :2]
    return float(np.linalg.norm(xy.max(axis=0) - xy.min(axis=0)))


# ----------------------------------------------------------------------------------------------
# registration

def yaw_matrix(yaw: float) -> np.ndarray:
    c, s = np.cos(yaw), np.sin(yaw)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def fit_yaw_translation(src: np.ndarray, dst: np.ndarray) -> tuple[float, np.ndarray]:
    """Least-squares yaw + 3-D translation mapping ``src`` onto ``dst`` (2-D Kabsch in xy, mean in z)."""
    cs, cd = src.mean(axis=0), dst.mean(axis=0)
    a, b = src[:, :2] - cs[:2], dst[:, :2] - cd[:2]
    sxx = float((a[:, 0] * b[:, 0] + a[:, 1] * b[:, 1]).sum())
    sxy = float((a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0]).sum())
    yaw = float(np.arctan2(sxy, sxx))
    t = cd - yaw_matrix(yaw) @ cs
    return yaw, t


def icp_yaw(src: np.ndarray, tree, target: np.ndarray, t0: np.ndarray, iters: int,
            gates: tuple[float, float], with_yaw: bool = True) -> tuple[float, np.ndarray]:
    """Trimmed point-to-point ICP (yaw + translation, or translation only) from ``t0``; returns (yaw, t)."""
    yaw, t = 0.0, np.asarray(t0, dtype=np.float64).copy()
    g0, g1 = gates
    for k in range(iters):
        gate = g0 + (g1 - g0) * k / max(1, iters - 1)
        moved = src @ yaw_matrix(yaw).T + t
        dist, idx = tree.query(moved, k=1, distance_upper_bound=gate)
        ok = np.isfinite(dist)
        if ok.sum() < 3:
            break
        if with_yaw:
            new_yaw, new_t = fit_yaw_translation(src[ok], target[idx[ok]])
        else:
            new_yaw, new_t = 0.0, (target[idx[ok]] - src[ok]).mean(axis=0)
        done = abs(new_yaw - yaw) < 1e-4 and float(np.abs(new_t - t).max()) < 1e-3
        yaw, t = new_yaw, new_t
        if done and k >= 2:
            break
    return yaw, t


def bev_normals(points: np.ndarray, tree_xy, k: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Bird's-eye unit normals (M,2) of a cloud and their weight (M,) = 1 - minor/major spread.

    Vertical surfaces (vehicle sides, fronts) are lines from above; roofs and bushes spread in both
    directions and get little weight.
    """
    k = min(k, len(points))
    _, idx = tree_xy.query(points[:, :2], k=k)
    nb = points[idx.reshape(len(points), k), :2]
    d = nb - nb.mean(axis=1, keepdims=True)
    cxx, cyy, cxy = (d[..., 0] ** 2).mean(1), (d[..., 1] ** 2).mean(1), (d[..., 0] * d[..., 1]).mean(1)
    major = 0.5 * np.arctan2(2 * cxy, cxx - cyy)  # direction of the largest spread
    normal = np.stack([-np.sin(major), np.cos(major)], axis=1)
    half = np.sqrt(((cxx - cyy) / 2) ** 2 + cxy ** 2)
    lam_max, lam_min = (cxx + cyy) / 2 + half, (cxx + cyy) / 2 - half
    return normal, np.clip(1.0 - lam_min / np.maximum(lam_max, 1e-12), 0.0, 1.0)


def refine_point_to_line(src: np.ndarray, tree, target: np.ndarray, normals: np.ndarray, weight: np.ndarray,
                         yaw: float, t: np.ndarray, gate: float, iters: int = 10) -> tuple[float, np.ndarray]:
    """Point-to-line ICP in bird's-eye view (yaw, x, y; z from the mean offset), from (yaw, t).

    Point-to-point ICP is biased along long flat sides: the dense side points pull toward where
    the two samplings coincide. Distances along the surface normal leave sliding free, so the
    object's ends and corners decide the motion along the side.
    """
    t = np.asarray(t, dtype=np.float64).copy()
    for _ in range(iters):
        moved = src @ yaw_matrix(yaw).T + t
        dist, j = tree.query(moved, k=1, distance_upper_bound=gate)
        ok = np.isfinite(dist)
        if ok.sum() < 6:
            break
        m, q, n, w = moved[ok], target[j[ok]], normals[j[ok]], weight[j[ok]]
        r = ((m[:, :2] - q[:, :2]) * n).sum(axis=1)
        jac = np.stack([n[:, 1] * m[:, 0] - n[:, 0] * m[:, 1], n[:, 0], n[:, 1]], axis=1)
        a = (jac * w[:, None]).T @ jac + 1e-6 * np.eye(3)
        dx = np.linalg.solve(a, -(jac * w[:, None]).T @ r)
        dyaw = float(dx[0])
        t = yaw_matrix(dyaw) @ t + np.array([dx[1], dx[2], float(np.mean(q[:, 2] - m[:, 2]))])
        yaw += dyaw
        if abs(dyaw) < 1e-5 and float(np.abs(dx[1:]).max()) < 1e-4:
            break
    return yaw, t


def vote_translations(src: np.ndarray, dst: np.ndarray, reach: float, cfg: RigidConfig) -> list[np.ndarray]:
    """Strongest candidate bird's-eye translations src -> dst (histogram voting), best first."""
    from scipy.ndimage import maximum_filter, uniform_filter
    if len(src) == 0 or len(dst) == 0:
        return []
    d = (dst[None, :, :2] - src[:, None, :2]).reshape(-1, 2)
    nb = int(np.ceil(reach / cfg.vote_bin_m))
    ij = np.floor(d / cfg.vote_bin_m + 0.5).astype(np.int64) + nb
    keep = ((ij >= 0) & (ij <= 2 * nb)).all(axis=1)
    ij, d = ij[keep], d[keep]
    if len(ij) == 0:
        return []
    size = 2 * nb + 1
    flat = ij[:, 0] * size + ij[:, 1]
    hist = np.bincount(flat, minlength=size * size).reshape(size, size).astype(np.float64)
    # A true displacement spreads over neighbouring cells (sampling differs between sweeps).
    smooth = uniform_filter(hist, size=3, mode='constant')
    peaks = (smooth == maximum_filter(smooth, size=5, mode='constant')) & (smooth > 0)
    cand = np.flatnonzero(peaks.ravel())
    cand = cand[np.argsort(-smooth.ravel()[cand], kind='stable')][:cfg.vote_peaks]
    out = []
    for c in cand:
        ci, cj = divmod(int(c), size)
        near = (np.abs(ij[:, 0] - ci) <= 1) & (np.abs(ij[:, 1] - cj) <= 1)
        if not near.any():  # a peak of float round-off in the smoothed histogram
            continue
        # Height is left to the ICP: votes pair points at any height, so their dz is noise.
        out.append(np.array([d[near, 0].mean(), d[near, 1].mean(), 0.0]))
    return out


def _fit_cost(points: np.ndarray, tree, trunc: float) -> tuple[float, float]:
    """(mean truncated NN distance, fraction within ``trunc``) of ``points`` to a tree's cloud."""
    dist, _ = tree.query(points, k=1, distance_upper_bound=trunc)
    inl = np.isfinite(dist)
    return float(np.where(inl, dist, trunc).mean()), float(inl.mean())


# ----------------------------------------------------------------------------------------------
# the teacher

@dataclass
class RigidResult:
    flow: np.ndarray        # (N,3) float32 residual flow of pc0
    cluster: np.ndarray     # (N,) int64 cluster id of every point of pc0
    moving: np.ndarray      # (N,) bool, point belongs to an accepted moving object
    candidate: np.ndarray   # (N,) bool, point belongs to a cluster that was registered at all
    info: dict[str, Any]


class _Scene:
    """Both sweeps as the registration sees them: t+1 (all points, object-sized ones) and t's clusters."""

    def __init__(self, pc0: np.ndarray, cluster0: np.ndarray, pc1: np.ndarray, cfg: RigidConfig) -> None:
        from scipy.spatial import cKDTree
        self.tree0 = cKDTree(pc0)
        self.cluster0 = cluster0
        self.tree_all = cKDTree(pc1)
        # pc1 is height-scaled
        labels = voxel_clusters(pc1, cfg.voxel_xy_m, cfg.voxel_z_m * cfg.z_weight, cfg.link_cells)
        keep = np.zeros(len(pc1), dtype=bool)
        for idx in _groups(labels):
            if len(idx) >= 3 and _extent_xy(pc1[idx]) <= cfg.max_extent_m:
                keep[idx] = True
        self.obj = pc1[keep]
        self.tree_obj = cKDTree(self.obj) if len(self.obj) else None
        self.tree_obj_xy = cKDTree(self.obj[:, :2]) if len(self.obj) else None
        self.normals, self.normal_weight = (bev_normals(self.obj, self.tree_obj_xy) if len(self.obj) >= 3
                                            else (np.zeros((0, 2)), np.zeros(0)))


def cKDTree_of(points: np.ndarray):  # noqa: N802 (scipy's class name)
    from scipy.spatial import cKDTree
    return cKDTree(points)


def _flat_and_long(pts: np.ndarray, cfg: RigidConfig) -> bool:
    """Long low structures (barriers, kerbs, hedges) are infrastructure, not vehicles.

    Their lidar rings hit them in short segments at fixed distances from the sensor, so in a moving
    sensor's frame the pattern travels with the sensor and fits "moving with us" better than static.
    No vehicle is both longer than ``flat_long_m[0]`` and less tall than ``flat_long_m[1]``.
    """
    length, height = cfg.flat_long_m  # pts are in matching space: heights scaled by z_weight
    return _extent_xy(pts) > length and float(np.ptp(pts[:, 2])) < height * cfg.z_weight


def _subsample(points: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    if len(points) <= k:
        return points
    return points[rng.choice(len(points), k, replace=False)]


def _plausible(step: np.ndarray, yaw: float, cfg: RigidConfig, dt: float) -> bool:
    return bool(np.linalg.norm(step) <= cfg.max_speed_mps * dt and abs(yaw) <= cfg.max_yaw_rate * dt
                and abs(step[2]) <= cfg.max_dz_m * cfg.z_weight)  # step is height-scaled


def _best_motion(src: np.ndarray, starts: list[np.ndarray], scene: _Scene, cfg: RigidConfig,
                 dt: float, with_yaw: bool) -> tuple[float, float, np.ndarray, float]:
    """(cost, yaw, t, inlier fraction) of the best plausible ICP result over the initial translations.

    Implausible results (too fast, turning too fast, jumping vertically: e.g. a car's lower half
    matched onto its own roof) are dropped before the choice, not after, so they cannot hide a
    slightly worse but plausible fit.
    """
    best = (np.inf, 0.0, np.zeros(3), 0.0)
    centre = src.mean(axis=0)
    for t0 in starts:
        yaw, t = icp_yaw(src, scene.tree_obj, scene.obj, t0, cfg.icp_iters, cfg.icp_gate_m, with_yaw)
        if not _plausible(yaw_matrix(yaw) @ centre + t - centre, yaw, cfg, dt):
            continue
        cost, inl = _fit_cost(src @ yaw_matrix(yaw).T + t, scene.tree_all, cfg.inlier_m)
        if cost < best[0]:
            best = (cost, yaw, t, inl)
    return best


def _follows_sensor(centre: np.ndarray, new_centre: np.ndarray, ego1_T_ego0: np.ndarray | None,
                    cfg: RigidConfig) -> bool:
    """Tell whether a motion keeps the object where it was *relative to the moving sensor*.

    Lidar rings cut walls and barriers parallel to the path into segments at fixed distances from
    the sensor; that pattern travels with a moving sensor, so "moving with us" fits them better than
    standing still. Real vehicles do follow us at our speed, so such a motion needs more evidence.
    """
    if ego1_T_ego0 is None:
        return False
    from zeroflow_ros.core.geometry import invert
    back = invert(ego1_T_ego0)
    if float(np.linalg.norm(back[:2, 3])) < cfg.follow_tol_m:
        return False  # the sensor barely moved: following it is standing still
    c = centre / (1.0, 1.0, cfg.z_weight)
    with_sensor = back[:3, :3] @ c + back[:3, 3]
    return float(np.linalg.norm(new_centre[:2] - with_sensor[:2])) < cfg.follow_tol_m


def register_cluster(pts: np.ndarray, own: int, scene: _Scene, cfg: RigidConfig, dt: float,
                     rng: np.random.Generator,
                     ego1_T_ego0: np.ndarray | None = None) -> tuple[float, np.ndarray, str]:
    """Best rigid motion (yaw, t) of cluster ``own`` of sweep t, or (0, 0, reason) when it stays static."""
    zero = np.zeros(3)
    if scene.tree_obj is None:
        return 0.0, zero, 'no object-sized points in sweep t+1'
    reach = cfg.max_speed_mps * dt
    centre = pts.mean(axis=0)
    radius = float(np.linalg.norm(pts[:, :2] - centre[:2], axis=1).max())
    near = scene.tree_obj_xy.query_ball_point(centre[:2], reach + radius + cfg.vote_bin_m)
    if len(near) < 3:
        return 0.0, zero, 'nothing within reach in sweep t+1'
    dst = _subsample(scene.obj[np.asarray(near)], cfg.vote_dst, rng)
    src = _subsample(pts, cfg.icp_points, rng)
    starts = vote_translations(_subsample(src, cfg.vote_src, rng), dst, reach, cfg) + [zero]
    static_cost, _ = _fit_cost(src, scene.tree_all, cfg.inlier_m)
    with_yaw = _extent_xy(pts) >= cfg.min_yaw_extent_m
    cost, yaw, t, inl = _best_motion(src, starts, scene, cfg, dt, with_yaw)
    if not np.isfinite(cost):
        return 0.0, zero, 'no plausible motion (speed, yaw rate, vertical motion)'
    motion = float(np.linalg.norm(yaw_matrix(yaw) @ centre + t - centre))
    if motion < cfg.min_motion_m:
        return 0.0, zero, 'static: best motion below min_motion_m'
    if inl < cfg.min_inlier_frac:
        return 0.0, zero, 'poor fit (too few inliers)'
    ratio = cfg.big_gain_ratio if _extent_xy(pts) > cfg.big_m else cfg.min_gain_ratio
    if cost > ratio * static_cost or static_cost - cost < cfg.min_gain_m:
        return 0.0, zero, 'static: motion does not explain sweep t+1 better than no motion'
    # Aliasing: on a periodic structure (columns, windows, a row of posts) the opposite shift fits
    # as well as the found one; a real mover cannot be explained by moving backwards.
    step = yaw_matrix(yaw) @ centre + t - centre
    if _fit_cost(src - step, scene.tree_all, cfg.inlier_m)[0] <= cfg.min_gain_ratio * static_cost:
        return 0.0, zero, 'static: the opposite motion fits as well (periodic structure)'
    if _follows_sensor(centre, yaw_matrix(yaw) @ centre + t, ego1_T_ego0, cfg) and (
            _extent_xy(pts) > cfg.follow_max_extent_m or cost > cfg.follow_gain_ratio * static_cost):
        return 0.0, zero, 'static: moves with the sensor without decisive evidence (ring pattern)'
    if with_yaw:
        yaw2, t2 = refine_point_to_line(src, scene.tree_obj, scene.obj, scene.normals, scene.normal_weight,
                                        yaw, t, cfg.icp_gate_m[1])
        step2 = yaw_matrix(yaw2) @ centre + t2 - centre
        # A refinement, not a new answer: far from the point-to-point result means it slid off.
        if np.linalg.norm(step2 - step) <= cfg.refine_max_m and _plausible(step2, yaw2, cfg, dt):
            yaw, t = yaw2, t2
    return yaw, t, 'moving'


def _contradicted(pts: np.ndarray, moved: np.ndarray, scene: _Scene, tree_static, tree_pred,
                  cfg: RigidConfig) -> str:
    """Say why the rest of the scene contradicts this mover ('' when it does not)."""
    dist, j = scene.tree_all.query(moved, k=1, distance_upper_bound=cfg.inlier_m)
    hit = np.unique(j[np.isfinite(dist)])
    if len(hit) == 0:
        return 'lands on nothing'
    ds, _ = tree_static.query(scene.tree_all.data[hit], k=1, distance_upper_bound=cfg.inlier_m)
    if np.isfinite(ds).mean() > cfg.max_stolen_frac:
        return 'its match at t+1 is something that stood there at t and stays'
    rows = scene.tree_all.query_ball_point(pts, cfg.vacate_m)
    near = np.unique(np.fromiter((k for row in rows for k in row), dtype=np.int64))
    if len(near):
        # Twice the inlier distance: a new view shows a little more or less of a surface.
        dp, _ = tree_pred.query(scene.tree_all.data[near], k=1, distance_upper_bound=2 * cfg.inlier_m)
        left = int((~np.isfinite(dp)).sum())
        if left >= 0.5 * len(near) and left > cfg.max_left_frac * len(pts):
            return 'something unexplained still stands where it was'
    return ''


def consistent_motions(p0: np.ndarray, motions: list, scene: _Scene, cfg: RigidConfig,
                       rng: np.random.Generator, rounds: int = 2) -> list:
    """Drop movers that the predicted sweep t+1 (static world in place, movers moved) contradicts.

    Checked per mover, against everything else (a vehicle split into several clusters moves into
    its own parts' old places, so the checks use the other movers' predicted places, not sweep t):

    * its match at t+1 must not be explained by static structure of t (a thin pole missed at t+1
      would otherwise "move" onto its neighbour);
    * it must vacate its old place: t+1 points there must be explained by the predicted scene (a
      stripe of a fence seen at a grazing angle is resampled elsewhere on the same fence each
      sweep; it "moves" while the fence still stands where it was).
    """
    from scipy.spatial import cKDTree
    keep = list(motions)
    for _ in range(rounds):
        moving = np.zeros(len(p0), dtype=bool)
        moved = []
        for idx, yaw, t in keep:
            moving[idx] = True
            moved.append(p0[idx] @ yaw_matrix(yaw).T + t)
        static = p0[~moving]
        tree_static = cKDTree(static if len(static) else np.full((1, 3), 1e9))
        tree_pred = cKDTree(np.concatenate([static] + moved))
        survivors = []
        for (idx, yaw, t) in keep:
            sub = _subsample(p0[idx], cfg.icp_points, rng)
            if not _contradicted(sub, sub @ yaw_matrix(yaw).T + t, scene, tree_static, tree_pred, cfg):
                survivors.append((idx, yaw, t))
        if len(survivors) == len(keep):
            break
        keep = survivors
    return keep


def adopt_fragments(p0: np.ndarray, groups: list[np.ndarray], motions: list, flow: np.ndarray,
                    moving: np.ndarray, scene: _Scene, cfg: RigidConfig) -> int:
    """Give unaccepted clusters near an accepted mover its motion when it fits them better than none.

    Lidar breaks one vehicle into pieces (windows, sparse far rings); a lone piece (a vertical stripe
    of a bus side) has no shape to register, but it moves with the body beside it. The fragment takes
    the neighbour's motion only if it is smaller than the neighbour, that motion brings it closer to
    sweep t+1 than standing still (``adopt_gain_ratio``) and lands at least half of it within
    ``inlier_m``; a pole next to a passing car stays put.
    """
    from scipy.spatial import cKDTree
    if not motions:
        return 0
    owner = np.concatenate([np.full(len(idx), k) for k, (idx, _, _) in enumerate(motions)])
    tree = cKDTree(np.concatenate([p0[idx, :2] for idx, _, _ in motions]))
    adopted = 0
    for idx in groups:
        if moving[idx[0]] or _extent_xy(p0[idx]) > cfg.max_extent_m:
            continue
        dist, j = tree.query(p0[idx, :2], k=1, distance_upper_bound=cfg.adopt_m)
        if not np.isfinite(dist).any():
            continue
        donor, yaw, t = motions[owner[j[np.argmin(dist)]]]
        if len(idx) > len(donor):  # a wall beside a passing car is no fragment of it
            continue
        pts = p0[idx]
        moved = pts @ yaw_matrix(yaw).T + t
        cost, inl = _fit_cost(moved, scene.tree_all, cfg.inlier_m)
        static_cost, _ = _fit_cost(pts, scene.tree_all, cfg.inlier_m)
        if inl >= cfg.min_inlier_frac and cost < cfg.adopt_gain_ratio * static_cost:
            flow[idx] = ((moved - pts) / (1.0, 1.0, cfg.z_weight)).astype(np.float32)
            moving[idx] = True
            adopted += 1
    return adopted


def _check_cloud(name: str, pc: Any) -> np.ndarray:
    a = np.asarray(pc)
    if a.ndim != 2 or a.shape[1] != 3 or not np.issubdtype(a.dtype, np.floating):
        raise RigidError(f'{name}: expected an (N,3) float array, got shape {a.shape} dtype {a.dtype}')
    if not np.isfinite(a).all():
        raise RigidError(f'{name}: {int((~np.isfinite(a)).any(axis=1).sum())} non-finite points')
    return a.astype(np.float64)


def rigid_objects(pc0: np.ndarray, pc1: np.ndarray, cfg: RigidConfig | None = None,
                  dt: float | None = None, seed: int | None = None,
                  ego1_T_ego0: np.ndarray | None = None) -> RigidResult:
    """Run the rigid teacher and keep its per-point bookkeeping (clusters, accepted objects)."""
    cfg = cfg or RigidConfig()
    t_start = time.perf_counter()
    p0 = _check_cloud('pc0', pc0)
    p1 = _check_cloud('pc1', pc1)
    dt = cfg.frame_dt_s if dt is None else float(dt)
    if not (np.isfinite(dt) and dt > 0):
        raise RigidError(f'dt: expected a positive sweep interval in seconds, got {dt!r}')
    n = len(p0)
    flow = np.zeros((n, 3), dtype=np.float32)
    moving = np.zeros(n, dtype=bool)
    candidate = np.zeros(n, dtype=bool)
    cluster = voxel_clusters(p0, cfg.voxel_xy_m, cfg.voxel_z_m, cfg.link_cells)
    info: dict[str, Any] = {'status': 'ok', 'reason': '', 'points': n, 'clusters': 0, 'registered': 0,
                            'moving_objects': 0, 'adopted': 0}
    if n == 0 or len(p1) == 0:
        info['seconds'] = time.perf_counter() - t_start
        return RigidResult(flow, cluster, moving, candidate, info)
    # Matching space: heights scaled (module docstring); flows are scaled back when written.
    w = np.array([1.0, 1.0, cfg.z_weight])
    p0, p1 = p0 * w, p1 * w
    scene = _Scene(p0, cluster, p1, cfg)
    rng = np.random.default_rng(cfg.seed if seed is None else seed)
    groups = _groups(cluster)
    info['clusters'] = len(groups)
    motions = []
    for idx in groups:
        pts = p0[idx]
        if len(idx) < cfg.min_points or _extent_xy(pts) > cfg.max_extent_m or _flat_and_long(pts, cfg):
            continue
        candidate[idx] = True
        info['registered'] += 1
        yaw, t, verdict = register_cluster(pts, int(cluster[idx[0]]), scene, cfg, dt, rng, ego1_T_ego0)
        if verdict == 'moving':
            motions.append((idx, yaw, t))
    motions = consistent_motions(p0, motions, scene, cfg, rng)
    for idx, yaw, t in motions:
        pts = p0[idx]
        flow[idx] = ((pts @ yaw_matrix(yaw).T + t - pts) / w).astype(np.float32)
        moving[idx] = True
    info['moving_objects'] = len(motions)
    info['adopted'] = adopt_fragments(p0, groups, motions, flow, moving, scene, cfg)
    info['seconds'] = time.perf_counter() - t_start
    return RigidResult(flow, cluster, moving, candidate, info)


def run_rigid(pc0: np.ndarray, pc1: np.ndarray, cfg: RigidConfig | None = None, dt: float | None = None,
              seed: int | None = None,
              ego1_T_ego0: np.ndarray | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Residual flow (N,3) float32 of ``pc0`` towards ``pc1`` (both ego0, ground removed) and an info dict.

    ``dt`` is the sweep interval in seconds (default ``cfg.frame_dt_s``); it scales the speed limits.
    ``ego1_T_ego0`` (optional, the pair's ego motion) lets it doubt motions that merely follow the sensor.
    Raises :class:`RigidError` on bad input.
    """
    res = rigid_objects(pc0, pc1, cfg, dt, seed, ego1_T_ego0)
    return res.flow, res.info
