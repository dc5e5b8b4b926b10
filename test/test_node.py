"""zeroflow_node over real rclpy/DDS: in-process and as a separate `zeroflow node` process.

* in-process: a synthetic sequence (engineer B's simulator, exact poses) with nav_msgs/Odometry
  published at 10 Hz -> one flow message per sweep after the first, fields right, values equal
  (<= 1e-5 m) to the backend run offline on the same pair compensated with the *true* ego motion;
  markers, debug timings and diagnostics checked on the wire.
* separate process (`zeroflow node --params-file ... --ros-args -r __node:=...`): 100k-point clouds
  at 10 Hz from another process arrive 20/20 from a reliable and from a best-effort publisher with
  the shipped Fast DDS profile (input_reliability auto re-subscribes when the publisher changes),
  then a good pair comes back equal to the offline result.

Run as a script (``python test/test_node.py publish ...``) this file is the publisher process.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from zeroflow_ros.testing import make_tiny_model

ROOT = Path(__file__).resolve().parents[1]
PROFILE = ROOT / 'config' / 'fastdds_large_data.xml'


def offline_flow(backend, p0, p1, ego1_T_ego0, ground='geometric', dt_s=0.1):
    """The offline reference (what `zeroflow predict` computes): prepare_pair + infer + the default
    motion-evidence check (tested on its own in test_static_residual/test_pipeline) + scatter."""
    from zeroflow_ros.core import preprocess
    from zeroflow_ros.pipeline import PipelineConfig, make_motion_evidence
    prep = preprocess.prepare_pair(p0, p1, ego1_T_ego0, preprocess.PreprocessConfig(ground=ground))
    flow_k, valid_k = backend.infer(prep.pc0, prep.pc1)
    evidence = make_motion_evidence(PipelineConfig())
    flow_k = evidence(flow_k, valid_k, prep.pc0, prep.pc1, ego1_T_ego0, dt_s=dt_s)
    flow = np.zeros((len(p0), 3), np.float32)
    flow[prep.mask0] = np.where(valid_k[:, None], flow_k, 0)
    valid = np.zeros(len(p0), bool)
    valid[prep.mask0] = valid_k
    return flow, valid


def field_array(msg, name):
    """One field of a PointCloud2, read with plain numpy (independent of the codec under test)."""
    f = {x.name: x for x in msg.fields}[name]
    dtype = {7: np.float32, 2: np.uint8}[f.datatype]
    raw = np.frombuffer(bytes(msg.data), np.uint8).reshape(-1, msg.point_step)
    return raw[:, f.offset:f.offset + np.dtype(dtype).itemsize].copy().view(dtype).reshape(-1)


# ------------------------------------------------------------------------------ in-process fixture

@pytest.fixture(scope='module')
def ros(tmp_path_factory):
    pytest.importorskip('rclpy')
    from zeroflow_ros.testing import ros_context
    with ros_context() as ctx:
        yield ctx


@pytest.fixture(scope='module')
def tiny_model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp('model') / 'model.pt')


@pytest.fixture(scope='module')
def synth_log(tmp_path_factory):
    from zeroflow_ros.data.av2 import list_logs
    from zeroflow_training.data.synth import make_tiny_dataset
    root = make_tiny_dataset(tmp_path_factory.mktemp('synth'), logs=1, sweeps=5)
    return list_logs(root, 'val')[0]


def test_sequence_with_odometry_in_process(ros, tiny_model, synth_log):
    import rclpy
    from diagnostic_msgs.msg import DiagnosticArray
    from nav_msgs.msg import Odometry
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.parameter import Parameter
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import PointCloud2
    from std_msgs.msg import Float64
    from visualization_msgs.msg import Marker

    from zeroflow_ros.core import geometry
    from zeroflow_ros.core import pointcloud2 as pc2
    from zeroflow_ros.node import ZeroFlowNode
    from zeroflow_ros.testing import wait_for, wait_for_matched

    params = [Parameter('model', value=str(tiny_model)), Parameter('backend', value='torch'),
              Parameter('device', value='cpu'), Parameter('ego_motion', value='odometry'),
              Parameter('odometry_wait_s', value=1.0), Parameter('latency_budget_ms', value=10000.0),
              Parameter('dynamic_threshold_mps', value=0.5), Parameter('marker_decimation', value=1),
              Parameter('marker_max_arrows', value=5000),  # every dynamic point: checked one by one
              Parameter('warmup_iterations', value=1), Parameter('diagnostics_period_s', value=0.2)]
    node = ZeroFlowNode('zf_test', context=ros, parameter_overrides=params)
    probe = rclpy.create_node('zf_probe', context=ros)
    flows, markers, diags, debug = [], [], [], {}
    probe.create_subscription(PointCloud2, '/zf_test/output/flow', flows.append, 10)
    probe.create_subscription(Marker, '/zf_test/output/flow_markers', markers.append, 10)
    probe.create_subscription(DiagnosticArray, '/diagnostics', diags.append, 10)
    be = QoSProfile(depth=10, reliability=ReliabilityPolicy.BEST_EFFORT)
    for k in ('preprocess', 'inference', 'postprocess', 'total', 'pipeline_latency'):
        probe.create_subscription(Float64, f'/zf_test/debug/{k}_ms',
                                  lambda m, k=k: debug.setdefault(k, []).append(m.data), be)
    cloud_pub = probe.create_publisher(PointCloud2, '/zf_test/input/pointcloud', 1)  # reliable
    odom_pub = probe.create_publisher(Odometry, '/zf_test/input/odometry', 10)
    ex = SingleThreadedExecutor(context=ros)
    ex.add_node(node)
    ex.add_node(probe)
    spin = threading.Thread(target=ex.spin, daemon=True)
    spin.start()
    try:
        assert node.diagnostic_status().message == 'waiting for first frame'
        wait_for_matched(cloud_pub)
        wait_for_matched(odom_pub)
        assert wait_for(lambda: node.reliability == 'reliable', 5)  # auto followed the publisher
        ts = synth_log.timestamps
        clouds = [synth_log.points(t) for t in ts]
        next_t = time.monotonic()
        for i, (t, pts) in enumerate(zip(ts, clouds)):
            T = synth_log.pose(t)
            q = geometry.matrix_to_quat(T[:3, :3])
            o = Odometry()
            o.header.stamp = pc2.ns_to_stamp(int(t))
            o.header.frame_id, o.child_frame_id = 'odom', 'base_link'
            o.pose.pose.position.x, o.pose.pose.position.y, o.pose.pose.position.z = map(float, T[:3, 3])
            (o.pose.pose.orientation.w, o.pose.pose.orientation.x, o.pose.pose.orientation.y,
             o.pose.pose.orientation.z) = map(float, q)
            odom_pub.publish(o)
            # 10 Hz, but never faster than the node (a loaded CI machine must not turn into drops)
            time.sleep(max(0.0, next_t - time.monotonic()))
            cloud_pub.publish(pc2.encode(pts, {}, frame_id='ego', stamp_ns=int(t)))
            next_t = time.monotonic() + 0.1
            assert wait_for(lambda: node.stats.received == i + 1 and node.wait_idle(0.01), 30)
        assert wait_for(lambda: len(flows) == len(ts) - 1 and len(markers) == len(ts) - 1, 10), \
            (len(flows), node.stats)
        assert node.stats.dropped_stale == 0 and node.stats.errors_total == 0
        assert node.stats.odometry_received == len(ts)

        backend = node.pipeline.backend
        for i, msg in enumerate(flows):
            assert [f.name for f in msg.fields] == ['x', 'y', 'z', 'flow_x', 'flow_y', 'flow_z', 'speed',
                                                    'is_dynamic']
            assert pc2.stamp_to_ns(msg.header.stamp) == ts[i] and msg.header.frame_id == 'ego'
            d = pc2.decode(msg)
            assert np.array_equal(d.xyz, clouds[i])  # every (finite) point of sweep t, input order
            T = synth_log.ego1_T_ego0(ts[i], ts[i + 1])  # true ego motion from the log
            ref, valid = offline_flow(backend, clouds[i], clouds[i + 1], T)
            got = np.stack([field_array(msg, k) for k in ('flow_x', 'flow_y', 'flow_z')], axis=1)
            assert np.abs(got - ref).max() <= 1e-5
            speed = field_array(msg, 'speed')
            dyn = field_array(msg, 'is_dynamic').astype(bool)
            assert np.allclose(speed, np.linalg.norm(ref, axis=1) / 0.1, atol=1e-4)
            assert np.array_equal(dyn, valid & (speed >= 0.5))
            m = markers[i]
            assert m.type == Marker.LINE_LIST and len(m.points) == 2 * dyn.sum() == len(m.colors)
            assert m.header.frame_id == 'ego'
        # debug timings and diagnostics on the wire
        assert wait_for(lambda: all(len(debug.get(k, [])) >= 1 for k in
                                    ('preprocess', 'inference', 'postprocess', 'total',
                                     'pipeline_latency')), 5)
        assert all(v > 0 for v in debug['inference'])
        assert debug['total'][-1] >= debug['inference'][-1]
        assert wait_for(lambda: any(_diag(a, '/zf_test', 'flows_published') == str(len(ts) - 1)
                                    for a in list(diags)), 5)
        st = node.diagnostic_status()
        values = {kv.key: kv.value for kv in st.values}
        assert st.level == b'\x00' and st.message == 'OK', st
        assert values['backend'] == 'torch' and values['messages_received'] == str(len(ts))
        assert values['input_reliability'] == 'reliable' and values['errors_total'] == '0'

        # over budget: WARN at once, ERROR once it lasts longer than error_after_s
        res = node.set_parameters([Parameter('latency_budget_ms', value=1.0),
                                   Parameter('error_after_s', value=2.0)])
        assert all(r.successful for r in res)
        assert not node.set_parameters([Parameter('latency_budget_ms', value=0.0)])[0].successful  # range
        assert not node.set_parameters([Parameter('backend', value='onnxruntime')])[0].successful  # read-only
        later = ts[-1] + 100_000_000
        for k, t in enumerate((later, later + 100_000_000)):
            odom_pub.publish(_odom(synth_log.pose(ts[-1]), t))
            cloud_pub.publish(pc2.encode(clouds[-1], {}, frame_id='ego', stamp_ns=int(t)))
            assert wait_for(lambda: len(flows) == len(ts) + k and node.wait_idle(0.01), 30)
            if k == 0:
                assert node.diagnostic_status().level == b'\x01'
        time.sleep(2.05)
        st = node.diagnostic_status()
        assert st.level == b'\x02' and 'over latency budget' in st.message
    finally:
        ex.shutdown()
        spin.join(5)
        node.destroy_node()
        probe.destroy_node()


def test_sim_time_node_subscribes_to_a_late_publisher_before_any_clock(ros, tiny_model):
    """A replayer waits for our subscription before it sends /clock: nothing may wait on sim time."""
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.parameter import Parameter
    from sensor_msgs.msg import PointCloud2

    from zeroflow_ros.node import ZeroFlowNode
    from zeroflow_ros.testing import wait_for

    params = [Parameter('use_sim_time', value=True), Parameter('model', value=str(tiny_model)),
              Parameter('backend', value='torch'), Parameter('device', value='cpu'),
              Parameter('ego_motion', value='none'), Parameter('warmup_iterations', value=0),
              Parameter('diagnostics_period_s', value=0.2)]
    node = ZeroFlowNode('zf_simtime', context=ros, parameter_overrides=params)
    probe = rclpy.create_node('zf_simtime_probe', context=ros)
    ex = SingleThreadedExecutor(context=ros)
    ex.add_node(node)
    ex.add_node(probe)
    spin = threading.Thread(target=ex.spin, daemon=True)
    spin.start()
    try:
        assert node.reliability is None            # no publisher yet: not subscribed
        pub = probe.create_publisher(PointCloud2, '/zf_simtime/input/pointcloud', 1)
        assert wait_for(lambda: pub.get_subscription_count() >= 1, 15), \
            'node never subscribed: its QoS poll must not run on the (stopped) sim clock'
        # the publisher can see the subscription a moment before the poll's thread records its QoS
        assert wait_for(lambda: node.reliability == 'reliable', 5), node.reliability
    finally:
        ex.shutdown()
        spin.join(5)
        node.destroy_node()
        probe.destroy_node()


def _odom(T, stamp_ns):
    from nav_msgs.msg import Odometry

    from zeroflow_ros.core import geometry
    from zeroflow_ros.core import pointcloud2 as pc2
    q = geometry.matrix_to_quat(T[:3, :3])
    o = Odometry()
    o.header.stamp = pc2.ns_to_stamp(int(stamp_ns))
    o.pose.pose.position.x, o.pose.pose.position.y, o.pose.pose.position.z = map(float, T[:3, 3])
    (o.pose.pose.orientation.w, o.pose.pose.orientation.x, o.pose.pose.orientation.y,
     o.pose.pose.orientation.z) = map(float, q)
    return o


def _diag(arr, node_name, key):
    for st in arr.status:
        if st.name.startswith(node_name + ':'):
            return {kv.key: kv.value for kv in st.values}.get(key)
    return None


# ------------------------------------------------------------------------- separate node process

def _shm_free_mb() -> float:
    try:
        st = os.statvfs('/dev/shm')
    except OSError:
        return 0.0
    return st.f_bavail * st.f_frsize / 2**20


def _env(domain: int, profile: bool = True) -> dict:
    env = dict(os.environ)
    env.update(ROS_DOMAIN_ID=str(domain), ROS_AUTOMATIC_DISCOVERY_RANGE='LOCALHOST', OMP_NUM_THREADS='1')
    env.pop('_ROS_WHEELS_BOOTSTRAP_COMPLETE', None)
    if profile:
        env['FASTDDS_DEFAULT_PROFILES_FILE'] = str(PROFILE)
    return env


def test_separate_process_large_clouds_and_pair(ros, tiny_model, tmp_path):
    import rclpy
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.executors import SingleThreadedExecutor
    from sensor_msgs.msg import PointCloud2

    from zeroflow_ros.backends import create_backend
    from zeroflow_ros.core import pointcloud2 as pc2
    from zeroflow_ros.testing import wait_for_matched

    domain = int(os.environ['ROS_DOMAIN_ID'])
    log_path = tmp_path / 'node.log'
    cmd = [sys.executable, '-m', 'zeroflow_ros.cli', 'node',
           '--params-file', str(ROOT / 'config' / 'zeroflow.param.yaml'),
           '--ros-args', '-r', '__node:=zf_proc', '-p', f'model:={tiny_model}', '-p', 'backend:=torch',
           '-p', 'device:=cpu', '-p', 'ego_motion:=none', '-p', 'warmup_iterations:=0',
           '-p', 'diagnostics_period_s:=0.2', '-p', 'latency_budget_ms:=10000.0']
    with open(log_path, 'w') as log_file:
        proc = subprocess.Popen(cmd, env=_env(domain), stdout=log_file, stderr=subprocess.STDOUT,
                                cwd=str(tmp_path))
    probe = rclpy.create_node('zf_proc_probe', context=ros)
    ex = SingleThreadedExecutor(context=ros)
    ex.add_node(probe)
    diags: list = []
    probe.create_subscription(DiagnosticArray, '/diagnostics', diags.append, 50)

    def value(key):
        for arr in reversed(diags):
            v = _diag(arr, '/zf_proc', key)
            if v is not None:
                return v
        return None

    def spin_until(pred, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError('node process died:\n' + log_path.read_text()[-3000:])
            if pred():
                return True
            ex.spin_once(timeout_sec=0.05)
        raise AssertionError(f'timeout; node log:\n{log_path.read_text()[-3000:]}')

    # The profile's 64 MB shared-memory segment per process needs room in /dev/shm (Docker's
    # default is 64 MB: run such containers with --shm-size=512m).
    shm_free = _shm_free_mb()
    shm_ok = shm_free >= 160
    try:
        spin_until(lambda: value('messages_received') == '0', 60)  # up, named by --ros-args
        received = 0
        for reliability in ('reliable', 'best_effort') if shm_ok else ('reliable',):
            pub = subprocess.run([sys.executable, __file__, 'publish', '--topic', '/zf_proc/input/pointcloud',
                                  '--reliability', reliability, '--points', '100000', '--count', '20',
                                  '--rate', '10'],
                                 env=_env(domain), capture_output=True, text=True, timeout=90)
            assert pub.returncode == 0, pub.stderr[-2000:]
            received += 20
            spin_until(lambda: value('messages_received') == str(received)
                       and value('input_reliability') == reliability, 15)
        assert value('errors_total') == '0'

        # a good pair through the process (nobody subscribed so far: it skipped the large clouds)
        flows: list = []
        flow_sub = probe.create_subscription(PointCloud2, '/zf_proc/output/flow', flows.append, 5)
        cloud_pub = probe.create_publisher(PointCloud2, '/zf_proc/input/pointcloud', 1)
        wait_for_matched(flow_sub)
        spin_until(lambda: value('input_reliability') == 'reliable', 10)  # followed the new publisher
        time.sleep(0.5)  # the re-created subscription's discovery
        wait_for_matched(cloud_pub)
        rng = np.random.default_rng(4)
        p0 = rng.uniform([-40, -40, -2], [40, 40, 3], (6000, 3)).astype(np.float32)
        p1 = p0 + np.float32([0.5, 0.0, 0.0]) * (np.arange(6000)[:, None] % 3 == 0)
        t0 = 2_000_000_000
        for k, pts in enumerate((p0, p1)):
            cloud_pub.publish(pc2.encode(pts, {}, frame_id='lidar', stamp_ns=t0 + k * 100_000_000))
            spin_until(lambda: value('messages_received') == str(received + k + 1), 15)
        spin_until(lambda: len(flows) == 1, 30)
        offline = create_backend(str(tiny_model), backend='torch', device='cpu')
        ref, _ = offline_flow(offline, p0, p1, np.eye(4))
        got = np.stack([field_array(flows[0], k) for k in ('flow_x', 'flow_y', 'flow_z')], axis=1)
        assert np.abs(got - ref).max() <= 1e-5
        if not shm_ok:
            pytest.skip(f'/dev/shm has {shm_free:.0f} MB free: best-effort 100k clouds through the Fast DDS '
                        'profile (64 MB segment per process) not checked; the rest of this test passed')
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        ex.shutdown()
        probe.destroy_node()


# ------------------------------------------------------------------------------ publisher process

def _publish_main(argv: list[str]) -> int:
    """Publish N clouds at a rate after a subscription matched (run in its own process)."""
    import rclpy
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import PointCloud2

    from zeroflow_ros.core import pointcloud2 as pc2
    from zeroflow_ros.testing import wait_for_matched

    ap = argparse.ArgumentParser()
    ap.add_argument('--topic', required=True)
    ap.add_argument('--reliability', choices=('reliable', 'best_effort'), required=True)
    ap.add_argument('--points', type=int, default=100000)
    ap.add_argument('--count', type=int, default=20)
    ap.add_argument('--rate', type=float, default=10.0)
    a = ap.parse_args(argv)
    rclpy.init()
    node = rclpy.create_node('zf_test_publisher')
    rel = ReliabilityPolicy.RELIABLE if a.reliability == 'reliable' else ReliabilityPolicy.BEST_EFFORT
    pub = node.create_publisher(PointCloud2, a.topic, QoSProfile(depth=1, reliability=rel))
    wait_for_matched(pub, timeout=30)
    time.sleep(1.0)  # matched on our side; give the reader's side time to match us too (best-effort)
    rng = np.random.default_rng(0)
    xyz = rng.uniform(-50, 50, (a.points, 3)).astype(np.float32)
    fields = {'intensity': rng.uniform(0, 255, a.points).astype(np.float32)}
    t = time.monotonic()
    for i in range(a.count):
        pub.publish(pc2.encode(xyz, fields, frame_id='lidar', stamp_ns=3_000_000_000 + i * 100_000_000))
        t += 1.0 / a.rate
        time.sleep(max(0.0, t - time.monotonic()))
    time.sleep(1.0)  # let a reliable writer finish repairs before the process exits
    node.destroy_node()
    rclpy.shutdown()
    return 0


if __name__ == '__main__':
    if len(sys.argv) > 1 and sys.argv[1] == 'publish':
        raise SystemExit(_publish_main(sys.argv[2:]))
