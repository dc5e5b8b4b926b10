"""``zeroflow label``: file contract (vs independent geometry and the teacher itself), failure
records, manifest repair, kill -9 + rerun, batching and Ray."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.feather as feather
import pytest

from zeroflow_ros.core.geometry import ego_flow, residual_to_av2
from zeroflow_ros.core.preprocess import PreprocessConfig, prepare_pair
from zeroflow_ros.data.av2 import AV2Log, list_logs

from zeroflow_training.label import (MANIFEST, LabelError, Manifest, label_path, pair_seed, read_label_file,
                                     run_label, write_label_file)
from zeroflow_training.teacher.nsfp import NSFPConfig, run_nsfp

# Tiny budget: these tests check plumbing, the optimiser has its own tests.
CFG = NSFPConfig(fit_points=128, fast_max_iters=3, hidden_units=16, hidden_layers=2)


@pytest.fixture(scope='module')
def dataset(tmp_path_factory) -> Path:
    from zeroflow_training.data.synth import make_tiny_dataset
    return make_tiny_dataset(tmp_path_factory.mktemp('synth'), logs=1, sweeps=4, split='train',
                             beams=8, azimuths=300)


def _all_pairs(root: Path):
    return [(lg, int(a), int(b)) for lg in list_logs(root, 'train')
            for a, b in zip(lg.timestamps[:-1], lg.timestamps[1:])]


def _manifest_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / MANIFEST).read_text().splitlines() if line.strip()]


def test_label_files_match_the_teacher_and_the_contract(dataset, tmp_path):
    out = tmp_path / 'labels'
    counts = run_label(dataset, 'train', out, CFG, workers=1)
    pairs = _all_pairs(dataset)
    assert counts == {'done_before': 0, 'ok': len(pairs), 'failed': 0, 'total': len(pairs)}
    lg, ts0, ts1 = pairs[1]
    pair = lg.pair(ts0, ts1, with_gt=False)
    cols, record = read_label_file(label_path(out, lg.log_id, ts0))
    assert len(cols['flow_tx_m']) == len(pair.points0)
    assert {c: cols[c].dtype for c in cols} == {'flow_tx_m': np.float32, 'flow_ty_m': np.float32,
                                                'flow_tz_m': np.float32, 'is_dynamic': np.bool_,
                                                'is_valid': np.bool_}
    flow = np.stack([cols['flow_tx_m'], cols['flow_ty_m'], cols['flow_tz_m']], 1)
    prep = prepare_pair(pair.points0, pair.points1, pair.ego1_T_ego0, PreprocessConfig(),
                        is_ground0=pair.is_ground0, is_ground1=pair.is_ground1)
    np.testing.assert_array_equal(cols['is_valid'], prep.mask0)
    # Points the teacher did not estimate: static world, T p - p (av2 convention).
    static = ego_flow(pair.points0, pair.ego1_T_ego0)
    np.testing.assert_allclose(flow[~prep.mask0], static[~prep.mask0], atol=1e-6)
    # Estimated points: exactly the teacher's residual for this pair's seed, converted to av2 flow.
    res, _ = run_nsfp(prep.pc0, prep.pc1, CFG, seed=pair_seed(CFG.seed, lg.log_id, ts0))
    full = np.zeros_like(pair.points0)
    full[prep.mask0] = res
    np.testing.assert_allclose(flow, residual_to_av2(pair.points0, full, pair.ego1_T_ego0), atol=1e-5)
    np.testing.assert_array_equal(cols['is_dynamic'], np.linalg.norm(full, axis=1) >= 0.05)
    lines = _manifest_lines(out)
    assert sorted((r['log_id'], r['ts0']) for r in lines) == sorted((lg.log_id, a) for lg, a, _ in pairs)
    assert all(r['status'] == 'ok' and r['iterations'] == 3 and r['points'] > 0 for r in lines)
    assert record['status'] == 'ok' and record['ts1'] == ts1
    # A rerun has nothing to do and leaves the manifest as it was.
    again = run_label(dataset, 'train', out, CFG, workers=1)
    assert again['total'] == 0 and again['done_before'] == len(pairs)
    assert len(_manifest_lines(out)) == len(pairs)


def _copy_with_bad_sweeps(dataset: Path, dst: Path) -> tuple[Path, str, list[int]]:
    shutil.copytree(dataset, dst)
    lg = list_logs(dst, 'train')[0]
    ts = [int(t) for t in lg.timestamps]
    path0 = lg.lidar_path(ts[0])
    t = feather.read_table(path0)
    x = t.column('x').to_numpy().copy()
    x[:5] = np.nan
    t = t.set_column(t.column_names.index('x'), 'x', pa.array(x.astype(t.column('x').to_numpy().dtype)))
    feather.write_feather(t, path0)
    path1 = lg.lidar_path(ts[1])
    t = feather.read_table(path1)
    z = np.full(t.num_rows, 90.0, dtype=t.column('z').to_numpy().dtype)  # everything above the range box
    t = t.set_column(t.column_names.index('z'), 'z', pa.array(z))
    feather.write_feather(t, path1)
    return dst, lg.log_id, ts


def test_bad_pairs_are_recorded_failed_with_a_file_of_ego_flow(dataset, tmp_path):
    root, log_id, ts = _copy_with_bad_sweeps(dataset, tmp_path / 'bad')
    out = tmp_path / 'labels'
    counts = run_label(root, 'train', out, CFG, workers=1)
    # pair 0: NaN in sweep 0; pair 1: sweep 1 (its t) is empty after the crop -> both failed;
    # pair 0 also has sweep 1 as its t+1 (empty), but the NaN is reported first.
    assert counts['failed'] == 2 and counts['ok'] == len(ts) - 3
    recs = {r['ts0']: r for r in _manifest_lines(out)}
    assert recs[ts[0]]['status'] == 'failed' and 'non-finite' in recs[ts[0]]['reason']
    assert str(AV2Log(root / 'train' / log_id).lidar_path(ts[0])) in recs[ts[0]]['reason']
    assert recs[ts[1]]['status'] == 'failed' and 'too few points' in recs[ts[1]]['reason']
    for t0 in (ts[0], ts[1]):
        cols, rec = read_label_file(label_path(out, log_id, t0))
        assert not cols['is_valid'].any() and not cols['is_dynamic'].any()
        flow = np.stack([cols['flow_tx_m'], cols['flow_ty_m'], cols['flow_tz_m']], 1)
        assert np.isfinite(flow).all()
        pts = AV2Log(root / 'train' / log_id).points(t0)
        T = AV2Log(root / 'train' / log_id).ego1_T_ego0(t0, ts[ts.index(t0) + 1])
        ok = np.isfinite(pts).all(1)
        np.testing.assert_allclose(flow[ok], ego_flow(pts[ok], T), atol=1e-6)
        assert (flow[~ok] == 0).all() and rec['status'] == 'failed'


def test_manifest_repair_and_recovery_from_file_metadata(tmp_path):
    out = tmp_path / 'labels'
    (out / 'log').mkdir(parents=True)
    rec = {'log_id': 'log', 'ts0': 5, 'ts1': 6, 'status': 'ok'}
    cols = {'flow_tx_m': np.zeros(3, np.float32), 'flow_ty_m': np.zeros(3, np.float32),
            'flow_tz_m': np.zeros(3, np.float32), 'is_dynamic': np.zeros(3, bool),
            'is_valid': np.ones(3, bool)}
    write_label_file(label_path(out, 'log', 5), cols, rec)
    write_label_file(label_path(out, 'log', 7), cols, dict(rec, ts0=7, ts1=8))
    # A duplicate and a torn last line, as a killed writer could leave.
    (out / MANIFEST).write_text(json.dumps(rec) + '\n' + json.dumps(rec) + '\n{"log_id": "log", "ts0"')
    m = Manifest(out)
    assert list(m.records) == [('log', 5)]
    assert (out / MANIFEST).read_text().count('\n') == 1
    from zeroflow_training.label import _recover_manifest
    _recover_manifest(out, m)
    assert sorted(m.records) == [('log', 5), ('log', 7)]
    assert sorted(r['ts0'] for r in _manifest_lines(out)) == [5, 7]
    with pytest.raises(LabelError, match='cannot read'):
        (out / 'log' / '9.feather').write_bytes(b'not feather')
        read_label_file(out / 'log' / '9.feather')


def _cli(root: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, '-m', 'zeroflow_ros.cli', 'label', str(root), '--split', 'train',
            '--out', str(out),
            '--no-progress', '--teacher', 'nsfp', '--fit-points', '128', '--iters', '25', *extra]


def test_kill_dash_nine_then_rerun_labels_every_pair_exactly_once(dataset, tmp_path):
    out = tmp_path / 'labels'
    env = dict(os.environ, OMP_NUM_THREADS='1')
    proc = subprocess.Popen(_cli(dataset, out, '--workers', '1'), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not list(out.glob('*/*.feather')):
            time.sleep(0.05)
        assert list(out.glob('*/*.feather')), 'the CLI wrote no label file within 60 s'
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    pairs = _all_pairs(dataset)
    assert len(list(out.glob('*/*.feather'))) < len(pairs), 'killed too late to test a resume'
    done = subprocess.run(_cli(dataset, out, '--workers', '1'), env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    files = sorted(out.glob('*/*.feather'))
    assert [(f.parent.name, int(f.stem)) for f in files] == sorted((lg.log_id, a) for lg, a, _ in pairs)
    for f in files:
        cols, rec = read_label_file(f)
        assert rec['status'] == 'ok' and len(cols['is_valid']) > 0
    keys = [(r['log_id'], r['ts0']) for r in _manifest_lines(out)]
    assert sorted(keys) == sorted(set(keys)) and len(keys) == len(pairs)
    assert not [p for p in out.rglob('*') if p.name.endswith('.tmp')]


def test_batched_labels_equal_unbatched(dataset, tmp_path):
    a = tmp_path / 'a'
    b = tmp_path / 'b'
    run_label(dataset, 'train', a, CFG, workers=1, batch_pairs=1, limit=2)
    run_label(dataset, 'train', b, CFG, workers=1, batch_pairs=2, limit=2)
    fa = sorted(a.glob('*/*.feather'))
    assert len(fa) == 2
    for f in fa:
        ca, ra = read_label_file(f)
        cb, rb = read_label_file(b / f.relative_to(a))
        assert rb['batch'] == 2 and ra['batch'] == 1
        for c in ('flow_tx_m', 'flow_ty_m', 'flow_tz_m'):
            np.testing.assert_allclose(ca[c], cb[c], atol=1e-5)
        np.testing.assert_array_equal(ca['is_valid'], cb['is_valid'])


def test_second_run_on_the_same_folder_is_refused(dataset, tmp_path):
    from zeroflow_training.label import _lock
    out = tmp_path / 'labels'
    held = _lock(out)
    try:
        with pytest.raises(LabelError, match='another'):
            run_label(dataset, 'train', out, CFG, workers=1)
    finally:
        held.close()


def test_process_pool_and_ray_local_label_every_pair(dataset, tmp_path):
    pytest.importorskip('ray')
    pairs = _all_pairs(dataset)
    pool = tmp_path / 'pool'
    counts = run_label(dataset, 'train', pool, CFG, workers=2, limit=2)
    assert counts['ok'] == 2
    ray_out = tmp_path / 'ray'
    # A local Ray instance with one CPU: ~15 s on an idle 2-core machine, mostly Ray's start-up.
    counts = run_label(dataset, 'train', ray_out, CFG, workers=1, ray_address='local')
    assert counts['ok'] == len(pairs)
    assert len(list(ray_out.glob('*/*.feather'))) == len(pairs)
    for f in pool.glob('*/*.feather'):  # same seeds -> same labels whatever ran them
        np.testing.assert_allclose(read_label_file(f)[0]['flow_tx_m'],
                                   read_label_file(ray_out / f.relative_to(pool))[0]['flow_tx_m'], atol=1e-5)


def test_rigid_teacher_labels_are_the_teachers_output_and_cli_config(dataset, tmp_path):
    import argparse

    from zeroflow_training.label import add_arguments, config_from_args
    from zeroflow_training.teacher import DEFAULT_TEACHER, TeacherConfig, run_teacher
    cfg = TeacherConfig('rigid')
    out = tmp_path / 'labels'
    counts = run_label(dataset, 'train', out, cfg, workers=1, limit=2)
    assert counts['ok'] == 2
    for lg, ts0, ts1 in _all_pairs(dataset)[:2]:
        pair = lg.pair(ts0, ts1, with_gt=False)
        cols, rec = read_label_file(label_path(out, lg.log_id, ts0))
        assert rec['status'] == 'ok' and rec['teacher'] == 'rigid' and 'moving_objects' in rec
        prep = prepare_pair(pair.points0, pair.points1, pair.ego1_T_ego0, PreprocessConfig(),
                            is_ground0=pair.is_ground0, is_ground1=pair.is_ground1)
        res, _ = run_teacher(prep.pc0, prep.pc1, cfg, seed=pair_seed(cfg.rigid.seed, lg.log_id, ts0),
                             dt=(ts1 - ts0) * 1e-9)
        full = np.zeros_like(pair.points0)
        full[prep.mask0] = res
        flow = np.stack([cols['flow_tx_m'], cols['flow_ty_m'], cols['flow_tz_m']], 1)
        np.testing.assert_allclose(flow, residual_to_av2(pair.points0, full, pair.ego1_T_ego0), atol=1e-5)
        np.testing.assert_array_equal(cols['is_valid'], prep.mask0)
    # The command line: default teacher, and NSFP flags reach the NSFP part of the hybrid.
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert config_from_args(parser.parse_args(['d', '--out', 'o'])).name == DEFAULT_TEACHER
    hyb = config_from_args(parser.parse_args(['d', '--out', 'o', '--teacher', 'hybrid',
                                              '--fit-points', '512']))
    assert hyb.name == 'hybrid' and hyb.nsfp.fit_points == 512
    assert TeacherConfig.from_dict(hyb.to_dict()).nsfp.fit_points == 512
    with pytest.raises(SystemExit):
        parser.parse_args(['d', '--out', 'o', '--teacher', 'icp'])


def test_label_takes_a_bag_directly_and_equals_labelling_its_import(tmp_path):
    """`zeroflow label BAG` imports the bag once into OUT.data (as `zeroflow data import`) and labels
    that root: the same label files as labelling the imported root by hand; a rerun re-imports nothing."""
    import itertools

    import pandas as pd

    from zeroflow_ros.cli import main
    from zeroflow_ros.data import bag as zbag
    from zeroflow_ros.data.av2 import list_logs
    kitti = Path(__file__).resolve().parents[1] / 'data' / 'samples' / 'kitti_raw_sfnd_seq'
    bag_dir, _ = zbag.write_bag(tmp_path / 'k.mcap', itertools.islice(
        zbag.records_from_sweeps(kitti, start_ns=10**9), 2))
    out = tmp_path / 'labels'
    common = ['--workers', '1', '--no-progress', '--sensor-xyz', '0', '0', '1.73']
    assert main(['label', str(bag_dir), '--out', str(out)] + common) == 0
    root = tmp_path / 'labels.data'
    logs = list_logs(root, 'train')
    assert len(logs) == 1
    stamp = (logs[0].log_dir / 'import.json').stat().st_mtime_ns
    files = sorted(out.rglob('*.feather'))
    assert len(files) == 1                               # one pair from two sweeps
    ref_out = tmp_path / 'by_hand'
    assert main(['label', str(root), '--out', str(ref_out), '--workers', '1', '--no-progress']) == 0
    ref = sorted(ref_out.rglob('*.feather'))
    assert [f.relative_to(ref_out) for f in ref] == [f.relative_to(out) for f in files]
    pd.testing.assert_frame_equal(pd.read_feather(files[0]), pd.read_feather(ref[0]))
    assert main(['label', str(bag_dir), '--out', str(out)] + common) == 0
    assert (logs[0].log_dir / 'import.json').stat().st_mtime_ns == stamp


def test_label_rejects_an_unknown_file_with_one_clear_error(tmp_path):
    from zeroflow_training.label import LabelError, imported_root
    bad = tmp_path / 'x.txt'
    bad.write_text('not a bag')
    with pytest.raises(LabelError, match='unknown file type'):
        imported_root(bad, tmp_path / 'out', 'train')
