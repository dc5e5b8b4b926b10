"""Synthetic lidar simulator: av2 ground-truth parity, determinism, ray-casting geometry, realism."""
from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from zeroflow_training.data import raycast as rc
from zeroflow_training.data import synth
from zeroflow_training.data.scene import SceneConfig, generate_scene

TINY = dict(beams=16, azimuths=600)


@pytest.fixture(scope='module')
def tiny_root(tmp_path_factory) -> Path:
    return synth.make_tiny_dataset(tmp_path_factory.mktemp('synth'), logs=2, sweeps=3, split='val', **TINY)


def _files(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob('*')) if p.is_file()}


# --------------------------------------------------------------------------- av2 parity

def test_category_table_matches_av2():
    from av2.evaluation.scene_flow.constants import CATEGORY_TO_INDEX
    assert synth.CATEGORY_TO_INDEX == dict(CATEGORY_TO_INDEX)


def test_interior_mask_matches_av2_cuboid():
    from av2.structures.cuboid import Cuboid
    from av2.geometry.se3 import SE3
    rng = np.random.default_rng(0)
    pts = rng.uniform(-4, 4, size=(20000, 3)).astype(np.float32)
    for _ in range(20):
        yaw, pitch = rng.uniform(-np.pi, np.pi), rng.normal(0, 0.05)
        q = np.array([np.cos(yaw / 2), 0, np.sin(pitch / 2), np.sin(yaw / 2)])
        q /= np.linalg.norm(q)
        t = rng.uniform(-1, 1, 3)
        lwh = rng.uniform(0.5, 5, 3)
        R = synth.quat_wxyz_to_mat(q)
        ref = Cuboid(SE3(R, t), *lwh, category='BUS', timestamp_ns=0).compute_interior_points(pts)[1]
        ours = synth.interior_mask(pts, synth._PointIndex(pts), R, t, lwh)
        assert ref.any()
        np.testing.assert_array_equal(ours, ref)


def test_gt_matches_official_av2_flow(tiny_root: Path, tmp_path: Path):
    """av2's SceneFlowDataloader + Flow.from_sweep_pair on our cuboids and poses == our GT files."""
    n_dyn, n_obj, n_invalid = _av2_parity(tiny_root, tmp_path, 2 * 2)
    assert n_dyn > 50 and n_obj > 500 and n_invalid > 0      # every branch of the rule is exercised


def test_gt_matches_official_av2_flow_rolling_shutter_highway(tmp_path: Path):
    """The same parity for a raw (not de-skewed) rolling-shutter sweep of fast highway traffic."""
    from zeroflow_training.data.scene import SceneConfig
    lidar = synth.LidarConfig(beams=16, azimuths=600, shutter='raw', min_range_m=0.3, range_10pct_m=60.0)
    synth.generate_one(synth.VAL_SEED_BASE, tmp_path / 'ds' / 'val', 3, lidar, SceneConfig(kind='highway'))
    n_dyn, n_obj, _ = _av2_parity(tmp_path / 'ds', tmp_path / 'ref', 2)
    assert n_dyn > 50 and n_obj > 200


