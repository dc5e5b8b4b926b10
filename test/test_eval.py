"""``zeroflow eval``: parity with the official av2 0.3.6 evaluation, bucketed EPE, bad predictions.

The reference is av2's own code (dev extra): its ``write_annotation`` writes the annotation files,
its ``evaluate_directories`` + ``results_to_dict`` score the predictions; our numpy metrics must give
the same numbers (rel 1e-6). The bucketed metric is checked against a brute-force loop written
straight from the reference implementation's definition, and against hand-computed values.
"""
from __future__ import annotations

import io
import math
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from zeroflow_ros.eval import metrics as M
from zeroflow_ros.eval.bucketed import META_CLASSES, BucketedAccumulator, speed_bucket_edges


class _AV2:
    """The official av2 scene-flow modules, imported on first use (dev extra, heavy: torch, kornia)."""

    def __getattr__(self, name: str):
        mod = {'eval': 'av2.evaluation.scene_flow.eval',
               'anno': 'av2.evaluation.scene_flow.make_annotation_files',
               'const': 'av2.evaluation.scene_flow.constants'}[name]
        return pytest.importorskip(mod, reason='the official av2 package is the reference (dev extra)')


av2 = _AV2()


def av2_results(anno_dir: Path, pred_dir: Path) -> dict[str, float]:
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # pandas groupby.apply deprecation chatter inside av2
        return av2.eval.results_to_dict(av2.eval.evaluate_directories(anno_dir, pred_dir))


def assert_same(ours: dict[str, float], ref: dict[str, float]) -> None:
    assert set(ours) == set(ref), f'keys differ: {set(ours) ^ set(ref)}'
    for k, v in ref.items():
        v = float(v)
        if math.isnan(v):
            assert math.isnan(ours[k]), k
        else:
            assert ours[k] == pytest.approx(v, rel=1e-6, abs=1e-12), k


def write_pred(pred_dir: Path, log_id: str, ts: int, flow: np.ndarray, dyn: np.ndarray) -> None:
    (pred_dir / log_id).mkdir(parents=True, exist_ok=True)
    pd.DataFrame({'flow_tx_m': flow[:, 0].astype(np.float32), 'flow_ty_m': flow[:, 1].astype(np.float32),
                  'flow_tz_m': flow[:, 2].astype(np.float32), 'is_dynamic': dyn.astype(bool)}
                 ).to_feather(pred_dir / log_id / f'{ts}.feather')


def random_example(rng: np.random.Generator, n: int, *, no_fg_dynamic_far: bool = False):
    pts = rng.uniform(-50, 50, (n, 3)).astype(np.float32)
    cats = np.where(rng.random(n) < 0.5, 0, rng.integers(1, 31, n)).astype(np.uint8)
    dyn = rng.random(n) < 0.3
    gt = rng.normal(0, 0.5, (n, 3)) * np.where(dyn, 3.0, 0.05)[:, None]
    gt[rng.random(n) < 0.1] = 0.0          # exact zero flow: relative accuracy and angle edge cases
    valid = rng.random(n) > 0.1
    gt[~valid] = np.nan                    # invalid rows may hold anything; av2 drops them first
    close = M.close_mask(pts)
    if no_fg_dynamic_far:
        dyn &= ~((cats > 0) & ~close)
    clean = np.where(np.isnan(gt), 0.0, gt)
    pred = clean + rng.normal(0, 0.08, (n, 3))
    hits = rng.random(n) < 0.05
    pred[hits] = clean[hits]               # exact hits
    pdyn = np.where(rng.random(n) < 0.8, dyn, ~dyn)
    return pts, cats, dyn, gt, valid, close, pred, pdyn


def test_constants_match_av2():
    assert M.CATEGORY_TO_INDEX == av2.const.CATEGORY_TO_INDEX
    fg, names = av2.const.FOREGROUND_BACKGROUND_BREAKDOWN, av2.const.MetricBreakdownCategories
    assert M.FOREGROUND_BACKGROUND_BREAKDOWN['Foreground'] == fg[names.FOREGROUND]
    assert M.FOREGROUND_BACKGROUND_BREAKDOWN['Background'] == fg[names.BACKGROUND]
    assert list(M.FLOW_METRICS) == [m.value for m in av2.const.SceneFlowMetricType]
    assert list(M.SEG_METRICS) == [m.value for m in av2.const.SegmentationMetricType]
    assert av2.anno.CLOSE_DISTANCE_THRESHOLD == M.CLOSE_DISTANCE_THRESHOLD
    for cat in sum(META_CLASSES.values(), []):
        assert cat == 'BACKGROUND' or cat in M.CATEGORY_TO_INDEX, cat


