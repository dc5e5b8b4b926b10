"""Tests of core/static_residual.py on hand-built scenes with known answers."""
import numpy as np
import pytest

from zeroflow_ros.core import geometry
from zeroflow_ros.core.static_residual import (EvidenceConfig, StaticResidualError, SurfaceMisfit,
                                               bev_clusters, fit_rigid_residual, fit_translations,
                                               supported_motion, weighted_kabsch)

DT = 0.1


def wall(x0, x1, y, z0=0.3, z1=2.0, step=0.05, offset=0.0):
    """Points of a vertical wall y = const, sampled on a grid shifted by ``offset`` along x."""
    xs = np.arange(x0 + offset, x1, step)
    zs = np.arange(z0, z1, step)
    X, Z = np.meshgrid(xs, zs)
    return np.column_stack([X.ravel(), np.full(X.size, y), Z.ravel()])


def box(cx, cy, length=4.0, width=1.8, offset=0.0):
    """The two faces of a car a lidar at the origin sees (rear and left side), as points."""
    rear = np.column_stack([np.full(37, cx), np.linspace(cy - width / 2, cy + width / 2, 37)])
    side = np.column_stack([np.arange(cx + offset, cx + length, 0.05), np.full(int(length / 0.05), cy)])[:80]
    xy = np.vstack([rear, side])
    zs = np.arange(0.3, 1.5, 0.05)
    return np.vstack([np.column_stack([xy, np.full(len(xy), z)]) for z in zs])


def test_weighted_kabsch_recovers_a_known_motion():
    rng = np.random.default_rng(0)
    p = rng.uniform(-10, 10, (200, 3))
    T = geometry.make_transform(geometry.rpy_matrix(0.01, -0.02, 0.3), [0.5, -0.2, 0.1])
    q = geometry.transform_points(T, p)
    np.testing.assert_allclose(weighted_kabsch(p, q, np.ones(len(p))), T, atol=1e-9)


def test_rigid_residual_ignores_movers():
    rng = np.random.default_rng(1)
    p = rng.uniform(-30, 30, (3000, 3))
    T = geometry.make_transform(geometry.rpy_matrix(0.0, 0.0, np.radians(0.1)), [0.03, -0.01, 0.0])
    flow = geometry.transform_points(T, p) - p
    movers = np.arange(len(p)) < 900          # 30 % of the points move 0.4 m, not rigidly with the rest
    flow[movers] += rng.uniform(0.2, 0.4, (900, 3))
    est = fit_rigid_residual(p, flow, np.ones(len(p), bool))
    assert np.abs(est[:3, 3] - T[:3, 3]).max() < 2e-3
    assert np.abs(est[:3, :3] - T[:3, :3]).max() < 1e-4
    np.testing.assert_array_equal(fit_rigid_residual(p[:2], flow[:2], np.ones(2, bool)), np.eye(4))


def test_surface_misfit_is_point_to_plane_on_a_patch():
    surf = SurfaceMisfit(wall(-5, 5, 3.0), cap_m=1.0, patch_m=0.3)
    q = np.array([[0.012, 3.1, 1.0],     # 10 cm in front of the wall: 0.1
                  [0.037, 3.0, 1.0],     # on the wall between samples: ~0
                  [7.0, 3.0, 1.0],       # 2 m past the wall's end: capped at 1
                  [5.4, 3.0, 1.0]])      # 0.45 m past the end: off the patch, point distance
    m = surf.misfit(q)
    np.testing.assert_allclose(m[:3], [0.1, 0.0, 1.0], atol=1e-6)
    assert m[3] == pytest.approx(5.4 - 4.95, abs=0.01)


def test_bev_clusters_join_touching_cells_only():
    pts = np.array([[0.1, 0.1, 0], [0.6, 0.6, 0], [3.0, 3.0, 0]])   # diagonal neighbours, then far
    c = bev_clusters(pts, 0.5)
    assert c[0] == c[1] != c[2]


