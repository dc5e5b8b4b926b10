"""Reader for the Argoverse 2 sensor-dataset layout (real AV2 logs or our synthetic ones).

Layout: ``DATA_ROOT/<split>/<log_id>/``
  sensors/lidar/<timestamp_ns>.feather     x, y, z (ego frame), intensity, ...
  city_SE3_egovehicle.feather               timestamp_ns, qw, qx, qy, qz, tx_m, ty_m, tz_m
  annotations.feather                       cuboids (optional)
  map/*ground_height_surface*.npy + *img_Sim2_city.json   (optional)
  scene_flow/<timestamp_ns>.feather         exact ground truth (synthetic logs only)

Pairs are (sweep t, sweep t+1) of consecutive lidar files of one log; flow conventions are in
:mod:`zeroflow_ros.core.geometry`.

Ground truth: ``scene_flow/<ts0>.feather`` when the log has it (synthetic logs, exact), else, for real
AV2 logs with ``annotations.feather``, the flow av2 derives from the cuboids
(``av2.torch.structures.flow.Flow.from_sweep_pair``, reproduced in numpy by :func:`flow_from_cuboids`).
Ground masks in :class:`Pair` come from the map raster only; the exact ``is_ground`` of synthetic logs is
in :attr:`FlowLabels.is_ground`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Iterator

import numpy as np

from zeroflow_ros.core.geometry import invert, make_transform, quat_to_matrix, transform_points
from zeroflow_ros.core.ground import GROUND_HEIGHT_THRESHOLD_M, GroundRaster  # noqa: F401 (public names)


logger = logging.getLogger(__name__)

# av2.evaluation.scene_flow.constants (AnnotationCategories in enum order, 0 = NONE); a test checks
# it against av2 so the runtime does not need the av2 package.
CATEGORY_TO_INDEX: dict[str, int] = {name: i for i, name in enumerate((
    'NONE', 'ANIMAL', 'ARTICULATED_BUS', 'BICYCLE', 'BICYCLIST', 'BOLLARD', 'BOX_TRUCK', 'BUS',
    'CONSTRUCTION_BARREL', 'CONSTRUCTION_CONE', 'DOG', 'LARGE_VEHICLE', 'MESSAGE_BOARD_TRAILER',
    'MOBILE_PEDESTRIAN_CROSSING_SIGN', 'MOTORCYCLE', 'MOTORCYCLIST', 'OFFICIAL_SIGNALER', 'PEDESTRIAN',
    'RAILED_VEHICLE', 'REGULAR_VEHICLE', 'SCHOOL_BUS', 'SIGN', 'STOP_SIGN', 'STROLLER',
    'TRAFFIC_LIGHT_TRAILER', 'TRUCK', 'TRUCK_CAB', 'VEHICULAR_TRAILER', 'WHEELCHAIR', 'WHEELED_DEVICE',
    'WHEELED_RIDER'))}
# av2.torch.structures.flow.BOUNDING_BOX_EXPANSION and SCENE_FLOW_DYNAMIC_THRESHOLD
BOUNDING_BOX_EXPANSION = 0.2
SCENE_FLOW_DYNAMIC_THRESHOLD = 0.05

POSE_COLUMNS = ['timestamp_ns', 'qw', 'qx', 'qy', 'qz', 'tx_m', 'ty_m', 'tz_m']
CUBOID_COLUMNS = ['timestamp_ns', 'track_uuid', 'category', 'length_m', 'width_m', 'height_m',
                  'qw', 'qx', 'qy', 'qz', 'tx_m', 'ty_m', 'tz_m']
SCENE_FLOW_COLUMNS = ['flow_tx_m', 'flow_ty_m', 'flow_tz_m', 'is_valid', 'is_dynamic', 'category_indices']


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
    is_ground: np.ndarray | None = None    # (N,) bool, synthetic logs only
    instance_id: np.ndarray | None = None  # (N,) int32, synthetic logs only (-1/0 = background)


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


def _float_columns(path: Path, tab, names: list[str]) -> None:
    """Check that ``names`` are present and numeric (floats, or ints for timestamps)."""
    import pyarrow.types as pat
    missing = [c for c in names if c not in tab.column_names]
    if missing:
        raise DataError(f'{path}: missing columns {missing} (has {tab.column_names})')
    for c in names:
        t = tab.schema.field(c).type
        if not (pat.is_floating(t) or pat.is_integer(t)):
            raise DataError(f'{path}: column {c!r} has type {t}, expected a number')


def _check_increasing(path: Path, what: str, ts: np.ndarray) -> None:
    d = np.diff(ts)
    if len(d) and (d <= 0).any():
        i = int(np.nonzero(d <= 0)[0][0])
        kind = 'duplicate' if d[i] == 0 else 'non-monotonic'
        raise DataError(f'{path}: {kind} {what} timestamps at rows {i}, {i + 1} ({ts[i]}, {ts[i + 1]})')


def cuboid_interior_mask(points: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Points inside a cuboid given its 8 vertices (av2 ``compute_interior_points_mask``, same order)."""
    corners = np.stack((vertices[6], vertices[3], vertices[1]))
    ref = vertices[2]
    uvw = ref - corners
    sim_points = points @ uvw.T
    sim_ref = uvw @ ref
    sim_vertices = np.diag(uvw @ corners.T)
    a = (sim_ref <= sim_points) & (sim_points <= sim_vertices)
    b = (sim_ref >= sim_points) & (sim_points >= sim_vertices)
    return (a | b).all(axis=1)


