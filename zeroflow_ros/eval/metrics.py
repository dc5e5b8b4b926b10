"""The official Argoverse 2 scene-flow metrics, in numpy (no av2 import at run time).

Re-implements ``av2/evaluation/scene_flow/eval.py`` of av2 0.3.6 (``compute_metrics`` per example,
``results_to_dict`` over the dataset) number for number, so that ``zeroflow eval`` gives the
leaderboard's figures without the av2 dev dependency. Parity with av2's own code is tested in
``test/test_eval.py``.

What the official pipeline does, and so do we:

* Each example (sweep pair) is broken down by meta-class (Background = ``NONE``; Foreground = all 30
  annotation categories) x Dynamic/Static (ground truth ``is_dynamic``) x Close/Far
  (``|x|, |y| <= 35 m``, av2 ``make_annotation_files.CLOSE_DISTANCE_THRESHOLD``), on points with
  ``is_valid`` ground truth inside the evaluation mask (non-ground, ``|x|, |y| <= 50 m``).
* Per subset: the mean EPE, accuracy strict (0.05) / relaxed (0.1) (absolute *or* relative error
  below the threshold), space-time angle error (``SWEEP_PAIR_TIME_DELTA`` = 0.1 s appended as a 4th
  coordinate), and TP/TN/FP/FN of the dynamic segmentation.
* Over the dataset: the per-example means are averaged weighted by their point counts; empty subsets
  are NaN with weight 0; Background/Dynamic is not reported. ``Dynamic IoU`` = TP / (TP + FP + FN)
  over everything; ``EPE 3-Way Average`` = mean of EPE on Foreground/Dynamic, Foreground/Static and
  Background/Static.
* The official annotation files store the ground-truth flow as float16
  (``make_annotation_files.write_annotation``); :func:`official_gt_flow` applies the same rounding.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

ACCURACY_RELAX_DISTANCE_THRESHOLD = 0.1
ACCURACY_STRICT_DISTANCE_THRESHOLD = 0.05
EPS = 1e-10
SWEEP_PAIR_TIME_DELTA = 0.1
SCENE_FLOW_DYNAMIC_THRESHOLD = 0.05
CLOSE_DISTANCE_THRESHOLD = 35.0
EVAL_RANGE_M = 50.0

# av2.datasets.sensor.constants.AnnotationCategories in enum order; the index in av2's
# CATEGORY_TO_INDEX is position + 1, with 0 = 'NONE' (background).
ANNOTATION_CATEGORIES: tuple[str, ...] = (
    'ANIMAL', 'ARTICULATED_BUS', 'BICYCLE', 'BICYCLIST', 'BOLLARD', 'BOX_TRUCK', 'BUS',
    'CONSTRUCTION_BARREL', 'CONSTRUCTION_CONE', 'DOG', 'LARGE_VEHICLE', 'MESSAGE_BOARD_TRAILER',
    'MOBILE_PEDESTRIAN_CROSSING_SIGN', 'MOTORCYCLE', 'MOTORCYCLIST', 'OFFICIAL_SIGNALER', 'PEDESTRIAN',
    'RAILED_VEHICLE', 'REGULAR_VEHICLE', 'SCHOOL_BUS', 'SIGN', 'STOP_SIGN', 'STROLLER',
    'TRAFFIC_LIGHT_TRAILER', 'TRUCK', 'TRUCK_CAB', 'VEHICULAR_TRAILER', 'WHEELCHAIR', 'WHEELED_DEVICE',
    'WHEELED_RIDER',
)
CATEGORY_TO_INDEX: dict[str, int] = {'NONE': 0, **{c: i + 1 for i, c in enumerate(ANNOTATION_CATEGORIES)}}
INDEX_TO_CATEGORY: dict[int, str] = {i: c for c, i in CATEGORY_TO_INDEX.items()}

# av2 constants.FOREGROUND_BACKGROUND_BREAKDOWN (the foreground lists every annotation category).
FOREGROUND_BACKGROUND_BREAKDOWN: dict[str, list[int]] = {
    'Background': [0],
    'Foreground': [CATEGORY_TO_INDEX[c] for c in (
        'BOLLARD', 'CONSTRUCTION_BARREL', 'CONSTRUCTION_CONE', 'MOBILE_PEDESTRIAN_CROSSING_SIGN', 'SIGN',
        'STOP_SIGN',
        'ANIMAL', 'DOG', 'OFFICIAL_SIGNALER', 'PEDESTRIAN',
        'BICYCLE', 'BICYCLIST', 'MOTORCYCLE', 'MOTORCYCLIST', 'STROLLER', 'WHEELCHAIR', 'WHEELED_DEVICE',
        'WHEELED_RIDER',
        'ARTICULATED_BUS', 'BOX_TRUCK', 'BUS', 'LARGE_VEHICLE', 'MESSAGE_BOARD_TRAILER', 'RAILED_VEHICLE',
        'REGULAR_VEHICLE', 'SCHOOL_BUS', 'TRAFFIC_LIGHT_TRAILER', 'TRUCK', 'TRUCK_CAB', 'VEHICULAR_TRAILER')],
}

# Order and spelling of av2's SceneFlowMetricType / SegmentationMetricType.
FLOW_METRICS: tuple[str, ...] = ('ACCURACY_RELAX', 'ACCURACY_STRICT', 'ANGLE_ERROR', 'EPE')
SEG_METRICS: tuple[str, ...] = ('TP', 'TN', 'FP', 'FN')
MOTIONS: tuple[str, ...] = ('Dynamic', 'Static')
DISTANCES: tuple[str, ...] = ('Close', 'Far')
NOT_REPORTED = ('Background', 'Dynamic')


class MetricsError(ValueError):
    """Inputs to the metrics have inconsistent shapes, non-finite values or unknown categories."""


def end_point_error(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    return np.linalg.norm(pred - gt, axis=-1).astype(np.float64)


def accuracy(pred: np.ndarray, gt: np.ndarray, threshold: float) -> np.ndarray:
    """1.0 where the absolute or the relative (to ``|gt|``) error is below ``threshold``."""
    err = np.linalg.norm(pred - gt, axis=-1)
    rel = err / (np.linalg.norm(gt, axis=-1) + EPS)
    return ((err < threshold) | (rel < threshold)).astype(np.float64)


def angle_error(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Angle (rad) between the space-time vectors ``(f, Δt)``; Δt keeps zero flow well defined."""
    def unit(f: np.ndarray) -> np.ndarray:
        st = np.concatenate([f, np.full((len(f), 1), SWEEP_PAIR_TIME_DELTA)], axis=1)
        return st / np.linalg.norm(st, axis=-1, keepdims=True)
    dot = np.einsum('bd,bd->b', unit(pred), unit(gt))
    return np.arccos(np.clip(dot, -1.0, 1.0)).astype(np.float64)


