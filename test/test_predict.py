"""``zeroflow predict``: file layout, flow convention, methods, resume, workers, submission archive.

A hand-built AV2-layout log (exact poses, one car moving through static scenery) is the reference:
its ground truth is known in closed form, so the ``ego`` and ``nn`` methods have exact expected
outputs, and the submission archive is checked with av2's own ``make_submission_archive.validate``.
"""
from __future__ import annotations

import argparse
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.feather as feather
import pytest

from zeroflow_ros.core.geometry import ego_flow, invert, matrix_to_quat, transform_points, yaw_transform
from zeroflow_ros.core.preprocess import PreprocessConfig
from zeroflow_ros.eval import predict as P
from zeroflow_ros.eval.masks import MaskError

LOG_ID = 'hand-built-log-0000'
TS0 = 315_970_000_000_000_000
DT_NS = 100_000_000
CAR_STEP = np.array([1.2, 0.3, 0.0])   # city-frame motion of the car per sweep (12 m/s)


def _surface_points(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """City-frame points: ground, walls, a moving and a parked car, a sign; category, is_ground, moving."""
    ground = np.c_[rng.uniform(-40, 40, (600, 2)), np.full(600, -1.8)]
    wall1 = np.c_[rng.uniform(-30, 30, 250), np.full(250, 12.0), rng.uniform(-1.5, 3.0, 250)]
    wall2 = np.c_[np.full(200, 25.0), rng.uniform(-20, 10, 200), rng.uniform(-1.5, 3.0, 200)]
    car = np.c_[rng.uniform(6, 10.5, 150), rng.uniform(-4, -2.2, 150), rng.uniform(-1.5, 0.0, 150)]
    far = np.c_[rng.uniform(52, 70, 40), rng.uniform(-5, 5, 40), rng.uniform(-1, 2, 40)]  # outside 50 m box
    parked = np.c_[rng.uniform(-12, -8, 80), rng.uniform(4, 6, 80), rng.uniform(-1.4, 0.0, 80)]
    sign = np.c_[rng.uniform(-3, -2.9, 20), rng.uniform(30, 30.5, 20), rng.uniform(0.0, 2.0, 20)]  # 'far'
    pts = np.concatenate([ground, wall1, wall2, car, far, parked, sign])
    cats = np.r_[np.zeros(600 + 250 + 200), np.full(150, 19), np.zeros(40), np.full(80, 19),
                 np.full(20, 21)].astype(np.uint8)
    is_ground = np.r_[np.ones(600, bool), np.zeros(len(pts) - 600, bool)]
    moving = np.r_[np.zeros(1050, bool), np.ones(150, bool), np.zeros(140, bool)]
    return pts, cats, is_ground, moving


def make_av2_log(root: Path, split: str = 'val', log_id: str = LOG_ID, n_sweeps: int = 3, seed: int = 0,
                 with_map: bool = True):
    """Write an AV2-layout log with exact scene-flow ground truth; returns the per-sweep city poses.

    ``with_map`` adds a flat ground-height raster (city z = -1.8 m, 1 m cells over +-100 m) in av2's
    file layout, so ground is the map rule (``z <= -1.5``) and exactly known.
    """
    rng = np.random.default_rng(seed)
    base, cats, is_ground, moving = _surface_points(rng)
    log_dir = root / split / log_id
    (log_dir / 'sensors' / 'lidar').mkdir(parents=True)
    (log_dir / 'scene_flow').mkdir()
    if with_map:
        (log_dir / 'map').mkdir()
        np.save(log_dir / 'map' / f'{log_id}_ground_height_surface____PIT.npy', np.full((200, 200), -1.8))
        (log_dir / 'map' / f'{log_id}___img_Sim2_city.json').write_text(
            json.dumps({'R': [1.0, 0.0, 0.0, 1.0], 't': [100.0, 100.0], 's': 1.0}))
    poses = [yaw_transform(0.02 * k, (0.8 * k, 0.1 * k, 0.0)) for k in range(n_sweeps)]  # city_T_ego
    rows = []
    for k, city_T_ego in enumerate(poses):
        ts = TS0 + k * DT_NS
        q = matrix_to_quat(city_T_ego[:3, :3])
        rows.append(dict(timestamp_ns=ts, qw=q[0], qx=q[1], qy=q[2], qz=q[3], tx_m=city_T_ego[0, 3],
                         ty_m=city_T_ego[1, 3], tz_m=city_T_ego[2, 3]))
        city = base + np.where(moving[:, None], k * CAR_STEP, 0.0)
        order = rng.permutation(len(city))          # lidar-file order differs from sweep to sweep
        ego = transform_points(invert(city_T_ego), city[order]).astype(np.float32)
        pd.DataFrame({'x': ego[:, 0], 'y': ego[:, 1], 'z': ego[:, 2],
                      'intensity': np.full(len(ego), 7, np.uint8)}).to_feather(
            log_dir / 'sensors' / 'lidar' / f'{ts}.feather')
        if k + 1 < n_sweeps:
            city1 = city[order] + np.where(moving[order, None], CAR_STEP, 0.0)
            q1 = transform_points(invert(poses[k + 1]), city1)
            flow = (q1 - ego.astype(np.float64)).astype(np.float32)
            pd.DataFrame({'flow_tx_m': flow[:, 0], 'flow_ty_m': flow[:, 1], 'flow_tz_m': flow[:, 2],
                          'is_valid': np.ones(len(ego), bool), 'is_dynamic': moving[order],
                          'is_ground': is_ground[order], 'category_indices': cats[order],
                          'instance_id': np.where(cats[order] > 0, 1, -1).astype(np.int32)}).to_feather(
                log_dir / 'scene_flow' / f'{ts}.feather')
    pd.DataFrame(rows).to_feather(log_dir / 'city_SE3_egovehicle.feather')
    return poses


@pytest.fixture
def dataset(tmp_path) -> Path:
    make_av2_log(tmp_path / 'data')
    return tmp_path / 'data'


def _predict(data: Path, out: Path, method: str, workers: int = 1, **extra) -> None:
    args = argparse.Namespace(data_root=data, split='val', method=method, model='models/default',
                              backend='auto', device='cpu', ground='auto', out=out, submission=None,
                              submission_out=None, only_masked=False, workers=workers,
                              no_motion_evidence=False)
    vars(args).update(extra)
    assert P.run(args) == 0


def _read(path: Path) -> pd.DataFrame:
    return pd.read_feather(path)


def _lidar(data: Path, k: int) -> np.ndarray:
    t = feather.read_table(data / 'val' / LOG_ID / 'sensors' / 'lidar' / f'{TS0 + k * DT_NS}.feather')
    return np.stack([t.column(c).to_numpy() for c in 'xyz'], axis=1)


def test_ego_method_layout_and_convention(dataset, tmp_path):
    out = tmp_path / 'ego'
    _predict(dataset, out, 'ego')
    files = sorted((out / LOG_ID).glob('*.feather'))
    # The last sweep has no successor.
    assert [f.name for f in files] == [f'{TS0}.feather', f'{TS0 + DT_NS}.feather']
    poses = [yaw_transform(0.02 * k, (0.8 * k, 0.1 * k, 0.0)) for k in range(3)]
    for k, f in enumerate(files):
        df = _read(f)
        assert list(df.columns) == ['flow_tx_m', 'flow_ty_m', 'flow_tz_m', 'is_dynamic']
        assert [str(df[c].dtype) for c in df.columns] == ['float32'] * 3 + ['bool']
        pts = _lidar(dataset, k)
        expect = ego_flow(pts, invert(poses[k + 1]) @ poses[k])
        np.testing.assert_allclose(df[['flow_tx_m', 'flow_ty_m', 'flow_tz_m']].to_numpy(), expect, atol=1e-5)
        assert not df.is_dynamic.any()
        # Static points: exactly the ground truth (which includes ego motion).
        gt = _read(dataset / 'val' / LOG_ID / 'scene_flow' / f.name)
        static = ~gt.is_dynamic.to_numpy()
        np.testing.assert_allclose(df[['flow_tx_m', 'flow_ty_m', 'flow_tz_m']].to_numpy()[static],
                                   gt[['flow_tx_m', 'flow_ty_m', 'flow_tz_m']].to_numpy()[static], atol=1e-4)
    assert not list(out.rglob('*.tmp'))


def test_zero_method(dataset, tmp_path):
    _predict(dataset, tmp_path / 'zero', 'zero')
    df = _read(tmp_path / 'zero' / LOG_ID / f'{TS0}.feather')
    assert (df[['flow_tx_m', 'flow_ty_m', 'flow_tz_m']].to_numpy() == 0).all()
    # Zero AV2 flow = every point moves against the world by inv(T) p - p; dynamic where that is >= 5 cm
    # (all but the points near the instantaneous centre of rotation of the ego motion).
    pts = _lidar(dataset, 0).astype(np.float64)
    T = invert(yaw_transform(0.02, (0.8, 0.1, 0.0)))
    speed = np.linalg.norm(transform_points(invert(T), pts) - pts, axis=1)
    np.testing.assert_array_equal(df.is_dynamic.to_numpy(), speed >= 0.05)
    assert 0.5 < df.is_dynamic.mean() < 1.0


def test_nn_method_against_brute_force(dataset, tmp_path):
    """NN = brute-force nearest non-ground point of t+1 (ego0): exact on static scenery, else ego flow."""
    _predict(dataset, tmp_path / 'nn', 'nn')
    poses = [yaw_transform(0.02 * j, (0.8 * j, 0.1 * j, 0.0)) for j in range(3)]
    cfg = PreprocessConfig()
    for k in range(2):
        name = f'{TS0 + k * DT_NS}.feather'
        df = _read(tmp_path / 'nn' / LOG_ID / name)
        gt = _read(dataset / 'val' / LOG_ID / 'scene_flow' / name)
        pred = df[['flow_tx_m', 'flow_ty_m', 'flow_tz_m']].to_numpy()
        gtf = gt[['flow_tx_m', 'flow_ty_m', 'flow_tz_m']].to_numpy()
        T = invert(poses[k + 1]) @ poses[k]
        p0 = _lidar(dataset, k).astype(np.float64)
        p1 = transform_points(invert(T), _lidar(dataset, k + 1).astype(np.float64))
        # The map rule on the flat raster: city z <= -1.5 is ground (city z = ego z here: yaw-only poses).
        keep0 = cfg.in_range(p0) & (p0[:, 2] > -1.5)
        keep1 = cfg.in_range(p1) & (_lidar(dataset, k + 1)[:, 2] > -1.5)
        q1 = p1[keep1]
        d2 = ((p0[keep0][:, None, :] - q1[None, :, :]) ** 2).sum(-1)
        residual = np.zeros_like(p0)
        residual[keep0] = q1[d2.argmin(1)] - p0[keep0]
        expect = transform_points(T, p0 + residual) - p0
        np.testing.assert_allclose(pred, expect, atol=2e-5)
        np.testing.assert_array_equal(df.is_dynamic.to_numpy(), np.linalg.norm(residual, axis=1) >= 0.05)
        # Static scenery is sampled identically in both sweeps: NN is exactly the ground truth there;
        # ground and out-of-range points get the static-world flow, which is their ground truth too.
        static = ~gt.is_dynamic.to_numpy()
        np.testing.assert_allclose(pred[static], gtf[static], atol=2e-5)
        assert (~keep0).sum() >= 600 + 40


def test_resume_skips_written_files(dataset, tmp_path, capsys):
    out = tmp_path / 'ego'
    _predict(dataset, out, 'ego')
    first = out / LOG_ID / f'{TS0}.feather'
    mtime = first.stat().st_mtime_ns
    (out / LOG_ID / f'{TS0 + DT_NS}.feather').unlink()
    capsys.readouterr()
    _predict(dataset, out, 'ego')
    assert '1 sweeps to predict, 1 already' in capsys.readouterr().out
    assert first.stat().st_mtime_ns == mtime
    assert (out / LOG_ID / f'{TS0 + DT_NS}.feather').exists()


def test_workers_give_identical_files(dataset, tmp_path):
    _predict(dataset, tmp_path / 'one', 'nn', workers=1)
    _predict(dataset, tmp_path / 'two', 'nn', workers=2)
    for f in sorted((tmp_path / 'one' / LOG_ID).glob('*.feather')):
        pd.testing.assert_frame_equal(_read(f), _read(tmp_path / 'two' / LOG_ID / f.name))


def _mask_zip(path: Path, data: Path) -> dict[str, np.ndarray]:
    """A mask archive as av2 make_mask_files writes it (one bool column 'mask' per sweep)."""
    masks = {}
    with zipfile.ZipFile(path, 'w') as zf:
        for k in range(2):
            pts = _lidar(data, k)
            m = (np.abs(pts[:, 0]) <= 50) & (np.abs(pts[:, 1]) <= 50) & (pts[:, 2] > -1.5)
            name = f'{LOG_ID}/{TS0 + k * DT_NS}.feather'
            buf = io.BytesIO()
            pd.DataFrame({'mask': m}).to_feather(buf)
            zf.writestr(name, buf.getvalue())
            masks[name] = m
    return masks


def test_submission_archive_passes_av2_validation(dataset, tmp_path):
    validate = pytest.importorskip('av2.evaluation.scene_flow.make_submission_archive').validate
    masks = _mask_zip(tmp_path / 'masks.zip', dataset)
    out = tmp_path / 'pred'
    _predict(dataset, out, 'nn', submission=tmp_path / 'masks.zip', submission_out=tmp_path / 'sub.zip')
    with zipfile.ZipFile(tmp_path / 'sub.zip') as zf:
        assert sorted(zf.namelist()) == sorted(masks)
        zf.extractall(tmp_path / 'sub')
    validate(tmp_path / 'sub', tmp_path / 'masks.zip')  # raises on any format error
    for name, m in masks.items():
        sub = _read(tmp_path / 'sub' / name)
        full = _read(out / name)
        assert len(sub) == m.sum()
        np.testing.assert_array_equal(sub.flow_tx_m.to_numpy(),
                                      full.flow_tx_m.to_numpy()[m].astype(np.float16))
        np.testing.assert_array_equal(sub.is_dynamic.to_numpy(), full.is_dynamic.to_numpy()[m])


def test_only_masked_predicts_listed_sweeps(dataset, tmp_path):
    masks = _mask_zip(tmp_path / 'masks.zip', dataset)
    with zipfile.ZipFile(tmp_path / 'one.zip', 'w') as zf:
        name = sorted(masks)[1]
        buf = io.BytesIO()
        pd.DataFrame({'mask': masks[name]}).to_feather(buf)
        zf.writestr(name, buf.getvalue())
    _predict(dataset, tmp_path / 'p', 'ego', submission=tmp_path / 'one.zip', only_masked=True)
    assert [p.name for p in (tmp_path / 'p' / LOG_ID).glob('*.feather')] == [name.split('/')[1]]
    assert (tmp_path / 'p.zip').is_file()


def test_bad_inputs_raise_clear_errors(dataset, tmp_path):
    with pytest.raises(P.PredictError, match='unknown method'):
        P.make_method('magic')
    with pytest.raises(ValueError, match='split folder not found'):
        _predict(dataset, tmp_path / 'x', 'ego', split='nope')
    with pytest.raises(P.PredictError, match='--only-masked needs'):
        _predict(dataset, tmp_path / 'x', 'ego', only_masked=True)
    with pytest.raises(MaskError, match='mask archive not found'):
        _predict(dataset, tmp_path / 'x', 'ego', submission=tmp_path / 'missing.zip')
    # A prediction file with the wrong row count cannot go into a submission.
    _mask_zip(tmp_path / 'masks.zip', dataset)
    _predict(dataset, tmp_path / 'p', 'ego')
    f = tmp_path / 'p' / LOG_ID / f'{TS0}.feather'
    _read(f).iloc[:-1].reset_index(drop=True).to_feather(f)
    with pytest.raises(P.PredictError, match=f'{TS0}.feather: .* rows but the mask'):
        P.write_submission(tmp_path / 'p', tmp_path / 'masks.zip', tmp_path / 's.zip')
    assert not (tmp_path / 's.zip').exists()


def _expected_from_residual(data: Path, k: int, scored_residual: np.ndarray, mask0: np.ndarray) -> np.ndarray:
    poses = [yaw_transform(0.02 * j, (0.8 * j, 0.1 * j, 0.0)) for j in range(3)]
    T = invert(poses[k + 1]) @ poses[k]
    p0 = _lidar(data, k).astype(np.float64)
    res = np.zeros_like(p0)
    res[mask0] = scored_residual
    return transform_points(T, p0 + res) - p0


def test_student_method_scatters_backend_output(dataset, tmp_path):
    """A random tiny FastFlow3D (torch backend): written flow = backend flow, scattered, in AV2 convention."""
    pytest.importorskip('torch')
    from zeroflow_ros.backends import create_backend
    from zeroflow_ros.core.preprocess import prepare_pair
    from zeroflow_ros.data.av2 import AV2Log
    from zeroflow_ros.model import FastFlow3DConfig
    from zeroflow_training.export import make_random_checkpoint
    # Range +-20 m: many scored points are out of the model's range (valid False -> static-world flow).
    cfg = FastFlow3DConfig(name='test_tiny', pillar_size=0.8, embed_channels=8, stage_channels=(8, 16),
                           stage_blocks=(1, 1), point_cloud_range=(-19.2, -19.2, -3.0, 19.2, 19.2, 3.0))
    ckpt = make_random_checkpoint(cfg, tmp_path / 'm' / 'model.pt', seed=3)
    _predict(dataset, tmp_path / 'st', 'student', model=str(ckpt), backend='torch')
    backend = create_backend(ckpt, 'torch', 'cpu')
    log_ = AV2Log(dataset / 'val' / LOG_ID)
    pair = log_.pair(TS0, TS0 + DT_NS, with_gt=False)
    prep = prepare_pair(pair.points0, pair.points1, pair.ego1_T_ego0, PreprocessConfig(),
                        is_ground0=pair.is_ground0, is_ground1=pair.is_ground1)
    flow, valid = backend.infer(prep.pc0, prep.pc1)
    assert 0 < valid.sum() < len(valid)
    # the node's default post-network check (tested in test_static_residual / test_pipeline)
    from zeroflow_ros.pipeline import PipelineConfig, make_motion_evidence
    flow = make_motion_evidence(PipelineConfig())(flow, valid, prep.pc0, prep.pc1, dt_s=DT_NS * 1e-9)
    scored = np.where(valid[:, None], flow, 0.0)
    expect = _expected_from_residual(dataset, 0, scored, prep.mask0)
    got = _read(tmp_path / 'st' / LOG_ID / f'{TS0}.feather')
    np.testing.assert_allclose(got[['flow_tx_m', 'flow_ty_m', 'flow_tz_m']].to_numpy(), expect, atol=1e-4)
    res = np.zeros((len(prep.mask0), 3))
    res[prep.mask0] = scored
    np.testing.assert_array_equal(got.is_dynamic.to_numpy(), np.linalg.norm(res, axis=1) >= 0.05)


def test_nsfp_method_scatters_teacher_output(dataset, tmp_path):
    """NSFP (a few iterations) through predict = run_nsfp on the prepared pair, scattered, in AV2."""
    pytest.importorskip('torch')
    from zeroflow_ros.core.preprocess import prepare_pair
    from zeroflow_ros.data.av2 import AV2Log
    from zeroflow_training.teacher.nsfp import NSFPConfig, run_nsfp
    few = dict(fast_max_iters=5, fit_points=512)
    method = P.make_method('nsfp', device='cpu', nsfp_config=few)
    assert 'fast' in method.describe()
    log_ = AV2Log(dataset / 'val' / LOG_ID)
    P.predict_pair(method, log_, TS0 + DT_NS, TS0 + 2 * DT_NS, tmp_path / 'ns')
    pair = log_.pair(TS0 + DT_NS, TS0 + 2 * DT_NS, with_gt=False)
    prep = prepare_pair(pair.points0, pair.points1, pair.ego1_T_ego0, PreprocessConfig(),
                        is_ground0=pair.is_ground0, is_ground1=pair.is_ground1)
    residual, _ = run_nsfp(prep.pc0, prep.pc1, NSFPConfig(**few), 'cpu')
    expect = _expected_from_residual(dataset, 1, residual, prep.mask0)
    got = _read(tmp_path / 'ns' / LOG_ID / f'{TS0 + DT_NS}.feather')
    np.testing.assert_allclose(got[['flow_tx_m', 'flow_ty_m', 'flow_tz_m']].to_numpy(), expect, atol=1e-4)
    # Ground and far points: static-world flow exactly.
    pts = _lidar(dataset, 1).astype(np.float64)
    assert np.abs(np.linalg.norm(residual, axis=1)).max() > 0
    np.testing.assert_allclose(got[['flow_tx_m', 'flow_ty_m', 'flow_tz_m']].to_numpy()[~prep.mask0],
                               expect[~prep.mask0], atol=1e-5)
    assert len(got) == len(pts)


def test_every_predicts_exactly_the_pairs_eval_scores(tmp_path):
    from zeroflow_ros.eval.evaluate import list_eval_pairs
    make_av2_log(tmp_path / 'data', n_sweeps=4)
    make_av2_log(tmp_path / 'data', log_id='00000000-0000-0000-0000-00000000beef', n_sweeps=4, seed=1)
    _predict(tmp_path / 'data', tmp_path / 'out', 'ego', every=2)
    written = sorted((p.parent.name, int(p.stem)) for p in (tmp_path / 'out').rglob('*.feather'))
    expected = sorted((Path(j.log_dir).name, j.ts0) for j in list_eval_pairs(tmp_path / 'data', 'val', 2))
    assert written == expected and len(written) == 3   # pairs 0, 2, 4 of 6, across both logs
    with pytest.raises(P.PredictError, match='--every'):
        _predict(tmp_path / 'data', tmp_path / 'out2', 'ego', every=0)


def test_nsfp_set_rejects_unknown_fields_and_parses_values():
    ns = argparse.Namespace(nsfp_faithful=False, nsfp_set=['fit_points=3072', 'fast_max_iters=350'])
    assert P._nsfp_overrides(ns) == {'fit_points': 3072, 'fast_max_iters': 350}
    with pytest.raises(P.PredictError, match=r"unknown NSFPConfig field\(s\) \['fitpoints'\]"):
        P._nsfp_overrides(argparse.Namespace(nsfp_faithful=False, nsfp_set=['fitpoints=1']))
    with pytest.raises(P.PredictError, match='KEY=VALUE'):
        P._nsfp_overrides(argparse.Namespace(nsfp_faithful=False, nsfp_set=['fit_points']))


def test_teacher_method_writes_the_default_teachers_flow_and_eval_scores_it(dataset, tmp_path):
    """``--method teacher`` = the default teacher of ``zeroflow label``; on the hand-built log it
    recovers the car's exact motion (12 m/s) and leaves the rest static, and ``zeroflow eval`` scores it."""
    from zeroflow_ros.eval.evaluate import evaluate

    from zeroflow_training.teacher import DEFAULT_TEACHER
    method = P.make_method('teacher', device='cpu')
    assert method.config.name == DEFAULT_TEACHER and DEFAULT_TEACHER in method.describe()
    _predict(dataset, tmp_path / 'te', 'teacher')
    gt = _read(dataset / 'val' / LOG_ID / 'scene_flow' / f'{TS0}.feather')
    got = _read(tmp_path / 'te' / LOG_ID / f'{TS0}.feather')
    cols = ['flow_tx_m', 'flow_ty_m', 'flow_tz_m']
    err = np.linalg.norm(got[cols].to_numpy() - gt[cols].to_numpy(), axis=1)
    scored = ~gt.is_ground.to_numpy() & (np.abs(_lidar(dataset, 0)[:, :2]) < 50).all(axis=1)
    car = gt.is_dynamic.to_numpy()
    assert err[car].max() < 0.05, f'car: max error {err[car].max():.3f} m'
    assert err[scored & ~car].max() < 1e-4  # static world: exactly the ego motion
    np.testing.assert_array_equal(got.is_dynamic.to_numpy()[scored], car[scored])
    res = evaluate(tmp_path / 'te', dataset, 'val')
    assert res.threeway['EPE/Foreground/Dynamic'] < 0.05 and res.threeway['EPE 3-Way Average'] < 0.02
