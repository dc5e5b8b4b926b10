"""``zeroflow data import``: every bundled real format in, the AV2 reader out, against independent references.

References: the raw KITTI float32 rows (numpy), the PJLab PCD decoded with liblzf and its column layout
(data/samples/SOURCES.md), ouster-sdk's own XYZLut and the scan facts of SOURCES.md, analytic
trajectories for odometry and de-skew.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from zeroflow_ros.core.geometry import invert, make_transform, transform_points, yaw_transform
from zeroflow_ros.core.odometry import OdometryConfig
from zeroflow_ros.data import bag as zbag
from zeroflow_ros.data import importer as imp
from zeroflow_ros.data.av2 import AV2Log, DataError, list_logs

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / 'data' / 'samples'
KITTI = SAMPLES / 'kitti_raw_sfnd_seq'
KITTI_BINS = sorted((KITTI / 'velodyne_points' / 'data').glob('*.bin'))
PJLAB = SAMPLES / 'pjlab_lidar2imu_seq'
OUSTER = SAMPLES / 'ouster_os1_128_3scans'
ICP = OdometryConfig(max_num_threads=1)


def _only_log(out: Path, split: str = 'train') -> AV2Log:
    logs = list_logs(out, split)
    assert len(logs) == 1
    return logs[0]


def _table(log: AV2Log, ts: int) -> dict:
    t = log.lidar_table(int(ts))
    return {c: t.column(c).to_numpy() for c in t.column_names}


def test_kitti_folder(tmp_path):
    res = imp.import_source(KITTI, tmp_path, max_sweeps=2, odometry=ICP)
    log = _only_log(tmp_path)
    assert log.log_id == 'kitti_raw_sfnd_seq' and res.sweeps == 2 and res.deskewed == 0
    for ts, path in zip(log.timestamps, KITTI_BINS):
        ref = np.fromfile(path, '<f4').reshape(-1, 4)
        np.testing.assert_array_equal(log.points(ts), ref[:, :3])
        np.testing.assert_array_equal(_table(log, ts)['intensity'], ref[:, 3])
    # No poses: KISS-ICP, world = first sweep, ~0.2 m forward per sweep (SOURCES.md).
    np.testing.assert_allclose(log.pose(log.timestamps[0]), np.eye(4), atol=1e-9)
    pair = next(log.pairs(with_gt=False))
    assert 0.12 < -pair.ego1_T_ego0[0, 3] < 0.32


def _pjlab_reference(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Return x and per-point time of a PJLab PCD: liblzf + the column layout of SOURCES.md."""
    import lzf
    raw = path.read_bytes()
    pos = raw.index(b'DATA binary_compressed\n') + len(b'DATA binary_compressed\n')
    csize, usize = (int(v) for v in np.frombuffer(raw[pos:pos + 8], '<u4'))
    buf = lzf.decompress(raw[pos + 8:pos + 8 + csize], usize)
    n = usize // 26   # x y z intensity (f4), ring (u2), timestamp (f8)
    return np.frombuffer(buf, '<f4', count=n), np.frombuffer(buf, '<f8', count=n, offset=18 * n)


def test_pcd_folder_with_poses(tmp_path):
    from zeroflow_ros.data.sweeps import read_pose_file
    folder, pose_file = PJLAB / 'top_center_lidar', PJLAB / 'top_center_lidar-pose.txt'
    imp.import_source(folder, tmp_path, poses=pose_file, deskew_sweeps=False, log_id='raw')
    imp.import_source(folder, tmp_path, poses=pose_file, log_id='deskewed')
    raw, desk = AV2Log(tmp_path / 'train' / 'raw'), AV2Log(tmp_path / 'train' / 'deskewed')
    names, mats = read_pose_file(pose_file)
    files = sorted(folder.glob('*.pcd'))
    assert len(raw.timestamps) == 5
    for ts, f in zip(raw.timestamps, files):
        x, t = _pjlab_reference(f)
        finite = np.isfinite(x)
        np.testing.assert_array_equal(raw.points(ts)[:, 0], x[finite])
        assert ts == round(t.max() * 1e9)     # the sweep's last point (sweeps.py convention)
        off = _table(raw, ts)['offset_ns']
        np.testing.assert_allclose(off, (t[finite] - t.max()) * 1e9, atol=1e3)
        np.testing.assert_allclose(raw.pose(ts), mats[names.index(f.stem)], atol=1e-9)
        # The car stands still (< 1 mm per sweep): de-skew moves nothing by more than a few mm.
        moved = np.abs(desk.points(ts) - raw.points(ts)).max()
        assert 0 < moved < 5e-3
    assert (tmp_path / 'train' / 'raw' / 'calibration' / 'egovehicle_SE3_sensor.feather').is_file()


