"""Pillar indices: the numpy pre-step shared by every backend (torch, onnxruntime, TensorRT).

The network never sees raw clouds: every backend calls :func:`pillarize` and feeds the network
``(pts, pillar_idx)`` of both sweeps. Keeping this step in one numpy function is what makes the
backends agree bit for bit on which point lands in which pillar (a float32-vs-float64 floor
at a pillar border is otherwise a silent per-backend difference).

Grid convention (same as ZeroFlow's DynamicVoxelizer / mmdet3d): the pseudo-image is
``(H, W) = (ny, nx)``, row = y, column = x, and the flat pillar index is ``iy * W + ix`` with
``ix = floor((x - x_min) / pillar_size)``. A point is in range when
``x_min <= x < x_max`` (same for y and z) and all coordinates are finite.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping

import numpy as np

# Relative tolerance for "the range divides evenly into pillars": 51.2 / 0.2 is 255.99999999999997
# in float64, which must count as 256, while 51.0 / 0.2 = 255 must not pass for 100.1 m.
_DIVIDE_TOL = 1e-6


class VoxelizeError(ValueError):
    """A grid definition or a cloud given to the pillar pre-step is not what it expects."""


@dataclass(frozen=True)
class PillarGrid:
    """Bird's-eye-view pillar grid. Only geometry: no torch, so the ONNX/TensorRT paths can use it."""

    x_min: float = -51.2
    x_max: float = 51.2
    y_min: float = -51.2
    y_max: float = 51.2
    z_min: float = -3.0
    z_max: float = 3.0
    pillar_size: float = 0.2
    # The UNet halves the pseudo-image this many times; both grid sides must divide by 2**levels
    # or the bilinear up-sampling cannot line up with the skip connections.
    divisor: int = 1

    def __post_init__(self) -> None:
        for lo, hi in (('x_min', 'x_max'), ('y_min', 'y_max'), ('z_min', 'z_max')):
            a, b = getattr(self, lo), getattr(self, hi)
            if not (math.isfinite(a) and math.isfinite(b) and b > a):
                raise VoxelizeError(f'PillarGrid: need finite {lo} < {hi}, got {lo}={a}, {hi}={b}')
        if not (math.isfinite(self.pillar_size) and self.pillar_size > 0):
            raise VoxelizeError(f'PillarGrid: pillar_size must be a positive number of metres, '
                                f'got {self.pillar_size}')
        if int(self.divisor) < 1:
            raise VoxelizeError(f'PillarGrid: divisor must be >= 1, got {self.divisor}')
        for axis in ('x', 'y'):
            extent = getattr(self, f'{axis}_max') - getattr(self, f'{axis}_min')
            cells = extent / self.pillar_size
            n = round(cells)
            if n < 1 or abs(cells - n) > _DIVIDE_TOL * max(1.0, cells):
                lo = math.floor(cells)
                hi = lo + 1
                raise VoxelizeError(
                    f'PillarGrid: {axis} range [{getattr(self, f"{axis}_min")}, '
                    f'{getattr(self, f"{axis}_max")}] ({extent:g} m) is not a whole number of '
                    f'{self.pillar_size:g} m pillars ({cells:.4f}); use a range of '
                    f'{lo * self.pillar_size:g} m or {hi * self.pillar_size:g} m, or a pillar size '
                    f'of {extent / max(lo, 1):g} m')
            if n % self.divisor:
                lo = (n // self.divisor) * self.divisor
                hi = lo + self.divisor
                raise VoxelizeError(
                    f'PillarGrid: {axis} has {n} pillars, not a multiple of {self.divisor} '
                    f'(the UNet down-samples {int(math.log2(self.divisor))} times); use '
                    f'{max(lo, self.divisor)} or {hi} pillars, e.g. a range of '
                    f'{hi * self.pillar_size:g} m')

    @property
    def nx(self) -> int:
        return int(round((self.x_max - self.x_min) / self.pillar_size))

    @property
    def ny(self) -> int:
        return int(round((self.y_max - self.y_min) / self.pillar_size))

    @property
    def shape(self) -> tuple[int, int]:
        """Pseudo-image (H, W) = (ny, nx)."""
        return self.ny, self.nx

    @property
    def num_pillars(self) -> int:
        return self.nx * self.ny

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> 'PillarGrid':
        """From a manifest/checkpoint dict; unknown keys are an error (they mean a format mismatch)."""
        known = set(cls.__dataclass_fields__)
        extra = sorted(set(d) - known)
        if extra:
            raise VoxelizeError(f'PillarGrid: unknown keys {extra}; expected a subset of {sorted(known)}')
        try:
            return cls(**{k: (int(v) if k == 'divisor' else float(v)) for k, v in d.items()})
        except (TypeError, ValueError) as exc:
            if isinstance(exc, VoxelizeError):
                raise
            raise VoxelizeError(f'PillarGrid: bad value in {dict(d)} ({exc})') from None


def as_grid(cfg: Any) -> PillarGrid:
    """Accept a PillarGrid, anything with a ``.grid`` PillarGrid (FastFlow3DConfig), or a dict."""
    if isinstance(cfg, PillarGrid):
        return cfg
    grid = getattr(cfg, 'grid', None)
    if isinstance(grid, PillarGrid):
        return grid
    if isinstance(cfg, Mapping):
        return PillarGrid.from_dict(cfg)
    raise VoxelizeError(f'expected a PillarGrid, a FastFlow3DConfig or a dict, got {type(cfg).__name__}')


def in_range_mask(points: np.ndarray, cfg: Any) -> np.ndarray:
    """(N,) bool: finite and inside the half-open box of the grid."""
    return _in_range(_check_points(points).astype(np.float64), as_grid(cfg))


def _in_range(p64: np.ndarray, g: PillarGrid) -> np.ndarray:
    # float64 like the pillar index, so "in range" and "which pillar" never disagree at a border;
    # NaN compares False, so non-finite points drop out without a separate isfinite pass
    with np.errstate(invalid='ignore'):
        c = (p64 >= (g.x_min, g.y_min, g.z_min)) & (p64 < (g.x_max, g.y_max, g.z_max))
    return c[:, 0] & c[:, 1] & c[:, 2]


def pillarize(points: np.ndarray, cfg: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pillar pre-step of every backend.

    Args:
        points: (N,3) float32 (other float dtypes are cast), ego frame, metres.
        cfg: a :class:`PillarGrid`, a ``FastFlow3DConfig`` or a grid dict.

    Returns:
        in_range: (N,) bool, points kept (finite and inside the grid box).
        pts: (K,3) float32, ``points[in_range]`` in input order.
        pillar_idx: (K,) int64, flat index ``iy * W + ix`` into the (H, W) pseudo-image.
    """
    g = as_grid(cfg)
    pts_all = _check_points(points)
    # float64 so that the pillar of a point does not depend on how the input was rounded
    p64 = pts_all.astype(np.float64)
    keep = _in_range(p64, g)
    pts = np.ascontiguousarray(pts_all[keep], dtype=np.float32)
    cell = np.floor((p64[keep, :2] - (g.x_min, g.y_min)) / g.pillar_size).astype(np.int64)
    # x < x_max can still round up to nx at the last ulp; clip rather than drop the point
    ix = np.clip(cell[:, 0], 0, g.nx - 1)
    iy = np.clip(cell[:, 1], 0, g.ny - 1)
    return keep, pts, iy * g.nx + ix


def pillar_centers(pillar_idx: np.ndarray, cfg: Any) -> np.ndarray:
    """(K,3) float64 centres of the given flat pillars (z = middle of the z range)."""
    g = as_grid(cfg)
    idx = np.asarray(pillar_idx, dtype=np.int64)
    ix, iy = idx % g.nx, idx // g.nx
    return np.stack([g.x_min + (ix + 0.5) * g.pillar_size,
                     g.y_min + (iy + 0.5) * g.pillar_size,
                     np.full(idx.shape, 0.5 * (g.z_min + g.z_max))], axis=1)


def _check_points(points: Any) -> np.ndarray:
    arr = np.asarray(points)
    if arr.ndim != 2 or arr.shape[1] != 3:
        raise VoxelizeError(f'points: expected an (N,3) array, got shape {arr.shape}')
    if not np.issubdtype(arr.dtype, np.floating):
        raise VoxelizeError(f'points: expected a float array (float32), got dtype {arr.dtype}')
    return arr.astype(np.float32, copy=False)
