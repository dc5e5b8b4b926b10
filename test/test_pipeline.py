"""Per-frame logic of the node (zeroflow_ros.pipeline), no ROS.

References are independent of the code under test: scipy's Slerp for pose interpolation, the
offline path (core.preprocess.prepare_pair + backend.infer + scatter, as `zeroflow predict`
does) for the flow, and hand-built static scenes seen from known poses for ego compensation.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from zeroflow_ros.testing import make_tiny_model
from scipy.spatial.transform import Rotation, Slerp

from zeroflow_ros.core import geometry, preprocess
from zeroflow_ros.pipeline import (FlowFrame, Pipeline, PipelineConfig, PipelineError, PoseBuffer,
                                   clip_indices, make_motion_evidence, make_preprocess_config, pose_matrix,
                                   resolve_model_path)
from zeroflow_ros.visualization import arrow_segments, speed_colors

ROOT = Path(__file__).resolve().parents[1]
KITTI = ROOT / 'data' / 'samples' / 'kitti_raw_sfnd_seq' / 'velodyne_points' / 'data'


@pytest.fixture(scope='module')
def backend(tmp_path_factory):
    from zeroflow_ros.backends import create_backend
    model = make_tiny_model(tmp_path_factory.mktemp('model') / 'model.pt')
    return create_backend(str(model), backend='torch', device='cpu', threads=1)


class Recorder:
    """Wraps a real backend and keeps the inputs of each call (to check what the pipeline fed it)."""

    def __init__(self, inner):
        self.inner = inner
        self.calls: list[tuple[np.ndarray, np.ndarray]] = []

    def infer(self, p0, p1):
        self.calls.append((p0.copy(), p1.copy()))
        return self.inner.infer(p0, p1)

    def describe(self):
        return self.inner.describe()


def kitti(i: int, n: int = 30000) -> np.ndarray:
    pts = np.fromfile(KITTI / f'{i:010d}.bin', np.float32).reshape(-1, 4)[:, :3]
    return np.ascontiguousarray(pts[:: max(1, len(pts) // n)][:n])


def offline_flow(backend, cfg: PipelineConfig, p0, p1, ego1_T_ego0, dt_s: float = 0.1):
    """What `zeroflow predict` computes for one pair: prepare_pair + infer (+ evidence test) + scatter."""
    prep = preprocess.prepare_pair(p0, p1, ego1_T_ego0, make_preprocess_config(cfg))
    flow_k, valid_k = backend.infer(prep.pc0, prep.pc1)
    fix = make_motion_evidence(cfg)
    if fix is not None:
        flow_k = fix(flow_k, valid_k, prep.pc0, prep.pc1, ego1_T_ego0, dt_s=dt_s)
    flow = np.zeros((len(p0), 3), np.float32)
    valid = np.zeros(len(p0), bool)
    flow[prep.mask0] = np.where(valid_k[:, None], flow_k, 0)
    valid[prep.mask0] = valid_k
    return flow, valid, prep


# ------------------------------------------------------------------------------------------ poses

def test_pose_buffer_matches_scipy_slerp_and_lerp():
    rng = np.random.default_rng(1)
    stamps = np.array([0, 100, 230, 300]) * 1_000_000
    rots = Rotation.random(4, random_state=2)
    pos = rng.normal(size=(4, 3)) * 5
    buf = PoseBuffer()
    for s, r, p in zip(stamps, rots, pos):
        x, y, z, w = r.as_quat()
        buf.add(int(s), p, (w, x, y, z))
    ref = Slerp(stamps, rots)
    for s in (0, 50_000_000, 99_999_999, 150_000_000, 229_000_000, 300_000_000):
        T = buf.interpolate(s)
        assert np.allclose(T[:3, :3], ref(s).as_matrix(), atol=1e-9)
        assert np.allclose(T[:3, 3], [np.interp(s, stamps, pos[:, k]) for k in range(3)], atol=1e-9)
    assert buf.interpolate(-1) is None and buf.interpolate(300_000_001) is None


def test_pose_buffer_waits_for_late_odometry():
    import threading
    buf = PoseBuffer()
    buf.add(0, (0, 0, 0), (1, 0, 0, 0))
    timer = threading.Timer(0.05, lambda: buf.add(200, (2, 0, 0), (1, 0, 0, 0)))
    timer.start()
    T = buf.wait_for(100, timeout_s=5.0)  # the cloud came before the odometry that covers it
    timer.join()
    assert T is not None and np.allclose(T[:3, 3], (1, 0, 0))
    assert buf.wait_for(300, timeout_s=0.05) is None


def test_pose_buffer_extrinsic_and_loop_reset():
    base_T_sensor = geometry.yaw_transform(0.3, (1.2, 0.0, 1.8))
    buf = PoseBuffer(base_T_sensor=base_T_sensor)
    buf.add(10, (1, 2, 3), (1, 0, 0, 0))
    buf.add(20, (2, 2, 3), (1, 0, 0, 0))
    T = buf.interpolate(15)
    assert np.allclose(T, geometry.make_transform(np.eye(3), (1.5, 2, 3)) @ base_T_sensor)
    buf.add(5, (0, 0, 0), (1, 0, 0, 0))  # bag loop: time went backwards
    assert len(buf) == 1 and buf.interpolate(15) is None
    with pytest.raises(PipelineError, match='not finite'):
        buf.add(30, (np.nan, 0, 0), (1, 0, 0, 0))
    assert buf.wait_for(1, 0.01) is None  # older than the buffer: returns at once


# ------------------------------------------------------------------------------------------- flow

def test_flow_equals_offline_prediction_and_scatter(backend):
    cfg = PipelineConfig(ego_motion='none', ground_removal='geometric', dynamic_threshold_mps=0.5)
    pipe = Pipeline(cfg, backend=backend)
    p0, p1 = kitti(0), kitti(1)
    p0[::97] = np.nan  # non-finite points are not scored and get zero flow
    assert pipe.step(p0, 1_000_000_000, frame_id='velo', tag='h0') is None
    frame = pipe.step(p1, 1_100_000_000, frame_id='velo', tag='h1')
    assert isinstance(frame, FlowFrame) and frame.tag == 'h0'
    flow, valid, prep = offline_flow(backend, cfg, p0, p1, np.eye(4))
    assert frame.flow.shape == (len(p0), 3) and frame.flow.dtype == np.float32
    assert np.abs(frame.flow - flow).max() <= 1e-5
    assert np.array_equal(frame.valid, valid)
    assert prep.mask0.sum() < len(p0) and valid.sum() > 1000  # ground/out-of-range exist, many scored
    assert not frame.flow[~frame.valid].any() and not frame.is_dynamic[~frame.valid].any()
    assert np.isclose(frame.dt_s, 0.1)
    assert np.allclose(frame.speed, np.linalg.norm(flow, axis=1) / 0.1, rtol=1e-5, atol=1e-5)
    assert np.array_equal(frame.is_dynamic, valid & (frame.speed >= 0.5))
    assert set(frame.timings_ms) == {'preprocess', 'inference', 'postprocess', 'total'}
    assert frame.timings_ms['total'] >= frame.timings_ms['inference'] > 0


def test_odometry_ego_compensation_static_scene(backend):
    """A static world seen from two known poses: sweep t+1 brought into ego0 must land on sweep t."""
    rng = np.random.default_rng(3)
    world_T_ego0 = geometry.make_transform(Rotation.from_euler('zyx', [0.4, 0.01, -0.02]).as_matrix(),
                                           (100.0, -20.0, 0.5))
    world = geometry.transform_points(world_T_ego0, rng.uniform([-30, -30, -1], [30, 30, 2], (4000, 3)))
    world_T_ego1 = world_T_ego0 @ geometry.yaw_transform(0.05, (1.3, 0.1, 0.0))  # ~13 m/s, turning
    p0 = geometry.transform_points(geometry.invert(world_T_ego0), world).astype(np.float32)
    p1 = geometry.transform_points(geometry.invert(world_T_ego1), world).astype(np.float32)
    keep = preprocess.PreprocessConfig(ground='none').in_range(p0) & \
        preprocess.PreprocessConfig(ground='none').in_range(p1)
    p0, p1 = p0[keep], p1[keep]
    rec = Recorder(backend)
    pipe = Pipeline(PipelineConfig(ego_motion='odometry', ground_removal='none'), backend=rec)
    pipe.step(p0, 0, world_T_ego0)
    frame = pipe.step(p1, 100_000_000, world_T_ego1)
    pc0, pc1 = rec.calls[0]
    assert len(pc0) == len(pc1) == len(p0)
    assert np.abs(pc1 - pc0).max() < 1e-4
    assert np.allclose(frame.ego1_T_ego0, geometry.invert(world_T_ego1) @ world_T_ego0, atol=1e-9)
    # same as running the backend on the pair compensated by the true motion
    flow, valid, _ = offline_flow(backend, pipe.config, p0, p1, geometry.invert(world_T_ego1) @ world_T_ego0)
    assert np.abs(frame.flow - flow).max() <= 1e-5
    with pytest.raises(PipelineError, match='no odometry'):
        pipe.step(p1, 200_000_000, None)


@pytest.mark.parametrize('ground', ['geometric', 'none'])  # mask handed to the odometry / its own
def test_lidar_odometry_recovers_known_motion(backend, ground):
    """ego_motion='lidar' (KISS-ICP, core/odometry.py): a real sweep moved by a known motion."""
    pytest.importorskip('kiss_icp')
    true = geometry.yaw_transform(np.deg2rad(2.0), (1.0, 0.1, 0.0))  # ego1_T_ego0
    p0 = kitti(0, 60000)
    p1 = geometry.transform_points(true, p0.astype(np.float64)).astype(np.float32)
    pipe = Pipeline(PipelineConfig(ego_motion='lidar', ground_removal=ground), backend=backend)
    pipe.step(p0, 0)
    frame = pipe.step(p1, 100_000_000)
    err = geometry.invert(true) @ frame.ego1_T_ego0
    assert np.linalg.norm(err[:3, 3]) < 0.05
    assert np.degrees(np.arccos(np.clip((np.trace(err[:3, :3]) - 1) / 2, -1, 1))) < 0.2
    pipe.step(p1, 50_000_000)  # time went backwards: new pair and a fresh odometry map
    assert pipe.last_reset_reason == 'stamp_backwards'


def test_no_ego_motion_feeds_raw_clouds(backend):
    rec = Recorder(backend)
    pipe = Pipeline(PipelineConfig(ego_motion='none', ground_removal='none'), backend=rec)
    a, b = kitti(2, 5000), kitti(3, 5000)
    pipe.step(a, 0)
    pipe.step(b, 100_000_000)
    inside = preprocess.PreprocessConfig(ground='none').in_range
    assert np.array_equal(rec.calls[0][0], a[inside(a)]) and np.array_equal(rec.calls[0][1], b[inside(b)])


class BaseFrameRule:
    """A backend whose answer depends on the frame: 0.1 m along base x for points above 1 m base z."""

    def __init__(self):
        self.calls: list[tuple[np.ndarray, np.ndarray]] = []

    def infer(self, p0, p1):
        self.calls.append((p0.copy(), p1.copy()))
        flow = np.where((p0[:, 2] > 1.0)[:, None], np.float32([0.1, 0.0, 0.0]), np.float32(0.0))
        return flow.astype(np.float32), np.ones(len(p0), bool)

    def describe(self):
        return {'backend': 'rule'}


def test_model_sees_clouds_in_the_base_frame_and_flow_comes_back_in_the_cloud_frame():
    # lidar 1.73 m above base_link, turned 90 deg left: base = Rz(90) sensor + (0, 0, 1.73)
    rule = BaseFrameRule()
    # a rule backend's flow is not in the data: the motion-evidence test (tested on its own) would drop it
    cfg = PipelineConfig(ego_motion='none', ground_removal='none', motion_evidence=False,
                         sensor_in_base_xyz=(0, 0, 1.73),
                         sensor_in_base_rpy=(0, 0, np.pi / 2))
    pipe = Pipeline(cfg, backend=rule)
    a, b = kitti(2, 5000), kitti(3, 5000)
    pipe.step(a, 0)
    frame = pipe.step(b, 100_000_000)
    inside = preprocess.PreprocessConfig(ground='none').in_range
    a_in, b_in = a[inside(a)], b[inside(b)]
    R = np.array([[0, -1, 0], [1, 0, 0], [0, 0, 1.0]])
    np.testing.assert_allclose(rule.calls[0][0], a_in @ R.T + [0, 0, 1.73], atol=1e-5)
    np.testing.assert_allclose(rule.calls[0][1], b_in @ R.T + [0, 0, 1.73], atol=1e-5)
    # base +x is sensor -y; the rule's "above 1 m in base" is "above -0.73 m" in the sensor frame
    up = inside(a) & (a[:, 2] > -0.73 + 1e-4)
    low = inside(a) & (a[:, 2] < -0.73 - 1e-4)
    assert up.sum() > 100 and low.sum() > 100
    np.testing.assert_allclose(frame.flow[up], np.tile([0.0, -0.1, 0.0], (up.sum(), 1)), atol=1e-6)
    assert np.all(frame.flow[low] == 0)
    # identity extrinsics: the clouds go to the model untouched (no per-sweep transform)
    rule2 = BaseFrameRule()
    pipe2 = Pipeline(PipelineConfig(ego_motion='none', ground_removal='none'), backend=rule2)
    pipe2.step(a, 0)
    pipe2.step(b, 100_000_000)
    assert np.array_equal(rule2.calls[0][0], a_in)
    with pytest.raises(PipelineError, match='sensor_in_base_xyz.*expected 3 finite numbers'):
        PipelineConfig(sensor_in_base_xyz=(0, 0))
    # the extrinsic matrix is the ROS convention (fixed-axis roll, pitch, yaw), checked with scipy
    T = PipelineConfig(sensor_in_base_xyz=(1, 2, 3), sensor_in_base_rpy=(0.1, -0.2, 0.3)).base_T_sensor
    ref = Rotation.from_euler('xyz', [0.1, -0.2, 0.3]).as_matrix()
    np.testing.assert_allclose(T[:3, :3], ref, atol=1e-12)
    np.testing.assert_allclose(T[:3, 3], [1, 2, 3])


# ---------------------------------------------------------------------------- pairing and bad input

def test_resets_gap_backwards_frame_change(backend):
    pipe = Pipeline(PipelineConfig(ego_motion='none', max_sweep_gap_s=0.25), backend=backend)
    a = kitti(4, 3000)
    t = 5_000_000_000
    assert pipe.step(a, t, frame_id='velo') is None
    assert pipe.step(a, t + 100_000_000, frame_id='velo') is not None
    assert pipe.step(a, t + 400_000_000, frame_id='velo') is None and pipe.last_reset_reason == 'gap'
    assert pipe.step(a, t + 300_000_000, frame_id='velo') is None
    assert pipe.last_reset_reason == 'stamp_backwards'
    assert pipe.step(a, t + 300_000_000, frame_id='velo') is None  # duplicate stamp
    assert pipe.step(a, t + 400_000_000, frame_id='other') is None
    assert pipe.last_reset_reason == 'frame_id_changed'
    f = pipe.step(a, t + 500_000_000, frame_id='other')
    assert f is not None and pipe.last_reset_reason is None and f.stamp_ns == t + 400_000_000
    assert pipe.counters.resets == {'gap': 1, 'stamp_backwards': 2, 'frame_id_changed': 1}


@pytest.mark.parametrize('bad, kind', [
    (np.zeros((0, 3), np.float32), 'empty'),
    (np.full((100, 3), np.nan, np.float32), 'all_nan'),
    (np.zeros((10, 4), np.float32), 'shape'),
    (np.zeros(30, np.float32), 'shape'),
    (np.zeros((1001, 3), np.float32), 'too_many_points'),
])
def test_bad_sweep_raises_and_keeps_previous(backend, bad, kind):
    pipe = Pipeline(PipelineConfig(ego_motion='none', max_points=1000), backend=backend)
    a = kitti(5, 1000)
    pipe.step(a, 0)
    with pytest.raises(PipelineError) as err:
        pipe.step(bad, 100_000_000)
    assert err.value.kind == kind and isinstance(err.value, ValueError)
    f = pipe.step(a, 200_000_000)  # pairs with the sweep before the bad one
    assert f is not None and f.stamp_ns == 0 and np.isclose(f.dt_s, 0.2)


def test_absurd_coordinates_are_not_scored(backend):
    """Finite but absurd values (corrupt driver output) must not crash ground removal or odometry."""
    pipe = Pipeline(PipelineConfig(ego_motion='none'), backend=backend)
    a = kitti(6, 3000)
    b = a.copy()
    b[::10] = np.float32(3e38)
    b[1::10] = np.float32(-1e30)
    pipe.step(b, 0)
    f = pipe.step(a, 100_000_000)
    assert not f.valid[::10].any() and not f.valid[1::10].any() and f.valid.sum() > 100
    assert np.isfinite(f.flow).all()


def test_config_validation_names_field():
    with pytest.raises(PipelineError, match='ego_motion'):
        PipelineConfig(ego_motion='gps')
    with pytest.raises(PipelineError, match='point_range_m'):
        PipelineConfig(point_range_m=(0, 0, 0, -1, 1, 1))
    c = PipelineConfig.from_dict({'backend': 'torch', 'publish_markers': True,
                                  'point_range_m': [-1, -1, -1, 1, 1, 1]})
    assert c.backend == 'torch' and c.point_range_m == (-1.0, -1.0, -1.0, 1.0, 1.0, 1.0)
    assert dataclasses.is_dataclass(c)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.backend = 'onnxruntime'


def test_clip_indices_keeps_order_and_coverage():
    assert clip_indices(10, 10) is None
    idx = clip_indices(2_000_000, 200_000)
    assert len(idx) == 200_000 and np.all(np.diff(idx) > 0) and idx[0] == 0 and idx[-1] >= 1_999_990
    gaps = np.diff(idx)
    assert gaps.min() == gaps.max() == 10


def test_resolve_model_path(tmp_path, monkeypatch):
    assert resolve_model_path(str(tmp_path)) == str(tmp_path.resolve())
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PipelineError, match='not found'):
        resolve_model_path('models/does_not_exist')
    # package-relative: found in the source tree from any working directory
    assert resolve_model_path('config/zeroflow.param.yaml') == str(ROOT / 'config' / 'zeroflow.param.yaml')


# -------------------------------------------------------------------------------------- markers

def test_arrow_segments_brute_force():
    rng = np.random.default_rng(7)
    pts = rng.normal(size=(50, 3)).astype(np.float32)
    flow = rng.normal(size=(50, 3)).astype(np.float32)
    speed = np.linalg.norm(flow, axis=1) * 10
    dyn = speed > 8
    verts, rgb = arrow_segments(pts, flow, speed, dyn, decimation=2, length_scale=2.0, max_speed=20.0)
    expect = [i for i in range(50) if dyn[i]][::2]
    assert len(verts) == 2 * len(expect) == len(rgb)
    for k, i in enumerate(expect):
        assert np.allclose(verts[2 * k], pts[i]) and np.allclose(verts[2 * k + 1], pts[i] + 2 * flow[i])
        assert np.allclose(rgb[2 * k], rgb[2 * k + 1])
    assert len(arrow_segments(pts, flow, speed, dyn, max_arrows=3)[0]) == 6
    c = speed_colors(np.array([0.0, 20.0, 99.0]), 20.0)
    assert np.allclose(c[0], [0, 0.2, 1]) and np.allclose(c[1], [1, 0.1, 0]) and np.allclose(c[2], c[1])
    with pytest.raises(ValueError, match='decimation'):
        arrow_segments(pts, flow, speed, dyn, decimation=0)


def test_pose_matrix_roundtrip():
    R = Rotation.from_euler('xyz', [0.1, -0.2, 0.3]).as_matrix()
    q = geometry.matrix_to_quat(R)
    assert np.allclose(pose_matrix((1, 2, 3), q), geometry.make_transform(R, (1, 2, 3)))


def test_flow_marker_equals_checked_message_construction():
    """The fast slot filling must give the same message as the checked constructors (after CDR)."""
    pytest.importorskip('rclpy')
    from geometry_msgs.msg import Point
    from rclpy.serialization import deserialize_message, serialize_message
    from std_msgs.msg import ColorRGBA, Header
    from visualization_msgs.msg import Marker

    from zeroflow_ros.visualization import flow_marker
    rng = np.random.default_rng(2)
    verts = rng.normal(size=(40, 3)).astype(np.float32)
    rgb = rng.random((40, 3)).astype(np.float32)
    header = Header(frame_id='lidar')
    header.stamp.sec = 7
    fast = flow_marker(header, verts, rgb, line_width=0.1, alpha=0.5)
    ref = Marker(header=header, ns='zeroflow_flow', id=0, type=Marker.LINE_LIST, action=Marker.ADD)
    ref.pose.orientation.w = 1.0
    ref.scale.x = 0.1
    ref.color.a = 0.5
    ref.lifetime.sec = 1
    ref.points = [Point(x=float(a), y=float(b), z=float(c)) for a, b, c in verts]
    ref.colors = [ColorRGBA(r=float(r), g=float(g), b=float(b), a=0.5) for r, g, b in rgb]
    # (CDR padding bytes are not initialised: compare the decoded messages, field by field)
    assert deserialize_message(serialize_message(fast), Marker) == ref
    assert deserialize_message(serialize_message(ref), Marker) == ref


# ------------------------------------------------------------------------ split / overlapped use

@pytest.fixture(scope='module')
def ort_backend(tmp_path_factory, backend):
    """onnxruntime on the same tiny model: its sweep-only part runs in prepare (encoder split)."""
    pytest.importorskip('onnxruntime')
    from zeroflow_ros.backends import create_backend
    from zeroflow_training.export import export_onnx
    d = tmp_path_factory.mktemp('onnx')
    export_onnx(backend.source.checkpoint, d / 'model.onnx', verify=False)
    return create_backend(str(d), backend='onnxruntime', device='cpu', threads=1)


@pytest.mark.parametrize('which', ['torch', 'onnxruntime'])
def test_prepare_then_run_pair_overlapped_equals_offline_flow(backend, ort_backend, which):
    """The node's two-stage use (sweep t+2 prepared before the pair t, t+1 runs) gives, for every
    pair, the offline values (prepare_pair + infer + scatter), also with the sensor above base."""
    backend = backend if which == 'torch' else ort_backend
    cfg = PipelineConfig(ego_motion='odometry', ground_removal='geometric', motion_evidence=False,
                         sensor_in_base_xyz=(0.3, 0.0, 1.73), sensor_in_base_rpy=(0.0, 0.02, 0.1))
    pipe = Pipeline(cfg, backend=backend)
    clouds = [kitti(i, 20000) for i in range(4)]
    poses = [geometry.yaw_transform(0.01 * i, (0.8 * i, 0.05 * i, 0.0)) for i in range(4)]
    jobs = [pipe.prepare(c, i * 100_000_000, poses[i], frame_id='v') for i, c in enumerate(clouds)]
    assert jobs[0] is None and all(j is not None for j in jobs[1:])
    # onnxruntime: sweep t's encoder pass ran in prepare; the pair only runs the rest
    assert all((j.prev.pillars0.encoded is not None) == (which == 'onnxruntime') for j in jobs[1:])
    frames = [pipe.run_pair(j) for j in jobs[1:]]  # after all were prepared: nothing shared leaks
    R, t = cfg.base_T_sensor[:3, :3], cfg.base_T_sensor[:3, 3]
    for i, frame in enumerate(frames):
        T = geometry.invert(poses[i + 1]) @ poses[i]
        prep = preprocess.prepare_pair(clouds[i], clouds[i + 1], T, make_preprocess_config(cfg))
        flow_k, valid_k = backend.infer((prep.pc0 @ R.T + t).astype(np.float32),
                                        (prep.pc1 @ R.T + t).astype(np.float32))
        ref = np.zeros((len(clouds[i]), 3), np.float32)
        ref[prep.mask0] = np.where(valid_k[:, None], flow_k @ R.astype(np.float32), 0)
        assert np.abs(frame.flow - ref).max() <= 1e-5
        assert np.allclose(frame.ego1_T_ego0, T, atol=1e-12)
        assert {'check', 'ground', 'odometry', 'sweep_pillars', 'pair_points', 'network',
                'scatter'} <= set(frame.stages_ms)


def test_flow_correction_hook_gets_the_pair_and_its_result_is_published(backend):
    """The post-network hook sees sweep t's scored points, sweep t+1 in ego0 and the motion."""
    seen = {}

    def halve(flow, valid, pc0, pc1, T, **kw):
        seen.update(flow=flow.copy(), valid=valid.copy(), pc0=pc0, pc1=pc1, T=T)
        return flow * 0.5

    cfg = PipelineConfig(ego_motion='none', ground_removal='geometric', motion_evidence=False)
    plain, hooked = Pipeline(cfg, backend=backend), Pipeline(cfg, backend=backend)
    hooked.flow_correction = halve
    p0, p1 = kitti(0), kitti(1)
    for pipe in (plain, hooked):
        pipe.step(p0, 0)
    ref, got = plain.step(p1, 100_000_000), hooked.step(p1, 100_000_000)
    prep = preprocess.prepare_pair(p0, p1, np.eye(4), make_preprocess_config(cfg))
    assert np.array_equal(seen['pc0'], prep.pc0) and np.array_equal(seen['pc1'], prep.pc1)
    assert np.array_equal(seen['T'], np.eye(4)) and len(seen['flow']) == len(prep.pc0)
    assert np.allclose(got.flow, 0.5 * ref.flow, atol=1e-7)


