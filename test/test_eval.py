"""``zeroflow eval``: parity with the official av2 0.3.6 evaluation, bucketed EPE, bad predictions.

The reference is av2's own code (dev extra): its ``write_annotation`` writes the annotation files,
its ``evaluate_directories`` + ``results_to_dict`` score the predictions; our numpy metrics must give
the same numbers (rel 1e-6). The bucketed metric is checked against a brute-force loop written
straight from the reference implementation's definition, and against hand-computed values.
"""
from __future__ import annotations

import math
import warnings
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