def test_pointwise_metrics_match_av2():
    rng = np.random.default_rng(0)
    gt = rng.normal(0, 1, (500, 3))
    gt[:50] = 0
    pred = gt + rng.normal(0, 0.07, (500, 3))
    pred[50:60] = gt[50:60]
    pred[60:70] = -gt[60:70]               # opposite direction: angle error near pi
    np.testing.assert_allclose(M.end_point_error(pred, gt), av2.eval.compute_end_point_error(pred, gt))
    np.testing.assert_array_equal(M.accuracy(pred, gt, 0.05), av2.eval.compute_accuracy_strict(pred, gt))
    np.testing.assert_array_equal(M.accuracy(pred, gt, 0.1), av2.eval.compute_accuracy_relax(pred, gt))
    np.testing.assert_allclose(M.angle_error(pred, gt), av2.eval.compute_angle_error(pred, gt), rtol=1e-12)


def test_threeway_parity_hand_built(tmp_path):
    """Several examples with empty subsets, NaN in invalid rows, exact hits; against av2's own pipeline."""
    rng = np.random.default_rng(1)
    anno, pred_dir = tmp_path / 'anno', tmp_path / 'pred'
    anno.mkdir()
    acc = M.ThreeWayAccumulator()
    examples = [random_example(rng, 400), random_example(rng, 300, no_fg_dynamic_far=True),
                random_example(rng, 7), random_example(rng, 250)]
    # One example with every point invalid (all subsets empty) and one with background only.
    pts, cats, dyn, gt, valid, close, pred, pdyn = random_example(rng, 50)
    examples.append((pts, cats, dyn, gt, np.zeros_like(valid), close, pred, pdyn))
    pts, cats, dyn, gt, valid, close, pred, pdyn = random_example(rng, 60)
    examples.append((pts, np.zeros_like(cats), dyn, gt, valid, close, pred, pdyn))
    for i, (pts, cats, dyn, gt, valid, close, pred, pdyn) in enumerate(examples):
        log_id, ts = f'log{i % 2}', 1000 + i
        av2.anno.write_annotation(cats, close, dyn, valid, gt, (log_id, ts), anno)
        write_pred(pred_dir, log_id, ts, pred, pdyn)
        acc.add_example(pred.astype(np.float32), pdyn, M.official_gt_flow(gt), cats, dyn, close, valid)
    ref = av2_results(anno, pred_dir)
    ours = acc.results()
    assert_same(ours, ref)
    assert math.isfinite(ours['EPE 3-Way Average'])


def test_threeway_empty_subset_is_nan_like_av2(tmp_path):
    """No foreground at all: every Foreground key and the 3-way average are NaN in both."""
    rng = np.random.default_rng(2)
    anno, pred_dir = tmp_path / 'anno', tmp_path / 'pred'
    anno.mkdir()
    pts, cats, dyn, gt, valid, close, pred, pdyn = random_example(rng, 100)
    cats[:] = 0
    av2.anno.write_annotation(cats, close, dyn, valid, gt, ('a', 1), anno)
    write_pred(pred_dir, 'a', 1, pred, pdyn)
    acc = M.ThreeWayAccumulator()
    acc.add_example(pred, pdyn, M.official_gt_flow(gt), cats, dyn, close, valid)
    ours = acc.results()
    assert_same(ours, av2_results(anno, pred_dir))
    assert math.isnan(ours['EPE/Foreground/Dynamic']) and math.isnan(ours['EPE 3-Way Average'])


def test_threeway_hand_values():
    """Two foreground-dynamic close points with EPE 0.3 and 0.15; one background static far point exact."""
    pred = np.array([[1.3, 0, 0], [0, 2.15, 0], [0.5, 0.5, 0]])
    gt = np.array([[1.0, 0, 0], [0, 2.0, 0], [0.5, 0.5, 0]])
    rows = M.compute_example(pred, np.array([True, False, False]), gt, np.array([19, 17, 0]),
                             np.array([True, True, False]), np.array([True, True, False]), np.ones(3, bool))
    acc = M.ThreeWayAccumulator()
    acc.add(rows)
    res = acc.results()
    assert res['EPE/Foreground/Dynamic/Close'] == pytest.approx(0.225)
    assert res['EPE/Background/Static/Far'] == 0.0
    # 0.3 / 1.0 = 30 % relative error fails; 0.15 / 2.0 = 7.5 % passes relaxed (< 0.1), not strict.
    assert res['Accuracy Relax/Foreground/Dynamic'] == pytest.approx(0.5)
    assert res['Accuracy Strict/Foreground/Dynamic'] == pytest.approx(0.0)
    assert res['Dynamic IoU'] == pytest.approx(0.5)    # TP 1, FN 1, FP 0
    assert math.isnan(res['EPE/Foreground/Static'])
    with pytest.raises(M.MetricsError, match='pred_flow'):
        M.compute_example(pred[:2], np.ones(3, bool), gt, np.zeros(3), np.ones(3, bool), np.ones(3, bool),
                          np.ones(3, bool))
    bad = pred.copy()
    bad[0, 0] = np.nan
    with pytest.raises(M.MetricsError, match='non-finite'):
        M.compute_example(bad, np.ones(3, bool), gt, np.zeros(3), np.ones(3, bool), np.ones(3, bool),
                          np.ones(3, bool))