_UNIT_VERTICES = np.array([[+1, +1, +1], [+1, -1, +1], [+1, -1, -1], [+1, +1, -1],
                           [-1, +1, +1], [-1, -1, +1], [-1, -1, -1], [-1, +1, -1]], dtype=np.float64)


def cuboid_vertices(pose: np.ndarray, lwh) -> np.ndarray:
    """(8,3) vertices of a cuboid (ego frame), av2's vertex order."""
    return transform_points(pose, (np.asarray(lwh, dtype=np.float64) / 2.0) * _UNIT_VERTICES)


def flow_from_cuboids(points0: np.ndarray, ego1_T_ego0: np.ndarray, cuboids0, cuboids1) -> FlowLabels:
    """Av2's annotation-derived flow of sweep t (``Flow.from_sweep_pair``) in numpy.

    ``cuboids0/1`` are the annotation rows (pandas) at t and t+1, ego frame of their own sweep.
    Static points get the ego-motion flow ``T p - p``; points inside a cuboid of t (length and width
    grown by 0.2 m) move with ``c1 inv(c0)``; a track missing at t+1 makes its points invalid;
    later rows win where cuboids overlap, as in av2. ``is_dynamic``: ``|flow - T p + p| >= 0.05``.
    """
    pc = np.asarray(points0, dtype=np.float32)
    pc64 = pc.astype(np.float64)
    rigid = (transform_points(ego1_T_ego0, pc64) - pc64).astype(np.float32)
    flow = rigid.copy()
    is_valid = np.ones(len(pc), dtype=bool)
    category = np.zeros(len(pc), dtype=np.uint8)

    def poses(df) -> dict:
        out = {}
        for row in df.itertuples(index=False):
            out[str(row.track_uuid)] = (
                make_transform(quat_to_matrix(row.qw, row.qx, row.qy, row.qz),
                               (row.tx_m, row.ty_m, row.tz_m)),
                (float(row.length_m), float(row.width_m), float(row.height_m)), str(row.category))
        return out

    c0s, c1s = poses(cuboids0), poses(cuboids1)
    # Candidates per cuboid from its axis-aligned box (points sorted by x once): the exact interior
    # test then runs on a few hundred points instead of the whole sweep (6x faster on the AV2 sample).
    order = np.argsort(pc64[:, 0], kind='stable')
    xs = pc64[order, 0]
    for uuid, (pose0, (length, width, height), cat) in c0s.items():
        if cat not in CATEGORY_TO_INDEX:
            raise DataError(f'annotations: unknown category {cat!r} (track {uuid})')
        grown = (length + BOUNDING_BOX_EXPANSION, width + BOUNDING_BOX_EXPANSION, height)
        vertices = cuboid_vertices(pose0, grown)
        lo, hi = vertices.min(axis=0) - 1e-6, vertices.max(axis=0) + 1e-6
        cand = order[np.searchsorted(xs, lo[0], 'left'):np.searchsorted(xs, hi[0], 'right')]
        sub = pc64[cand]
        cand = cand[(sub[:, 1] >= lo[1]) & (sub[:, 1] <= hi[1]) & (sub[:, 2] >= lo[2]) & (sub[:, 2] <= hi[2])]
        inside = np.sort(cand[cuboid_interior_mask(pc64[cand], vertices)])
        category[inside] = CATEGORY_TO_INDEX[cat]
        if uuid in c1s:
            c1_T_c0 = c1s[uuid][0] @ invert(pose0)
            obj = pc64[inside]
            flow[inside] = (transform_points(c1_T_c0, obj) - obj).astype(np.float32)
        else:
            is_valid[inside] = False
    is_dynamic = np.linalg.norm(flow - rigid, axis=1) >= SCENE_FLOW_DYNAMIC_THRESHOLD
    return FlowLabels(flow, is_valid, is_dynamic, category)