def test_bag_of_kitti_sweeps(tmp_path):
    import itertools
    bag_dir, _ = zbag.write_bag(tmp_path / 'k.mcap', itertools.islice(
        zbag.records_from_sweeps(KITTI, start_ns=10**9), 2))
    res = imp.import_source(bag_dir, tmp_path / 'out', odometry=ICP)
    log = _only_log(tmp_path / 'out')
    assert res.pose_source.startswith('KISS-ICP') and list(log.timestamps) == [10**9, 11 * 10**8]
    for ts, path in zip(log.timestamps, KITTI_BINS):
        ref = np.fromfile(path, '<f4').reshape(-1, 4)
        np.testing.assert_array_equal(log.points(ts), ref[:, :3])


def test_ouster_pcap(tmp_path):
    pytest.importorskip('ouster.sdk')
    from ouster.sdk import core, open_source
    pcap = OUSTER / 'OS-1-128_v2.3.0_1024x10_lb_n3.pcap'
    imp.import_source(pcap, tmp_path, deskew_sweeps=False, odometry=ICP)
    log = _only_log(tmp_path)
    # SOURCES.md: first-column timestamps and valid-return counts of the three scans.
    assert list(log.timestamps) == [991_587_364_520, 991_687_315_250, 991_787_323_080]
    src = open_source(str(pcap), meta=[str(OUSTER / 'OS-1-128_v2.3.0_1024x10.json')])
    lut = core.XYZLut(src.sensor_info[0])
    scans = [s for frames in src for s in frames]
    for ts, scan, n in zip(log.timestamps, scans, (107_647, 107_357, 107_532)):
        rng = scan.field(core.ChanField.RANGE)
        pts = log.points(ts)
        assert len(pts) == n
        np.testing.assert_array_equal(pts, lut(rng)[rng > 0].astype(np.float32))
        tab = _table(log, ts)
        assert tab['offset_ns'].min() == 0 and 99_000_000 < tab['offset_ns'].max() < 100_000_000
        assert tab['laser_number'].max() == 127
    # The sensor moves ~0.23 m then ~0.27 m forward (SOURCES.md).
    fwd = [-p.ego1_T_ego0[0, 3] for p in log.pairs(with_gt=False)]
    assert 0.15 < fwd[0] < 0.3 and 0.18 < fwd[1] < 0.35, fwd


# ------------------------------------------------------------------------------ odometry + de-skew

# The turn starts on a 50 Hz odometry stamp: a yaw-rate step between two samples is not what
# interpolation can follow (2.5 mrad at mid-gap, 7 cm at 30 m), real vehicles ramp it.
SPEED, YAW_RATE, TURN_AT = 5.0, 0.5, 1.26


def _truth(t: float) -> np.ndarray:
    """world_T_ego: straight along x at 5 m/s until 1.26 s, then a 0.5 rad/s left turn at 5 m/s."""
    if t <= TURN_AT:
        return make_transform(np.eye(3), (SPEED * t, 0.0, 0.0))
    r = SPEED / YAW_RATE
    a = YAW_RATE * (t - TURN_AT)
    return yaw_transform(a, (SPEED * TURN_AT + r * np.sin(a), r * (1 - np.cos(a)), 0.0))