# --- bucketed ------------------------------------------------------------------------------------

def brute_force_bucketed(frames, distance: float):
    """Straight from BucketedSceneFlowEval: per frame/category/bucket means, merged by counts, normalised."""
    edges = speed_bucket_edges()
    buckets = list(zip(edges[:-1], edges[1:]))
    idx_to_name = {0: 'BACKGROUND', **{i: c for c, i in M.CATEGORY_TO_INDEX.items() if i > 0}}
    stats: dict = {}   # (category, bucket) -> list of (avg_epe, count, avg_speed)
    for pts, pred, gt, cats in frames:
        speeds = [math.sqrt(sum(float(v) ** 2 for v in g)) for g in gt]
        epes = [math.sqrt(sum((float(a) - float(b)) ** 2 for a, b in zip(p, g))) for p, g in zip(pred, gt)]
        for b, (lo, hi) in enumerate(buckets):
            for c in sorted(set(int(c) for c in cats)):
                sel = [i for i in range(len(pts)) if int(cats[i]) == c and lo <= speeds[i] < hi
                       and max(abs(float(pts[i][0])), abs(float(pts[i][1]))) < distance]
                if sel:
                    k = len(sel)
                    stats.setdefault((idx_to_name[c], b), []).append(
                        (sum(epes[i] for i in sel) / k, k, sum(speeds[i] for i in sel) / k))
    out = {}
    for meta, members in META_CLASSES.items():
        row = []
        for b in range(len(buckets)):
            vals = [v for m in members for v in stats.get((m, b), [])]
            if not vals:
                row.append(float('nan'))
                continue
            n = sum(v[1] for v in vals)
            epe = sum(v[0] * v[1] for v in vals) / n
            spd = sum(v[2] * v[1] for v in vals) / n
            row.append(epe if b == 0 else epe / spd)
        dyn = [v for v in row[1:] if not math.isnan(v)]
        out[meta] = (row[0], sum(dyn) / len(dyn) if dyn else float('nan'))
    return out


def test_bucketed_against_brute_force():
    rng = np.random.default_rng(3)
    acc = BucketedAccumulator()
    frames = []
    for n in (300, 120):
        pts = rng.uniform(-60, 60, (n, 3))
        cats = rng.choice([0, 0, 0, 19, 17, 23, 3, 4, 6, 25, 5, 21, 1, 10], size=n)  # incl. excluded ones
        speed = np.where(cats == 0, 0.0, rng.uniform(0, 2.6, n))
        direction = rng.normal(size=(n, 3))
        gt = direction / np.linalg.norm(direction, axis=1, keepdims=True) * speed[:, None]
        pred = gt + rng.normal(0, 0.1, (n, 3))
        frames.append((pts, pred, gt, cats))
        acc.add(pts, pred, gt, cats)
    for d in (35.0, float('inf')):
        ours = acc.result(d).per_class()
        ref = brute_force_bucketed(frames, d)
        assert set(ours) == set(ref)
        for c in ref:
            for a, b in zip(ours[c], ref[c]):
                assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-9), (c, d)


def test_bucketed_hand_values():
    """CAR: 2 static points (EPE 0.1, 0.3) and 2 at 1.0 m/frame (EPE 0.5, 0.3) -> static 0.2, dynamic 0.4.

    PEDESTRIAN: one point at 0.1 m/frame with EPE 0.05 -> 0.5; a point beyond 35 m is left out;
    a SIGN point (not in any meta-class) is ignored; mean dynamic over CAR and PEDESTRIAN = 0.45.
    """
    pts = np.array([[1, 1, 0], [2, 2, 0], [3, 3, 0], [4, 4, 0], [5, 5, 0], [40, 0, 0], [6, 6, 0]], float)
    gt = np.array([[0, 0, 0], [0, 0, 0], [1, 0, 0], [0, 1, 0], [0.1, 0, 0], [0.1, 0, 0], [1, 0, 0]], float)
    err = [[0.1, 0, 0], [0, 0.3, 0], [0.5, 0, 0], [0, 0.3, 0], [0, 0.05, 0], [5, 0, 0], [9, 0, 0]]
    pred = gt + np.array(err)
    cats = np.array([19, 19, 19, 19, 17, 17, 21])
    acc = BucketedAccumulator()
    acc.add(pts, pred, gt, cats)
    res = acc.result(35.0)
    per = res.per_class()
    assert per['CAR'][0] == pytest.approx(0.2) and per['CAR'][1] == pytest.approx(0.4)
    assert math.isnan(per['PEDESTRIAN'][0]) and per['PEDESTRIAN'][1] == pytest.approx(0.5)
    assert math.isnan(per['WHEELED_VRU'][1]) and math.isnan(per['BACKGROUND'][0])
    assert res.mean() == pytest.approx((0.2, 0.45))
    assert res.count.sum() == 5
    # speed 0.04 exactly starts the second bucket (buckets are [lo, hi)).
    edges = speed_bucket_edges()
    assert len(edges) == 52 and edges[1] == pytest.approx(0.04) and edges[-2] == 2.0 and np.isinf(edges[-1])


