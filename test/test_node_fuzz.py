"""Fuzz zeroflow_node over real DDS: >= 1,000 malformed PointCloud2 messages, then a good pair.

Every message is accounted for: the expected error counts by kind come from how each message was
built (and, for frame/stamp changes, from the documented pairing rule replayed here), and must
equal the node's counters exactly; no 'internal' error (an exception the node did not foresee) is
allowed. Afterwards the node must still answer a good pair with the offline result.
"""
from __future__ import annotations

import collections
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from zeroflow_ros.testing import make_tiny_model
from zeroflow_ros.pipeline import PipelineConfig, make_motion_evidence

ROOT = Path(__file__).resolve().parents[1]
N_FUZZ = 1000
MAX_GAP_S = 0.35


# PointField datatypes -> numpy
DT = {1: 'i1', 2: 'u1', 3: 'i2', 4: 'u2', 5: 'i4', 6: 'u4', 7: 'f4', 8: 'f8'}


class Factory:
    """Builds rclpy PointCloud2 messages byte by byte (not with the codec under test)."""

    def __init__(self, seed: int):
        from sensor_msgs.msg import PointCloud2, PointField
        self.PointCloud2, self.PointField = PointCloud2, PointField
        self.rng = np.random.default_rng(seed)

    def layout(self, names=('x', 'y', 'z'), xyz_type=7, extra=0):
        """Random field order, offsets and padding: list of (name, offset, datatype, count), point_step."""
        rng = self.rng
        fields = [(n, xyz_type) for n in names]
        fields += [(f'extra{i}', int(rng.choice(list(DT)))) for i in range(extra)]
        order = rng.permutation(len(fields))
        out, off = [], 0
        for i in order:
            name, dt = fields[i]
            off += int(rng.integers(0, 3))  # padding
            out.append((name, off, dt, 1))
            off += np.dtype(DT[dt]).itemsize
        return out, off + int(rng.integers(0, 5))

    def msg(self, fields, point_step, width, height=1, data=None, row_step=None, big=False,
            frame_id='f', stamp_ns=0):
        m = self.PointCloud2()
        m.header.frame_id = frame_id
        m.header.stamp.sec, m.header.stamp.nanosec = divmod(int(stamp_ns), 1_000_000_000)
        m.height, m.width = int(height), int(width)
        m.fields = [self.PointField(name=n, offset=int(o), datatype=int(d), count=int(c))
                    for n, o, d, c in fields]
        m.point_step = int(point_step)
        m.row_step = int(point_step * width if row_step is None else row_step)
        m.is_bigendian = bool(big)
        m.is_dense = False
        if data is None:
            data = self.rng.integers(0, 256, m.row_step * m.height, dtype=np.uint8).tobytes()
        m.data = bytes(data)
        return m

    def cloud(self, xyz, xyz_type=7, big=False, frame_id='f', stamp_ns=0, extra=1):
        """A structurally valid cloud of ``xyz`` (may hold NaN) in a random layout."""
        fields, step = self.layout(xyz_type=xyz_type, extra=extra)
        n = len(xyz)
        buf = self.rng.integers(0, 256, (n, step), dtype=np.uint8)
        order = '>' if big else '<'
        for name, off, dt, _ in fields:
            if name in 'xyz':
                col = xyz[:, 'xyz'.index(name)]
                size = np.dtype(DT[dt]).itemsize
                buf[:, off:off + size] = np.asarray(col, order + DT[dt]).reshape(-1, 1).view(np.uint8)
        return self.msg(fields, step, n, data=buf.tobytes(), big=big, frame_id=frame_id, stamp_ns=stamp_ns)