def _world_points(rng) -> np.ndarray:
    return rng.uniform((-20, -20, -1), (40, 30, 3), (300, 3))


def _write_odom_bag(path: Path, world: np.ndarray, cloud_stamps: list[int], odom_hz: float,
                    mount: np.ndarray = np.eye(4), odom_child: str = 'lidar') -> Path:
    """Clouds of a static world seen from the moving sensor, each point at its own time, + odometry.

    ``_truth`` is the pose of the base frame, the sensor sits at ``mount`` (base_T_sensor) in it; the
    odometry gives the base pose when ``odom_child`` is not the clouds' frame 'lidar', else the sensor's.
    """
    odom_T = np.eye(4) if odom_child == 'base_link' else mount
    from rosbags.rosbag2 import StoragePlugin, Writer

    from zeroflow_ros.core.pointcloud2 import encode
    ts = zbag.typestore()
    T = ts.types
    w = Writer(path, version=Writer.VERSION_LATEST, storage_plugin=StoragePlugin.MCAP)
    w.open()
    pc = w.add_connection('/points', zbag.POINTCLOUD2, typestore=ts)
    od = w.add_connection('/odom', zbag.ODOMETRY, typestore=ts)
    # Per-point offsets on the 100 µs grid over a 100 ms sweep, stamp at the sweep start (Ouster-like).
    offs = (np.arange(len(world)) * 1000 // len(world)).astype(np.int64) * 100_000
    msgs = [(int(s), 'pc', s) for s in cloud_stamps]
    msgs += [(int(round(k * 1e9 / odom_hz)), 'od', None)
             for k in range(int((cloud_stamps[-1] * 1e-9 + 0.3) * odom_hz))]
    for stamp, kind, _ in sorted(msgs):
        if kind == 'pc':
            local = np.stack([transform_points(invert(_truth((stamp + o) * 1e-9) @ mount), p[None])[0]
                              for p, o in zip(world, offs)])
            msg = encode(local.astype(np.float32), {'offset_ns': offs.astype(np.uint32)}, frame_id='lidar',
                         stamp_ns=stamp, msg_cls=T[zbag.POINTCLOUD2])
            w.write(pc, stamp, ts.serialize_cdr(msg, zbag.POINTCLOUD2))
        else:
            pose = _truth(stamp * 1e-9) @ odom_T
            msg = zbag._odometry(T[zbag.ODOMETRY], T, pose, stamp, 'odom', odom_child)
            w.write(od, stamp, ts.serialize_cdr(msg, zbag.ODOMETRY))
    w.close()
    return path


def _write_tum(path: Path, hz: float, until_s: float, mount: np.ndarray = np.eye(4)) -> Path:
    from zeroflow_ros.core.geometry import matrix_to_quat
    lines = ['# t tx ty tz qx qy qz qw']
    for k in range(int(until_s * hz)):
        T = _truth(k / hz) @ mount
        w, x, y, z = matrix_to_quat(T[:3, :3])
        lines.append(' '.join(f'{v:.12g}' for v in (k / hz, *T[:3, 3], x, y, z, w)))
    path.write_text('\n'.join(lines) + '\n')
    return path


def test_bag_with_odometry_poses_and_deskew(tmp_path):
    world = _world_points(np.random.default_rng(3))
    # Clouds at 10 Hz, 3 ms off the 50 Hz odometry grid, through the straight part and the turn.
    stamps = [1_003_000_000 + k * 100_000_000 for k in range(12)]
    bag_dir = _write_odom_bag(tmp_path / 'odom_bag', world, stamps, 50.0)
    res = imp.import_source(bag_dir, tmp_path / 'out')
    assert res.pose_source == 'odometry /odom' and res.sweeps == 12 and res.deskewed == 12
    # The same trajectory as a TUM file instead of the bag's odometry.
    res = imp.import_source(bag_dir, tmp_path / 'out', poses=_write_tum(tmp_path / 't.tum', 50.0, 2.5),
                            log_id='tum')
    assert res.pose_source == 'TUM poses t.tum' and res.deskewed == 12
    imp.import_source(bag_dir, tmp_path / 'out', deskew_sweeps=False, log_id='raw')
    raw = AV2Log(tmp_path / 'out' / 'train' / 'raw')
    for log in (AV2Log(tmp_path / 'out' / 'train' / 'odom_bag'), AV2Log(tmp_path / 'out' / 'train' / 'tum')):
        assert list(log.timestamps) == stamps
        for ts in stamps:
            truth = _truth(ts * 1e-9)
            # Interpolating 50 Hz poses of a 5 m/s, 0.5 rad/s arc: chord error ~0.1 mm.
            np.testing.assert_allclose(log.pose(ts)[:3, 3], truth[:3, 3], atol=1e-3)
            np.testing.assert_allclose(log.pose(ts)[:3, :3], truth[:3, :3], atol=1e-4)
            expect = transform_points(invert(truth), world)
            assert np.abs(log.points(ts) - expect).max() < 3e-3
            # Without de-skew the sweep is smeared by up to 0.5 m (5 m/s over 100 ms).
            assert np.abs(raw.points(ts) - expect).max() > 0.3


# ------------------------------------------------------------------------------------- lidar mount

def _scipy_mount(xyz, rpy) -> np.ndarray:
    """base_T_sensor by scipy: the node's fixed-axis roll, pitch, yaw (tf2) is scipy's extrinsic 'xyz'."""
    from scipy.spatial.transform import Rotation
    return make_transform(Rotation.from_euler('xyz', rpy).as_matrix(), xyz)


def _near_ground_z(pts: np.ndarray) -> float:
    """Return the most common z within 20 m (5 cm bins): the road, on these KITTI sweeps."""
    hist, edges = np.histogram(pts[np.hypot(pts[:, 0], pts[:, 1]) < 20.0, 2], bins=np.arange(-4, 4, 0.05))
    return float(edges[hist.argmax()] + 0.025)


def test_kitti_mount_puts_ground_at_zero(tmp_path, caplog):
    import logging
    with caplog.at_level(logging.INFO, logger=imp.__name__):
        imp.import_source(KITTI, tmp_path, max_sweeps=2, odometry=ICP, log_id='lidar')
    # Default (identity): the ego frame is the lidar's, ground ~1.73 m below it, and the log says so.
    hint = re.search(r'--sensor-xyz 0 0 (\S+) ', caplog.text)
    assert hint and 1.6 < float(hint.group(1)) < 1.9, caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=imp.__name__):
        imp.import_source(KITTI, tmp_path, max_sweeps=2, odometry=ICP, log_id='base', sensor_xyz=(0, 0, 1.73))
    assert '--sensor-xyz' not in caplog.text
    lidar, base = AV2Log(tmp_path / 'train' / 'lidar'), AV2Log(tmp_path / 'train' / 'base')
    M = make_transform(np.eye(3), (0.0, 0.0, 1.73))
    for ts, path in zip(base.timestamps, KITTI_BINS):
        ref = np.fromfile(path, '<f4').reshape(-1, 4)[:, :3]
        np.testing.assert_allclose(base.points(ts), ref.astype(np.float64) + (0, 0, 1.73), atol=2e-6)
        assert _near_ground_z(lidar.points(ts)) < -1.6 and abs(_near_ground_z(base.points(ts))) < 0.15
        # KISS-ICP's world becomes the first base frame: M P inv(M) of the lidar-frame poses.
        np.testing.assert_allclose(base.pose(ts), M @ lidar.pose(ts) @ invert(M), atol=1e-6)
    np.testing.assert_allclose(base.pose(base.timestamps[0]), np.eye(4), atol=1e-9)