def _av2_parity(root: Path, tmp_path: Path, pairs: int) -> tuple[int, int, int]:
    from av2.torch.data_loaders.scene_flow import SceneFlowDataloader
    tiny_root = root
    (tmp_path / 'av2' / 'sensor').mkdir(parents=True)
    (tmp_path / 'av2' / 'sensor' / 'val').symlink_to(tiny_root / 'val', target_is_directory=True)
    loader = SceneFlowDataloader(tmp_path, 'av2', 'val')
    assert len(loader) == pairs
    n_dyn = n_obj = n_invalid = 0
    for i in range(len(loader)):
        s0, s1, ego1_T_ego0, flow = loader[i]
        log_id, ts = s0.sweep_uuid
        gt = pd.read_feather(tiny_root / 'val' / log_id / 'scene_flow' / f'{ts}.feather')
        assert len(gt) == len(flow)
        ours = gt[['flow_tx_m', 'flow_ty_m', 'flow_tz_m']].to_numpy()
        ref = flow.flow.numpy()
        np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
        np.testing.assert_array_equal(gt['is_valid'].to_numpy(), flow.is_valid.numpy())
        np.testing.assert_array_equal(gt['category_indices'].to_numpy(), flow.category_indices.numpy())
        # is_dynamic may only differ where |flow - rigid| sits within float noise of the 5 cm threshold
        pts = s0.lidar.as_tensor()[:, :3].numpy().astype(np.float64)
        T = ego1_T_ego0.matrix().numpy()[0].astype(np.float64)
        rigid = pts @ T[:3, :3].T + T[:3, 3] - pts
        near = np.abs(np.linalg.norm(ref - rigid, axis=1) - 0.05) < 1e-4
        differ = gt['is_dynamic'].to_numpy() != flow.is_dynamic.numpy()
        assert not (differ & ~near).any()
        n_dyn += int(flow.is_dynamic.sum())
        n_obj += int((flow.category_indices > 0).sum())
        n_invalid += int((~flow.is_valid).sum())
        # the flow convention: static background moves by the ego motion only
        bg = gt['category_indices'].to_numpy() == 0
        np.testing.assert_allclose(ours[bg], rigid[bg], atol=1e-4)
    print(f'av2 parity: {n_dyn} dynamic, {n_obj} object, {n_invalid} invalid points')
    return n_dyn, n_obj, n_invalid


def test_map_loads_in_av2_and_ground_rule(tiny_root: Path):
    """av2's own map (raster + vector) flags >= 95 % of simulator ground and < 5 % of the rest."""
    from av2.map.map_api import ArgoverseStaticMap
    from zeroflow_ros.core.geometry import transform_points
    from zeroflow_ros.data.av2 import list_logs
    logs = list_logs(tiny_root, 'val')
    assert len(logs) == 2
    for lg in logs:
        avm = ArgoverseStaticMap.from_map_dir(lg.log_dir / 'map', build_raster=True)
        assert len(avm.vector_drivable_areas) >= 1 and len(avm.vector_lane_segments) >= 2
        for ts in lg.timestamps[:2]:
            pts = lg.points(int(ts)).astype(np.float64)
            city = transform_points(lg.pose(int(ts)), pts)
            flagged = avm.get_ground_points_boolean(city).astype(bool)
            gt = pd.read_feather(lg.log_dir / 'scene_flow' / f'{int(ts)}.feather')
            ground = gt['is_ground'].to_numpy()
            assert 0.1 < ground.mean() < 0.6
            assert flagged[ground].mean() >= 0.95
            assert flagged[~ground].mean() < 0.05
            # the project's own reader agrees with av2 on the rule
            np.testing.assert_array_equal(lg.ground_mask(pts.astype(np.float32), int(ts)), flagged)


def test_reader_reads_logs(tiny_root: Path):
    from zeroflow_ros.data.av2 import iter_pairs
    pairs = list(iter_pairs(tiny_root, 'val'))
    assert len(pairs) == 4
    for p in pairs:
        assert p.points0.dtype == np.float32 and p.gt is not None
        assert len(p.gt.flow) == len(p.points0)
        assert p.ts1 - p.ts0 == synth.SWEEP_PERIOD_NS
        # sensor layout: ego frame, sensor ~1.8 m above the ground under the car
        near = np.linalg.norm(p.points0[:, :2], axis=1) < 15
        assert -0.6 < np.median(p.points0[near & p.is_ground0, 2]) < 0.6


# --------------------------------------------------------------------------- determinism