def test_sweep_not_encoded_ahead_still_gives_the_same_flow(ort_backend):
    """encode=False (the node when behind) skips sweep t's encoder pass; its pair runs the whole
    network instead: same flow as the encoded path (and as offline prediction)."""
    cfg = PipelineConfig(ego_motion='none', ground_removal='geometric')
    a, b = Pipeline(cfg, backend=ort_backend), Pipeline(cfg, backend=ort_backend)
    p0, p1 = kitti(0), kitti(1)
    ja = [a.prepare(p0, 0), a.prepare(p1, 100_000_000)]
    jb = [b.prepare(p0, 0, encode=False), b.prepare(p1, 100_000_000)]
    assert ja[1].prev.pillars0.encoded is not None and jb[1].prev.pillars0.encoded is None
    fa, fb = a.run_pair(ja[1]), b.run_pair(jb[1])
    assert np.abs(fa.flow - fb.flow).max() <= 1e-5 and np.array_equal(fa.valid, fb.valid)
    flow, valid, _ = offline_flow(ort_backend, cfg, p0, p1, np.eye(4))
    assert np.abs(fb.flow - flow).max() <= 1e-5


def test_motion_evidence_is_on_by_default_and_equals_the_core_check(backend):
    """The default config runs core.static_residual's check on the pair (in the base frame, with the
    pair's own dt); motion_evidence=False publishes the network's flow unchanged."""
    from zeroflow_ros.core.static_residual import EvidenceConfig, supported_motion
    assert PipelineConfig().motion_evidence
    p0, p1 = kitti(0), kitti(1)
    frames = {}
    for on in (True, False):
        cfg = PipelineConfig(ego_motion='none', ground_removal='geometric', motion_evidence=on,
                             sensor_in_base_xyz=(0, 0, 1.73), sensor_in_base_rpy=(0.0, 0.3, 0.4))
        pipe = Pipeline(cfg, backend=backend)
        pipe.step(p0, 0)
        frames[on] = pipe.step(p1, 200_000_000)
    raw, got = frames[False], frames[True]
    cfg = PipelineConfig(ground_removal='geometric', sensor_in_base_xyz=(0, 0, 1.73),
                         sensor_in_base_rpy=(0.0, 0.3, 0.4))
    prep = preprocess.prepare_pair(p0, p1, np.eye(4), make_preprocess_config(cfg))
    # the check runs in the base frame (its object fit keeps z fixed there): an independent rotation
    R = Rotation.from_euler('xyz', [0.0, 0.3, 0.4]).as_matrix()
    t = np.array([0, 0, 1.73])
    ok = supported_motion(prep.pc0 @ R.T + t, raw.flow[prep.mask0] @ R.T, raw.valid[prep.mask0],
                          prep.pc1 @ R.T + t, 0.2, EvidenceConfig(min_speed_mps=cfg.dynamic_threshold_mps))
    assert (~ok).sum() > 0 and ok.sum() > 0  # the tiny model's flow: some points dropped, some kept
    want = np.where(ok[:, None], raw.flow[prep.mask0], 0.0)
    np.testing.assert_allclose(got.flow[prep.mask0], want, atol=1e-6)
    assert not got.is_dynamic[prep.mask0][~ok].any()