# --- Foreground/Dynamic EPE per ground-truth speed bucket ----------------------------------------

def test_speed_buckets_hand_built_pair(tmp_path):
    """Own speeds and errors chosen per point, ego turning and driving, dt = 0.2 s (not the usual 0.1).

    FG dynamic: 1.0, 1.9 & 0.3 m/s (err 0.1, 0.3, 0.05) -> 0-2: 0.15 (3); 3 m/s (err 0.4) -> 2-5:
    0.4 (1); 7 & 9 m/s (0.25, 0.75) -> 5-10: 0.5 (2); 15 m/s (1.0) -> 10-20: 1.0 (1); 25 & 40 m/s
    (0.5, 1.5) -> 20+: 1.0 (2). Left out: background mover, FG static, invalid, outside the mask.
    The 0.3 m/s pedestrian has ~6 m/s AV2 flow (the ego's): it lands in 0-2 only if ego motion is
    removed; with dt taken as 0.1 s instead of the pair's 0.2 s, 1.9 m/s would read 3.8 (2-5).
    """
    from zeroflow_ros.core.geometry import yaw_transform
    from zeroflow_ros.eval.evaluate import EvalPair, PredictionSource, score_pair
    dt = 0.2
    speed = np.array([1.0, 1.9, 3.0, 7.0, 9.0, 15.0, 25.0, 40.0, 12.0, 0.0, 8.0, 8.0, 0.3])
    err_norm = np.array([0.1, 0.3, 0.4, 0.25, 0.75, 1.0, 0.5, 1.5, 9.0, 0.0, 9.0, 9.0, 0.05])
    cats = np.array([19, 19, 17, 19, 25, 19, 19, 7, 0, 19, 19, 19, 17])
    dyn = np.array([1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1], bool)
    valid = np.array([1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1], bool)
    in_mask = np.array([1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 1], bool)
    n = len(speed)
    rng = np.random.default_rng(3)
    pts = np.c_[rng.uniform(-30, 30, (n, 2)), rng.uniform(-1, 2, n)].astype(np.float32)
    heading = rng.uniform(-np.pi, np.pi, n)
    own = (speed * dt)[:, None] * np.c_[np.cos(heading), np.sin(heading), np.zeros(n)]
    T = yaw_transform(0.04, (-1.2, 0.1, 0.02))                  # ego1_T_ego0: 6 m/s forward, turning
    R, t = T[:3, :3], T[:3, 3]
    p64 = pts.astype(np.float64)
    gt = (((p64 + own) @ R.T + t) - p64).astype(np.float32)  # AV2 flow: q - p in ego0 coordinates
    err_dir = rng.normal(size=(n, 3))
    err = err_dir / np.linalg.norm(err_dir, axis=1, keepdims=True) * err_norm[:, None]
    pred = gt.astype(np.float16).astype(np.float64) + err  # errors against the GT as av2 scores it
    write_pred(tmp_path / 'pred', 'log', 5, pred, dyn)
    pair = EvalPair('log', 5, pts, T, gt, valid, dyn, cats.astype(np.uint8), in_mask, dt_s=dt)
    sc = score_pair(pair, PredictionSource(tmp_path / 'pred'))
    got = {label: (epe, count) for label, epe, count in sc.speeds.rows()}
    assert list(got) == ['0-2', '2-5', '5-10', '10-20', '20+']
    expected = {'0-2': (0.15, 3), '2-5': (0.4, 1), '5-10': (0.5, 2), '10-20': (1.0, 1), '20+': (1.0, 2)}
    for label, (epe, count) in expected.items():
        assert got[label][1] == count, label
        assert got[label][0] == pytest.approx(epe, abs=1e-5), label   # float32 prediction file
    # Same points and EPE as the official Foreground/Dynamic subset: the count-weighted mean agrees.
    acc = M.ThreeWayAccumulator()
    acc.add(sc.rows)
    fg_dyn = acc.results()['EPE/Foreground/Dynamic']
    mean = sum(e * c for e, c in expected.values()) / sum(c for _, c in expected.values())
    assert fg_dyn == pytest.approx(mean, abs=1e-5)
    d = sc.speeds.to_dict()['buckets']
    assert [b['count'] for b in d] == [3, 1, 2, 1, 2] and d[-1]['hi_mps'] is None and d[1]['lo_mps'] == 2.0