class AV2Log:
    """One log folder of the AV2 sensor layout; every reader raises :class:`DataError` naming the file."""

    def __init__(self, log_dir: Path):
        self.log_dir = Path(log_dir)
        self.log_id = self.log_dir.name

    @cached_property
    def timestamps(self) -> np.ndarray:
        """Return the sorted sweep times (ns) taken from the lidar file names."""
        lidar_dir = self.log_dir / 'sensors' / 'lidar'
        if not lidar_dir.is_dir():
            raise DataError(f'{lidar_dir}: lidar folder not found')
        files = sorted(lidar_dir.glob('*.feather'))
        ts = []
        for f in files:
            try:
                ts.append(int(f.stem))
            except ValueError:
                raise DataError(f'{f}: lidar file name is not a nanosecond timestamp') from None
        out = np.array(sorted(ts), dtype=np.int64)
        _check_increasing(lidar_dir, 'lidar file', out)
        return out

    def lidar_path(self, ts: int) -> Path:
        return self.log_dir / 'sensors' / 'lidar' / f'{int(ts)}.feather'

    def lidar_table(self, ts: int):
        """Return the sweep's arrow table (x, y, z checked numeric), for readers that want intensity etc."""
        path = self.lidar_path(ts)
        tab = read_feather(path)
        _float_columns(path, tab, ['x', 'y', 'z'])
        return tab

    def points(self, ts: int) -> np.ndarray:
        """(N,3) float32 ego-frame points in file row order (float16 files cast first)."""
        tab = self.lidar_table(ts)
        return np.stack([tab.column(c).to_numpy().astype(np.float32) for c in ('x', 'y', 'z')], axis=1)

    @cached_property
    def _pose_table(self) -> tuple[np.ndarray, np.ndarray]:
        path = self.log_dir / 'city_SE3_egovehicle.feather'
        tab = read_feather(path)
        _float_columns(path, tab, POSE_COLUMNS)
        ts = tab.column('timestamp_ns').to_numpy().astype(np.int64)
        vals = np.stack([tab.column(c).to_numpy().astype(np.float64) for c in POSE_COLUMNS[1:]], axis=1)
        _check_increasing(path, 'pose', ts)
        if not np.isfinite(vals).all():
            raise DataError(f'{path}: non-finite pose values')
        if (np.abs(np.linalg.norm(vals[:, :4], axis=1) - 1) > 1e-3).any():
            raise DataError(f'{path}: quaternion (qw, qx, qy, qz) not unit norm')
        return ts, vals

    @property
    def pose_timestamps(self) -> np.ndarray:
        return self._pose_table[0]

    def pose(self, ts: int) -> np.ndarray:
        """city_T_ego at the sweep timestamp (an exact pose row is required, as in av2)."""
        pts, vals = self._pose_table
        i = int(np.searchsorted(pts, int(ts)))
        if i >= len(pts) or pts[i] != int(ts):
            raise DataError(f'{self.log_dir / "city_SE3_egovehicle.feather"}: no pose at {ts}')
        v = vals[i]
        return make_transform(quat_to_matrix(*v[:4]), v[4:7])

    def ego1_T_ego0(self, ts0: int, ts1: int) -> np.ndarray:
        return invert(self.pose(ts1)) @ self.pose(ts0)

    @cached_property
    def ground_raster(self) -> GroundRaster | None:
        return GroundRaster.from_map_dir(self.log_dir / 'map')

    def ground_mask(self, points_ego: np.ndarray, ts: int) -> np.ndarray | None:
        """Map ground rule for ego-frame points of sweep ``ts``; None without a map."""
        if self.ground_raster is None:
            return None
        city = transform_points(self.pose(ts), points_ego.astype(np.float64))
        return self.ground_raster.is_ground(city)

    @cached_property
    def annotations(self):
        """Cuboid rows (pandas) or None when the log has no ``annotations.feather``."""
        path = self.log_dir / 'annotations.feather'
        if not path.exists():
            return None
        tab = read_feather(path)
        missing = [c for c in CUBOID_COLUMNS if c not in tab.column_names]
        if missing:
            raise DataError(f'{path}: missing columns {missing} (has {tab.column_names})')
        _float_columns(path, tab, [c for c in CUBOID_COLUMNS if c not in ('track_uuid', 'category')])
        return tab.select(CUBOID_COLUMNS).to_pandas()

    def cuboids(self, ts: int):
        """Annotation rows at ``ts`` in file order (empty frame when none), or None without annotations."""
        ann = self.annotations
        if ann is None:
            return None
        return ann[ann['timestamp_ns'].to_numpy() == int(ts)]

    def gt_flow(self, ts0: int, ts1: int | None = None,
                points0: np.ndarray | None = None) -> FlowLabels | None:
        """Ground truth of sweep ``ts0``: ``scene_flow/<ts0>.feather`` or, failing that, from annotations."""
        path = self.log_dir / 'scene_flow' / f'{int(ts0)}.feather'
        if path.exists():
            return self._read_scene_flow(path, ts0)
        if ts1 is None or self.annotations is None:
            return None
        p0 = self.points(ts0) if points0 is None else points0
        return flow_from_cuboids(p0, self.ego1_T_ego0(ts0, ts1), self.cuboids(ts0), self.cuboids(ts1))

    def _read_scene_flow(self, path: Path, ts0: int) -> FlowLabels:
        t = read_feather(path)
        missing = [c for c in SCENE_FLOW_COLUMNS if c not in t.column_names]
        if missing:
            raise DataError(f'{path}: missing columns {missing} (has {t.column_names})')
        n = self.lidar_table(ts0).num_rows
        if t.num_rows != n:
            raise DataError(
                f'{path}: {t.num_rows} rows but the sweep has {n} points (one row per point expected)')
        flow = np.stack([t.column(c).to_numpy().astype(np.float32)
                         for c in ('flow_tx_m', 'flow_ty_m', 'flow_tz_m')], axis=1)

        def opt(name, dtype):
            return t.column(name).to_numpy().astype(dtype) if name in t.column_names else None

        return FlowLabels(flow, t.column('is_valid').to_numpy().astype(bool),
                          t.column('is_dynamic').to_numpy().astype(bool),
                          t.column('category_indices').to_numpy().astype(np.uint8),
                          opt('is_ground', bool), opt('instance_id', np.int32))

    def pairs(self, with_gt: bool = True) -> Iterator[Pair]:
        """Consecutive sweep pairs; each sweep is read (and map-labelled) once, not twice."""
        ts = self.timestamps
        prev = None
        for t0, t1 in zip(ts[:-1], ts[1:]):
            pair = self.pair(int(t0), int(t1), with_gt=with_gt, _sweep0=prev)
            prev = (pair.points1, pair.is_ground1)
            yield pair

    def pair(self, ts0: int, ts1: int, with_gt: bool = True, _sweep0=None) -> Pair:
        p0, g0 = _sweep0 if _sweep0 is not None else (None, None)
        if p0 is None:
            p0 = self.points(ts0)
            g0 = self.ground_mask(p0, ts0)
        p1 = self.points(ts1)
        return Pair(self.log_id, ts0, ts1, p0, p1, self.ego1_T_ego0(ts0, ts1),
                    g0, self.ground_mask(p1, ts1),
                    self.gt_flow(ts0, ts1, p0) if with_gt else None)


def list_logs(data_root: Path, split: str | None) -> list[AV2Log]:
    """Return the logs that have lidar sweeps (calibration-only folders skipped).

    ``split`` None or '' reads log folders directly under ``data_root`` (e.g. av2's test-data layout).
    """
    root = Path(data_root) / split if split else Path(data_root)
    if not root.is_dir():
        raise DataError(f'{root}: split folder not found (expected DATA_ROOT/<split>/<log_id>/...)')
    return [AV2Log(d) for d in sorted(root.iterdir()) if (d / 'sensors' / 'lidar').is_dir()]


def iter_pairs(data_root: Path, split: str | None, with_gt: bool = True) -> Iterator[Pair]:
    """(sweep t, sweep t+1) pairs of every log of the split, logs in name order."""
    for log in list_logs(data_root, split):
        yield from log.pairs(with_gt=with_gt)
