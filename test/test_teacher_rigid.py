"""Rigid-object teacher on a hand-built pair with an exactly known answer, and its building blocks.

The scene (ego frame of sweep t): a car-sized box moving 2 m per sweep (20 m/s), a vehicle turning
at 25 m/s (2.5 m and 0.08 rad per sweep), a static 15 m wall (short enough to be registered, so the
teacher must not slide it along itself), and ground; the ego vehicle drives and turns too. Each
sweep samples the surfaces independently (different points at t and t+1, 1 cm noise), so no point
has an exact partner. The expected AV2 flow is computed here from the object motions and the ego
motion directly: ``q - p`` with ``q = ego1_T_ego0 @ M_obj @ p``.
"""
from __future__ import annotations

import numpy as np
import pytest

from zeroflow_ros.core.geometry import invert, transform_points, yaw_transform
from zeroflow_ros.core.preprocess import PreprocessConfig, prepare_pair

from zeroflow_training.teacher import TeacherConfig, run_teacher
from zeroflow_training.teacher.rigid import RigidConfig, RigidError, run_rigid, voxel_clusters

SPACING = 0.1


def _box_surface(rng, size, spacing=SPACING) -> np.ndarray:
    """Points on the four sides and the top of an axis-aligned box centred at 0 (object frame)."""
    lx, ly, lz = size
    faces = []
    for (a, b), make in (
            ((lx, lz), lambda u, v: np.c_[u, np.full_like(u, ly / 2), v]),
            ((lx, lz), lambda u, v: np.c_[u, np.full_like(u, -ly / 2), v]),
            ((ly, lz), lambda u, v: np.c_[np.full_like(u, lx / 2), u, v]),
            ((ly, lz), lambda u, v: np.c_[np.full_like(u, -lx / 2), u, v]),
            ((lx, ly), lambda u, v: np.c_[u, v, np.full_like(u, lz / 2)])):
        n = int(a * b / spacing ** 2)
        faces.append(make(rng.uniform(-a / 2, a / 2, n), rng.uniform(-b / 2, b / 2, n)))
    return np.concatenate(faces)


def _pose(x, y, z, yaw) -> np.ndarray:
    return yaw_transform(yaw, (x, y, z))


def _scene(seed: int):
    """Objects as (name, size, pose at t, motion M in ego0 at t -> t+1)."""
    turn_c0 = np.array([-4.0, -12.0, 0.8])
    yaw0, dyaw, step = 0.3, 0.08, 2.5
    turn_c1 = turn_c0 + step * np.array([np.cos(yaw0 + dyaw / 2), np.sin(yaw0 + dyaw / 2), 0.0])
    # Rotation by dyaw about the car's centre, centre moved along the arc's chord.
    turn_m = _pose(*turn_c1, 0.0) @ yaw_transform(dyaw) @ _pose(*(-turn_c0), 0.0)
    return [
        ('box', (4.5, 1.8, 1.5), _pose(10.0, 5.0, 0.8, 0.0), _pose(2.0, 0.0, 0.0, 0.0)),
        ('turning', (4.6, 1.9, 1.5), _pose(*turn_c0, yaw0), turn_m),
        ('wall', (15.0, 0.3, 2.5), _pose(5.0, 16.0, 1.3, 0.0), np.eye(4)),
    ]


def _sweep(rng, objects, at_t1: bool):
    pts, owner = [], []
    for k, (_, size, pose0, motion) in enumerate(objects):
        pose = motion @ pose0 if at_t1 else pose0
        p = transform_points(pose, _box_surface(rng, size))
        pts.append(p)
        owner.append(np.full(len(p), k))
    ground = np.c_[rng.uniform(-30, 30, (6000, 2)), rng.normal(0.0, 0.01, 6000)]
    pts.append(ground)
    owner.append(np.full(len(ground), -1))
    pts = np.concatenate(pts) + rng.normal(0.0, 0.01, (sum(len(p) for p in pts), 3))
    return pts, np.concatenate(owner)


