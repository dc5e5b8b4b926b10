"""Reader for the Argoverse 2 sensor-dataset layout (real AV2 logs or our synthetic ones).

Layout: ``DATA_ROOT/<split>/<log_id>/``
  sensors/lidar/<timestamp_ns>.feather     x, y, z (ego frame), intensity, ...
  city_SE3_egovehicle.feather               timestamp_ns, qw, qx, qy, qz, tx_m, ty_m, tz_m
  annotations.feather                       cuboids (optional)
  map/*ground_height_surface*.npy + *img_Sim2_city.json   (optional)
  scene_flow/<timestamp_ns>.feather         exact ground truth (synthetic logs only)

Pairs are (sweep t, sweep t+1) of consecutive lidar files of one log; flow conventions are in
:mod:`zeroflow_ros.core.geometry`.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Iterator

import numpy as np

from zeroflow_ros.core.geometry import invert, make_transform, quat_to_matrix, transform_points
from zeroflow_ros.core.ground import GROUND_HEIGHT_THRESHOLD_M, GroundRaster  # noqa: F401 (public names)


class DataError(ValueError):
    """A dataset file is missing, corrupt or not what the layout promises (names the file)."""


def read_feather(path: Path, columns: list[str] | None = None):
    import pyarrow.feather as feather
    try:
        return feather.read_table(path, columns=columns)
    except FileNotFoundError:
        raise DataError(f'{path}: file not found') from None
    except Exception as exc:  # pyarrow raises a zoo of types for corrupt files
        raise DataError(f'{path}: cannot read as feather ({exc})') from None


@dataclass
class FlowLabels:
    """Ground-truth flow of sweep t, one row per point of its lidar file (AV2 convention)."""

    flow: np.ndarray              # (N,3) float32, AV2 convention (includes ego motion)
    is_valid: np.ndarray          # (N,) bool
    is_dynamic: np.ndarray        # (N,) bool
    category_indices: np.ndarray  # (N,) uint8, av2 CATEGORY_TO_INDEX (0 = background)


@dataclass
class Pair:
    log_id: str
    ts0: int
    ts1: int
    points0: np.ndarray           # (N,3) float32, ego0 frame, lidar-file row order
    points1: np.ndarray           # (M,3) float32, ego1 frame
    ego1_T_ego0: np.ndarray       # (4,4) float64
    is_ground0: np.ndarray | None  # (N,) bool, from the map when present
    is_ground1: np.ndarray | None
    gt: FlowLabels | None


class AV2Log:
    def __init__(self, log_dir: Path):
        self.log_dir = Path(log_dir)
        self.log_id = self.log_dir.name

    @cached_property
    def timestamps(self) -> np.ndarray:
        files = sorted((self.log_dir / 'sensors' / 'lidar').glob('*.feather'))
        ts = []
        for f in files:
            try:
                ts.append(int(f.stem))
            except ValueError:
                raise DataError(f'{f}: lidar file name is not a nanosecond timestamp') from None
        return np.array(sorted(ts), dtype=np.int64)

    def lidar_path(self, ts: int) -> Path:
        return self.log_dir / 'sensors' / 'lidar' / f'{int(ts)}.feather'

    def points(self, ts: int) -> np.ndarray:
        """(N,3) float32 ego-frame points in file row order (float16 files cast first)."""
        path = self.lidar_path(ts)
        tab = read_feather(path)
        for c in ('x', 'y', 'z'):
            if c not in tab.column_names:
                raise DataError(f'{path}: missing column {c!r} (has {tab.column_names})')
        pts = np.stack([tab.column(c).to_numpy().astype(np.float32) for c in ('x', 'y', 'z')], axis=1)
        return pts

    @cached_property
    def _poses(self) -> dict[int, np.ndarray]:
        path = self.log_dir / 'city_SE3_egovehicle.feather'
        tab = read_feather(path).to_pandas()
        need = ['timestamp_ns', 'qw', 'qx', 'qy', 'qz', 'tx_m', 'ty_m', 'tz_m']
        missing = [c for c in need if c not in tab.columns]
        if missing:
            raise DataError(f'{path}: missing columns {missing}')
        out = {}
        for row in tab[need].itertuples(index=False):
            out[int(row[0])] = make_transform(quat_to_matrix(*row[1:5]), row[5:8])
        return out

    def pose(self, ts: int) -> np.ndarray:
        """city_T_ego at the sweep timestamp (an exact pose row is required, as in av2)."""
        try:
            return self._poses[int(ts)]
        except KeyError:
            raise DataError(f'{self.log_dir / "city_SE3_egovehicle.feather"}: no pose at {ts}') from None

    def ego1_T_ego0(self, ts0: int, ts1: int) -> np.ndarray:
        return invert(self.pose(ts1)) @ self.pose(ts0)

    @cached_property
    def ground_raster(self) -> GroundRaster | None:
        return GroundRaster.from_map_dir(self.log_dir / 'map')

    def ground_mask(self, points_ego: np.ndarray, ts: int) -> np.ndarray | None:
        if self.ground_raster is None:
            return None
        city = transform_points(self.pose(ts), points_ego.astype(np.float64))
        return self.ground_raster.is_ground(city)

    def gt_flow(self, ts0: int) -> FlowLabels | None:
        """Exact ground truth from ``scene_flow/<ts0>.feather`` when present (synthetic logs)."""
        path = self.log_dir / 'scene_flow' / f'{int(ts0)}.feather'
        if not path.exists():
            return None
        t = read_feather(path)
        flow = np.stack([t.column(c).to_numpy().astype(np.float32)
                         for c in ('flow_tx_m', 'flow_ty_m', 'flow_tz_m')], axis=1)
        return FlowLabels(flow, t.column('is_valid').to_numpy().astype(bool),
                          t.column('is_dynamic').to_numpy().astype(bool),
                          t.column('category_indices').to_numpy().astype(np.uint8))

    def pairs(self, with_gt: bool = True) -> Iterator[Pair]:
        ts = self.timestamps
        for t0, t1 in zip(ts[:-1], ts[1:]):
            yield self.pair(int(t0), int(t1), with_gt=with_gt)

    def pair(self, ts0: int, ts1: int, with_gt: bool = True) -> Pair:
        p0, p1 = self.points(ts0), self.points(ts1)
        return Pair(self.log_id, ts0, ts1, p0, p1, self.ego1_T_ego0(ts0, ts1),
                    self.ground_mask(p0, ts0), self.ground_mask(p1, ts1),
                    self.gt_flow(ts0) if with_gt else None)


def list_logs(data_root: Path, split: str) -> list[AV2Log]:
    """Return the logs of a split that have lidar sweeps (calibration-only folders skipped)."""
    root = Path(data_root) / split
    if not root.is_dir():
        raise DataError(f'{root}: split folder not found (expected DATA_ROOT/<split>/<log_id>/...)')
    return [AV2Log(d) for d in sorted(root.iterdir()) if (d / 'sensors' / 'lidar').is_dir()]


def iter_pairs(data_root: Path, split: str, with_gt: bool = True) -> Iterator[Pair]:
    for log in list_logs(data_root, split):
        yield from log.pairs(with_gt=with_gt)
