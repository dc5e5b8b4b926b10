"""zeroflow replay: a synthetic sequence bag through a real `zeroflow node` process over DDS.

* --rate 1.0 and --rate 0: exactly one flow per sweep after the first, recorded in a new mcap bag
  that reads back with rosbags and with the plain mcap reader; the flow clouds carry the input
  points unchanged (checked against the input bag) and the input stamps.
* bad bags: unknown topic, wrong type, empty, not a bag, truncated (replays up to the break).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip('rclpy')

SWEEPS = 4
SPACING_NS = 300_000_000  # 3.3 Hz: a loaded CI core still keeps up at --rate 1.0 (gap limit 0.35 s)


def tiny_model(path: Path) -> Path:
    """Randomly initialised, very small FastFlow3D: fast on one CPU core."""
    import torch

    from zeroflow_ros.model import build_model, get_config, save_checkpoint
    torch.manual_seed(0)
    cfg = get_config('cpu_small', pillar_size=0.8, embed_channels=8, stage_channels=(8, 16),
                     stage_blocks=(1, 1), head_hidden=8)
    return save_checkpoint(path, build_model(cfg))


@pytest.fixture(scope='module')
def assets(tmp_path_factory):
    from zeroflow_ros.data.av2 import list_logs
    from zeroflow_ros.data.bag import records_from_av2_log, write_bag
    from zeroflow_training.data.synth import make_tiny_dataset
    tmp = tmp_path_factory.mktemp('replay')
    root = make_tiny_dataset(tmp / 'synth', logs=1, sweeps=SWEEPS, beams=8, azimuths=400)
    log_dir = list_logs(root, 'val')[0].log_dir
    recs = list(records_from_av2_log(log_dir))
    t0 = recs[0].stamp_ns
    for k, r in enumerate(recs):
        r.stamp_ns = t0 + k * SPACING_NS
    bag, n = write_bag(tmp / 'in.mcap', recs, topic='/lidar', odom_topic='/odom')
    assert n == SWEEPS
    return {'bag': bag, 'records': recs, 'model': tiny_model(tmp / 'model.pt'), 'tmp': tmp}


def _replay(assets, rate: float, name: str):
    from zeroflow_ros.replay import ReplayConfig, replay
    cfg = ReplayConfig(bag=assets['bag'], topic='/lidar', odom='/odom', rate=rate,
                       record=assets['tmp'] / f'{name}.mcap', node_name=name,
                       node_params=[f'model:={assets["model"]}', 'backend:=torch', 'device:=cpu',
                                    'warmup_iterations:=1', 'latency_budget_ms:=10000.0'],
                       timeout=90.0, frame_timeout=30.0, node_log=assets['tmp'] / f'{name}.log')
    return replay(cfg)


def _xyz(msg) -> np.ndarray:
    """x, y, z of a PointCloud2 read with plain numpy (not the codec under test)."""
    offs = {f.name: f.offset for f in msg.fields}
    raw = np.frombuffer(bytes(msg.data), np.uint8).reshape(-1, msg.point_step)
    return np.stack([raw[:, offs[c]:offs[c] + 4].copy().view('<f4').reshape(-1) for c in 'xyz'], axis=1)


def _check_recording(assets, record: Path, name: str) -> None:
    from mcap.reader import make_reader
    from rosbags.rosbag2 import Reader

    from zeroflow_ros.data.bag import typestore
    recs = assets['records']
    flow_topic = f'/{name}/output/flow'
    ts = typestore()
    flows = []
    with Reader(record) as reader:
        types = {c.topic: c.msgtype for c in reader.connections}
        assert types[flow_topic] == 'sensor_msgs/msg/PointCloud2'
        assert types[f'/{name}/output/flow_markers'] == 'visualization_msgs/msg/Marker'
        assert types['/diagnostics'] == 'diagnostic_msgs/msg/DiagnosticArray'
        assert types[f'/{name}/debug/total_ms'] == 'std_msgs/msg/Float64'
        conns = [c for c in reader.connections if c.topic == flow_topic]
        for conn, _, raw in reader.messages(connections=conns):
            flows.append(ts.deserialize_cdr(raw, conn.msgtype))
    assert len(flows) == SWEEPS - 1
    for k, msg in enumerate(flows):
        stamp = msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec
        assert stamp == recs[k].stamp_ns
        assert {'flow_x', 'flow_y', 'flow_z', 'speed', 'is_dynamic'} <= {f.name for f in msg.fields}
        np.testing.assert_array_equal(_xyz(msg), recs[k].points.astype(np.float32))

    # The same file through the plain mcap reader: ros2msg schemas, cdr messages.
    files = list(Path(record).glob('*.mcap'))
    assert len(files) == 1 and (Path(record) / 'metadata.yaml').is_file()
    with open(files[0], 'rb') as fh:
        r = make_reader(fh)
        n = 0
        for schema, channel, message in r.iter_messages(topics=[flow_topic]):
            assert schema.name == 'sensor_msgs/msg/PointCloud2' and schema.encoding == 'ros2msg'
            assert b'sensor_msgs/PointField[] fields' in schema.data  # full definition for Foxglove
            assert channel.message_encoding == 'cdr'
            n += 1
    assert n == SWEEPS - 1


def test_replay_cli_rate_1_records_one_flow_per_sweep(ros_domain, assets, capsys):
    from zeroflow_ros.cli import main
    name = 'zf_replay_rt'
    rec = assets['tmp'] / f'{name}.mcap'
    argv = ['replay', str(assets['bag']), '--topic', '/lidar', '--odom', '/odom', '--rate', '1.0',
            '--record', str(rec), '--node-name', name, '--timeout', '90', '--frame-timeout', '30',
            '--node-log', str(assets['tmp'] / f'{name}.log'), '--json', str(assets['tmp'] / 'rt.json')]
    for p in (f'model:={assets["model"]}', 'backend:=torch', 'device:=cpu', 'warmup_iterations:=1'):
        argv += ['--node-param', p]
    t0 = time.monotonic()
    rc = main(argv)
    wall = time.monotonic() - t0
    out, err = capsys.readouterr()
    assert rc == 0, err[-4000:]
    frames = [line for line in out.splitlines() if line.startswith('sweep ')]
    assert len(frames) == SWEEPS - 1, out
    assert (f'replay: sweeps in {SWEEPS}, flows out {SWEEPS - 1}/{SWEEPS - 1}, dropped 0, frame timeouts 0'
            in out), out
    assert 'backend torch/cpu' in out
    js = json.loads((assets['tmp'] / 'rt.json').read_text())
    assert (js['sweeps_in'], js['flows_out'], js['dropped']) == (SWEEPS, SWEEPS - 1, 0)
    assert js['backend'] == 'torch'
    assert [f['stamp_ns'] for f in js['frames']] == [r.stamp_ns for r in assets['records'][:-1]]
    assert js['latency_p50_ms'] > 0
    _check_recording(assets, rec.with_suffix(''), name)
    # Real-time pacing: the sweeps went out over (SWEEPS-1) x 0.3 s, not at once.
    assert wall >= (SWEEPS - 1) * SPACING_NS / 1e9


def test_replay_rate_0_lossless(ros_domain, assets):
    name = 'zf_replay_max'
    summary = _replay(assets, 0.0, name)
    assert (summary.sweeps_in, summary.expected, summary.flows_out) == (SWEEPS, SWEEPS - 1, SWEEPS - 1), \
        summary.line()
    assert summary.dropped == 0 and summary.frame_timeouts == 0 and not summary.truncated
    assert all(np.isfinite(summary.latencies_ms)) and min(summary.latencies_ms) > 0
    assert summary.backend == 'torch' and summary.device == 'cpu'
    for topic in ('output/flow', 'output/flow_markers', 'debug/total_ms', 'debug/inference_ms'):
        assert summary.recorded[f'/{name}/{topic}'] == SWEEPS - 1, summary.recorded
    assert all(np.isfinite(f.node_total_ms) and f.node_total_ms > 0 for f in summary.frames)
    assert summary.node_diagnostics.get('flows_published') == str(SWEEPS - 1)
    _check_recording(assets, summary.record, name)


# ---------------------------------------------------------------------------------- bad input

def test_bad_topics_list_the_bag(assets):
    from zeroflow_ros.replay import ReplayConfig, ReplayError, replay
    with pytest.raises(ReplayError,
                       match=r"'/nope' is not in the bag.*/lidar \[sensor_msgs/msg/PointCloud2, 4"):
        replay(ReplayConfig(bag=assets['bag'], topic='/nope'))
    with pytest.raises(ReplayError, match=r"'/odom' has type nav_msgs/msg/Odometry, expected "
                                          r"sensor_msgs/msg/PointCloud2.*/lidar"):
        replay(ReplayConfig(bag=assets['bag'], topic='/odom'))
    with pytest.raises(ReplayError, match=r"--odom '/lidar' has type sensor_msgs/msg/PointCloud2"):
        replay(ReplayConfig(bag=assets['bag'], topic='/lidar', odom='/lidar'))
    with pytest.raises(ReplayError, match='--rate'):
        ReplayConfig(bag=assets['bag'], rate=-1)
    with pytest.raises(ReplayError, match='--max-sweeps'):
        ReplayConfig(bag=assets['bag'], max_sweeps=0)


def test_empty_and_not_a_bag(tmp_path):
    from rosbags.rosbag2 import StoragePlugin, Writer

    from zeroflow_ros.data.bag import typestore
    from zeroflow_ros.replay import ReplayConfig, ReplayError, replay
    w = Writer(tmp_path / 'empty', version=Writer.VERSION_LATEST, storage_plugin=StoragePlugin.MCAP)
    w.open()
    w.add_connection('/lidar', 'sensor_msgs/msg/PointCloud2', typestore=typestore())
    w.close()
    with pytest.raises(ReplayError, match='empty|no messages'):
        replay(ReplayConfig(bag=tmp_path / 'empty'))
    junk = tmp_path / 'junk.mcap'
    junk.write_bytes(b'not an mcap file at all' * 10)
    with pytest.raises(ReplayError, match='cannot open'):
        replay(ReplayConfig(bag=junk))
    with pytest.raises(ReplayError, match='not found'):
        replay(ReplayConfig(bag=tmp_path / 'missing.mcap'))


def test_truncated_bag_replays_up_to_the_break(tmp_path):
    from zeroflow_ros.data.bag import CloudRecord, write_bag
    from zeroflow_ros.replay import iter_messages, open_bag
    rng = np.random.default_rng(0)
    # 1.6 MB clouds: larger than an mcap chunk, so a cut file still holds whole chunks before the break.
    recs = [CloudRecord(10**9 + k * 10**8, rng.normal(size=(100_000, 3)).astype(np.float32), {})
            for k in range(5)]
    bag, _ = write_bag(tmp_path / 'full.mcap', recs)
    src = next(bag.glob('*.mcap'))
    full = list(iter_messages(bag, '/lidar', []))
    assert [m.stamp_ns for m in full] == [r.stamp_ns for r in recs]
    cut = tmp_path / 'cut'
    cut.mkdir()
    data = src.read_bytes()
    (cut / src.name).write_bytes(data[:int(len(data) * 0.6)])
    _, odom, n_listed = open_bag(cut / src.name, '/lidar', None)
    part = list(iter_messages(cut / src.name, '/lidar', odom))
    assert 1 <= len(part) < len(full)
    for a, b in zip(part, full):
        assert a.raw == b.raw and a.stamp_ns == b.stamp_ns


def test_odometry_goes_out_before_the_cloud_it_brackets(assets):
    from zeroflow_ros.replay import BagMessage, iter_messages
    clouds = [r.stamp_ns for r in assets['records']]
    # odometry 50 ms after each cloud (as a 10 Hz odometry source out of phase with the lidar)
    odom = [BagMessage(s + 50_000_000, s + 50_000_000, 'odom', b'') for s in clouds]
    seq = [(m.kind, m.stamp_ns) for m in iter_messages(assets['bag'], '/lidar', odom)]
    for k, s in enumerate(clouds):
        i = seq.index(('cloud', s))
        before = [t for kind, t in seq[:i] if kind == 'odom']
        assert before and before[-1] >= s, 'a pose at/after the stamp must precede the cloud'
        assert k == 0 or any(t <= s for t in before), 'and one at/before it'
    assert [t for kind, t in seq if kind == 'odom'] == sorted(m.stamp_ns for m in odom)


def test_sqlite3_bag_reads_like_mcap(assets, tmp_path):
    from zeroflow_ros.data.bag import write_bag
    from zeroflow_ros.replay import iter_messages, open_bag
    db, _ = write_bag(tmp_path / 'same.db3', assets['records'], topic='/lidar', odom_topic='/odom')
    a = list(iter_messages(db, '/lidar', open_bag(db, '/lidar', '/odom')[1]))
    b = list(iter_messages(assets['bag'], '/lidar', open_bag(assets['bag'], '/lidar', '/odom')[1]))
    assert [(m.kind, m.stamp_ns, m.raw) for m in a] == [(m.kind, m.stamp_ns, m.raw) for m in b]
    assert [m.kind for m in a].count('cloud') == SWEEPS


def test_stamp_from_cdr_matches_rosbags(assets):
    from rosbags.rosbag2 import Reader

    from zeroflow_ros.data.bag import typestore
    from zeroflow_ros.replay import _stamp_from_cdr
    ts = typestore()
    with Reader(assets['bag']) as r:
        for conn, _, raw in r.messages():
            msg = ts.deserialize_cdr(raw, conn.msgtype)
            stamp = msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec
            assert _stamp_from_cdr(raw, conn.msgtype) == stamp


def test_no_node_times_out_naming_the_topic(ros_domain, assets):
    from zeroflow_ros.replay import ReplayConfig, ReplayError, replay
    with pytest.raises(ReplayError, match=r'no publisher on /nobody/output/flow'):
        replay(ReplayConfig(bag=assets['bag'], no_node=True, node_name='nobody', timeout=1.0))


def test_node_that_cannot_start_is_reported_with_its_log(ros_domain, assets):
    from zeroflow_ros.replay import ReplayConfig, ReplayError, replay
    cfg = ReplayConfig(bag=assets['bag'], node_name='zf_bad', timeout=60.0,
                       node_params=[f'model:={assets["tmp"] / "no_such_model.pt"}', 'backend:=torch'])
    with pytest.raises(ReplayError, match=r'(?s)zeroflow node exited with code 1.*no_such_model'):
        replay(cfg)


def test_cli_reports_bad_topic(assets, capsys):
    from zeroflow_ros.cli import main
    assert main(['replay', str(assets['bag']), '--topic', '/nope']) == 2
    err = capsys.readouterr().err
    assert '/nope' in err and '/lidar [sensor_msgs/msg/PointCloud2' in err


def test_node_command(tmp_path):
    from zeroflow_ros.replay import ReplayConfig, node_command
    cmd = node_command(ReplayConfig(bag=tmp_path, topic='/points', odom='/odom', node_name='zf',
                                    node_params=['backend:=torch']))
    i = cmd.index('--ros-args')
    assert cmd[i:] == ['--ros-args', '-r', '__node:=zf', '-r', '~/input/pointcloud:=/points',
                       '-p', 'use_sim_time:=true', '-p', 'ego_motion:=odometry',
                       '-r', '~/input/odometry:=/odom', '-p', 'backend:=torch']
