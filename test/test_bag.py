"""rosbag2 in/out and the KITTI/PCD sweep readers, on hand-built logs and the real samples."""
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.feather as feather
import pytest

from zeroflow_ros.core.geometry import invert, matrix_to_quat, yaw_transform
from zeroflow_ros.data import bag as zbag
from zeroflow_ros.data import sweeps as zsw
from zeroflow_ros.data.av2 import POSE_COLUMNS, AV2Log, DataError

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / 'data' / 'samples'
KITTI = SAMPLES / 'kitti_raw_sfnd_seq'
PJLAB = SAMPLES / 'pjlab_lidar2imu_seq'
TS = [315_000_000_000_000_000 + k * 100_000_000 for k in range(3)]


@pytest.fixture(scope='module')
def small_log(tmp_path_factory) -> Path:
    """A 3-sweep AV2-layout log: float16 xyz and uint8 intensity as AV2 stores them, yawing ego."""
    log = tmp_path_factory.mktemp('av2') / 'val' / 'log-a'
    (log / 'sensors' / 'lidar').mkdir(parents=True)
    rng = np.random.default_rng(3)
    rows = []
    for k, ts in enumerate(TS):
        n = 1500 + 100 * k
        xyz = rng.uniform(-60, 60, (n, 3)).astype(np.float16)
        feather.write_feather(pa.table({'x': xyz[:, 0], 'y': xyz[:, 1], 'z': xyz[:, 2],
                                        'intensity': rng.integers(0, 256, n).astype(np.uint8),
                                        'laser_number': rng.integers(0, 64, n).astype(np.uint8),
                                        'offset_ns': np.sort(rng.integers(0, 10**8, n)).astype(np.int32)}),
                              log / 'sensors' / 'lidar' / f'{ts}.feather')
        T = yaw_transform(0.03 * k, (1400.0 + 1.2 * k, 200.0 + 0.1 * k, 13.0))
        rows.append([ts, *matrix_to_quat(T[:3, :3]), *T[:3, 3]])
    rows = np.array(rows, dtype=object)
    poses = pa.table({c: np.array(rows[:, i], dtype=np.int64 if i == 0 else np.float64)
                      for i, c in enumerate(POSE_COLUMNS)})
    feather.write_feather(poses, log / 'city_SE3_egovehicle.feather')
    return log


def test_av2_pairs_reuse_sweeps_correctly(small_log):
    log = AV2Log(small_log)
    pairs = list(log.pairs(with_gt=False))
    assert [(p.ts0, p.ts1) for p in pairs] == [(TS[0], TS[1]), (TS[1], TS[2])]
    for p in pairs:
        np.testing.assert_array_equal(p.points0, log.points(p.ts0))
        np.testing.assert_array_equal(p.points1, log.points(p.ts1))
        np.testing.assert_allclose(p.ego1_T_ego0, invert(log.pose(p.ts1)) @ log.pose(p.ts0), atol=1e-12)
        assert p.is_ground0 is None and p.gt is None  # no map, no labels in this log