def test_deterministic_and_seed_dependent(tmp_path: Path):
    kw = dict(logs=1, sweeps=2, split='train', beams=8, azimuths=300)
    a = _files(synth.make_tiny_dataset(tmp_path / 'a', seed=5, **kw))
    b = _files(synth.make_tiny_dataset(tmp_path / 'b', seed=5, **kw))
    c = _files(synth.make_tiny_dataset(tmp_path / 'c', seed=6, **kw))
    assert a == b and len(a) >= 10
    lidar_a = {k: v for k, v in a.items() if '/sensors/lidar/' in k}
    lidar_c = {k: v for k, v in c.items() if '/sensors/lidar/' in k}
    assert set(lidar_a.values()).isdisjoint(lidar_c.values())


def test_split_seeds_disjoint():
    assert synth.split_seeds('train', 3, 10) == [10, 11, 12]
    assert synth.split_seeds('val', 2, 10) == [synth.VAL_SEED_BASE, synth.VAL_SEED_BASE + 1]
    with pytest.raises(synth.SynthError, match='seed'):
        synth.split_seeds('train', 5, synth.VAL_SEED_BASE - 2)
    with pytest.raises(synth.SynthError, match='split'):
        synth.split_seeds('test', 1, 0)


# --------------------------------------------------------------------------- ray casting geometry

def _march(o, d, inside_fn, t_max=40.0, step=2e-3):
    """First sample along each ray that is inside the primitive (brute force, independent)."""
    ts = np.arange(step, t_max, step)
    out = np.full(len(d), np.inf)
    for i in range(len(d)):
        p = o + ts[:, None] * d[i]
        hit = np.flatnonzero(inside_fn(p))
        if len(hit):
            out[i] = ts[hit[0]]
    return out