def malformed(f: Factory, kind: str, stamp_ns: int):
    """One message of a kind that must be rejected; returns (msg, expected error kind)."""
    rng = f.rng
    n = int(rng.integers(1, 300))
    if kind == 'missing_field':
        drop = str(rng.choice(list('xyz')))
        fields, step = f.layout(names=tuple(a for a in 'xyz' if a != drop), extra=1)
        return f.msg(fields, step, n, stamp_ns=stamp_ns), 'decode'
    if kind == 'small_point_step':
        fields, step = f.layout()
        return f.msg(fields, int(rng.integers(0, max(f_end(fields), 1))), n, stamp_ns=stamp_ns,
                     data=b'\0' * 7), 'decode'
    if kind == 'data_length':
        fields, step = f.layout()
        size = step * n + int(rng.choice([-1, 1])) * int(rng.integers(1, step + 1))
        return f.msg(fields, step, n, data=rng.integers(0, 256, max(size, 0), dtype=np.uint8).tobytes(),
                     stamp_ns=stamp_ns), 'decode'
    if kind == 'bad_datatype':
        fields, step = f.layout()
        i = int(rng.integers(0, len(fields)))
        name, off, _, c = fields[i]
        fields[i] = (name, off, int(rng.choice([0, 9, 42, 255])), c)
        return f.msg(fields, step + 8, n, stamp_ns=stamp_ns), 'decode'
    if kind == 'bad_count':
        fields, step = f.layout()
        name, off, dt, _ = fields[0]
        fields[0] = (name, off, dt, int(rng.choice([0, 2, 3])) if name in 'xyz' else 1)
        if name not in 'xyz':  # make sure an axis gets the bad count
            j = next(k for k, fl in enumerate(fields) if fl[0] in 'xyz')
            fields[j] = (fields[j][0], fields[j][1], fields[j][2], 0)
        return f.msg(fields, step + 16, n, stamp_ns=stamp_ns), 'decode'
    if kind == 'garbage':
        fields = [(str(rng.choice(['x', 'y', 'z', 'i', '', 'x'])), int(rng.integers(0, 40)),
                   int(rng.integers(0, 12)), int(rng.integers(0, 3))) for _ in range(int(rng.integers(0, 6)))]
        step = int(rng.integers(0, 48))
        h, w = int(rng.integers(0, 4)), int(rng.integers(0, 500))
        size = step * w * h + 1 + int(rng.integers(0, 64))  # never the right length
        return f.msg(fields, step, w, height=h, data=rng.integers(0, 256, size, dtype=np.uint8).tobytes(),
                     stamp_ns=stamp_ns, big=bool(rng.integers(0, 2))), 'decode'
    if kind == 'row_step':
        fields, step = f.layout()
        return f.msg(fields, step, n, height=2, row_step=step * n - 1, data=b'\0' * (2 * (step * n - 1)),
                     stamp_ns=stamp_ns), 'decode'
    if kind == 'huge_claim':
        fields, step = f.layout()
        return f.msg(fields, step, 2_000_000, data=b'\0' * 1024, stamp_ns=stamp_ns), 'decode'
    if kind == 'empty':
        fields, step = f.layout()
        return f.msg(fields, step, 0, data=b'', stamp_ns=stamp_ns), 'empty'
    if kind == 'all_nan':
        xyz = np.full((n, 3), np.nan)
        xyz[rng.random(n) < 0.5, 0] = np.inf
        return f.cloud(xyz, xyz_type=int(rng.choice([7, 8])), big=bool(rng.integers(0, 2)),
                       stamp_ns=stamp_ns), 'all_nan'
    raise AssertionError(kind)


def f_end(fields):
    return max(o + np.dtype(DT[d]).itemsize * c for _, o, d, c in fields)


BAD_KINDS = ('missing_field', 'small_point_step', 'data_length', 'bad_datatype', 'bad_count', 'garbage',
             'row_step', 'huge_claim', 'empty', 'all_nan')