@pytest.mark.parametrize('ext', ['.mcap', '.db3'])
def test_av2_log_round_trip(small_log, tmp_path, ext):
    bag_dir, n = zbag.write_bag(tmp_path / f'out{ext}', zbag.records_from_av2_log(small_log),
                                topic='/lidar', odom_topic='/odom', frame_id='ego')
    assert n == 3 and bag_dir == tmp_path / 'out'
    info = zbag.bag_info(bag_dir)
    assert info.storage == ('mcap' if ext == '.mcap' else 'sqlite3')
    assert {t: (v.msgtype, v.count) for t, v in info.topics.items()} == {
        '/lidar': ('sensor_msgs/msg/PointCloud2', 3), '/odom': ('nav_msgs/msg/Odometry', 3)}
    log = AV2Log(small_log)
    clouds = list(zbag.iter_clouds(bag_dir, '/lidar'))
    assert [c.stamp_ns for c in clouds] == TS
    for c, ts in zip(clouds, TS):
        raw = feather.read_table(log.lidar_path(ts)).to_pandas()
        np.testing.assert_array_equal(c.cloud.xyz, log.points(ts))  # bit-identical after the float16 cast
        np.testing.assert_array_equal(c.cloud.intensity, raw['intensity'].to_numpy().astype(np.float32))
        np.testing.assert_array_equal(c.cloud.ring, raw['laser_number'].to_numpy())
        np.testing.assert_array_equal(c.cloud.time, raw['offset_ns'].to_numpy() * 1e-9)  # ns -> s
        assert c.cloud.frame_id == 'ego' and c.log_ns == ts
    pairs = list(zbag.iter_bag_pairs(bag_dir, '/lidar', '/odom'))
    assert [(p.ts0, p.ts1) for p in pairs] == [(TS[0], TS[1]), (TS[1], TS[2])]
    for p in pairs:
        np.testing.assert_allclose(p.ego1_T_ego0, log.ego1_T_ego0(p.ts0, p.ts1), atol=1e-9)
        np.testing.assert_array_equal(p.points1, log.points(p.ts1))
    # Without odometry the pair has no ego motion rather than a guessed one.
    assert all(p.ego1_T_ego0 is None for p in zbag.iter_bag_pairs(bag_dir, '/lidar'))


def test_kitti_sequence_to_mcap(tmp_path):
    bag_dir, n = zbag.write_bag(tmp_path / 'kitti.mcap', zbag.records_from_sweeps(KITTI, start_ns=10**9))
    assert n == 10
    assert set(zbag.bag_info(bag_dir).topics) == {'/lidar'}  # no poses -> no odometry topic
    files = zsw.list_sweep_files(KITTI)
    counts = []
    for k, (c, f) in enumerate(zip(zbag.iter_clouds(bag_dir, '/lidar'), files)):
        ref = np.fromfile(f, dtype='<f4').reshape(-1, 4)
        np.testing.assert_array_equal(c.cloud.xyz, ref[:, :3])
        np.testing.assert_array_equal(c.cloud.intensity, ref[:, 3])
        assert c.stamp_ns == 10**9 + k * 100_000_000
        counts.append(len(c.cloud))
    assert counts[0] == 114_278 and counts[9] == 113_593  # SOURCES.md
    # No poses in the bag: KISS-ICP estimates the ego motion (about 0.2 m forward per frame).
    from zeroflow_ros.core.odometry import OdometryConfig
    pairs = zbag.iter_bag_pairs(bag_dir, '/lidar', lidar_odometry=OdometryConfig(max_num_threads=1))
    fwd = [-p.ego1_T_ego0[0, 3] for _, p in zip(range(2), pairs)]
    assert all(0.12 < f < 0.32 for f in fwd), fwd


def _ref_lzf(src: bytes, out_len: int) -> bytes:
    # The reference decoder of data/samples/SOURCES.md, byte by byte.
    out = bytearray(out_len)
    i = o = 0
    while i < len(src):
        ctrl = src[i]
        i += 1
        if ctrl < 32:
            out[o:o + ctrl + 1] = src[i:i + ctrl + 1]
            i += ctrl + 1
            o += ctrl + 1
        else:
            ln = ctrl >> 5
            if ln == 7:
                ln += src[i]
                i += 1
            ref = o - ((ctrl & 0x1F) << 8) - src[i] - 1
            i += 1
            for _ in range(ln + 2):
                out[o] = out[ref]
                o += 1
                ref += 1
    assert o == out_len
    return bytes(out)


def test_pcd_binary_compressed_matches_reference_decoder():
    path = sorted((PJLAB / 'top_center_lidar').glob('*.pcd'))[0]
    raw = path.read_bytes()
    pos = raw.index(b'DATA binary_compressed\n') + len(b'DATA binary_compressed\n')
    csize, usize = np.frombuffer(raw[pos:pos + 8], '<u4')
    buf = _ref_lzf(raw[pos + 8:pos + 8 + int(csize)], int(usize))
    n = 80_787
    x = np.frombuffer(buf, '<f4', count=n, offset=0)
    ring = np.frombuffer(buf, '<u2', count=n, offset=16 * n)
    t = np.frombuffer(buf, '<f8', count=n, offset=18 * n)
    s = zsw.read_pcd(path)
    assert s.points.shape == (n, 3)
    np.testing.assert_array_equal(s.points[:, 0], x)
    np.testing.assert_array_equal(s.fields['ring'], ring)
    np.testing.assert_array_equal(s.fields['timestamp'], t)
    assert abs(s.stamp_ns - 1635236489.468977e9) < 2e3  # the sweep's last point time