def test_mount_rotation_and_calibration(tmp_path):
    import json
    av2_io = pytest.importorskip('av2.utils.io')
    xyz, rpy = (1.2, -0.3, 1.73), (0.02, -0.03, 0.4)
    M = _scipy_mount(xyz, rpy)
    (tmp_path / 'p.txt').write_text((' '.join(map(str, np.eye(4)[:3].ravel())) + '\n') * len(KITTI_BINS))
    for frame in ('sensor', 'base'):
        imp.import_source(KITTI, tmp_path / 'out', max_sweeps=1, poses=tmp_path / 'p.txt', sensor_xyz=xyz,
                          sensor_rpy=rpy, poses_frame=None if frame == 'sensor' else frame, log_id=frame)
    log = AV2Log(tmp_path / 'out' / 'train' / 'sensor')
    # The official av2 reader gets the mount back.
    calib = av2_io.read_ego_SE3_sensor(log.log_dir)
    assert list(calib) == ['up_lidar']
    np.testing.assert_allclose(calib['up_lidar'].transform_matrix, M, atol=1e-12)
    ts = log.timestamps[0]
    ref = np.fromfile(KITTI_BINS[0], '<f4').reshape(-1, 4)[:, :3].astype(np.float64)
    np.testing.assert_allclose(log.points(ts), ref @ M[:3, :3].T + M[:3, 3], atol=1e-5)
    # A pose file describes the sensor by default (world_T_base = world_T_sensor inv(M)); 'base' keeps it.
    np.testing.assert_allclose(log.pose(ts), invert(M), atol=1e-9)
    np.testing.assert_allclose(AV2Log(tmp_path / 'out' / 'train' / 'base').pose(ts), np.eye(4), atol=1e-12)
    info = json.loads((log.log_dir / 'import.json').read_text())
    assert info['poses_frame'] == 'sensor' and info['sensor_rpy'] == list(rpy)
    with pytest.raises(DataError, match=r"poses_frame: expected one of \('sensor', 'base'\), got 'odom'"):
        imp.import_source(KITTI, tmp_path / 'out', poses=tmp_path / 'p.txt', poses_frame='odom')
    with pytest.raises(DataError, match='expected 3 finite numbers'):
        imp.import_source(KITTI, tmp_path / 'out', sensor_xyz=(0, 1.7))