def test_fit_translations_finds_a_car_moving_along_its_side():
    car0 = box(6.0, -3.0)
    truth = np.array([0.5, 0.0, 0.0])
    surf = SurfaceMisfit(box(6.0 + truth[0], -3.0, offset=0.02), cap_m=1.0, patch_m=0.3)
    t = fit_translations(car0, np.zeros(len(car0), int), np.array([[0.2, 0.0, 0.0]]), surf)
    np.testing.assert_allclose(t[0], truth, atol=0.03)


def test_resampled_static_wall_is_not_motion():
    # The cause seen on KITTI: a parked car/wall 2.6 m to the side, scanned again after the lidar
    # moved, is sampled 4 cm further along; a network following the samples says 1.4 m/s.
    p0 = wall(-4, 4, 2.6, step=0.1)
    p1 = wall(-4, 4, 2.6, step=0.1, offset=0.04)
    flow = np.tile([0.14, 0.0, 0.0], (len(p0), 1))
    ok = supported_motion(p0, flow, np.ones(len(p0), bool), p1, DT)
    assert not ok.any()
    # point-to-point distances (no point is on a patch) would reward following the samples
    ok = supported_motion(p0, flow, np.ones(len(p0), bool), p1, DT, EvidenceConfig(patch_m=1e-9))
    assert ok.all()


def test_moving_car_keeps_its_flow_even_when_under_predicted():
    car0 = box(6.0, -3.0)
    static0 = wall(-10, 10, 8.0)
    p0 = np.vstack([car0, static0])
    p1 = np.vstack([box(6.5, -3.0, offset=0.02), wall(-10, 10, 8.0, offset=0.02)])
    flow = np.zeros((len(p0), 3))
    flow[:len(car0)] = [0.2, 0.0, 0.0]         # truth 0.5 m per sweep, the network says 0.2
    flow[len(car0):] = [0.07, 0.0, 0.0]        # the static wall: false motion along itself
    ok = supported_motion(p0, flow, np.ones(len(p0), bool), p1, DT)
    assert ok[:len(car0)].all() and not ok[len(car0):].any()


def test_fast_car_far_from_its_old_place_keeps_its_flow():
    # 2 m per sweep, the network says 0.2: nothing of sweep t+1 near the old place, zero flow fails
    car0 = box(6.0, -3.0)
    ok = supported_motion(car0, np.tile([0.2, 0.0, 0.0], (len(car0), 1)), np.ones(len(car0), bool),
                          box(8.0, -3.0), DT)
    assert ok.all()


def test_slow_and_invalid_points_are_untouched():
    p0 = wall(-4, 4, 2.6)
    p1 = wall(-4, 4, 2.6, offset=0.02)
    flow = np.tile([0.07, 0.0, 0.0], (len(p0), 1))
    flow[:10] = [0.01, 0.0, 0.0]              # 0.1 m/s: below the dynamic threshold
    valid = np.ones(len(p0), bool)
    valid[10:20] = False
    ok = supported_motion(p0, flow, valid, p1, DT)
    assert ok[:20].all() and not ok[20:].any()
    assert supported_motion(p0, flow, valid, np.zeros((0, 3)), DT).all()


@pytest.mark.parametrize('kwargs, match', [
    (dict(points0=np.zeros((5, 2))), 'points'),
    (dict(flow=np.zeros((4, 3))), 'flow'),
    (dict(valid=np.ones(5, int)), 'valid'),
    (dict(points1=np.zeros((5, 4))), 'points1'),
    (dict(dt_s=0.0), 'dt_s'),
])
def test_bad_input_names_the_argument(kwargs, match):
    args = dict(points0=np.zeros((5, 3)), flow=np.zeros((5, 3)), valid=np.ones(5, bool),
                points1=np.zeros((5, 3)), dt_s=DT)
    args.update(kwargs)
    with pytest.raises(StaticResidualError, match=match):
        supported_motion(**args)