def _random_dirs(rng, n):
    v = rng.normal(size=(n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_primitive_hits_match_ray_marching():
    rng = np.random.default_rng(1)
    o = np.array([0.3, -0.2, 1.8])
    # oriented box
    c, half, yaw = np.array([6.0, 2.0, 1.0]), np.array([2.0, 0.8, 1.0]), 0.7
    d = _random_dirs(rng, 150)
    d[:60] = (c + rng.uniform(-1, 1, (60, 3)) * half - o)
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    cs, sn = np.cos(yaw), np.sin(yaw)

    def in_box(p):
        q = p - c
        lx, ly = cs * q[:, 0] + sn * q[:, 1], -sn * q[:, 0] + cs * q[:, 1]
        return (np.abs(lx) <= half[0]) & (np.abs(ly) <= half[1]) & (np.abs(q[:, 2]) <= half[2])
    t = rc._box_hits(o, d, c, half, yaw)
    ref = _march(o, d, in_box)
    assert np.isfinite(ref).sum() >= 50
    np.testing.assert_array_equal(np.isfinite(t), np.isfinite(ref))
    assert np.all(np.abs(t - ref)[np.isfinite(ref)] <= 2.5e-3)
    # vertical capped cylinder, rays from above included (top cap)
    cc, r, hh = np.array([-3.0, 4.0, 0.6]), 0.5, 0.6
    d = cc + rng.uniform(-0.7, 0.7, (120, 3)) - o
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    t = rc._cylinder_hits(o, d, cc, r, hh)
    ref = _march(o, d, lambda p: (np.hypot(p[:, 0] - cc[0], p[:, 1] - cc[1]) <= r)
                 & (np.abs(p[:, 2] - cc[2]) <= hh))
    assert np.isfinite(ref).sum() >= 40
    np.testing.assert_array_equal(np.isfinite(t), np.isfinite(ref))
    assert np.all(np.abs(t - ref)[np.isfinite(ref)] <= 2.5e-3)
    # undulating sloped ground and a draped sidewalk slab (curb face + top)
    g = rc.GroundSurface(z0=0.1, gx=0.02, gy=-0.01, amp=0.08, kx=0.15, ky=0.1, px=0.3, py=1.0)
    o2 = np.array([0.0, 0.0, 1.9])
    d = _random_dirs(rng, 200)
    d[:, 2] = -np.abs(d[:, 2]) - 0.15
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    t = g.intersect(o2, d)
    ref = _march(o2, d, lambda p: p[:, 2] <= g.height(p[:, 0], p[:, 1]))
    ok = np.isfinite(ref)
    assert ok.sum() > 150 and np.all(np.abs(t - ref)[ok] <= 2.5e-3)
    sc, sh, syaw, off = np.array([4.0, 1.0]), np.array([1.5, 3.0]), 0.3, 0.15
    cs, sn = np.cos(syaw), np.sin(syaw)
    d = np.concatenate([np.c_[sc + rng.uniform(-2, 2, (150, 2)), rng.uniform(-0.1, 0.3, 150)] - o2])
    d /= np.linalg.norm(d, axis=1, keepdims=True)

    def in_slab(p):
        q = p[:, :2] - sc
        lx, ly = cs * q[:, 0] + sn * q[:, 1], -sn * q[:, 0] + cs * q[:, 1]
        h = g.height(p[:, 0], p[:, 1])
        return (np.abs(lx) <= sh[0]) & (np.abs(ly) <= sh[1]) & (p[:, 2] <= h + off) & (p[:, 2] >= h)
    t = rc._slab_hits(o2, d, g, sc, sh, syaw, off)
    ref = _march(o2, d, in_slab, t_max=10.0)
    assert np.isfinite(ref).sum() > 60
    np.testing.assert_array_equal(np.isfinite(t), np.isfinite(ref))
    assert np.all(np.abs(t - ref)[np.isfinite(ref)] <= 2.5e-3)


def test_culled_cast_equals_brute_force_on_a_scene():
    """The azimuth/elevation culling never drops a hit: compare with every primitive on every ray."""
    scene = generate_scene(11, 0.2, 100.0)
    P = synth._copy_static(scene.static)
    for agent in scene.agents:
        x, y, yaw = (float(v[0]) for v in agent.poses(np.array([0.0]), 0.2))
        origin = np.array([x, y, float(scene.surface_height(x, y))])
        synth._agent_primitives(P, agent, synth.agent_rotation(scene, agent, x, y, yaw), origin, yaw)
    T = scene.city_T_ego(np.array([0.0]))[0]
    o = T[:3, :3] @ np.array([1.35, 0, 1.8]) + T[:3, 3]
    rng = np.random.default_rng(3)
    dirs_e, _, _ = synth.LidarConfig().ray_grid()
    d = dirs_e[rng.choice(len(dirs_e), 1500, replace=False)] @ T[:3, :3].T
    res = rc.cast(o, d, scene.ground, P, 100.0, np.random.default_rng(0))
    best = scene.ground.intersect(o, d)
    hits = [best]
    assert any(abs(R[2, 2]) < 1 - 1e-6 for R in P.box_rot)       # tilted vehicles are exercised
    for c, h, R in zip(P.box_center, P.box_half, P.box_rot):
        hits.append(rc._box_hits(o, d, c, h, R))
    for c, h, y, off in zip(P.slab_center, P.slab_half, P.slab_yaw, P.slab_offset):
        hits.append(rc._slab_hits(o, d, scene.ground, c, h, y, off))
    for c, r, hh in zip(P.cyl_center, P.cyl_radius, P.cyl_half_h):
        hits.append(rc._cylinder_hits(o, d, c, r, hh))
    hits = np.stack(hits)
    porous = P.table()['porosity'] > 0
    solid = np.where(porous[:, None], np.inf, hits).min(axis=0)
    nearest = hits.min(axis=0)
    ref_t = np.where(nearest <= 100.0, nearest, np.inf)
    # porous vegetation may let a ray through to the next solid surface, never further
    exact = np.isclose(res.t, ref_t) | (np.isinf(res.t) & np.isinf(ref_t))
    assert exact.mean() > 0.9
    assert np.all(res.t[~exact] <= np.where(solid <= 100.0, solid, np.inf)[~exact] + 1e-9)
    assert np.all(res.t >= ref_t - 1e-9)              # nothing is returned from behind a closer surface
    assert np.isfinite(res.t).mean() > 0.6


def test_occlusion_wall_shadows_what_is_behind():
    """A wall in front of a box: every ray through the wall returns the wall, none the box."""
    g = rc.GroundSurface()
    P = rc.Primitives()
    P.add_box((10.0, 0.0, 1.5), (0.1, 3.0, 1.5), 0.0, instance=1)      # wall, x 9.9..10.1, y -3..3
    P.add_box((20.0, 0.0, 1.0), (1.0, 1.0, 1.0), 0.0, instance=2)      # box hidden behind it
    cfg = synth.LidarConfig(beams=32, azimuths=3600)
    d, _, _ = cfg.ray_grid()
    o = np.array([0.0, 0.0, 1.8])
    res = rc.cast(o, d, g, P, 100.0, np.random.default_rng(0))
    inst = P.table()['instance'][np.maximum(res.prim, 0)]
    assert not np.any((res.prim > 0) & (inst == 2))
    wall = (res.prim > 0) & (inst == 1)
    assert wall.sum() > 100
    np.testing.assert_allclose(res.t[wall] * d[wall, 0], 9.9, atol=1e-9)
    # without the wall the same rays see the box
    P2 = rc.Primitives()
    P2.add_box((20.0, 0.0, 1.0), (1.0, 1.0, 1.0), 0.0, instance=2)
    res2 = rc.cast(o, d, g, P2, 100.0, np.random.default_rng(0))
    assert (res2.prim > 0).sum() > 20


# --------------------------------------------------------------------------- realism

def test_default_sweep_realism():
    lg = synth.simulate_log(2, 2)
    for sw, lab in zip(lg.sweeps, lg.flows + [None]):
        n = len(sw.points)
        assert 30_000 <= n <= 120_000
        assert 0.1 < sw.is_ground.mean() < 0.45            # real AV2 sample: 0.14
        assert 5.0 < np.median(np.linalg.norm(sw.points[:, :2], axis=1)) < 30.0     # real AV2: 15.9 m
        # grazing ground returns are dark, as on real AV2 (mean intensity ~12 ground, ~23 the rest)
        assert sw.intensity[sw.is_ground].mean() < sw.intensity[~sw.is_ground].mean() < 60
        # one return per (laser, column) at most: a ray never yields a point behind its first hit
        key = sw.laser_number.astype(np.int64) * 100_000 + sw.offset_ns.astype(np.int64) // (10 ** 8 // 1800)
        assert len(np.unique(key)) == n
        assert sw.laser_number.max() == 31 and sw.offset_ns.max() < 10 ** 8
        r = np.linalg.norm(sw.points - np.array([1.35, 0, 1.8], np.float32), axis=1)
        assert r.max() <= 100.0 + 1e-3
    lab = lg.flows[0]
    moving = {a.instance for a in lg.scene.agents if a.profile is not None and a.profile.v0 > 1.0}
    dyn_inst = set(np.unique(lab['instance_id'][lab['is_dynamic']]).tolist())
    assert lab['is_dynamic'].sum() > 100 and dyn_inst & moving
    # static world never flagged dynamic, labels as written by the annotations
    static_pts = (lab['category_indices'] == 0)
    assert not lab['is_dynamic'][static_pts].any()
    # object geometry lies inside its cuboid (only range noise pushes a few returns out), and the
    # unannotated world (walls, trees, poles) inside none
    obj = lab['instance_id'] >= 0
    assert obj.sum() > 500 and (lab['category_indices'][obj] > 0).mean() > 0.99
    world = ~obj & ~lab['is_ground']
    assert (lab['category_indices'][world] > 0).mean() < 0.01
    # pedestrians stand on the surface under them: sidewalk tops (curb 0.15 m) or the road
    ann = lg.annotations[lg.annotations.timestamp_ns == lg.timestamps[0]]
    ped = ann[ann.category == 'PEDESTRIAN']
    centre = ped[['tx_m', 'ty_m', 'tz_m']].to_numpy() @ lg.city_T_ego[0][:3, :3].T + lg.city_T_ego[0][:3, 3]
    bottom = centre[:, 2] - ped['height_m'].to_numpy() / 2
    support = lg.scene.surface_height(centre[:, 0], centre[:, 1])
    on_sidewalk = support - lg.scene.ground.height(centre[:, 0], centre[:, 1]) > 0.1
    assert len(ped) >= 3 and on_sidewalk.any()
    np.testing.assert_allclose(bottom, support, atol=1e-6)


def test_ego_behaviours_over_seeds():
    modes, stopped, fast, turned = set(), 0, 0, 0
    for seed in range(6):
        sc = generate_scene(seed, 1.9, 100.0, SceneConfig(kind='urban'))
        T = sc.city_T_ego(np.arange(20) * 0.1)
        v = np.linalg.norm(np.diff(T[:, :3, 3], axis=0), axis=1) / 0.1
        yaw = np.unwrap(np.arctan2(T[:, 1, 0], T[:, 0, 0]))
        assert v.max() < 20 and np.abs(np.diff(v)).max() / 0.1 < 8.0       # m/s, m/s^2
        modes.add(sc.ego_mode)
        stopped += bool((v < 1e-3).any())
        fast += bool(v.max() > 5)
        turned += bool(abs(yaw[-1] - yaw[0]) > 0.2)
    assert stopped >= 1 and fast >= 1 and turned >= 1 and len(modes) >= 3


# --------------------------------------------------------------------------- CLI and bad input

def test_cli_writes_splits_and_resumes(tmp_path: Path, capsys):
    from zeroflow_training.data.cli_synth import add_synth_arguments, run_synth
    p = argparse.ArgumentParser()
    add_synth_arguments(p)
    argv = [str(tmp_path / 'ds'), '--sequences', '1', '--sweeps', '2', '--seed', '3', '--split-val', '1',
            '--beams', '8', '--azimuths', '200']
    assert run_synth(p.parse_args(argv)) == 0
    train = list((tmp_path / 'ds' / 'train').iterdir())
    val = list((tmp_path / 'ds' / 'val').iterdir())
    assert [d.name for d in train] == [synth.log_id_for_seed(3)]
    assert [d.name for d in val] == [synth.log_id_for_seed(synth.VAL_SEED_BASE)]
    before = _files(tmp_path / 'ds')
    mtimes = {q: q.stat().st_mtime_ns for q in (tmp_path / 'ds').rglob('*.feather')}
    assert run_synth(p.parse_args(argv)) == 0
    assert 'skipped' in capsys.readouterr().out
    assert {q: q.stat().st_mtime_ns for q in (tmp_path / 'ds').rglob('*.feather')} == mtimes
    assert _files(tmp_path / 'ds') == before
    with pytest.raises(synth.SynthError, match='--sweeps'):
        run_synth(p.parse_args(argv[:1] + ['--sweeps', '1']))
    # --overwrite with fewer sweeps replaces the log as a whole: no stale sweeps, no partial folder
    small = ['--sequences', '1', '--seed', '3', '--beams', '8', '--azimuths', '200']
    assert run_synth(p.parse_args(argv[:1] + small + ['--sweeps', '3'])) == 0
    assert run_synth(p.parse_args(argv[:1] + small + ['--sweeps', '2', '--overwrite'])) == 0
    log_dir = tmp_path / 'ds' / 'train' / synth.log_id_for_seed(3)
    assert len(list((log_dir / 'sensors' / 'lidar').iterdir())) == 2
    assert len(list((log_dir / 'scene_flow').iterdir())) == 1
    assert sorted(q.name for q in (tmp_path / 'ds').iterdir()) == ['train', 'val']
    with pytest.raises(synth.SynthError, match='--points'):
        run_synth(p.parse_args(argv[:1] + ['--points', '10']))
    with pytest.raises(synth.SynthError, match='--elevations'):
        run_synth(p.parse_args(argv[:1] + ['--elevations', '1,x']))
    # explicit beam angles reach the sensor model
    assert run_synth(p.parse_args([str(tmp_path / 'el'), '--sequences', '1', '--sweeps', '2',
                                   '--azimuths', '200', '--elevations=-20,-10,-5,-2'])) == 0
    lid = next((tmp_path / 'el' / 'train').iterdir()) / 'sensors' / 'lidar'
    laser = pd.read_feather(sorted(lid.iterdir())[0])['laser_number'].to_numpy()
    assert set(np.unique(laser)) <= {0, 1, 2, 3} and len(np.unique(laser)) >= 3


@pytest.mark.parametrize('kw, match', [
    (dict(beams=0), 'beams'), (dict(azimuths=2), 'azimuths'), (dict(max_range_m=1.0), 'max_range_m'),
    (dict(dropout=1.5), 'dropout'), (dict(beams=4, elevations_deg=(0.0, 1.0)), 'elevations_deg')])
def test_bad_lidar_settings(kw, match):
    with pytest.raises(synth.SynthError, match=match):
        synth.simulate_log(0, 2, synth.LidarConfig(**kw))


def _inside_rect(p, c, yaw, half):
    q = p - c
    lx = np.cos(yaw) * q[:, 0] + np.sin(yaw) * q[:, 1]
    ly = -np.sin(yaw) * q[:, 0] + np.cos(yaw) * q[:, 1]
    return (np.abs(lx) <= half[0]) & (np.abs(ly) <= half[1])


def test_traffic_never_overlaps_ego_or_each_other():
    """Footprints sampled on a 10 cm grid: no moving agent enters the ego or another agent."""
    from zeroflow_training.data.scene import EGO_LENGTH, EGO_REAR_OVERHANG, EGO_WIDTH
    times = np.arange(20) * 0.1
    for seed in (0, 4):
        sc = generate_scene(seed, 1.9, 100.0)
        ex, ey, eyaw = sc.ego_xy_yaw(times)
        off = EGO_LENGTH / 2 - EGO_REAR_OVERHANG
        boxes = [(np.stack([ex + off * np.cos(eyaw), ey + off * np.sin(eyaw)], -1), eyaw,
                  np.array([EGO_LENGTH / 2, EGO_WIDTH / 2]), True, -1)]
        for a in sc.agents:
            x, y, yaw = a.poses(times, 1.9)
            for trk in a.tracks:
                c = np.stack([x + np.cos(yaw) * trk.offset[0], y + np.sin(yaw) * trk.offset[0]], -1)
                boxes.append((c, yaw, trk.dims[:2] / 2, a.profile is not None, a.instance))
        moving = [b for b in boxes if b[3]]
        assert len(moving) > 10
        centres = np.stack([b[0] for b in boxes])                      # (B, T, 2)
        reach = np.array([np.hypot(*b[2]) for b in boxes])
        for k in range(0, 20, 4):
            for ci, yi, hi, _, ii in moving:
                near = np.flatnonzero(np.linalg.norm(centres[:, k] - ci[k], axis=1) <= reach + np.hypot(*hi))
                g = np.stack(np.meshgrid(np.arange(-hi[0], hi[0], 0.1), np.arange(-hi[1], hi[1], 0.1)),
                             -1).reshape(-1, 2)
                pts = ci[k] + g @ np.array([[np.cos(yi[k]), np.sin(yi[k])], [-np.sin(yi[k]), np.cos(yi[k])]])
                for j in near:
                    cj, yj, hj, _, ij = boxes[j]
                    if ij == ii:        # the same agent (itself, or bicycle + rider)
                        continue
                    assert not _inside_rect(pts, cj[k], yj[k], hj - 0.05).any(), (seed, k, ii, ij)