def test_speed_buckets_edges_and_empty():
    """Buckets are [lo, hi): 2.0 m/s opens 2-5 and 20.0 opens 20+; an empty bucket is NaN / None."""
    from zeroflow_ros.eval.bucketed import SpeedBucketEPE
    acc = SpeedBucketEPE()
    speed = np.array([0.0, 1.999, 2.0, 20.0, 19.999])
    gt = np.zeros((5, 3))
    pred = np.c_[np.array([0.1, 0.2, 0.3, 0.4, 0.5]), np.zeros((5, 2))]
    acc.add(pred, gt, speed, np.full(5, 19), np.ones(5, bool))
    rows = acc.rows()
    assert [r[2] for r in rows] == [2, 1, 0, 1, 1]
    assert rows[0][1] == pytest.approx(0.15) and rows[1][1] == pytest.approx(0.3)
    assert math.isnan(rows[2][1]) and acc.to_dict()['buckets'][2]['epe'] is None
    assert rows[3][1] == pytest.approx(0.5) and rows[4][1] == pytest.approx(0.4)
    other = SpeedBucketEPE()
    other.add(pred[:1] * 3, gt[:1], speed[:1], np.array([19]), np.array([True]))
    acc.merge(other)
    assert acc.rows()[0][2] == 3 and acc.rows()[0][1] == pytest.approx((0.1 + 0.2 + 0.3) / 3)
    with pytest.raises(M.MetricsError, match=r'speed_mps: expected shape \(5,\)'):
        acc.add(pred, gt, speed[:4], np.full(5, 19), np.ones(5, bool))
    with pytest.raises(M.MetricsError, match='cannot merge'):
        acc.merge(SpeedBucketEPE((0.0, 1.0, float('inf'))))


# --- end to end: predict -> eval against av2's evaluation on the same ground truth --------------

def _hand_ground(log_dir: Path, ts: int, pts: np.ndarray) -> np.ndarray:
    """The hand-built logs' flat raster at city z = -1.8 m and yaw-only poses: ground is ``z <= -1.5``."""
    return pts[:, 2] <= -1.5


def _av2_map_ground(log_dir: Path, ts: int, pts: np.ndarray) -> np.ndarray:
    """Ground by av2's own map API (raster rule) on city-frame points."""
    from av2.map.map_api import ArgoverseStaticMap
    from zeroflow_ros.core.geometry import make_transform, quat_to_matrix, transform_points
    poses = pd.read_feather(log_dir / 'city_SE3_egovehicle.feather').set_index('timestamp_ns')
    r = poses.loc[ts]
    city_T_ego = make_transform(quat_to_matrix(r.qw, r.qx, r.qy, r.qz), (r.tx_m, r.ty_m, r.tz_m))
    avm = ArgoverseStaticMap.from_map_dir(log_dir / 'map', build_raster=True)
    return avm.get_ground_points_boolean(transform_points(city_T_ego, pts.astype(np.float64)))


def _av2_annotations(data: Path, split: str, anno: Path, ground_fn) -> dict[str, np.ndarray]:
    """Annotation files in av2's format (its own write_annotation) from the synthetic GT; returns the masks.

    The mask is av2's compute_eval_point_mask rule: not ground and ``|x|, |y| <= 50``.
    """
    anno.mkdir(parents=True, exist_ok=True)
    masks = {}
    for log_dir in sorted((data / split).iterdir()):
        for f in sorted((log_dir / 'scene_flow').glob('*.feather')):
            gt = pd.read_feather(f)
            pts = pd.read_feather(log_dir / 'sensors' / 'lidar' / f.name)[['x', 'y', 'z']].to_numpy()
            pts = pts.astype(np.float32)
            in_box = (np.abs(pts[:, 0]) <= 50) & (np.abs(pts[:, 1]) <= 50)
            mask = in_box & ~ground_fn(log_dir, int(f.stem), pts)
            close = np.all(np.abs(pts[mask, :2]) <= 35, axis=1)
            flow = gt[['flow_tx_m', 'flow_ty_m', 'flow_tz_m']].to_numpy()[mask]
            cats, dyn, valid = (gt[c].to_numpy()[mask]
                                for c in ('category_indices', 'is_dynamic', 'is_valid'))
            av2.anno.write_annotation(cats, close, dyn, valid, flow, (log_dir.name, int(f.stem)), anno)
            masks[f'{log_dir.name}/{f.name}'] = mask
    return masks


def _masked_predictions(pred: Path, masks: dict[str, np.ndarray], out: Path) -> None:
    """Prediction files holding only the evaluated rows (the format av2's evaluator reads)."""
    for name, mask in masks.items():
        df = pd.read_feather(pred / name)[mask].reset_index(drop=True)
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        df.to_feather(out / name)