def test_bad_config_is_a_clear_error():
    with pytest.raises(StaticResidualError, match='min_gain'):
        EvidenceConfig(min_gain=1.5)
    with pytest.raises(StaticResidualError, match='cap_m'):
        EvidenceConfig(cap_m=0)


def _car_and_wall_scene():
    """Sweep t and t+1 (base frame, ego motion removed): a car moving 0.5 m, a resampled wall."""
    car0 = box(6.0, -3.0)
    p0 = np.vstack([car0, wall(-10, 10, 8.0, step=0.1)])
    p1 = np.vstack([box(6.5, -3.0, offset=0.02), wall(-10, 10, 8.0, step=0.1, offset=0.04)])
    flow = np.zeros((len(p0), 3))
    flow[:len(car0)] = [0.3, 0.0, 0.0]
    flow[len(car0):] = [0.14, 0.0, 0.0]
    return p0, p1, flow, len(car0)


def test_flow_correction_hook_in_a_tilted_sensor_frame():
    # The same scene seen by a sensor 1.8 m up, rolled, pitched and yawed: the hook takes the
    # cloud frame, judges in the base frame and returns the flow in the cloud frame.
    from zeroflow_ros.core.static_residual import make_flow_correction
    p0, p1, flow, n_car = _car_and_wall_scene()
    base_T_sensor = geometry.make_transform(geometry.rpy_matrix(0.05, -0.04, 0.7), [0.2, 0.0, 1.8])
    s_T_b = geometry.invert(base_T_sensor)
    q0, q1 = geometry.transform_points(s_T_b, p0), geometry.transform_points(s_T_b, p1)
    fs = (flow @ s_T_b[:3, :3].T).astype(np.float32)
    out = make_flow_correction(base_T_sensor=base_T_sensor)(fs, np.ones(len(p0), bool), q0, q1, np.eye(4))
    np.testing.assert_array_equal(out[:n_car], fs[:n_car])
    assert not out[n_car:].any()
    with pytest.raises(StaticResidualError, match='base_T_sensor'):
        make_flow_correction(base_T_sensor=np.eye(3))


class _ConstantFlow:
    """Backend double: the scene's flow for sweep t, whatever the clouds (what a network would say)."""

    name = 'constant'

    def __init__(self, flow):
        self.flow = np.asarray(flow, np.float32)

    def infer(self, p0, p1):
        assert len(p0) == len(self.flow)
        return self.flow, np.ones(len(p0), bool)


def test_pipeline_hook_clears_the_static_wall_and_keeps_the_car():
    from zeroflow_ros.core.static_residual import make_flow_correction
    from zeroflow_ros.pipeline import Pipeline, PipelineConfig
    p0, p1, flow, n_car = _car_and_wall_scene()
    cfg = PipelineConfig(ego_motion='none', ground_removal='none')
    for hook, car, wall_dyn in ((None, True, True), (make_flow_correction(), True, False)):
        pipe = Pipeline(cfg, backend=_ConstantFlow(flow))
        pipe.flow_correction = hook
        pipe.step(p0.astype(np.float32), 0)
        fr = pipe.step(p1.astype(np.float32), 100_000_000)
        assert fr.is_dynamic[:n_car].all() == car
        assert fr.is_dynamic[n_car:].any() == wall_dyn


def test_group_medians_equal_a_per_group_sort():
    """The loop-free per-object median (the fit's start) equals sorting each group on its own."""
    from zeroflow_ros.core.static_residual import _group_medians
    rng = np.random.default_rng(0)
    for _ in range(30):
        _, g = np.unique(rng.integers(0, int(rng.integers(1, 40)), size=int(rng.integers(1, 300))),
                         return_inverse=True)
        v = rng.normal(size=(len(g), 3))
        got = _group_medians(v, g)
        for k in range(int(g.max()) + 1):
            s = np.sort(v[g == k], axis=0)
            assert np.array_equal(got[k], s[(len(s) - 1) // 2])