def test_bag_with_mount_static_world(tmp_path):
    import json
    mount = _scipy_mount((1.1, 0.3, 1.8), (0.0, 0.0, 0.35))    # forward, left, up, yawed 20 degrees
    world = _world_points(np.random.default_rng(5))
    # Six 10 Hz sweeps across the start of the turn (0.5 rad/s at 5 m/s).
    stamps = [1_103_000_000 + k * 100_000_000 for k in range(6)]
    base_bag = _write_odom_bag(tmp_path / 'base_bag', world, stamps, 50.0, mount, 'base_link')
    sensor_bag = _write_odom_bag(tmp_path / 'sensor_bag', world, stamps, 50.0, mount, 'lidar')
    tum = _write_tum(tmp_path / 's.tum', 50.0, 2.0, mount)
    kw = dict(sensor_xyz=(1.1, 0.3, 1.8), sensor_rpy=(0.0, 0.0, 0.35))
    cases = {'base_bag': (base_bag, {}, 'base'), 'sensor_bag': (sensor_bag, {}, 'sensor'),
             'tum': (base_bag, {'poses': tum, 'log_id': 'tum'}, 'sensor')}
    for name, (bag, extra, frame) in cases.items():
        res = imp.import_source(bag, tmp_path / 'out', **kw, **extra)
        assert res.deskewed == 6
        log = AV2Log(tmp_path / 'out' / 'train' / name)
        assert json.loads((log.log_dir / 'import.json').read_text())['poses_frame'] == frame, name
        city = []
        for ts in stamps:
            truth = _truth(ts * 1e-9)
            np.testing.assert_allclose(log.pose(ts)[:3, 3], truth[:3, 3], atol=1e-3)
            np.testing.assert_allclose(log.pose(ts)[:3, :3], truth[:3, :3], atol=1e-4)
            assert np.abs(log.points(ts) - transform_points(invert(truth), world)).max() < 3e-3, name
            city.append(transform_points(log.pose(ts), log.points(ts).astype(np.float64)))
        # A static world point lands on the same city coordinates from every sweep (within mm).
        assert max(np.abs(c - city[0]).max() for c in city) < 5e-3, name
    # Ignoring the mount: the poses are the sensor's, the city points of two sweeps disagree.
    imp.import_source(base_bag, tmp_path / 'out', log_id='no_mount')
    log = AV2Log(tmp_path / 'out' / 'train' / 'no_mount')
    c0, c1 = (transform_points(log.pose(ts), log.points(ts).astype(np.float64)) for ts in stamps[::5])
    assert np.abs(c0 - c1).max() > 0.1