def _setup(root: Path, ground_fn) -> Path:
    from test_predict import _predict
    for m in ('ego', 'zero', 'nn'):
        _predict(root / 'data', root / m, m)
    masks = _av2_annotations(root / 'data', 'val', root / 'anno', ground_fn)
    for m in ('ego', 'zero', 'nn'):
        _masked_predictions(root / m, masks, root / f'{m}_masked')
    _write_mask_zip(root / 'masks.zip', masks)
    return root


def _write_mask_zip(path: Path, masks: dict[str, np.ndarray]) -> None:
    """A mask archive as av2's make_mask_files writes it: one bool column 'mask' per sweep."""
    with zipfile.ZipFile(path, 'w') as zf:
        for name, m in masks.items():
            buf = io.BytesIO()
            pd.DataFrame({'mask': m.astype(bool)}).to_feather(buf)
            zf.writestr(name, buf.getvalue())


@pytest.fixture(scope='module')
def synth(tmp_path_factory):
    """Two hand-built logs (map raster, exact GT), predictions of ego / zero / nn, av2 annotation files."""
    from test_predict import make_av2_log
    root = tmp_path_factory.mktemp('e2e')
    make_av2_log(root / 'data', log_id='log-a', n_sweeps=3, seed=0)
    make_av2_log(root / 'data', log_id='log-b', n_sweeps=2, seed=1)
    return _setup(root, _hand_ground)


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    """engineer B's ray-cast synthetic logs (make_tiny_dataset): the same, with av2's map API for ground."""
    from zeroflow_training.data import synth as synth_mod
    pytest.importorskip('av2.map.map_api')
    root = tmp_path_factory.mktemp('tiny')
    synth_mod.make_tiny_dataset(root / 'data', logs=1, sweeps=3)
    return _setup(root, _av2_map_ground)


@pytest.mark.parametrize('data', ['synth', 'tiny'])
@pytest.mark.parametrize('method', ['ego', 'zero', 'nn'])
def test_end_to_end_parity_with_av2(request, data, method):
    from zeroflow_ros.eval.evaluate import evaluate
    root = request.getfixturevalue(data)
    res = evaluate(root / method, root / 'data', 'val')
    assert res.num_pairs == (3 if data == 'synth' else 2)
    ref = av2_results(root / 'anno', root / f'{method}_masked')
    assert_same(res.threeway, ref)
    assert math.isfinite(res.threeway['EPE 3-Way Average'])
    # Challenge-format input (masked rows only) scores the same.
    assert_same(evaluate(root / f'{method}_masked', root / 'data', 'val').threeway, ref)


def test_end_to_end_known_values(synth):
    """Ego flow: static scenery exact; the car (12.4 m/s) entirely missed -> normalised dynamic EPE = 1."""
    from zeroflow_ros.eval.evaluate import evaluate
    res = evaluate(synth / 'ego', synth / 'data', 'val')
    assert res.threeway['EPE/Background/Static'] < 1e-3
    assert res.threeway['EPE/Foreground/Static'] < 1e-3      # the parked car and the sign
    car_speed = float(np.hypot(1.2, 0.3))
    assert res.threeway['EPE/Foreground/Dynamic'] == pytest.approx(car_speed, abs=2e-3)  # float16 GT
    assert res.threeway['Dynamic IoU'] == 0.0
    per = res.bucketed.per_class()
    assert per['CAR'][1] == pytest.approx(1.0, abs=1e-5)
    assert per['BACKGROUND'][0] == pytest.approx(0.0, abs=1e-5)
    assert per['CAR'][0] == pytest.approx(0.0, abs=1e-5)             # parked car, static bucket
    assert math.isnan(per['PEDESTRIAN'][1])
    # The moving car (12.4 m/s over dt 0.1 s) is all of FG dynamic: one bucket, 10-20, EPE = the miss.
    by_speed = {label: (epe, count) for label, epe, count in res.speed_buckets.rows()}
    assert by_speed['10-20'][0] == pytest.approx(res.threeway['EPE/Foreground/Dynamic'], rel=1e-9)
    assert by_speed['10-20'][1] > 0
    assert all(c == 0 for label, (_, c) in by_speed.items() if label != '10-20')
    nn = evaluate(synth / 'nn', synth / 'data', 'val')
    assert nn.threeway['EPE/Background/Static'] < 1e-3   # same samples in both sweeps
    assert nn.threeway['Dynamic IoU'] > 0.5