@pytest.fixture(scope='module')
def node_env(tmp_path_factory):
    pytest.importorskip('rclpy')
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.parameter import Parameter
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import PointCloud2

    from zeroflow_ros.node import ZeroFlowNode
    from zeroflow_ros.testing import ros_context, wait_for_matched

    model = make_tiny_model(tmp_path_factory.mktemp('fuzzmodel') / 'model.pt')
    with ros_context() as ctx:
        params = [Parameter('model', value=str(model)), Parameter('backend', value='torch'),
                  Parameter('device', value='cpu'), Parameter('ego_motion', value='none'),
                  Parameter('input_reliability', value='reliable'), Parameter('max_points', value=100_000),
                  Parameter('skip_when_no_subscribers', value=False), Parameter('warmup_iterations', value=0),
                  Parameter('max_sweep_gap_s', value=MAX_GAP_S),
                  Parameter('latency_budget_ms', value=10000.0)]
        node = ZeroFlowNode('zf_fuzz', context=ctx, parameter_overrides=params)
        probe = rclpy.create_node('zf_fuzz_probe', context=ctx)
        flows: list = []
        probe.create_subscription(PointCloud2, '/zf_fuzz/output/flow', flows.append, 10)
        pub = probe.create_publisher(PointCloud2, '/zf_fuzz/input/pointcloud',
                                     QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE))
        ex = SingleThreadedExecutor(context=ctx)
        ex.add_node(node)
        ex.add_node(probe)
        spin = threading.Thread(target=ex.spin, daemon=True)
        spin.start()
        wait_for_matched(pub)
        try:
            yield node, pub, flows
        finally:
            ex.shutdown()
            spin.join(5)
            node.destroy_node()
            probe.destroy_node()


def send(node, pub, msg, timeout=30.0):
    """Publish one message and wait until the node has received and finished it."""
    before = node.stats.received
    pub.publish(msg)
    deadline = time.monotonic() + timeout
    while node.stats.received == before or not node.wait_idle(0.0):
        if time.monotonic() > deadline:
            raise AssertionError(f'message not handled within {timeout} s: {node.stats}')
        time.sleep(0.0005)