@pytest.mark.parametrize('yaw_rate,speed', [(0.0, 10.0), (1.0, 0.0), (0.4, 8.0)])
def test_deskew_hand_built(yaw_rate, speed):
    rng = np.random.default_rng(0)
    world = rng.uniform(-30, 30, (500, 3))

    def pose(t):
        # Translation linear in time and yaw at a constant rate: exactly what linear + slerp interpolation
        # reproduces, so the only error left is float32.
        return yaw_transform(0.3 + yaw_rate * t, (speed * t, 0.5 * speed * t, 0.0))
    knots = [0.0, 0.1, 0.2]
    traj = imp.Trajectory([int(k * 1e9) for k in knots], [pose(k) for k in knots])
    offs = rng.integers(-1000, 1000, len(world)) * imp.DESKEW_BIN_NS   # +-100 ms around the stamp
    stamp = 100_000_000
    measured = np.stack([transform_points(invert(pose((stamp + o) * 1e-9)), p[None])[0]
                         for p, o in zip(world, offs)])
    out = imp.deskew(measured, offs, stamp, traj.at)
    expect = transform_points(invert(pose(stamp * 1e-9)), world)
    assert np.abs(out - expect).max() < 1e-4
    assert np.abs(measured - expect).max() > 0.3      # the skew was real
    assert imp.deskew(measured, offs + 10**9, stamp, traj.at) is None   # beyond the poses


def test_no_return_points_dropped(tmp_path):
    # An organised cloud (Ouster driver) marks no-return pixels as (0, 0, 0); NaN rows are dropped too.
    pts = np.array([[1, 2, 3], [0, 0, 0], [np.nan, 1, 1], [0, 0, 4]], np.float32)
    rec = zbag.CloudRecord(10**9, pts, {'intensity': np.arange(4, dtype=np.float32)})
    bag_dir, _ = zbag.write_bag(tmp_path / 'o.mcap', [rec])
    (tmp_path / 'p.txt').write_text('1 0 0 0 0 1 0 0 0 0 1 0\n')
    imp.import_source(bag_dir, tmp_path / 'out', poses=tmp_path / 'p.txt')
    log = _only_log(tmp_path / 'out')
    np.testing.assert_array_equal(log.points(10**9), [[1, 2, 3], [0, 0, 4]])
    np.testing.assert_array_equal(_table(log, 10**9)['intensity'], [0, 3])


def test_offsets_from_times():
    stamp = 1_635_236_489_468_976_896
    t_abs = stamp * 1e-9 + np.array([-0.1, -0.05, 0.0])
    np.testing.assert_allclose(imp.offsets_from_times(t_abs, stamp), [-1e8, -5e7, 0], atol=1e3)
    np.testing.assert_array_equal(imp.offsets_from_times(np.array([0.0, 0.05]), stamp), [0, 50_000_000])
    assert imp.offsets_from_times(None, stamp) is None