def flow_metric(name: str, pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    if name == 'ACCURACY_RELAX':
        return accuracy(pred, gt, ACCURACY_RELAX_DISTANCE_THRESHOLD)
    if name == 'ACCURACY_STRICT':
        return accuracy(pred, gt, ACCURACY_STRICT_DISTANCE_THRESHOLD)
    if name == 'ANGLE_ERROR':
        return angle_error(pred, gt)
    if name == 'EPE':
        return end_point_error(pred, gt)
    raise MetricsError(f'unknown flow metric {name!r}; valid: {FLOW_METRICS}')


def official_gt_flow(flow: np.ndarray) -> np.ndarray:
    """Ground-truth flow as the official annotation files hold it (float16, then float64)."""
    return np.asarray(flow).astype(np.float16).astype(np.float64)


def close_mask(points: np.ndarray) -> np.ndarray:
    """av2 ``is_close``: inside the 70 m x 70 m box around the ego vehicle."""
    return np.all(np.abs(points[:, :2]) <= CLOSE_DISTANCE_THRESHOLD, axis=1)


def eval_point_mask(points: np.ndarray, is_ground: np.ndarray) -> np.ndarray:
    """av2 ``compute_eval_point_mask``: non-ground and ``|x|, |y| <= 50 m``."""
    in_range = (np.abs(points[:, 0]) <= EVAL_RANGE_M) & (np.abs(points[:, 1]) <= EVAL_RANGE_M)
    return in_range & ~np.asarray(is_ground, dtype=bool)


@dataclass
class ExampleRows:
    """One row per (class, motion, distance) subset of one example, as av2's long-form DataFrame."""

    cls: list[str] = field(default_factory=list)
    motion: list[str] = field(default_factory=list)
    distance: list[str] = field(default_factory=list)
    count: list[int] = field(default_factory=list)
    flow: dict[str, list[float]] = field(default_factory=lambda: {m: [] for m in FLOW_METRICS})
    seg: dict[str, list[int]] = field(default_factory=lambda: {m: [] for m in SEG_METRICS})


def _check(name: str, arr: np.ndarray, shape: tuple) -> None:
    if arr.shape != shape:
        raise MetricsError(f'{name}: expected shape {shape}, got {arr.shape}')


def compute_example(pred_flow: np.ndarray, pred_dynamic: np.ndarray, gt_flow: np.ndarray,
                    category_indices: np.ndarray, is_dynamic: np.ndarray, is_close: np.ndarray,
                    is_valid: np.ndarray,
                    breakdown: dict[str, list[int]] = FOREGROUND_BACKGROUND_BREAKDOWN) -> ExampleRows:
    """Per-subset means of one example (av2 ``compute_metrics``); rows for empty subsets are NaN / 0."""
    n = len(gt_flow)
    _check('pred_flow', np.asarray(pred_flow), (n, 3))
    _check('gt_flow', np.asarray(gt_flow), (n, 3))
    for name, arr in (('pred_dynamic', pred_dynamic), ('category_indices', category_indices),
                      ('is_dynamic', is_dynamic), ('is_close', is_close), ('is_valid', is_valid)):
        _check(name, np.asarray(arr), (n,))
    valid = np.asarray(is_valid, dtype=bool)
    pred = np.asarray(pred_flow)[valid].astype(np.float64)
    gt = np.asarray(gt_flow)[valid].astype(np.float64)
    if not np.isfinite(pred).all():
        raise MetricsError('pred_flow: non-finite values on evaluated points')
    if not np.isfinite(gt).all():
        raise MetricsError('gt_flow: non-finite values on points marked valid')
    pdyn = np.asarray(pred_dynamic, dtype=bool)[valid]
    cats = np.asarray(category_indices)[valid].astype(int)
    dyn = np.asarray(is_dynamic, dtype=bool)[valid]
    close = np.asarray(is_close, dtype=bool)[valid]

    rows = ExampleRows()
    for cls, idxs in breakdown.items():
        cmask = np.isin(cats, idxs)
        for motion, mmask in (('Dynamic', dyn), ('Static', ~dyn)):
            for dist, dmask in (('Close', close), ('Far', ~close)):
                mask = cmask & mmask & dmask
                size = int(mask.sum())
                rows.cls.append(cls)
                rows.motion.append(motion)
                rows.distance.append(dist)
                rows.count.append(size)
                if size:
                    for m in FLOW_METRICS:
                        rows.flow[m].append(float(flow_metric(m, pred[mask], gt[mask]).mean()))
                    d, g = pdyn[mask], dyn[mask]
                    rows.seg['TP'].append(int((d & g).sum()))
                    rows.seg['TN'].append(int((~d & ~g).sum()))
                    rows.seg['FP'].append(int((d & ~g).sum()))
                    rows.seg['FN'].append(int((~d & g).sum()))
                else:
                    for m in FLOW_METRICS:
                        rows.flow[m].append(float('nan'))
                    for m in SEG_METRICS:
                        rows.seg[m].append(0)
    return rows


def _metric_label(metric: str) -> str:
    # av2 spells EPE as is and the others title-cased: 'ACCURACY_RELAX' -> 'Accuracy Relax'.
    return metric if metric == 'EPE' else metric.title().replace('_', ' ')


class ThreeWayAccumulator:
    """Collects :class:`ExampleRows` of many examples and reduces them like av2 ``results_to_dict``."""

    def __init__(self) -> None:
        self._keys: list[tuple[str, str, str]] = []
        self._count: list[int] = []
        self._flow: dict[str, list[float]] = {m: [] for m in FLOW_METRICS}
        self._seg: dict[str, list[int]] = {m: [] for m in SEG_METRICS}
        self.num_examples = 0

    def add(self, rows: ExampleRows) -> None:
        self._keys += list(zip(rows.cls, rows.motion, rows.distance))
        self._count += rows.count
        for m in FLOW_METRICS:
            self._flow[m] += rows.flow[m]
        for m in SEG_METRICS:
            self._seg[m] += rows.seg[m]
        self.num_examples += 1

    def add_example(self, *args, **kwargs) -> None:
        self.add(compute_example(*args, **kwargs))

    @staticmethod
    def _weighted(values: np.ndarray, counts: np.ndarray) -> float:
        total = counts.sum()
        if total == 0:
            return float('nan')
        # pandas' Series.sum skips NaN (empty subsets have NaN x 0).
        return float(np.nansum(values * counts) / total)

    def results(self) -> dict[str, float]:
        """Dataset-level metrics, keyed exactly as av2 ``results_to_dict`` keys them."""
        if not self._keys:
            raise MetricsError('no examples were evaluated')
        keys = np.array(self._keys, dtype=object)
        counts = np.array(self._count, dtype=np.float64)
        out: dict[str, float] = {}
        for depth in (3, 2):
            groups = sorted({tuple(k[:depth]) for k in self._keys})
            for m in FLOW_METRICS:
                vals = np.array(self._flow[m], dtype=np.float64)
                for g in groups:
                    if g[:2] == NOT_REPORTED:
                        continue
                    sel = np.all(keys[:, :depth] == np.array(g, dtype=object), axis=1)
                    out[_metric_label(m) + '/' + '/'.join(g)] = self._weighted(vals[sel], counts[sel])
        tp, fp, fn = (float(np.sum(self._seg[m])) for m in ('TP', 'FP', 'FN'))
        out['Dynamic IoU'] = tp / (tp + fp + fn) if tp + fp + fn > 0 else float('nan')
        out['EPE 3-Way Average'] = (out['EPE/Foreground/Dynamic'] + out['EPE/Foreground/Static']
                                    + out['EPE/Background/Static']) / 3
        return out


def threeway_results(examples: Iterable[ExampleRows]) -> dict[str, float]:
    acc = ThreeWayAccumulator()
    for rows in examples:
        acc.add(rows)
    return acc.results()