def test_fuzz_then_good_pair(node_env):
    from zeroflow_ros.backends import create_backend  # noqa: F401  (same backend object is used below)
    from zeroflow_ros.core import preprocess
    node, pub, flows = node_env
    assert node.diagnostic_status().message == 'waiting for first frame'
    f = Factory(seed=1234)
    rng = f.rng
    expected = collections.Counter()
    flows_expected = 0
    prev = None  # (frame_id, stamp) of the sweep the pipeline holds, replayed from the pairing rule
    stamp = 10 * 1_000_000_000
    sent = 0

    def accept(frame_id, t):
        nonlocal prev, flows_expected
        if prev is not None and frame_id != prev[0]:
            expected['frame_id_changed'] += 1
        elif prev is not None and t <= prev[1]:
            expected['stamp_backwards'] += 1
        elif prev is not None and (t - prev[1]) * 1e-9 <= MAX_GAP_S:
            flows_expected += 1
        prev = (frame_id, t)

    while sent < N_FUZZ:
        stamp += 100_000_000
        r = rng.random()
        if r < 0.06:  # structurally valid, odd but acceptable: other dtypes, endianness, some NaN rows
            n = int(rng.integers(5, 300))
            xyz = rng.uniform(-60, 60, (n, 3))
            xyz[rng.random(n) < 0.2] = np.nan
            xyz[rng.random(n) < 0.05] = rng.choice([-1e30, 1e30, 3e38])  # finite but absurd
            xyz[0] = rng.uniform(-20, 20, 3)  # at least one finite point
            xyz_type = int(rng.choice([7, 8, 3]))
            if xyz_type == 7:
                xyz = np.clip(xyz, -3e38, 3e38)
            frame_id, t = 'f', stamp
            if rng.random() < 0.25:
                frame_id = str(rng.choice(['f', 'g']))
            if rng.random() < 0.2:
                t = stamp - int(rng.integers(1, 5)) * 100_000_000
            if xyz_type == 3:
                xyz = np.clip(np.where(np.isfinite(xyz), np.round(xyz), 0), -32768, 32767)  # int16: no NaN
            send(node, pub, f.cloud(xyz, xyz_type=xyz_type, big=bool(rng.integers(0, 2)),
                                    frame_id=frame_id, stamp_ns=t))
            accept(frame_id, t)
        else:
            kind = BAD_KINDS[int(rng.integers(0, len(BAD_KINDS)))]
            msg, err = malformed(f, kind, stamp)
            send(node, pub, msg)
            expected[err] += 1
        sent += 1

    # one real 2 M-point cloud: clipped to max_points (evenly strided), reported, still processed
    big = rng.uniform(-40, 40, (2_000_000, 3)).astype(np.float32)
    stamp += 100_000_000
    send(node, pub, f.cloud(big, extra=0, frame_id='f', stamp_ns=stamp), timeout=60)
    accept('f', stamp)

    # every family of bad input really occurred
    assert expected['decode'] > 500 and min(expected[k] for k in ('empty', 'all_nan', 'frame_id_changed',
                                                                  'stamp_backwards')) > 0, expected
    s = node.stats
    assert s.received == N_FUZZ + 1 and s.processed == N_FUZZ + 1 and s.dropped_stale == 0
    assert s.errors.get('internal', 0) == 0, s.last_error
    assert dict(s.errors) == dict(expected), (dict(s.errors), dict(expected))
    assert s.clipped == 1
    assert s.published == flows_expected
    st = node.diagnostic_status()
    values = {kv.key: kv.value for kv in st.values}
    assert values['errors_total'] == str(sum(expected.values()))
    assert values['errors.decode'] == str(expected['decode']) and values['clipped'] == '1'

    # only errors for longer than error_after_s: ERROR 'failing'
    from rclpy.parameter import Parameter
    assert node.set_parameters([Parameter('error_after_s', value=0.1)])[0].successful
    stamp += 100_000_000
    send(node, pub, malformed(f, 'missing_field', stamp)[0])
    time.sleep(0.15)
    send(node, pub, malformed(f, 'garbage', stamp)[0])
    st = node.diagnostic_status()
    assert st.level == b'\x02' and st.message.startswith('failing'), st.message
    node.set_parameters([Parameter('error_after_s', value=5.0)])

    # the node still answers a good pair correctly (a gap first, so the pair starts fresh)
    n_flows = len(flows)
    p0 = rng.uniform([-40, -40, -2], [40, 40, 3], (5000, 3)).astype(np.float32)
    p1 = (p0 + rng.normal(0, 0.05, p0.shape)).astype(np.float32)
    t0 = stamp + 2_000_000_000
    send(node, pub, f.cloud(p0, frame_id='f', stamp_ns=t0))
    send(node, pub, f.cloud(p1, frame_id='f', stamp_ns=t0 + 100_000_000))
    deadline = time.monotonic() + 10
    while len(flows) < n_flows + 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(flows) >= n_flows + 1
    msg = flows[-1]
    assert msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec == t0
    prep = preprocess.prepare_pair(p0, p1, np.eye(4), preprocess.PreprocessConfig(ground='geometric'))
    flow_k, valid_k = node.pipeline.backend.infer(prep.pc0, prep.pc1)
    flow_k = make_motion_evidence(PipelineConfig())(flow_k, valid_k, prep.pc0, prep.pc1, np.eye(4), dt_s=0.1)
    ref = np.zeros((len(p0), 3), np.float32)
    ref[prep.mask0] = np.where(valid_k[:, None], flow_k, 0)
    raw = np.frombuffer(bytes(msg.data), np.uint8).reshape(-1, msg.point_step)
    off = {fl.name: fl.offset for fl in msg.fields}
    got = np.stack([raw[:, off[k]:off[k] + 4].copy().view('<f4').ravel()
                    for k in ('flow_x', 'flow_y', 'flow_z')], 1)
    xyz = np.stack([raw[:, off[k]:off[k] + 4].copy().view('<f4').ravel() for k in 'xyz'], 1)
    assert np.array_equal(xyz, p0)
    assert np.abs(got - ref).max() <= 1e-5
    assert node.diagnostic_status().level in (b'\x00', b'\x01')  # recovered: no longer ERROR