def test_cli_mount_flags(tmp_path, capsys):
    import inspect

    from zeroflow_ros.cli import main
    from zeroflow_ros.data import cli as data_cli
    if '--sensor-xyz' not in inspect.getsource(data_cli):
        pytest.skip('zeroflow data import has no --sensor-xyz yet (data/cli.py change pending)')
    (tmp_path / 'p.txt').write_text('1 0 0 0 0 1 0 0 0 0 1 0\n' * len(KITTI_BINS))
    assert main(['data', 'import', str(KITTI), str(tmp_path / 'out'), '--max-sweeps', '1', '--poses',
                 str(tmp_path / 'p.txt'), '--sensor-xyz', '0.5', '0', '1.73', '--sensor-rpy', '0', '0', '0.1',
                 '--poses-frame', 'base']) == 0
    log = _only_log(tmp_path / 'out')
    M = _scipy_mount((0.5, 0.0, 1.73), (0.0, 0.0, 0.1))
    ref = np.fromfile(KITTI_BINS[0], '<f4').reshape(-1, 4)[:, :3].astype(np.float64)
    np.testing.assert_allclose(log.points(log.timestamps[0]), ref @ M[:3, :3].T + M[:3, 3], atol=1e-5)
    np.testing.assert_allclose(log.pose(log.timestamps[0]), np.eye(4), atol=1e-12)   # --poses-frame base


# ------------------------------------------------------------------------------------- bad input

def test_bad_input_is_one_clear_error(tmp_path, capsys):
    from zeroflow_ros.cli import main
    with pytest.raises(DataError, match='not found'):
        imp.import_source(tmp_path / 'nope', tmp_path / 'out')
    (tmp_path / 'x.txt').write_text('hi')
    with pytest.raises(DataError, match=r"unknown file type '\.txt' \(expected \.mcap, \.db3 or \.pcap\)"):
        imp.import_source(tmp_path / 'x.txt', tmp_path / 'out')
    (tmp_path / 'empty').mkdir()
    with pytest.raises(DataError, match='no .bin or .pcd sweep files'):
        imp.import_source(tmp_path / 'empty', tmp_path / 'out')
    with pytest.raises(DataError, match='pose file not found'):
        imp.import_source(KITTI, tmp_path / 'out', poses=tmp_path / 'poses.txt')
    (tmp_path / 'poses.txt').write_text('1 0 0 0 0 1 0 0 0 0 1 0\n')
    with pytest.raises(DataError, match='1 poses for 10 sweeps'):
        imp.import_source(KITTI, tmp_path / 'out', poses=tmp_path / 'poses.txt')
    one = zbag.CloudRecord(10**9, np.ones((4, 3), np.float32), {})
    bag_dir, _ = zbag.write_bag(tmp_path / 'b.mcap', [one])
    with pytest.raises(DataError, match=r"no topic '/nope'; the bag has /lidar"):
        imp.import_source(bag_dir, tmp_path / 'out', topic='/nope')
    imp.import_source(bag_dir, tmp_path / 'out', poses=tmp_path / 'poses.txt')
    with pytest.raises(DataError, match='exists already'):
        imp.import_source(bag_dir, tmp_path / 'out', poses=tmp_path / 'poses.txt')
    assert not list((tmp_path / 'out' / 'train').glob('.*partial*'))
    assert main(['data', 'import', str(tmp_path / 'x.txt'), str(tmp_path / 'out')]) == 2
    err = capsys.readouterr().err
    assert err.startswith('zeroflow data import: error: ') and 'Traceback' not in err and err.count('\n') == 1


def test_cli_import_then_reader(tmp_path, capsys):
    from zeroflow_ros.cli import main
    pose_lines = ''.join(' '.join(map(str, np.eye(4)[:3].ravel())) + '\n' for _ in range(10))
    (tmp_path / 'p.txt').write_text(pose_lines)
    assert main(['data', 'import', str(KITTI), str(tmp_path / 'out'), '--split', 'val', '--log-id', 'k',
                 '--max-sweeps', '2', '--poses', str(tmp_path / 'p.txt')]) == 0
    assert 'imported 2 sweeps' in capsys.readouterr().out
    log = _only_log(tmp_path / 'out', 'val')
    assert log.log_id == 'k'
    np.testing.assert_array_equal(log.ego1_T_ego0(*log.timestamps[:2]), np.eye(4))