@pytest.fixture(scope='module')
def pair():
    rng = np.random.default_rng(7)
    objects = _scene(7)
    ego1_T_ego0 = invert(yaw_transform(0.03, (1.2, 0.05, 0.0)))  # ego drives 1.2 m and turns
    p0, own0 = _sweep(rng, objects, at_t1=False)
    p1_in0, own1 = _sweep(rng, objects, at_t1=True)
    p1 = transform_points(ego1_T_ego0, p1_in0)
    # Exact AV2 flow of sweep t, straight from the definitions: q - p with q = T M p.
    expected = np.zeros_like(p0)
    for k, (_, _, _, motion) in enumerate(objects):
        sel = own0 == k
        expected[sel] = transform_points(ego1_T_ego0 @ motion, p0[sel]) - p0[sel]
    ground = own0 == -1
    expected[ground] = transform_points(ego1_T_ego0, p0[ground]) - p0[ground]
    return dict(p0=p0.astype(np.float32), p1=p1.astype(np.float32), T=ego1_T_ego0, own0=own0,
                g0=own0 == -1, g1=own1 == -1, expected=expected, names=[o[0] for o in objects])


def _teacher_av2_flow(pair, cfg: TeacherConfig) -> np.ndarray:
    prep = prepare_pair(pair['p0'], pair['p1'], pair['T'], PreprocessConfig(ground='map'),
                        is_ground0=pair['g0'], is_ground1=pair['g1'])
    residual, info = run_teacher(prep.pc0, prep.pc1, cfg, dt=0.1)
    assert info['status'] == 'ok' and info['teacher'] == cfg.name
    full = np.zeros((len(pair['p0']), 3))
    full[prep.mask0] = residual
    p = pair['p0'].astype(np.float64)
    # Residual -> AV2 flow by the definition T (p + r) - p (not via the code under test).
    return transform_points(pair['T'], p + full) - p


def test_rigid_teacher_matches_the_exact_motion_of_each_object(pair):
    flow = _teacher_av2_flow(pair, TeacherConfig('rigid'))
    err = np.linalg.norm(flow - pair['expected'], axis=1)
    for k, name in enumerate(pair['names']):
        sel = pair['own0'] == k
        if name == 'wall':
            # Static structure: exactly the ego motion (the teacher outputs residual 0 there).
            assert err[sel].max() < 1e-4, f'wall moved: max error {err[sel].max():.4f} m'
        else:
            assert np.median(err[sel]) < 0.03 and err[sel].mean() < 0.05, \
                f'{name}: mean error {err[sel].mean():.3f} m, median {np.median(err[sel]):.3f} m'
    # Sanity of the scene itself: the movers really move 2-2.5 m relative to the world.
    static = transform_points(pair['T'], pair['p0'].astype(np.float64)) - pair['p0']
    moved = np.linalg.norm(pair['expected'] - static, axis=1)
    assert moved[pair['own0'] == 0].min() > 1.9 and moved[pair['own0'] == 1].min() > 2.0


def test_ego_only_pair_is_all_static():
    rng = np.random.default_rng(3)
    objects = [(n, s, p, np.eye(4)) for n, s, p, _ in _scene(3)]
    p0, _ = _sweep(rng, objects, False)
    p1, _ = _sweep(rng, objects, True)
    keep0, keep1 = p0[:, 2] > 0.2, p1[:, 2] > 0.2
    flow, info = run_rigid(p0[keep0].astype(np.float32), p1[keep1].astype(np.float32))
    assert info['moving_objects'] == 0 and not flow.any()


def test_voxel_clusters_equal_brute_force_components():
    from scipy.sparse.csgraph import connected_components
    rng = np.random.default_rng(0)
    pts = rng.uniform(0, 6, (400, 3))
    labels = voxel_clusters(pts, 0.5, 1.0)
    # Brute force: two points are linked when their voxels differ by at most 1 on every axis.
    ijk = np.floor(pts / (0.5, 0.5, 1.0)).astype(int)
    adj = (np.abs(ijk[:, None, :] - ijk[None, :, :]) <= 1).all(axis=2)
    _, ref = connected_components(adj, directed=False)
    # Same partition (ids may differ): pairs in the same cluster agree.
    np.testing.assert_array_equal(labels[:, None] == labels[None, :], ref[:, None] == ref[None, :])


def test_bad_input_and_config_are_clear_errors():
    with pytest.raises(RigidError, match=r'pc0: expected an \(N,3\) float array'):
        run_rigid(np.zeros((5, 2), np.float32), np.zeros((5, 3), np.float32))
    with pytest.raises(RigidError, match='non-finite'):
        run_rigid(np.full((5, 3), np.nan, np.float32), np.zeros((5, 3), np.float32))
    with pytest.raises(RigidError, match='unknown keys'):
        RigidConfig.from_dict({'voxel': 1})
    with pytest.raises(RigidError, match='max_speed_mps'):
        RigidConfig(max_speed_mps=-1)
    with pytest.raises(ValueError, match='unknown'):
        TeacherConfig('icp')
    cfg = TeacherConfig('hybrid')
    assert TeacherConfig.from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()