def test_pcd_sequence_with_poses_to_sqlite3(tmp_path):
    folder = PJLAB / 'top_center_lidar'
    pose_file = PJLAB / 'top_center_lidar-pose.txt'
    bag_dir, n = zbag.write_bag(tmp_path / 'pj.db3', zbag.records_from_sweeps(folder, pose_file),
                                odom_topic='/odom')
    assert n == 5
    names, mats = zsw.read_pose_file(pose_file)
    assert len(names) == 1081 and names[0] == '2021-10-26-16-21-29-468'
    sweeps = list(zsw.iter_sweeps(folder))
    pairs = list(zbag.iter_bag_pairs(bag_dir, '/lidar', '/odom'))
    assert len(pairs) == 4
    for k, p in enumerate(pairs):
        np.testing.assert_array_equal(p.points0, sweeps[k].points)
        np.testing.assert_array_equal(p.cloud0.intensity, sweeps[k].fields['intensity'])
        np.testing.assert_array_equal(p.cloud0.ring, sweeps[k].fields['ring'])
        np.testing.assert_array_equal(p.cloud0.time, sweeps[k].fields['timestamp'])
        np.testing.assert_allclose(p.ego1_T_ego0, invert(mats[k + 1]) @ mats[k], atol=1e-9)
        assert np.abs(p.ego1_T_ego0[:3, 3]).max() < 1e-3  # the vehicle stands still (SOURCES.md)


@pytest.mark.parametrize('data', ['ascii', 'binary', 'binary_compressed'])
def test_pcd_writer_reader_round_trip(tmp_path, data):
    rng = np.random.default_rng(5)
    pts = rng.normal(size=(257, 3)).astype(np.float32)
    fields = {'intensity': rng.uniform(0, 255, 257).astype(np.float32),
              'ring': rng.integers(0, 64, 257).astype(np.uint16), 't': rng.uniform(0, 0.1, 257)}
    zsw.write_pcd(tmp_path / 'a.pcd', pts, fields, data=data)
    s = zsw.read_pcd(tmp_path / 'a.pcd')
    np.testing.assert_array_equal(s.points, pts)
    for k, v in fields.items():
        np.testing.assert_array_equal(s.fields[k], v)
        assert s.fields[k].dtype == v.dtype