def test_cli_writes_table_json_png(synth, capsys):
    import json
    from zeroflow_ros.cli import main
    out = synth / 'report'
    assert main(['eval', str(synth / 'nn'), str(synth / 'data'), '--split', 'val', '--out', str(out)]) == 0
    text = capsys.readouterr().out
    assert 'EPE 3-Way Average' in text and 'WHEELED_VRU' in text
    d = json.loads((out / 'metrics.json').read_text())
    assert d['num_pairs'] == 3 and d['threeway']['EPE 3-Way Average'] is not None
    assert 'Foreground/Dynamic EPE per ground-truth speed' in text and '10-20' in text
    buckets = d['fg_dynamic_by_speed']['buckets']
    assert [b['bucket_mps'] for b in buckets] == ['0-2', '2-5', '5-10', '10-20', '20+']
    assert sum(b['count'] for b in buckets) > 0
    png = (out / 'bucketed_epe.png').read_bytes()
    assert png[:8] == b'\x89PNG\r\n\x1a\n' and len(png) > 10_000


def _corrupt(src: Path, dst: Path, fn) -> Path:
    import shutil
    shutil.copytree(src, dst)
    f = sorted(dst.rglob('*.feather'))[1]
    fn(f)
    return f


@pytest.mark.parametrize('kind,match', [
    ('missing', 'prediction missing'),
    ('rows', r'rows, expected \d+ \(one per lidar point\)'),
    ('nan', 'NaN/inf flow'),
    ('nan_unscored', 'rows have NaN/inf flow'),
    ('column', r"missing columns \['flow_ty_m'\]"),
    ('dtype', 'is_dynamic must be bool'),
    ('garbage', 'cannot read as feather'),
])
def test_bad_predictions_name_the_file(synth, tmp_path, kind, match):
    from zeroflow_ros.eval.evaluate import EvalError, evaluate

    def damage(f: Path) -> None:
        if kind == 'missing':
            f.unlink()
            return
        if kind == 'garbage':
            f.write_bytes(b'not a feather file')
            return
        df = pd.read_feather(f)
        if kind == 'rows':
            df = df.iloc[:-3].reset_index(drop=True)
        elif kind == 'nan':
            mask = (df.index.to_numpy() % 7) == 0
            df.loc[mask, 'flow_tx_m'] = np.nan
        elif kind == 'nan_unscored':      # a ground point (never scored) with NaN flow: still an error
            pts = pd.read_feather(synth / 'data' / 'val' / f.parent.name / 'sensors' / 'lidar' / f.name)
            df.loc[np.flatnonzero(pts.z.to_numpy() <= -1.5)[:1], 'flow_tz_m'] = np.nan
        elif kind == 'column':
            df = df.drop(columns=['flow_ty_m'])
        elif kind == 'dtype':
            df['is_dynamic'] = df['is_dynamic'].astype(np.uint8)
        df.to_feather(f)
    f = _corrupt(synth / 'ego', tmp_path / 'bad', damage)
    with pytest.raises(EvalError, match=match) as exc:
        evaluate(tmp_path / 'bad', synth / 'data', 'val')
    assert str(f.relative_to(tmp_path / 'bad')) in str(exc.value)


def test_every_k_counts_over_the_split(synth, tmp_path):
    """--every 2 over log-a (2 pairs) + log-b (1 pair) keeps global pairs 0 and 2: log-a t0 and log-b t0."""
    import shutil
    from zeroflow_ros.eval.evaluate import evaluate
    shutil.copytree(synth / 'ego', tmp_path / 'ego')
    skipped = sorted((tmp_path / 'ego' / 'log-a').glob('*.feather'))[1]
    skipped.unlink()                    # not needed: the subset never reads it
    res = evaluate(tmp_path / 'ego', synth / 'data', 'val', every=2)
    assert res.num_pairs == 2


def test_submission_zip_scores_like_av2_evaluate_zip(synth, tmp_path):
    from zeroflow_ros.eval.evaluate import evaluate
    archive = tmp_path / 'sub.zip'
    with zipfile.ZipFile(archive, 'w') as zf:
        for f in sorted((synth / 'nn_masked').rglob('*.feather')):
            df = pd.read_feather(f)
            for c in ('flow_tx_m', 'flow_ty_m', 'flow_tz_m'):
                df[c] = df[c].astype(np.float16)       # the challenge format
            buf = io.BytesIO()
            df.to_feather(buf)
            zf.writestr(f'{f.parent.name}/{f.name}', buf.getvalue())
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        ref = av2.eval.results_to_dict(av2.eval.evaluate_zip(synth / 'anno', archive))
    assert_same(evaluate(archive, synth / 'data', 'val').threeway, ref)


