"""``zeroflow data import``: real drives into AV2-layout logs that ``zeroflow label``/``train`` read.

Sources: a rosbag2 (mcap or sqlite3; ``sensor_msgs/PointCloud2``, plus ``nav_msgs/Odometry`` when
present), a folder of KITTI ``.bin`` or PCD sweeps, or an Ouster pcap with its metadata json. Output::

    OUT/<split>/<log_id>/
      sensors/lidar/<ts_ns>.feather     x, y, z (float32), and when the source has them: intensity
                                        (float32, the source's scale), laser_number (uint8),
                                        offset_ns (int32, point time - sweep time)
      city_SE3_egovehicle.feather       world_T_ego at each sweep time (av2 columns)
      calibration/egovehicle_SE3_sensor.feather   'up_lidar' = the mount (base_T_sensor)
      import.json                       source, frames, where the poses came from, de-skew, counts

Frames: as in AV2 (and for our model, simulator and node), points and poses are those of the ego
(base) frame on the ground under the vehicle, ground at z ~ 0. The lidar mount ``base_T_sensor``
is given as ``sensor_xyz``/``sensor_rpy`` (``--sensor-xyz X Y Z --sensor-rpy R P Y``, metres and
radians, the convention and meaning of the node's ``sensor_in_base_xyz``/``sensor_in_base_rpy``:
:attr:`zeroflow_ros.pipeline.PipelineConfig.base_T_sensor`), written to the calibration file. The
default, identity, makes the ego frame the lidar frame (ground at about -1.7 m on a car roof; an
INFO line says so when the road under the first sweep sits below -1 m). Points without a
return are dropped: non-finite ones and, from organised clouds, points exactly at the sensor origin
(the no-return marker of e.g. the Ouster ROS driver).

Times: the sweep time is the source's (bag header stamp, file name / PCD point time / KITTI
timestamps.txt / nominal 10 Hz for folders, the first column for Ouster). Per-point times given in
seconds are read as absolute when that puts them closer to the sweep time than reading them as
offsets (Hesai/PJLab ``timestamp`` vs Velodyne ``time``, Ouster ``t``).

Poses, first that applies: ``--poses`` (a TUM file ``t tx ty tz qx qy qz qw``, interpolated at each
sweep time; or a KITTI-style file, see :mod:`zeroflow_ros.data.sweeps`: by name for sweep folders,
else one line per sweep in order), the bag's odometry interpolated at each sweep time, else KISS-ICP
lidar odometry (:mod:`zeroflow_ros.core.odometry`). Sweeps more than 50 ms outside timed poses are
skipped. Which frame a pose source describes (``poses_frame``, ``--poses-frame``): pose files (TUM,
KITTI-style, e.g. KISS-ICP's output) default to ``sensor``; bag odometry to ``sensor`` when its
``child_frame_id`` is the clouds' frame (as ``zeroflow data to-bag`` writes it), else ``base``
(nav_msgs/Odometry normally gives base_link in odom, as the node's ``PoseBuffer`` reads it).
Sensor poses become base poses as ``world_T_sensor @ inv(base_T_sensor)``. KISS-ICP always tracks the
sensor; its world is the first sweep's *base* frame (``base_T_sensor @ W @ inv(base_T_sensor)``), so
the first pose is identity and city z is height above the ground.

De-skew: a spinning lidar measures point i at its own time ``t_i`` in the sensor frame *of that
moment*, so a moving sensor smears the sweep (3 cm at 3 m/s over a 10 ms slice of a 10 Hz sweep,
0.3 m over the whole sweep at 3 m/s). Here de-skewing moves every point into the sensor frame at
the sweep time: ``p_i' = inv(W(t_s)) @ W(t_i) @ p_i`` with ``W = world_T_ego`` interpolated between
poses (linear translation, slerp rotation: :func:`zeroflow_ros.data.bag.interpolate_pose`) and
extrapolated at the ends with the nearest segment's constant motion. It needs per-point times and
poses; ``offset_ns`` is kept and import.json says how many sweeps were de-skewed. Times are grouped
in 100 µs bins (< 3 mm at 30 m/s). KISS-ICP registers the sweeps as measured (a constant-velocity
skew is the same in consecutive sweeps, so their relative motion is unbiased). On the bundled Ouster
scans (~2.5 m/s) de-skewing halves the seam: points at the last vs first azimuths of a sweep are
0.14-0.16 m apart (median nearest neighbour) as measured, 0.06-0.07 m de-skewed. With a mount, the
points are first moved into the base frame (``base_T_sensor @ p_i``) and de-skewed with the base
poses: ``inv(B(t_s)) @ B(t_i) @ M @ p_i`` equals ``M`` times the sensor-frame de-skew, since
``B @ M`` is the sensor's pose.

Bad input raises :class:`~zeroflow_ros.data.av2.DataError` naming what was expected and what came.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from zeroflow_ros.core.geometry import invert, matrix_to_quat, transform_points
from zeroflow_ros.data.av2 import POSE_COLUMNS, DataError

logger = logging.getLogger(__name__)

DESKEW_BIN_NS = 100_000
POSE_FRAMES = ('sensor', 'base')
# The first sweep's road height (core.ground.estimate_ground_height) below this: the ego frame is
# probably the lidar's, not the base frame on the ground the model is trained in.
GROUND_HINT_Z_M = -1.0
# Poses are extrapolated at most this far past the known ones (one sweep and a bit).
MAX_EXTRAPOLATION_NS = 200_000_000


@dataclass
class SourceSweep:
    """One sweep as a source gives it: sensor-frame xyz and the optional per-point channels."""

    stamp_ns: int
    points: np.ndarray                      # (N,3) float32, finite
    intensity: np.ndarray | None = None     # (N,) float32
    ring: np.ndarray | None = None          # (N,) integer beam index
    offset_ns: np.ndarray | None = None     # (N,) int64, point time - stamp_ns


@dataclass
class ImportResult:
    log_dir: Path
    sweeps: int
    points: int
    pose_source: str
    deskewed: int
    skipped: int


# ------------------------------------------------------------------------------------ trajectory

class Trajectory:
    """Poses ``world_T_ego`` at increasing times; interpolated between, extrapolated a little past."""

    def __init__(self, stamps: Iterable[int], poses: Iterable[np.ndarray]):
        self.stamps = np.asarray(list(stamps), dtype=np.int64)
        self.poses = np.asarray(list(poses), dtype=np.float64).reshape(-1, 4, 4)
        if len(self.stamps) != len(self.poses) or (np.diff(self.stamps) <= 0).any():
            raise DataError(f'trajectory: expected increasing stamps, one per pose; got {self.stamps[:5]} '
                            f'for {len(self.poses)} poses')

    def at(self, t_ns: int) -> np.ndarray | None:
        """Pose at ``t_ns``; None beyond :data:`MAX_EXTRAPOLATION_NS` past the ends."""
        from zeroflow_ros.data.bag import interpolate_pose
        s = self.stamps
        if len(s) == 0 or t_ns < s[0] - MAX_EXTRAPOLATION_NS or t_ns > s[-1] + MAX_EXTRAPOLATION_NS:
            return None
        if len(s) == 1:
            return self.poses[0].copy()
        # The segment holding t_ns, or the first/last one to extrapolate along.
        i = int(np.clip(np.searchsorted(s, t_ns, side='right') - 1, 0, len(s) - 2))
        if s[i] == t_ns:
            return self.poses[i].copy()
        a = (t_ns - s[i]) / float(s[i + 1] - s[i])
        return interpolate_pose(self.poses[i], self.poses[i + 1], a)


def deskew(points: np.ndarray, offset_ns: np.ndarray, stamp_ns: int,
           pose_at: Callable[[int], np.ndarray | None], bin_ns: int = DESKEW_BIN_NS) -> np.ndarray | None:
    """Move each point from the sensor frame at its own time into the one at ``stamp_ns``.

    ``p' = inv(W(stamp)) @ W(stamp + offset) @ p`` (see the module docstring); ``pose_at(t_ns)``
    gives ``W = world_T_ego``. Returns None when a needed pose is unknown (outside the trajectory).
    """
    pts = np.asarray(points, dtype=np.float64)
    off = np.asarray(offset_ns, dtype=np.int64)
    if off.shape != (len(pts),):
        raise DataError(f'deskew: offset_ns has shape {off.shape}, expected ({len(pts)},)')
    w_s = pose_at(int(stamp_ns))
    if w_s is None:
        return None
    bins, inv_idx = np.unique(np.round(off / bin_ns).astype(np.int64), return_inverse=True)
    rel = np.empty((len(bins), 4, 4))
    w_s_inv = invert(w_s)
    for k, b in enumerate(bins):
        w = pose_at(int(stamp_ns) + int(b) * bin_ns)
        if w is None:
            return None
        rel[k] = w_s_inv @ w
    out = np.einsum('nij,nj->ni', rel[inv_idx, :3, :3], pts) + rel[inv_idx, :3, 3]
    return out.astype(np.float32)


# ---------------------------------------------------------------------------------------- sources

def offsets_from_times(times_s: np.ndarray | None, stamp_ns: int) -> np.ndarray | None:
    """Per-point seconds -> int64 ns from the sweep time (read as absolute or relative: the nearer)."""
    if times_s is None:
        return None
    t = np.asarray(times_s, dtype=np.float64).reshape(-1)
    if len(t) == 0 or not np.isfinite(t).all():
        return None
    as_rel = t * 1e9
    as_abs = (t - stamp_ns * 1e-9) * 1e9
    off = as_abs if np.abs(np.median(as_abs)) < np.abs(np.median(as_rel)) else as_rel
    if np.abs(off).max() > 1e9:
        logger.warning('per-point times span more than 1 s around the sweep time %d; ignored', stamp_ns)
        return None
    return np.round(off).astype(np.int64)


def _clean(s: SourceSweep) -> SourceSweep:
    """Drop non-finite points and no-return points at the sensor origin, channels alike."""
    p = np.asarray(s.points, dtype=np.float32)
    keep = np.isfinite(p).all(axis=1) & (p != 0).any(axis=1)
    if keep.all():
        return s

    def sub(a):
        return None if a is None else np.asarray(a)[keep]
    return SourceSweep(s.stamp_ns, p[keep], sub(s.intensity), sub(s.ring), sub(s.offset_ns))


def folder_sweeps(folder: Path, start_ns: int) -> Iterator[SourceSweep]:
    """KITTI ``.bin`` / PCD sweeps of a folder (:func:`zeroflow_ros.data.sweeps.iter_sweeps`)."""
    from zeroflow_ros.data.sweeps import _TIME_FIELDS, iter_sweeps
    for s in iter_sweeps(folder, start_ns=start_ns):
        f = s.fields
        inten = f.get('intensity')
        ring = f.get('ring')
        tname = next((n for n in _TIME_FIELDS if n in f and f[n].ndim == 1), None)
        yield SourceSweep(int(s.stamp_ns), s.points,
                          None if inten is None or inten.ndim != 1 else inten.astype(np.float32),
                          None if ring is None or ring.ndim != 1 else ring,
                          offsets_from_times(f[tname], int(s.stamp_ns)) if tname else None)


def bag_sweeps(path: Path, topic: str) -> Iterator[SourceSweep]:
    """PointCloud2 messages of a bag topic (:func:`zeroflow_ros.data.bag.iter_clouds`)."""
    from zeroflow_ros.data.bag import iter_clouds
    for bc in iter_clouds(path, topic):
        c = bc.cloud
        yield SourceSweep(int(bc.stamp_ns), c.xyz, c.intensity, c.ring,
                          offsets_from_times(c.time, bc.stamp_ns))


def bag_topics(path: Path, topic: str | None, odom_topic: str | None) -> tuple[str, str | None]:
    """Cloud and odometry topics: the given ones, else the bag's only PointCloud2 / Odometry topic.

    ``odom_topic=''`` means no odometry even when the bag has some.
    """
    from zeroflow_ros.data.bag import ODOMETRY, POINTCLOUD2, BagError, bag_info
    info = bag_info(path)

    def only(msgtype: str, what: str) -> str | None:
        names = [t.name for t in info.topics.values() if t.msgtype == msgtype and t.count]
        if len(names) > 1:
            raise BagError(f'{path}: {len(names)} {msgtype} topics, pick one with {what}; the bag has '
                           f'{info.describe_topics()}')
        return names[0] if names else None
    if topic is None:
        topic = only(POINTCLOUD2, '--topic')
        if topic is None:
            raise BagError(f'{path}: no {POINTCLOUD2} topic; the bag has {info.describe_topics()}')
    if odom_topic is None:
        odom_topic = only(ODOMETRY, '--odom-topic')
    return topic, odom_topic or None


def detect_kind(source: Path) -> str:
    """Return 'bag', 'pcap' or 'folder' for SOURCE, or raise DataError saying what was expected."""
    source = Path(source)
    if not source.exists():
        raise DataError(f'{source}: not found (expected a rosbag2, a .pcap or a folder of .bin/.pcd sweeps)')
    if source.is_file():
        ext = source.suffix.lower()
        if ext in ('.mcap', '.db3'):
            return 'bag'
        if ext == '.pcap':
            return 'pcap'
        raise DataError(f'{source}: unknown file type {ext!r} (expected .mcap, .db3 or .pcap)')
    if (source / 'metadata.yaml').is_file():
        return 'bag'
    pcaps = sorted(source.glob('*.pcap'))
    if len(pcaps) == 1:
        return 'pcap'
    return 'folder'


# ------------------------------------------------------------------------------------------ mount

def mount_transform(sensor_xyz=(0.0, 0.0, 0.0), sensor_rpy=(0.0, 0.0, 0.0)) -> np.ndarray:
    """Return ``base_T_sensor`` exactly as the node builds it from ``sensor_in_base_xyz``/``_rpy``."""
    from zeroflow_ros.pipeline import PipelineConfig, PipelineError
    try:
        cfg = PipelineConfig(sensor_in_base_xyz=tuple(sensor_xyz), sensor_in_base_rpy=tuple(sensor_rpy))
    except (PipelineError, TypeError, ValueError):
        raise DataError(f'sensor mount: expected 3 finite numbers each for xyz (m) and rpy (rad), got '
                        f'xyz={sensor_xyz!r} rpy={sensor_rpy!r}') from None
    return cfg.base_T_sensor


def _ground_hint(points_base: np.ndarray) -> None:
    """Log one INFO line when the road sits well below z = 0 (the ego frame is the lidar's?)."""
    from zeroflow_ros.core.ground import estimate_ground_height
    z = estimate_ground_height(points_base)
    if z < GROUND_HINT_Z_M:
        logger.info('the ground sits at z ~ %.2f m in the written ego frame; the model is trained in the '
                    'base frame on the ground: if the lidar is ~%.2f m up, import with --sensor-xyz 0 0 %.2f '
                    '(and --sensor-rpy)', z, -z, -z)


class _BasePoses:
    """A pose source's poses turned into ``world_T_base`` (what ``city_SE3_egovehicle`` holds)."""

    def __init__(self, inner, convert: Callable[[np.ndarray], np.ndarray]):
        self.inner, self.convert, self.name = inner, convert, inner.name
        self._full: Trajectory | None = None

    def pose(self, sweep: SourceSweep, k: int) -> np.ndarray | None:
        p = self.inner.pose(sweep, k)
        return None if p is None else self.convert(p)

    def motion(self, local: Trajectory) -> Trajectory:
        m = self.inner.motion(local)
        if m is local:      # built from our (converted) poses already
            return local
        if self._full is None:  # the inner source's own whole track: converted once
            self._full = Trajectory(m.stamps, [self.convert(p) for p in m.poses])
        return self._full


def _in_base(poser, mount: np.ndarray, poses_frame: str | None):
    """Wrap POSER so it gives base poses; return it and the frame its poses were taken in."""
    if poses_frame is not None and poses_frame not in POSE_FRAMES:
        raise DataError(f'poses_frame: expected one of {POSE_FRAMES}, got {poses_frame!r}')
    icp = isinstance(poser, _IcpPoses)
    if icp and poses_frame == 'base':
        logger.warning('poses_frame=base ignored: no poses given, KISS-ICP tracks the sensor')
    frame = 'sensor' if icp else (poses_frame or poser.frame)
    if frame == 'base' or np.array_equal(mount, np.eye(4)):
        return poser, frame
    inv_m = invert(mount)

    def from_sensor(world_T_sensor: np.ndarray) -> np.ndarray:
        return world_T_sensor @ inv_m

    def from_icp(first_T_sensor: np.ndarray) -> np.ndarray:
        # ICP's world is the first sweep's sensor frame: re-express it in the first base frame.
        return mount @ first_T_sensor @ inv_m
    return _BasePoses(poser, from_icp if icp else from_sensor), frame


# ------------------------------------------------------------------------------------------ poses

class _FilePoses:
    """Poses of a pose file, one per sweep in sweep order."""

    frame = 'sensor'

    def __init__(self, mats: np.ndarray, path: Path):
        self.mats, self.path = mats, Path(path)
        self.name = f'pose file {self.path.name}'

    def pose(self, sweep: SourceSweep, k: int) -> np.ndarray:
        if k >= len(self.mats):
            raise DataError(f'{self.path}: {len(self.mats)} poses, but the source has more sweeps '
                            '(one pose line per sweep expected)')
        return self.mats[k]

    def motion(self, local: Trajectory) -> Trajectory:
        return local


class _TrackPoses:
    """Timed poses (bag odometry, TUM file) interpolated at each sweep time; de-skew uses the whole track."""

    def __init__(self, traj: Trajectory, name: str, frame: str = 'sensor', tolerance_ns: int = 50_000_000):
        self.full, self.name, self.frame, self.tolerance_ns = traj, name, frame, tolerance_ns

    def pose(self, sweep: SourceSweep, k: int) -> np.ndarray | None:
        s = self.full.stamps
        # Sweeps before/after the track (beyond a tolerance) are skipped rather than extrapolated.
        if len(s) == 0 or not s[0] - self.tolerance_ns <= sweep.stamp_ns <= s[-1] + self.tolerance_ns:
            return None
        return self.full.at(sweep.stamp_ns)

    def motion(self, local: Trajectory) -> Trajectory:
        return self.full


def read_tum(path: Path) -> Trajectory:
    """TUM trajectory file: ``t tx ty tz qx qy qz qw`` per line (t in seconds; '#' comments)."""
    from zeroflow_ros.core.geometry import make_transform, quat_to_matrix
    path = Path(path)
    stamps, poses = [], []
    for k, line in enumerate(path.read_text().splitlines()):
        tok = line.split()
        if not tok or tok[0].startswith('#'):
            continue
        try:
            v = [float(x) for x in tok]
        except ValueError:
            raise DataError(f'{path}:{k + 1}: non-numeric TUM pose line {line!r}') from None
        if len(v) != 8:
            raise DataError(f'{path}:{k + 1}: expected 8 numbers (t tx ty tz qx qy qz qw), got {len(v)}')
        stamps.append(int(round(v[0] * 1e9)))
        poses.append(make_transform(quat_to_matrix(v[7], v[4], v[5], v[6]), v[1:4]))
    if not stamps:
        raise DataError(f'{path}: no poses')
    if (np.diff(stamps) <= 0).any():
        raise DataError(f'{path}: pose times must increase')
    return Trajectory(stamps, poses)


def _is_tum(path: Path) -> bool:
    for line in Path(path).read_text().splitlines():
        tok = line.split()
        if tok and not tok[0].startswith('#'):
            return len(tok) == 8
    return False


class _IcpPoses:
    """KISS-ICP over the sweeps in order (world = the first sweep's sensor frame)."""

    name = 'KISS-ICP lidar odometry'
    frame = 'sensor'

    def __init__(self, config=None):
        from zeroflow_ros.core.odometry import LidarOdometry
        self.icp = LidarOdometry(config)

    def pose(self, sweep: SourceSweep, k: int) -> np.ndarray:
        from zeroflow_ros.core.odometry import OdometryError
        try:
            return self.icp.register(sweep.points, sweep.stamp_ns)
        except OdometryError as exc:
            raise DataError(f'lidar odometry failed at sweep {k} ({sweep.stamp_ns}): {exc}') from None

    def motion(self, local: Trajectory) -> Trajectory:
        return local


def _posed(sweeps: Iterable[SourceSweep], poser,
           stats: dict) -> Iterator[tuple[SourceSweep, np.ndarray, Trajectory]]:
    """Yield (sweep, world_T_ego, trajectory for de-skew), one sweep late so the next pose is known."""
    stamps: list[int] = []
    poses: list[np.ndarray] = []
    pending = None
    for k, s in enumerate(sweeps):
        s = _clean(s)
        if len(s.points) == 0:
            logger.warning('sweep %d (%d): no point with a return; skipped', k, s.stamp_ns)
            stats['skipped'] += 1
            continue
        pose = poser.pose(s, k)
        if pose is None:
            if not stats['skipped']:
                logger.warning('sweep %d (%d): no pose (outside the odometry); skipped', k, s.stamp_ns)
            stats['skipped'] += 1
            continue
        stamps, poses = stamps[-2:] + [s.stamp_ns], poses[-2:] + [np.asarray(pose, np.float64)]
        if pending is not None:
            yield pending, poses[-2], poser.motion(Trajectory(stamps, poses))
        pending = s
    if pending is not None:
        yield pending, poses[-1], poser.motion(Trajectory(stamps[-2:], poses[-2:]))


# ---------------------------------------------------------------------------------------- writing

def _write_table(columns: dict[str, np.ndarray], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.feather as feather
    feather.write_feather(pa.table(columns), str(path))


def _sweep_columns(s: SourceSweep, points: np.ndarray) -> dict[str, np.ndarray]:
    cols = {'x': points[:, 0].astype(np.float32), 'y': points[:, 1].astype(np.float32),
            'z': points[:, 2].astype(np.float32)}
    if s.intensity is not None:
        cols['intensity'] = np.asarray(s.intensity, np.float32)
    if s.ring is not None:
        ring = np.asarray(s.ring)
        if len(ring) and (ring.min() < 0 or ring.max() > 255):
            raise DataError(f'sweep {s.stamp_ns}: ring/beam index {ring.min()}..{ring.max()} does not fit '
                            "av2's laser_number (uint8, 0..255)")
        cols['laser_number'] = ring.astype(np.uint8)
    if s.offset_ns is not None:
        cols['offset_ns'] = np.asarray(s.offset_ns, np.int64).astype(np.int32)
    return cols


def _write_log(tmp: Path, posed, deskew_sweeps: bool, stats: dict, mount: np.ndarray) -> list[tuple]:
    lidar_dir = tmp / 'sensors' / 'lidar'
    lidar_dir.mkdir(parents=True)
    rows = []
    moved_to_base = not np.array_equal(mount, np.eye(4))
    for s, pose, traj in posed:
        # Into the base frame first; de-skew then uses base poses (see the module docstring).
        pts = transform_points(mount, s.points.astype(np.float64)) if moved_to_base else s.points
        if deskew_sweeps and s.offset_ns is not None and np.any(s.offset_ns != 0):
            moved = deskew(pts, s.offset_ns, s.stamp_ns, traj.at)
            if moved is None:
                logger.warning('sweep %d: poses do not cover its point times; written without de-skew',
                               s.stamp_ns)
            else:
                pts = moved
                stats['deskewed'] += 1
        pts = np.asarray(pts, np.float32)
        if not rows:
            _ground_hint(pts)
        _write_table(_sweep_columns(s, pts), lidar_dir / f'{int(s.stamp_ns)}.feather')
        q = matrix_to_quat(pose[:3, :3])
        rows.append((int(s.stamp_ns), *map(float, q), *map(float, pose[:3, 3])))
        stats['points'] += len(pts)
    if not rows:
        raise DataError('no sweep to write (every sweep was empty or had no pose)')
    cols = {name: np.array([r[i] for r in rows], np.int64 if i == 0 else np.float64)
            for i, name in enumerate(POSE_COLUMNS)}
    _write_table(cols, tmp / 'city_SE3_egovehicle.feather')
    (tmp / 'calibration').mkdir()
    q, t = matrix_to_quat(mount[:3, :3]), mount[:3, 3]
    calib = {'sensor_name': np.array(['up_lidar'])}
    calib.update({c: np.array([float(v)]) for c, v in zip(POSE_COLUMNS[1:], (*q, *t))})
    _write_table(calib, tmp / 'calibration' / 'egovehicle_SE3_sensor.feather')
    return rows


# ----------------------------------------------------------------------------------------- import

def _first_cloud_frame(path: Path, topic: str) -> str:
    """Return the ``header.frame_id`` of the topic's first cloud ('' when none)."""
    from zeroflow_ros.data.bag import iter_clouds
    clouds = iter_clouds(path, topic)
    try:
        return next((bc.cloud.frame_id or '' for bc in clouds), '')
    finally:
        clouds.close()


def _open(kind: str, source: Path, *, poses: Path | None, topic: str | None, odom_topic: str | None,
          meta: Path | None, start_ns: int, odometry) -> tuple[Iterator[SourceSweep], object, str, dict]:
    """Sweeps, pose source, default log id and what to record in import.json, for one source kind."""
    from zeroflow_ros.data.sweeps import list_sweep_files, poses_for_sweeps, read_pose_file
    info: dict = {'kind': kind}
    poser = None
    if poses is not None and _is_tum(poses):
        poser = _TrackPoses(read_tum(poses), f'TUM poses {Path(poses).name}')
    if kind == 'folder':
        files = list_sweep_files(source)
        sweeps = folder_sweeps(source, start_ns)
        if poses is not None and poser is None:
            poser = _FilePoses(poses_for_sweeps(poses, files), poses)
        log_id = source.name
    elif kind == 'bag':
        topic, odom_topic = bag_topics(source, topic, '' if poses is not None else odom_topic)
        info.update(topic=topic, odom_topic=odom_topic)
        sweeps = bag_sweeps(source, topic)
        if poses is None and odom_topic:
            from zeroflow_ros.data.bag import read_odometry
            track = read_odometry(source, odom_topic)
            cloud_frame = _first_cloud_frame(source, topic)
            # Odometry of the cloud's own frame describes the sensor, else (base_link) the base.
            frame = 'sensor' if track.child_frame_id and track.child_frame_id == cloud_frame else 'base'
            info.update(odom_child_frame=track.child_frame_id, cloud_frame=cloud_frame)
            poser = _TrackPoses(Trajectory(track.stamps, track.poses), f'odometry {odom_topic}', frame)
        log_id = source.stem if source.is_file() else source.name
    else:
        from zeroflow_ros.data.ouster import find_metadata, iter_ouster_pcap
        pcap = source if source.is_file() else sorted(source.glob('*.pcap'))[0]
        meta = find_metadata(pcap, meta)
        info.update(pcap=str(pcap), meta=str(meta))
        sweeps = iter_ouster_pcap(pcap, meta)
        log_id = pcap.stem
    if poser is None and poses is not None:
        poser = _FilePoses(read_pose_file(poses)[1], poses)
    if poser is None:
        poser = _IcpPoses(odometry)
    return sweeps, poser, log_id, info


def import_source(source: Path, out: Path, *, split: str = 'train', log_id: str | None = None,
                  poses: Path | None = None, topic: str | None = None, odom_topic: str | None = None,
                  meta: Path | None = None, deskew_sweeps: bool = True, max_sweeps: int | None = None,
                  start_ns: int = 1_000_000_000, overwrite: bool = False, odometry=None,
                  sensor_xyz=(0.0, 0.0, 0.0), sensor_rpy=(0.0, 0.0, 0.0), poses_frame: str | None = None,
                  progress: Callable[[Iterable], Iterable] | None = None) -> ImportResult:
    """Import SOURCE as the log ``OUT/<split>/<log_id>/`` (see the module docstring).

    ``odom_topic`` None picks the bag's only Odometry topic, '' ignores odometry; ``odometry`` is an
    :class:`~zeroflow_ros.core.odometry.OdometryConfig` for KISS-ICP. ``sensor_xyz``/``sensor_rpy``:
    the lidar in the base frame (m, rad); ``poses_frame`` ('sensor'/'base', None = per source) the
    frame given poses describe. The log is written to a temporary folder and renamed into place, so a
    failed import leaves nothing half-written.
    """
    import itertools
    source = Path(source)
    kind = detect_kind(source)
    if poses is not None and not Path(poses).is_file():
        raise DataError(f'{poses}: pose file not found')
    if max_sweeps is not None and max_sweeps < 1:
        raise DataError(f'max_sweeps: expected >= 1, got {max_sweeps}')
    mount = mount_transform(sensor_xyz, sensor_rpy)
    sweeps, poser, default_id, info = _open(kind, source, poses=poses, topic=topic, odom_topic=odom_topic,
                                            meta=meta, start_ns=start_ns, odometry=odometry)
    poser, frame = _in_base(poser, mount, poses_frame)
    log_dir = Path(out) / split / (log_id or default_id)
    if log_dir.exists() and not overwrite:
        raise DataError(f'{log_dir}: exists already (pick another --log-id, or --overwrite)')
    if max_sweeps is not None:
        sweeps = itertools.islice(sweeps, max_sweeps)
    stats = {'skipped': 0, 'deskewed': 0, 'points': 0}
    posed = _posed(sweeps, poser, stats)
    tmp = log_dir.parent / f'.{log_dir.name}.partial-{os.getpid()}'
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        rows = _write_log(tmp, progress(posed) if progress else posed, deskew_sweeps, stats, mount)
        info.update(source=str(source), pose_source=poser.name, poses_frame=frame, sweeps=len(rows),
                    deskew=deskew_sweeps, deskewed_sweeps=stats['deskewed'], skipped_sweeps=stats['skipped'],
                    sensor_xyz=[float(v) for v in sensor_xyz], sensor_rpy=[float(v) for v in sensor_rpy],
                    frames='ego = base frame, lidar at calibration/egovehicle_SE3_sensor.feather'
                    if not np.array_equal(mount, np.eye(4)) else 'ego = lidar frame (identity calibration)')
        (tmp / 'import.json').write_text(json.dumps(info, indent=1) + '\n')
        if log_dir.exists():
            shutil.rmtree(log_dir)
        os.replace(tmp, log_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ImportResult(log_dir, len(rows), stats['points'], poser.name, stats['deskewed'], stats['skipped'])
