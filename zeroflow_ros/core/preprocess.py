"""Point selection shared by predict, the teacher, training and the ROS node (numpy, ROS-free).

One convention (see :mod:`zeroflow_ros.core.geometry`): everything the estimator sees is in the ego
frame of sweep t (``ego0``). ``points0`` is sweep t in ego0, ``points1`` is sweep t+1 in ego1 and
is brought into ego0 with ``inv(ego1_T_ego0)``. A point is *scored* when it is finite, inside the
range box and not ground. The range box is half-open, ``min <= x < max`` (same for y, z), so every
kept point falls in a pillar of a grid that starts at ``min`` (``floor((x - min) / voxel)`` is then
always in ``[0, cells)``).

Ground is decided in each sweep's own frame (the sensor geometry holds there): from the map
(``is_ground0/1`` given by the reader) or by :func:`zeroflow_ros.core.ground.geometric_ground`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from zeroflow_ros.core.geometry import invert, transform_points
from zeroflow_ros.core.ground import GeometricGroundConfig, geometric_ground

GROUND_MODES = ('auto', 'map', 'geometric', 'none')


class PreprocessError(ValueError):
    """Bad input to preprocessing (names the argument and what was expected)."""


@dataclass(frozen=True)
class PreprocessConfig:
    """Range box (ego frame, metres, half-open) and ground handling.

    The default box is ZeroFlow's point-cloud range (x, y in [-51.2, 51.2), z in [-3, 3)), the same
    as the default pillar grid of :mod:`zeroflow_ros.core.voxelize` and of the model.

    ``ground``: ``'map'`` uses the given ``is_ground`` masks (required), ``'geometric'`` always
    computes them, ``'none'`` keeps ground, ``'auto'`` uses the given masks when present, else
    geometric.
    """

    x_min: float = -51.2
    x_max: float = 51.2
    y_min: float = -51.2
    y_max: float = 51.2
    z_min: float = -3.0
    z_max: float = 3.0
    ground: str = 'auto'
    geometric: GeometricGroundConfig = field(default_factory=GeometricGroundConfig)

    def __post_init__(self) -> None:
        if self.ground not in GROUND_MODES:
            raise PreprocessError(f'PreprocessConfig.ground: {self.ground!r} is not one of {GROUND_MODES}')
        for lo, hi in (('x_min', 'x_max'), ('y_min', 'y_max'), ('z_min', 'z_max')):
            if not getattr(self, lo) < getattr(self, hi):
                raise PreprocessError(
                    f'PreprocessConfig: {lo}={getattr(self, lo)} must be < {hi}={getattr(self, hi)}')

    @classmethod
    def from_dict(cls, d: dict) -> 'PreprocessConfig':
        """Build from a plain dict (manifest, checkpoint); unknown keys raise and list the valid ones."""
        d = dict(d)
        valid = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(d) - valid)
        if unknown:
            raise PreprocessError(f'PreprocessConfig: unknown keys {unknown} (valid: {sorted(valid)})')
        if isinstance(d.get('geometric'), dict):
            g = dict(d['geometric'])
            gvalid = set(GeometricGroundConfig.__dataclass_fields__)
            if set(g) - gvalid:
                raise PreprocessError(f'PreprocessConfig.geometric: unknown keys {sorted(set(g) - gvalid)} '
                                      f'(valid: {sorted(gvalid)})')
            for k in ('ring_edges', 'init_range'):
                if k in g:
                    g[k] = tuple(float(v) for v in g[k])
            d['geometric'] = GeometricGroundConfig(**g)
        return cls(**d)

    def to_dict(self) -> dict:
        """Plain dict (for manifests and checkpoints)."""
        out = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != 'geometric'}
        g = self.geometric
        out['geometric'] = {k: getattr(g, k) for k in g.__dataclass_fields__}
        out['geometric']['ring_edges'] = list(g.ring_edges)
        out['geometric']['init_range'] = list(g.init_range)
        return out

    def in_range(self, points: np.ndarray) -> np.ndarray:
        """(N,) bool: finite and inside the half-open box."""
        # float64 like core.voxelize: float32 bounds (float32(-51.2) < -51.2) would disagree at the ulp.
        p = np.asarray(points)[:, :3].astype(np.float64)
        x, y, z = p[:, 0], p[:, 1], p[:, 2]
        with np.errstate(invalid='ignore'):
            return ((x >= self.x_min) & (x < self.x_max) & (y >= self.y_min) & (y < self.y_max)
                    & (z >= self.z_min) & (z < self.z_max))


@dataclass
class PreparedCloud:
    mask: np.ndarray        # (N,) bool, points the estimator scores
    points: np.ndarray      # (K,3) float32 = input[mask]
    is_ground: np.ndarray   # (N,) bool, the ground mask used (all False for ground='none')


@dataclass
class PreparedPair:
    mask0: np.ndarray        # (N,) bool over points0
    pc0: np.ndarray          # (K0,3) float32, ego0
    mask1: np.ndarray        # (M,) bool over points1
    pc1: np.ndarray          # (K1,3) float32, sweep t+1 in ego0
    ego1_T_ego0: np.ndarray  # (4,4) float64
    is_ground0: np.ndarray   # (N,) bool
    is_ground1: np.ndarray   # (M,) bool


def _check_points(name: str, points) -> np.ndarray:
    arr = np.asarray(points)
    if arr.ndim != 2 or arr.shape[1] < 3:
        raise PreprocessError(
            f'{name}: expected an (N,3) array (extra columns ignored), got shape {arr.shape}')
    if not np.issubdtype(arr.dtype, np.floating):
        raise PreprocessError(f'{name}: expected a float array, got dtype {arr.dtype}')
    return arr[:, :3]


def _check_mask(name: str, mask, n: int) -> np.ndarray | None:
    if mask is None:
        return None
    m = np.asarray(mask)
    if m.shape != (n,):
        raise PreprocessError(f'{name}: expected shape ({n},) to match the points, got {m.shape}')
    if m.dtype != bool:
        raise PreprocessError(f'{name}: expected a bool mask, got dtype {m.dtype}')
    return m


def check_transform(name: str, T) -> np.ndarray:
    """Return T as float64 if it is a finite 4x4 rigid transform (rotation to 1e-3), else raise."""
    if T is None:
        raise PreprocessError(f'{name}: expected a 4x4 rigid transform, got None')
    T = np.asarray(T, dtype=np.float64)
    if T.shape != (4, 4) or not np.isfinite(T).all():
        raise PreprocessError(f'{name}: expected a finite 4x4 transform, got shape {T.shape}')
    R = T[:3, :3]
    if (np.abs(R @ R.T - np.eye(3)).max() > 1e-3 or abs(np.linalg.det(R) - 1) > 1e-3
            or np.abs(T[3] - (0, 0, 0, 1)).max() > 1e-9):
        raise PreprocessError(
            f'{name}: not a rigid transform (rotation not orthonormal or last row not 0 0 0 1)')
    return T


def _ground(name: str, points: np.ndarray, given: np.ndarray | None, cfg: PreprocessConfig) -> np.ndarray:
    if cfg.ground == 'none':
        return np.zeros(len(points), dtype=bool)
    if cfg.ground == 'map':
        if given is None:
            raise PreprocessError(f'{name}: ground mode "map" needs a ground mask from the map, got None '
                                  '(use ground="auto" or "geometric" for data without a map)')
        return given
    if cfg.ground == 'auto' and given is not None:
        return given
    return geometric_ground(points, cfg.geometric)


def prepare_cloud(points, cfg: PreprocessConfig | None = None, is_ground=None) -> PreparedCloud:
    """Select the points of one cloud (own frame) that the estimator scores."""
    cfg = cfg or PreprocessConfig()
    pts = _check_points('points', points)
    g = _ground('points', pts, _check_mask('is_ground', is_ground, len(pts)), cfg)
    mask = cfg.in_range(pts) & ~g
    return PreparedCloud(mask, pts[mask].astype(np.float32), g)


def prepare_pair(points0, points1, ego1_T_ego0, cfg: PreprocessConfig | None = None,
                 is_ground0=None, is_ground1=None) -> PreparedPair:
    """Select and ego-compensate a pair; see the module docstring for the frames."""
    cfg = cfg or PreprocessConfig()
    p0 = _check_points('points0', points0)
    p1 = _check_points('points1', points1)
    T = check_transform('ego1_T_ego0', ego1_T_ego0)
    g0 = _ground('points0', p0, _check_mask('is_ground0', is_ground0, len(p0)), cfg)
    g1 = _ground('points1', p1, _check_mask('is_ground1', is_ground1, len(p1)), cfg)
    mask0 = cfg.in_range(p0) & ~g0
    p1_in0 = transform_points(invert(T), p1.astype(np.float64))
    mask1 = cfg.in_range(p1_in0) & ~g1
    return PreparedPair(mask0, p0[mask0].astype(np.float32), mask1, p1_in0[mask1].astype(np.float32),
                        T, g0, g1)