def test_official_masks_and_workers(synth, tmp_path):
    """--masks scores exactly the archive's sweeps on its masks; --workers changes nothing."""
    from zeroflow_ros.eval.evaluate import EvalError, evaluate
    ref = av2_results(synth / 'anno', synth / 'nn_masked')
    one = evaluate(synth / 'nn', synth / 'data', 'val', masks=synth / 'masks.zip')
    assert_same(one.threeway, ref)
    two = evaluate(synth / 'nn', synth / 'data', 'val', masks=synth / 'masks.zip', workers=2)
    assert_same(two.threeway, one.threeway)
    assert two.num_points == one.num_points
    np.testing.assert_array_equal(two.bucketed.count, one.bucketed.count)
    np.testing.assert_allclose(two.bucketed.epe, one.bucketed.epe, rtol=1e-12)
    # A one-sweep archive scores one pair; a mask of the wrong length is named.
    with zipfile.ZipFile(synth / 'masks.zip') as zf:
        name = sorted(zf.namelist())[0]
        data = zf.read(name)
    _write_mask_zip(tmp_path / 'one.zip', {name: pd.read_feather(io.BytesIO(data))['mask'].to_numpy()})
    assert evaluate(synth / 'nn', synth / 'data', 'val', masks=tmp_path / 'one.zip').num_pairs == 1
    _write_mask_zip(tmp_path / 'short.zip', {name: np.ones(5, bool)})
    with pytest.raises(EvalError, match=f'mask {name}: 5 rows'):
        evaluate(synth / 'nn', synth / 'data', 'val', masks=tmp_path / 'short.zip')
    _write_mask_zip(tmp_path / 'other.zip', {'no-such-log/1.feather': np.ones(5, bool)})
    with pytest.raises(EvalError, match='no log no-such-log'):
        evaluate(synth / 'nn', synth / 'data', 'val', masks=tmp_path / 'other.zip')


def test_eval_mask_on_real_av2_sweep_matches_av2_map_api():
    """The real AV2 sample sweep: our mask (AV2Log ground + 50 m box) = av2's map API rule."""
    pytest.importorskip('av2.map.map_api')
    from zeroflow_ros.data.av2 import AV2Log
    log_dir = Path(__file__).resolve().parents[1] / 'data' / 'samples' / 'av2_sample' / \
        'adcf7d18-0510-35b0-a2fa-b4cea13a6d76'
    lg = AV2Log(log_dir)
    ts = int(lg.timestamps[0])
    pts = lg.points(ts)
    mask = M.eval_point_mask(pts, lg.ground_mask(pts, ts))
    ref = ~_av2_map_ground(log_dir, ts, pts) & (np.abs(pts[:, 0]) <= 50) & (np.abs(pts[:, 1]) <= 50)
    np.testing.assert_array_equal(mask, ref)
    assert 0.2 < mask.mean() < 0.9 and len(pts) == 100_660   # SOURCES.md: 100,660 points


def test_results_table_speed_bucket_columns(tmp_path, capsys):
    """bench/results_table.py: the default table is unchanged; --speed-buckets adds 'EPE (count)' cells."""
    import importlib.util
    import json
    spec = importlib.util.spec_from_file_location(
        'results_table', Path(__file__).resolve().parents[1] / 'bench' / 'results_table.py')
    rt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rt)
    three = {'EPE 3-Way Average': 0.1, 'EPE/Foreground/Dynamic': 0.25, 'EPE/Foreground/Static': 0.03,
             'EPE/Background/Static': None, 'Dynamic IoU': 0.5}
    labels = ['0-2', '2-5', '5-10', '10-20', '20+']
    buckets = [{'bucket_mps': b, 'epe': e, 'count': c}
               for b, e, c in zip(labels, [0.125, None, 0.5, 0.75, 1.0], [10, 0, 3, 4, 5])]
    d = {'threeway': three, 'bucketed': {'mean_static_epe': 0.02, 'mean_dynamic_normalized_epe': 0.6},
         'fg_dynamic_by_speed': {'buckets': buckets}}
    (tmp_path / 'a').mkdir()
    (tmp_path / 'a' / 'metrics.json').write_text(json.dumps(d))
    assert rt.main([f'x={tmp_path / "a"}']) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].count('|') == 9
    assert lines[2] == '| x | 0.1000 | 0.2500 | 0.0300 | - | 0.5000 | 0.0200 | 0.6000 |'
    assert rt.main(['--speed-buckets', f'x={tmp_path / "a"}']) == 0
    lines = capsys.readouterr().out.splitlines()
    assert 'FG dyn 10-20 m/s (n)' in lines[0]
    assert lines[2].endswith('| 0.1250 (10) | - (0) | 0.5000 (3) | 0.7500 (4) | 1.0000 (5) |')
    del d['fg_dynamic_by_speed']
    (tmp_path / 'old').mkdir()
    (tmp_path / 'old' / 'metrics.json').write_text(json.dumps(d))
    with pytest.raises(SystemExit, match='old/metrics.json: no .fg_dynamic_by_speed.'):
        rt.main(['--speed-buckets', f'x={tmp_path / "old"}'])