def test_pcd_hand_written_layouts(tmp_path):
    (tmp_path / 'a.pcd').write_text(
        '# .PCD v0.7\nVERSION 0.7\nFIELDS x y z normal\nSIZE 4 4 4 4\nTYPE F F F F\nCOUNT 1 1 1 2\n'
        'WIDTH 2\nHEIGHT 1\nVIEWPOINT 0 0 0 1 0 0 0\nPOINTS 2\nDATA ascii\n1 2 3 0.5 0.25\n-1 -2 nan 7 8\n')
    s = zsw.read_pcd(tmp_path / 'a.pcd')
    np.testing.assert_array_equal(s.points[0], [1, 2, 3])
    assert np.isnan(s.points[1, 2])
    np.testing.assert_array_equal(s.fields['normal'], [[0.5, 0.25], [7, 8]])
    # binary with a padding field '_' (PCL writes those for alignment)
    rec = np.zeros(3, dtype=[('x', '<f4'), ('y', '<f4'), ('z', '<f4'), ('_', 'u1', (4,)), ('i', '<u2')])
    rec['x'] = [1, 2, 3]
    rec['i'] = [7, 8, 9]
    head = ('VERSION 0.7\nFIELDS x y z _ i\nSIZE 4 4 4 1 2\nTYPE F F F U U\nCOUNT 1 1 1 4 1\n'
            'WIDTH 3\nHEIGHT 1\nPOINTS 3\nDATA binary\n')
    (tmp_path / 'b.pcd').write_bytes(head.encode() + rec.tobytes())
    s = zsw.read_pcd(tmp_path / 'b.pcd')
    np.testing.assert_array_equal(s.points[:, 0], [1, 2, 3])
    np.testing.assert_array_equal(s.fields['i'], [7, 8, 9])
    assert '_' not in s.fields
    # truncated data and bad headers name the file
    (tmp_path / 'c.pcd').write_bytes(head.encode() + rec.tobytes()[:-5])
    with pytest.raises(zsw.SweepError, match=r'c\.pcd: binary data has .* \(truncated\?\)'):
        zsw.read_pcd(tmp_path / 'c.pcd')
    (tmp_path / 'd.pcd').write_text('VERSION 0.7\nFIELDS a b\nSIZE 4 4\nTYPE F F\nPOINTS 0\nDATA ascii\n')
    with pytest.raises(zsw.SweepError, match=r"d\.pcd: PCD has no fields \['x', 'y', 'z'\]"):
        zsw.read_pcd(tmp_path / 'd.pcd')
    raw = sorted((PJLAB / 'top_center_lidar').glob('*.pcd'))[0].read_bytes()
    (tmp_path / 'e.pcd').write_bytes(raw[:len(raw) // 2])
    with pytest.raises(zsw.SweepError, match=r'e\.pcd: compressed block has'):
        zsw.read_pcd(tmp_path / 'e.pcd')
    (tmp_path / 'f.bin').write_bytes(b'\0' * 18)
    with pytest.raises(zsw.SweepError, match=r'f\.bin: 18 bytes is not a multiple of 16'):
        zsw.read_kitti_bin(tmp_path / 'f.bin')
    assert issubclass(zsw.SweepError, DataError)


def test_lzf_rejects_corrupt_streams():
    with pytest.raises(zsw.SweepError, match='back-reference out of range'):
        zsw.lzf_decompress(bytes([0x20, 0x05]), 8)
    with pytest.raises(zsw.SweepError, match='literal run past the end'):
        zsw.lzf_decompress(bytes([5, 1, 2]), 6)
    data = bytes(range(7)) * 5
    assert zsw.lzf_decompress(zsw.lzf_compress_literal(data), len(data)) == data
    # an overlapping back-reference repeats a period: "ab" then copy 6 from 2 back
    assert zsw.lzf_decompress(bytes([1]) + b'ab' + bytes([(4 << 5) | 0, 1]), 8) == b'abababab'


def test_sweep_folder_pairs():
    folder = PJLAB / 'top_center_lidar'
    mats = zsw.read_pose_file(PJLAB / 'top_center_lidar-pose.txt')[1]
    pairs = list(zsw.iter_sweep_pairs(folder, PJLAB / 'top_center_lidar-pose.txt'))
    assert len(pairs) == 4 and pairs[0].log_id == 'top_center_lidar'
    np.testing.assert_allclose(pairs[2].ego1_T_ego0, invert(mats[3]) @ mats[2], atol=1e-12)
    assert pairs[0].points0.shape == (80_787, 3) and pairs[0].points1.shape == (80_753, 3)
    kitti = [p for _, p in zip(range(2), zsw.iter_sweep_pairs(KITTI, start_ns=5))]
    assert kitti[0].ego1_T_ego0 is None and (kitti[0].ts0, kitti[1].ts1) == (5, 5 + 2 * 10**8)


def test_kitti_timestamps_file(tmp_path):
    data = tmp_path / 'velodyne_points' / 'data'
    data.mkdir(parents=True)
    for k in range(3):
        zsw.write_kitti_bin(data / f'{k:010d}.bin', np.zeros((4, 3), np.float32))
    (tmp_path / 'velodyne_points' / 'timestamps.txt').write_text(
        '2011-09-26 13:02:25.964389445\n2011-09-26 13:02:26.074898293\n2011-09-26 13:02:26.185525101\n')
    stamps = [s.stamp_ns for s in zsw.iter_sweeps(tmp_path)]
    assert stamps[0] == 1317042145964389445 and stamps[2] - stamps[1] == 110_626_808


def _write_raw_bag(path: Path, stamps: list[int], with_msgs: bool = True) -> Path:
    from rosbags.rosbag2 import StoragePlugin, Writer

    from zeroflow_ros.core.pointcloud2 import encode
    ts = zbag.typestore()
    w = Writer(path, version=Writer.VERSION_LATEST, storage_plugin=StoragePlugin.MCAP)
    w.open()
    conn = w.add_connection('/points', zbag.POINTCLOUD2, typestore=ts)
    w.add_connection('/odom', zbag.ODOMETRY, typestore=ts)
    if with_msgs:
        for k, s in enumerate(stamps):
            msg = encode(np.zeros((3, 3), np.float32), frame_id='l', stamp_ns=s,
                         msg_cls=ts.types[zbag.POINTCLOUD2])
            w.write(conn, 10**9 + k, ts.serialize_cdr(msg, zbag.POINTCLOUD2))
    w.close()
    return path


def test_bag_bad_input(tmp_path):
    good = _write_raw_bag(tmp_path / 'good', [10, 20, 30])
    listing = r'/odom \[nav_msgs/msg/Odometry, 0 msgs\], /points \[sensor_msgs/msg/PointCloud2, 3 msgs\]'
    with pytest.raises(zbag.BagError, match=r"no topic '/lidar'; the bag has " + listing):
        list(zbag.iter_clouds(good, '/lidar'))
    with pytest.raises(zbag.BagError, match=r"'/odom' has type nav_msgs/msg/Odometry, expected sensor_msgs"):
        list(zbag.iter_clouds(good, '/odom'))
    with pytest.raises(zbag.BagError, match=r"'/points' has type sensor_msgs/msg/PointCloud2, expected nav"):
        list(zbag.iter_bag_pairs(good, '/points', '/points'))
    with pytest.raises(zbag.BagError, match=r"topic '/odom' has no messages"):
        zbag.read_odometry(good, '/odom')
    empty = _write_raw_bag(tmp_path / 'empty', [], with_msgs=False)
    with pytest.raises(zbag.BagError, match=r"'/points' has no messages; the bag has /odom"):
        list(zbag.iter_clouds(empty, '/points'))
    back = _write_raw_bag(tmp_path / 'back', [10, 30, 20])
    with pytest.raises(zbag.BagError, match=r'not increasing at messages 1, 2 \(30 then 20\); the bag has'):
        list(zbag.iter_clouds(back, '/points'))
    zero = _write_raw_bag(tmp_path / 'zero', [0, 0, 0])
    assert [c.stamp_ns for c in zbag.iter_clouds(zero, '/points')] == [10**9, 10**9 + 1, 10**9 + 2]
    mixed = _write_raw_bag(tmp_path / 'mixed', [0, 0, 5])
    with pytest.raises(zbag.BagError, match='mixes zero and non-zero header stamps'):
        list(zbag.iter_clouds(mixed, '/points'))
    with pytest.raises(zbag.BagError, match='bag not found'):
        zbag.bag_info(tmp_path / 'nope')
    with pytest.raises(zbag.BagError, match='sweep stamps must increase'):
        zbag.write_bag(tmp_path / 'w.mcap', [zbag.CloudRecord(5, np.zeros((1, 3)), {}),
                                             zbag.CloudRecord(5, np.zeros((1, 3)), {})])
    with pytest.raises(zbag.BagError, match='exists already'):
        zbag.write_bag(tmp_path / 'good', [])
    assert issubclass(zbag.BagError, DataError)


def test_truncated_mcap_reads_up_to_the_break(tmp_path):
    """Documented behaviour: an mcap without footer yields the clouds before the break, then stops."""
    bag_dir, _ = zbag.write_bag(tmp_path / 'full.mcap', zbag.records_from_sweeps(KITTI, start_ns=10**9))
    cut = tmp_path / 'cut'
    shutil.copytree(bag_dir, cut)
    f = cut / 'full.mcap'
    data = f.read_bytes()
    f.write_bytes(data[:len(data) // 2])
    clouds = list(zbag.iter_clouds(cut, '/lidar'))
    full = list(zbag.iter_clouds(bag_dir, '/lidar'))
    assert 0 < len(clouds) < 10
    for a, b in zip(clouds, full):
        assert a.stamp_ns == b.stamp_ns
        np.testing.assert_array_equal(a.cloud.xyz, b.cloud.xyz)
    f.write_bytes(data[:200])  # nothing readable left: a clear error, not an empty iterator
    with pytest.raises(zbag.BagError, match=r'cut: cannot open as a rosbag2'):
        list(zbag.iter_clouds(cut, '/lidar'))


def test_odometry_interpolation():
    T0, T1 = yaw_transform(0.0, (0, 0, 0)), yaw_transform(0.4, (2.0, -1.0, 0.5))
    track = zbag.OdometryTrack(np.array([100, 200]), np.stack([T0, T1]))
    np.testing.assert_allclose(track.at(150), yaw_transform(0.2, (1.0, -0.5, 0.25)), atol=1e-12)
    np.testing.assert_allclose(track.at(100), T0)
    np.testing.assert_allclose(track.at(200 + zbag.ODOM_TOLERANCE_NS), T1)
    assert track.at(200 + zbag.ODOM_TOLERANCE_NS + 1) is None
    assert track.at(100 - zbag.ODOM_TOLERANCE_NS - 1) is None


def test_cli_synth_delegates_to_training_package():
    from zeroflow_ros.cli import build_parser
    args = build_parser('data').parse_args(['data', 'synth', 'OUT', '--sequences', '3'])
    assert args.data_command == 'synth' and args.sequences == 3 and str(args.out) == 'OUT'


def test_cli_to_bag_and_info(small_log, tmp_path, capsys):
    from zeroflow_ros.cli import main
    assert main(['data', 'to-bag', str(small_log.parent), str(tmp_path / 'x.mcap'), '--frame-id', 'ego']) == 0
    out = capsys.readouterr().out
    assert 'wrote 3 sweeps of AV2 log log-a' in out and '/odom' in out
    # The poses also go to /tf as odom -> ego, for rviz.
    from rosbags.rosbag2 import Reader
    with Reader(tmp_path / 'x') as reader:
        conns = [c for c in reader.connections if c.topic == '/tf']
        msgs = [zbag.typestore().deserialize_cdr(raw, c.msgtype) for c, _, raw in reader.messages(conns)]
    assert len(msgs) == 3
    tf = msgs[2].transforms[0]
    assert (tf.header.frame_id, tf.child_frame_id) == ('odom', 'ego')
    np.testing.assert_allclose([tf.transform.translation.x, tf.transform.translation.y],
                               AV2Log(small_log).pose(TS[2])[:2, 3], atol=1e-9)
    assert main(['data', 'to-bag', str(KITTI), str(tmp_path / 'k.db3'), '--max-sweeps', '2']) == 0
    assert 'wrote 2 sweeps of sweep folder' in capsys.readouterr().out
    assert zbag.bag_info(tmp_path / 'k').storage == 'sqlite3'
    assert main(['data', 'info', str(tmp_path / 'x')]) == 0
    out = capsys.readouterr().out
    assert 'sensor_msgs/msg/PointCloud2' in out
    assert ("/lidar: frame 'ego', 1500x1 points, point_step 24, fields x:f32@0 y:f32@4 z:f32@8 "
            'intensity:f32@12 ring:u16@16 offset_ns:i32@20') in out
    assert main(['data', 'info', str(KITTI)]) == 0
    assert '10 .bin sweeps, first has 114278 points' in capsys.readouterr().out
    assert main(['data', 'to-bag', str(tmp_path / 'nothing-here'), str(tmp_path / 'y.mcap')]) == 2
    assert 'error:' in capsys.readouterr().err