class SlowBackend:
    """A real backend made slow, as on an overloaded CPU (sleeps, results unchanged)."""

    def __init__(self, inner, delay_s: float):
        self.inner, self.delay_s = inner, delay_s

    def infer(self, p0, p1):
        time.sleep(self.delay_s)
        return self.inner.infer(p0, p1)

    def describe(self):
        return self.inner.describe()


def test_overload_drops_but_pairs_consecutive_sweeps(node_env):
    """Input faster than processing: latest wins, drops are counted, and every flow still spans one
    sweep interval (the skipped predecessor is fed first) with the offline values for that pair."""
    from zeroflow_ros.core import preprocess
    node, pub, flows = node_env
    real = node.pipeline.backend
    node.pipeline.backend = SlowBackend(real, 0.35)
    rng = np.random.default_rng(5)
    base = rng.uniform([-40, -40, -2], [40, 40, 3], (3000, 3)).astype(np.float32)
    clouds = [(base + k * np.float32([0.3, 0, 0]) * (np.arange(3000)[:, None] % 2)).astype(np.float32)
              for k in range(10)]
    f = Factory(seed=9)
    t0 = 500 * 10**9
    n_flows, s0 = len(flows), dataclass_copy(node.stats)
    try:
        for k, c in enumerate(clouds):
            pub.publish(f.cloud(c, frame_id='ov', stamp_ns=t0 + k * 100_000_000))
            time.sleep(0.1)
        assert node.wait_idle(30)
        time.sleep(0.2)
    finally:
        node.pipeline.backend = real
    s = node.stats
    received = s.received - s0['received']
    dropped = s.dropped_stale - s0['dropped_stale']
    out = flows[n_flows:]
    assert received == 10 and dropped >= 2 and len(out) >= 2, (received, dropped, len(out))
    assert s.published - s0['published'] == len(out)
    # bounded: a message waits for at most the frame in work, then its own frame; never a queue
    latest = list(s.latencies_ms)[-len(out):]
    assert max(latest) <= 2 * max(list(s.totals_ms)[-len(out):]) + 500, (latest, list(s.totals_ms))
    for msg in out:
        k = (msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec - t0) // 100_000_000
        p0, p1 = clouds[k], clouds[k + 1]  # consecutive, even though frames were dropped
        prep = preprocess.prepare_pair(p0, p1, np.eye(4), preprocess.PreprocessConfig(ground='geometric'))
        flow_k, valid_k = real.infer(prep.pc0, prep.pc1)
        flow_k = make_motion_evidence(PipelineConfig())(flow_k, valid_k, prep.pc0, prep.pc1, np.eye(4),
                                                        dt_s=0.1)
        ref = np.zeros((len(p0), 3), np.float32)
        ref[prep.mask0] = np.where(valid_k[:, None], flow_k, 0)
        raw = np.frombuffer(bytes(msg.data), np.uint8).reshape(-1, msg.point_step)
        off = {fl.name: fl.offset for fl in msg.fields}
        got = np.stack([raw[:, off[c]:off[c] + 4].copy().view('<f4').ravel()
                        for c in ('flow_x', 'flow_y', 'flow_z')], 1)
        assert np.abs(got - ref).max() <= 1e-5
        speed = raw[:, off['speed']:off['speed'] + 4].copy().view('<f4').ravel()
        assert np.allclose(speed, np.linalg.norm(ref, axis=1) / 0.1, atol=1e-4)  # dt = 0.1 s


def dataclass_copy(stats):
    return {'received': stats.received, 'dropped_stale': stats.dropped_stale, 'published': stats.published}
