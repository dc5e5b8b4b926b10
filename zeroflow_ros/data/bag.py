"""rosbag2 in/out with ``rosbags`` (no ROS install needed), mcap or sqlite3.

Reading: ``sensor_msgs/msg/PointCloud2`` on one topic, optionally ``nav_msgs/msg/Odometry`` on
another, into the pair shape of :mod:`zeroflow_ros.data.av2` (:class:`BagPair` is a
:class:`~zeroflow_ros.data.av2.Pair`). Clouds are decoded with :mod:`zeroflow_ros.core.pointcloud2`
(points with a non-finite coordinate are dropped; ``BagPair.cloud0/1.indices`` map back to the
message's point order). Times are header stamps (the log times when a driver leaves them all at
zero). A bag path is the rosbag2 folder or a bare .mcap/.db3 file. With odometry, ``ego1_T_ego0`` is
``inv(world_T_ego(t1)) @ world_T_ego(t0)``, the odometry pose interpolated at each cloud stamp
(linear translation, slerp rotation); it assumes the odometry's ``child_frame_id`` is the cloud's
frame (a mismatch is logged once). Stamps outside the odometry's time span (beyond 50 ms) give None.
Without an odometry topic, KISS-ICP can estimate it (``lidar_odometry``), else it is None.

Writing (:func:`write_bag`, ``zeroflow data to-bag``): clouds as FLOAT32 x, y, z plus extra fields
(intensity FLOAT32, ring UINT16, per-point time as stored), odometry from known poses
(``header.frame_id`` = the world/odom frame, ``child_frame_id`` = the cloud frame, zero twist) and
optionally the same pose on ``/tf``; log time = header stamp.

Bad input (unknown topic, wrong message type, empty bag, stamps not increasing) raises
:class:`BagError` (a :class:`~zeroflow_ros.data.av2.DataError`) listing the bag's topics and types.
A truncated mcap file (a recorder killed before writing the footer, a copy cut short) is read up
to the break, with a warning giving the number of messages read; nothing after it is guessed
(``mcap recover`` rewrites such a file). Other corrupt bags (e.g. a truncated sqlite3 file) raise
:class:`BagError` when opened or at the first message that cannot be read.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from zeroflow_ros.core.geometry import invert, make_transform, matrix_to_quat, quat_to_matrix
from zeroflow_ros.data.av2 import DataError, Pair

logger = logging.getLogger(__name__)

POINTCLOUD2 = 'sensor_msgs/msg/PointCloud2'
ODOMETRY = 'nav_msgs/msg/Odometry'
TFMESSAGE = 'tf2_msgs/msg/TFMessage'
ODOM_TOLERANCE_NS = 50_000_000


class BagError(DataError):
    """A bag cannot be read as asked (names the bag, lists its topics and types)."""


@lru_cache(maxsize=1)
def typestore():
    """Return the ROS 2 Kilted message typestore of rosbags."""
    from rosbags.typesys import Stores, get_typestore
    return get_typestore(Stores.ROS2_KILTED)


def _storage_for(path: Path, storage: str | None) -> tuple[Path, str]:
    """Bag folder and storage plugin name from ``OUT[.mcap|.db3]`` and an optional override."""
    path = Path(path)
    ext = path.suffix.lower()
    if ext in ('.mcap', '.db3'):
        kind = 'mcap' if ext == '.mcap' else 'sqlite3'
        if storage and storage != kind:
            raise BagError(f'{path}: extension {ext} contradicts storage={storage!r}')
        return path.with_suffix(''), kind
    kind = storage or 'mcap'
    if kind not in ('mcap', 'sqlite3'):
        raise BagError(f'{path}: storage {kind!r} not supported (expected mcap or sqlite3)')
    return path, kind


@dataclass
class BagTopic:
    name: str
    msgtype: str
    count: int


@dataclass
class BagInfo:
    path: Path
    storage: str
    topics: dict[str, BagTopic]
    start_ns: int
    end_ns: int
    message_count: int

    def describe_topics(self) -> str:
        if not self.topics:
            return '(no topics)'
        return ', '.join(f'{t.name} [{t.msgtype}, {t.count} msgs]'
                         for t in sorted(self.topics.values(), key=lambda t: t.name))


class _RosbagsSource:
    """A complete bag read with rosbags (folder with metadata.yaml, or a bare .mcap/.db3 file)."""

    def __init__(self, path: Path):
        from rosbags.rosbag2 import Reader
        self.reader = Reader(path)
        self.reader.open()
        r = self.reader
        topics = {name: BagTopic(name, t.msgtype, int(t.msgcount or 0)) for name, t in r.topics.items()}
        files = [path] if path.is_file() else list(path.iterdir())
        storage = 'mcap' if any(f.suffix == '.mcap' for f in files) else 'sqlite3'
        self.info = BagInfo(path, storage, topics, int(r.start_time or 0), int(r.end_time or 0),
                            int(r.message_count or 0))

    def raw_messages(self, topic: str) -> Iterator[tuple[int, str, bytes]]:
        conns = [c for c in self.reader.connections if c.topic == topic]
        for conn, log_ns, raw in self.reader.messages(connections=conns):
            yield int(log_ns), conn.msgtype, raw

    def close(self) -> None:
        self.reader.close()


class _McapStreamSource:
    """An mcap file without a valid footer (recorder killed, copy cut short), streamed up to the break."""

    def __init__(self, file: Path, path: Path):
        self.file = file
        topics: dict[str, BagTopic] = {}
        stamps: list[int] = []
        for log_ns, topic, msgtype, _ in self._records():
            t = topics.setdefault(topic, BagTopic(topic, msgtype, 0))
            t.count += 1
            stamps.append(log_ns)
        self.info = BagInfo(path, 'mcap', topics, min(stamps, default=0), max(stamps, default=0), len(stamps))

    def _records(self) -> Iterator[tuple[int, str, str, bytes]]:
        from mcap.exceptions import McapError
        from mcap.records import Channel, Message, Schema
        from mcap.stream_reader import StreamReader
        schemas: dict[int, str] = {}
        channels: dict[int, tuple[str, str]] = {}
        with open(self.file, 'rb') as fh:
            try:
                for rec in StreamReader(fh).records:
                    if isinstance(rec, Schema):
                        schemas[rec.id] = rec.name
                    elif isinstance(rec, Channel):
                        channels[rec.id] = (rec.topic, schemas.get(rec.schema_id, ''))
                    elif isinstance(rec, Message) and rec.channel_id in channels:
                        topic, msgtype = channels[rec.channel_id]
                        yield int(rec.log_time), topic, msgtype, rec.data
            except (McapError, EOFError, ValueError, OSError):
                # The break: everything before it has been yielded.
                return

    def raw_messages(self, topic: str) -> Iterator[tuple[int, str, bytes]]:
        for log_ns, t, msgtype, raw in self._records():
            if t == topic:
                yield log_ns, msgtype, raw

    def close(self) -> None:
        pass


def _open_source(path: Path):
    path = Path(path)
    if not path.exists():
        raise BagError(f'{path}: bag not found')
    try:
        return _RosbagsSource(path)
    except Exception as exc:  # rosbags raises ReaderError, sqlite3/mcap errors, KeyError on bad yaml ...
        first = f'{type(exc).__name__}: {exc}'
    mcaps = [path] if path.suffix == '.mcap' else (sorted(path.glob('*.mcap')) if path.is_dir() else [])
    if len(mcaps) == 1 and mcaps[0].is_file():
        src = _McapStreamSource(mcaps[0], path)
        if src.info.message_count:
            logger.warning('%s: truncated mcap (%s); reading the %d messages before the break. '
                           '`mcap recover` can rewrite it as a complete file.', mcaps[0], first,
                           src.info.message_count)
            return src
    raise BagError(f'{path}: cannot open as a rosbag2 (mcap or sqlite3) bag: {first}. A truncated bag may '
                   'be salvaged with `mcap recover` (mcap) or `ros2 bag reindex` (sqlite3).')


def bag_info(path: Path) -> BagInfo:
    """Topics, types, message counts and time span of a bag (folder, or a bare .mcap/.db3 file)."""
    src = _open_source(path)
    src.close()
    return src.info


def _check_topic(info: BagInfo, topic: str, msgtype: str) -> None:
    if topic not in info.topics:
        raise BagError(f'{info.path}: no topic {topic!r}; the bag has {info.describe_topics()}')
    have = info.topics[topic].msgtype
    if have != msgtype:
        raise BagError(f'{info.path}: topic {topic!r} has type {have}, expected {msgtype}; '
                       f'the bag has {info.describe_topics()}')
    if info.topics[topic].count == 0:
        raise BagError(f'{info.path}: topic {topic!r} has no messages; the bag has {info.describe_topics()}')


def _messages(src, topic: str, msgtype: str) -> Iterator[tuple[int, Any]]:
    """(log time, deserialised message) of one topic, wrapping storage/CDR errors into BagError."""
    info = src.info
    _check_topic(info, topic, msgtype)
    ts = typestore()
    it = src.raw_messages(topic)
    k = 0
    while True:
        try:
            log_ns, have, raw = next(it)
        except StopIteration:
            return
        except Exception as exc:
            raise BagError(f'{info.path}: cannot read message {k} of {topic!r} '
                           f'(truncated or corrupt bag?): {type(exc).__name__}: {exc}') from None
        try:
            msg = ts.deserialize_cdr(raw, have)
        except Exception as exc:
            raise BagError(f'{info.path}: message {k} of {topic!r} does not deserialise as '
                           f'{have}: {type(exc).__name__}: {exc}') from None
        yield int(log_ns), msg
        k += 1


def _stamp(msg) -> int:
    return int(msg.header.stamp.sec) * 1_000_000_000 + int(msg.header.stamp.nanosec)


@dataclass
class OdometryTrack:
    """Odometry poses ``world_T_child`` at increasing stamps, with interpolation."""

    stamps: np.ndarray      # (K,) int64 ns
    poses: np.ndarray       # (K,4,4) float64
    frame_id: str = ''
    child_frame_id: str = ''

    def at(self, t_ns: int, tolerance_ns: int = ODOM_TOLERANCE_NS) -> np.ndarray | None:
        """Pose at ``t_ns`` (linear + slerp between neighbours); None outside the span (+tolerance)."""
        s = self.stamps
        if len(s) == 0 or t_ns < s[0] - tolerance_ns or t_ns > s[-1] + tolerance_ns:
            return None
        if t_ns <= s[0]:
            return self.poses[0].copy()
        if t_ns >= s[-1]:
            return self.poses[-1].copy()
        i = int(np.searchsorted(s, t_ns, side='right')) - 1
        if s[i] == t_ns:
            return self.poses[i].copy()
        a = (t_ns - s[i]) / float(s[i + 1] - s[i])
        return interpolate_pose(self.poses[i], self.poses[i + 1], a)


def interpolate_pose(T0: np.ndarray, T1: np.ndarray, a: float) -> np.ndarray:
    """Pose at fraction ``a`` from T0 to T1: linear translation, slerp rotation."""
    q0, q1 = matrix_to_quat(T0[:3, :3]), matrix_to_quat(T1[:3, :3])
    d = float(np.dot(q0, q1))
    if d < 0:
        q1, d = -q1, -d
    if d > 0.9995:
        q = q0 + a * (q1 - q0)
    else:
        th = np.arccos(np.clip(d, -1.0, 1.0))
        q = (np.sin((1 - a) * th) * q0 + np.sin(a * th) * q1) / np.sin(th)
    return make_transform(quat_to_matrix(*q), (1 - a) * T0[:3, 3] + a * T1[:3, 3])


def read_odometry(path: Path, topic: str) -> OdometryTrack:
    """All ``nav_msgs/Odometry`` poses of a topic (header stamps must increase)."""
    src = _open_source(path)
    info = src.info
    try:
        stamps, poses = [], []
        frame = child = ''
        for _, msg in _messages(src, topic, ODOMETRY):
            p = msg.pose.pose
            stamps.append(_stamp(msg))
            o = p.orientation
            poses.append(make_transform(quat_to_matrix(o.w, o.x, o.y, o.z),
                                        (p.position.x, p.position.y, p.position.z)))
            frame, child = msg.header.frame_id, msg.child_frame_id
    finally:
        src.close()
    st = np.array(stamps, dtype=np.int64)
    _check_increasing(info, topic, st)
    return OdometryTrack(st, np.stack(poses), frame, child)


def _check_increasing(info: BagInfo, topic: str, stamps: np.ndarray) -> None:
    d = np.diff(stamps)
    if len(d) and (d <= 0).any():
        i = int(np.nonzero(d <= 0)[0][0])
        raise BagError(f'{info.path}: header stamps of {topic!r} not increasing at messages {i}, {i + 1} '
                       f'({stamps[i]} then {stamps[i + 1]}); the bag has {info.describe_topics()}')


@dataclass
class BagCloud:
    stamp_ns: int
    log_ns: int
    cloud: Any  # zeroflow_ros.core.pointcloud2.DecodedCloud


def iter_clouds(path: Path, topic: str) -> Iterator[BagCloud]:
    """Yield the decoded PointCloud2 messages of ``topic`` in log order; header stamps must increase.

    A driver that leaves every header stamp at zero gets the bag's log (receive) times instead, with
    a warning; a zero stamp after non-zero ones is an error like any other stamp going backwards.
    """
    from zeroflow_ros.core.pointcloud2 import CloudError, decode
    src = _open_source(path)
    info = src.info
    use_log_time = False
    try:
        prev = None
        for k, (log_ns, msg) in enumerate(_messages(src, topic, POINTCLOUD2)):
            stamp = _stamp(msg)
            if k == 0 and stamp == 0:
                use_log_time = True
                logger.warning('%s: %r has zero header stamps; using the bag\'s log times', info.path, topic)
            if use_log_time:
                if stamp != 0:
                    raise BagError(f'{info.path}: {topic!r} mixes zero and non-zero header stamps '
                                   f'(message {k}); the bag has {info.describe_topics()}')
                stamp = log_ns
            if prev is not None and stamp <= prev:
                what = 'log times' if use_log_time else 'header stamps'
                raise BagError(f'{info.path}: {what} of {topic!r} not increasing at messages {k - 1}, {k} '
                               f'({prev} then {stamp}); the bag has {info.describe_topics()}')
            prev = stamp
            try:
                cloud = decode(msg, copy=True)
            except CloudError as exc:
                raise BagError(f'{info.path}: message {k} of {topic!r}: {exc}') from None
            yield BagCloud(stamp, log_ns, cloud)
    finally:
        src.close()


def first_cloud_layout(path: Path, topic: str) -> str:
    """One line on the first PointCloud2 of a topic: frame, size, point_step and fields."""
    names = {1: 'i8', 2: 'u8', 3: 'i16', 4: 'u16', 5: 'i32', 6: 'u32', 7: 'f32', 8: 'f64'}
    src = _open_source(path)
    try:
        for _, msg in _messages(src, topic, POINTCLOUD2):
            fields = ' '.join(f'{f.name}:{names.get(f.datatype, f.datatype)}@{f.offset}' for f in msg.fields)
            return (f'frame {msg.header.frame_id!r}, {msg.width}x{msg.height} points, '
                    f'point_step {msg.point_step}, fields {fields}')
    finally:
        src.close()
    return 'no message'


def _normalised_times(t: np.ndarray | None) -> np.ndarray | None:
    """Per-point times scaled to [0, 1] over the sweep (KISS-ICP's deskew input), None if unknown."""
    if t is None or len(t) == 0:
        return None
    lo, hi = float(np.min(t)), float(np.max(t))
    return np.zeros(len(t)) if hi <= lo else (np.asarray(t, np.float64) - lo) / (hi - lo)


@dataclass
class BagPair(Pair):
    cloud0: Any = None  # DecodedCloud of sweep t (indices, intensity, time, frame_id)
    cloud1: Any = None


def iter_bag_pairs(path: Path, topic: str, odom_topic: str | None = None,
                   lidar_odometry: Any = None) -> Iterator[BagPair]:
    """Consecutive cloud pairs of a bag.

    ``ego1_T_ego0`` comes from the ``odom_topic`` odometry when given and covering both stamps;
    else, with ``lidar_odometry`` (an :class:`~zeroflow_ros.core.odometry.OdometryConfig`, or True
    for its defaults), from KISS-ICP run over the clouds in order; else it is None.
    """
    odom = read_odometry(path, odom_topic) if odom_topic else None
    icp = None
    if odom is None and lidar_odometry:
        from zeroflow_ros.core.odometry import LidarOdometry, OdometryConfig
        icp = LidarOdometry(lidar_odometry if isinstance(lidar_odometry, OdometryConfig) else None)
    warned = False
    prev: BagCloud | None = None
    for bc in iter_clouds(path, topic):
        if odom is not None and not warned and odom.child_frame_id and bc.cloud.frame_id \
                and odom.child_frame_id != bc.cloud.frame_id:
            logger.warning('%s: odometry child_frame_id %r differs from the cloud frame %r; ego motion is '
                           'taken as that of the cloud frame (no TF lookup)', path, odom.child_frame_id,
                           bc.cloud.frame_id)
            warned = True
        if icp is not None:
            icp.register(bc.cloud.xyz, bc.stamp_ns, _normalised_times(bc.cloud.time))
        if prev is not None:
            T = None
            if odom is not None:
                w0, w1 = odom.at(prev.stamp_ns), odom.at(bc.stamp_ns)
                if w0 is not None and w1 is not None:
                    T = invert(w1) @ w0
            elif icp is not None:
                T = icp.last_motion()
            yield BagPair(Path(path).stem, prev.stamp_ns, bc.stamp_ns, prev.cloud.xyz, bc.cloud.xyz, T,
                          None, None, None, prev.cloud, bc.cloud)
        prev = bc


# ------------------------------------------------------------------------------------- writing

@dataclass
class CloudRecord:
    """One sweep to write: stamp, xyz (N,3) and extra per-point fields (name -> (N,))."""

    stamp_ns: int
    points: np.ndarray
    fields: dict[str, np.ndarray]
    pose: np.ndarray | None = None  # world_T_cloud-frame, written as odometry when given


def write_bag(out: Path, records: Iterable[CloudRecord], *, topic: str = '/lidar',
              odom_topic: str | None = None, frame_id: str = 'lidar', odom_frame: str = 'odom',
              storage: str | None = None, tf_topic: str | None = None) -> tuple[Path, int]:
    """Write clouds (and odometry for records with a pose) to a new bag; returns (bag folder, clouds).

    ``tf_topic`` (e.g. ``/tf``) also writes each pose as the transform ``odom_frame -> frame_id``,
    so rviz can show the replay in the odometry frame.
    """
    from rosbags.rosbag2 import StoragePlugin, Writer
    from zeroflow_ros.core.pointcloud2 import encode
    bag_dir, kind = _storage_for(out, storage)
    if bag_dir.exists():
        raise BagError(f'{bag_dir}: exists already; rosbag2 writers never overwrite (remove it first)')
    ts = typestore()
    T = ts.types
    pc_cls, odom_cls = T[POINTCLOUD2], T[ODOMETRY]
    plugin = StoragePlugin.MCAP if kind == 'mcap' else StoragePlugin.SQLITE3
    n = 0
    prev = None
    writer = Writer(bag_dir, version=Writer.VERSION_LATEST, storage_plugin=plugin)
    writer.open()
    try:
        pc_conn = writer.add_connection(topic, POINTCLOUD2, typestore=ts)
        od_conn = tf_conn = None
        for rec in records:
            stamp = int(rec.stamp_ns)
            if prev is not None and stamp <= prev:
                raise BagError(f'{bag_dir}: sweep stamps must increase ({prev} then {stamp})')
            prev = stamp
            msg = encode(rec.points, rec.fields, frame_id=frame_id, stamp_ns=stamp, msg_cls=pc_cls)
            writer.write(pc_conn, stamp, ts.serialize_cdr(msg, POINTCLOUD2))
            if odom_topic and rec.pose is not None:
                if od_conn is None:
                    # Only sources with poses get an odometry topic: an empty one would mislead readers.
                    od_conn = writer.add_connection(odom_topic, ODOMETRY, typestore=ts)
                writer.write(od_conn, stamp, ts.serialize_cdr(
                    _odometry(odom_cls, T, rec.pose, stamp, odom_frame, frame_id), ODOMETRY))
            if tf_topic and rec.pose is not None:
                if tf_conn is None:
                    tf_conn = writer.add_connection(tf_topic, TFMESSAGE, typestore=ts)
                writer.write(tf_conn, stamp, ts.serialize_cdr(
                    _tf(T, rec.pose, stamp, odom_frame, frame_id), TFMESSAGE))
            n += 1
    except BaseException:
        writer.close()
        raise
    writer.close()
    if n == 0:
        raise BagError(f'{bag_dir}: no sweeps to write')
    return bag_dir, n


def _tf(T, pose: np.ndarray, stamp_ns: int, frame: str, child: str):
    q = matrix_to_quat(pose[:3, :3])
    sec, nsec = divmod(int(stamp_ns), 1_000_000_000)
    header = T['std_msgs/msg/Header'](stamp=T['builtin_interfaces/msg/Time'](sec=sec, nanosec=nsec),
                                      frame_id=frame)
    t = [float(v) for v in pose[:3, 3]]
    tr = T['geometry_msgs/msg/Transform'](
        translation=T['geometry_msgs/msg/Vector3'](x=t[0], y=t[1], z=t[2]),
        rotation=T['geometry_msgs/msg/Quaternion'](x=float(q[1]), y=float(q[2]), z=float(q[3]),
                                                   w=float(q[0])))
    return T[TFMESSAGE](transforms=[T['geometry_msgs/msg/TransformStamped'](
        header=header, child_frame_id=child, transform=tr)])


def _odometry(odom_cls, T, pose: np.ndarray, stamp_ns: int, frame: str, child: str):
    q = matrix_to_quat(pose[:3, :3])
    sec, nsec = divmod(int(stamp_ns), 1_000_000_000)
    header = T['std_msgs/msg/Header'](stamp=T['builtin_interfaces/msg/Time'](sec=sec, nanosec=nsec),
                                      frame_id=frame)
    pose_msg = T['geometry_msgs/msg/Pose'](
        position=T['geometry_msgs/msg/Point'](x=float(pose[0, 3]), y=float(pose[1, 3]), z=float(pose[2, 3])),
        orientation=T['geometry_msgs/msg/Quaternion'](x=float(q[1]), y=float(q[2]), z=float(q[3]),
                                                      w=float(q[0])))
    zero3 = T['geometry_msgs/msg/Vector3'](x=0.0, y=0.0, z=0.0)
    return odom_cls(
        header=header, child_frame_id=child,
        pose=T['geometry_msgs/msg/PoseWithCovariance'](pose=pose_msg, covariance=np.zeros(36)),
        twist=T['geometry_msgs/msg/TwistWithCovariance'](
            twist=T['geometry_msgs/msg/Twist'](linear=zero3, angular=zero3), covariance=np.zeros(36)))


# ---------------------------------------------------------------------------------- converters

def records_from_av2_log(log_dir: Path) -> Iterator[CloudRecord]:
    """Sweeps of an AV2/synthetic log (ego frame) with the city pose.

    Extra fields: ``intensity`` (FLOAT32), ``ring`` (UINT16, from ``laser_number``) and ``offset_ns``
    (INT32, the per-point time within the sweep, for deskewing), when the log has them.
    """
    from zeroflow_ros.data.av2 import AV2Log
    log = AV2Log(log_dir)
    has_poses = (log.log_dir / 'city_SE3_egovehicle.feather').exists()
    for ts in log.timestamps:
        tab = log.lidar_table(int(ts))
        pts = np.stack([tab.column(c).to_numpy().astype(np.float32) for c in ('x', 'y', 'z')], axis=1)
        fields = {}
        for src, dst, dtype in (('intensity', 'intensity', np.float32), ('laser_number', 'ring', np.uint16),
                                ('offset_ns', 'offset_ns', np.int32)):
            if src in tab.column_names:
                fields[dst] = tab.column(src).to_numpy().astype(dtype)
        yield CloudRecord(int(ts), pts, fields, log.pose(int(ts)) if has_poses else None)


def records_from_sweeps(folder: Path, poses_file: Path | None = None,
                        start_ns: int = 0) -> Iterator[CloudRecord]:
    """Sweeps of a KITTI .bin / PCD folder (recorded or nominal 10 Hz times), poses from a KITTI file.

    Extra fields: ``intensity`` (FLOAT32), and from PCDs ``ring`` (UINT16) and the per-point time
    (``timestamp``/``time``/``t`` as stored) when present.
    """
    from zeroflow_ros.data.sweeps import iter_sweeps, list_sweep_files, poses_for_sweeps
    poses = poses_for_sweeps(poses_file, list_sweep_files(folder)) if poses_file else None
    for k, s in enumerate(iter_sweeps(folder, start_ns=start_ns)):
        fields = {}
        if 'intensity' in s.fields:
            fields['intensity'] = np.asarray(s.fields['intensity'], dtype=np.float32).reshape(-1)
        if 'ring' in s.fields and s.fields['ring'].ndim == 1:
            fields['ring'] = s.fields['ring'].astype(np.uint16)
        for name in ('timestamp', 'time', 't'):
            if name in s.fields and s.fields[name].ndim == 1:
                fields[name] = s.fields[name]
                break
        yield CloudRecord(int(s.stamp_ns), s.points, fields, None if poses is None else poses[k])
