"""Bucket-normalised EPE, the metric of the Argoverse 2 2024 scene-flow challenge.

Khatri, Vedder, Peri, Ramanan, Hays, "I Can't Believe It's Not Scene Flow!", ECCV 2024
(arXiv 2403.04739). Re-implemented from the reference code, github.com/kylevedder/BucketedSceneFlowEval:

* ``bucketed_scene_flow_eval/datasets/argoverse2/av2_metacategories.py``: the meta-classes
  BACKGROUND, CAR, PEDESTRIAN, WHEELED_VRU, OTHER_VEHICLES (:data:`META_CLASSES`). Road signs
  (BOLLARD, CONSTRUCTION_BARREL/CONE, MOBILE_PEDESTRIAN_CROSSING_SIGN, SIGN, STOP_SIGN,
  MESSAGE_BOARD_TRAILER, TRAFFIC_LIGHT_TRAILER) are left out on purpose there ("labeling oddities"),
  and so are ANIMAL and DOG, which no meta-class lists.
* ``bucketed_scene_flow_eval/eval/bucketed_epe.py`` (``BucketedEPEEvaluator``, defaults
  ``bucket_max_speed=2.0``, ``num_buckets=51``): speed-bucket edges ``linspace(0, 2.0, 51)`` plus
  ``inf``, i.e. 51 buckets ``[0, 0.04), [0.04, 0.08), ..., [1.96, 2.0), [2.0, inf)`` in metres per
  frame (0.1 s), so the first (static) bucket is below 0.4 m/s. The speed of a point is the norm of
  its ground-truth flow with ego motion removed (the reference computes flow from world-frame points).
* ``base_per_frame_sceneflow_eval.py``: per frame, per category, per bucket and per distance threshold
  (35 m and inf, on ``max(|x|, |y|) < d``, strict), the mean EPE and mean speed with their count;
  frames are merged by count-weighted averages, then categories into meta-classes the same way.
  A (meta-class, bucket) cell is thus the plain mean over all its points.
* ``BucketResultMatrix.get_normalized_error_matrix``: the static bucket keeps its raw EPE; every
  other bucket is divided by the cell's mean speed. Per meta-class: ``static EPE`` = the static
  bucket, ``dynamic error`` = NaN-mean over the non-static buckets. ``compute_results`` reports the
  35 m threshold; the mean over meta-classes (NaN-mean) gives the headline "mean dynamic normalised
  EPE" (and the mean static EPE).

The reference evaluates the points of its ground-truth flow files (valid, non-ground); we apply the
same evaluation mask as the three-way metric (valid, non-ground, ``|x|, |y| <= 50 m``).

Also here (not part of the challenge): :class:`SpeedBucketEPE`, the official three-way metric's
Foreground/Dynamic EPE broken down by ground-truth speed in m/s (0-2, 2-5, 5-10, 10-20, 20+), so that
errors on fast traffic are visible on their own instead of averaged with slow movers.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from zeroflow_ros.eval.metrics import (CATEGORY_TO_INDEX, FOREGROUND_BACKGROUND_BREAKDOWN, MetricsError,
                                       end_point_error)

BACKGROUND = ['BACKGROUND']
CAR = ['REGULAR_VEHICLE']
PEDESTRIAN = ['PEDESTRIAN', 'STROLLER', 'WHEELCHAIR', 'OFFICIAL_SIGNALER']
WHEELED_VRU = ['BICYCLE', 'BICYCLIST', 'MOTORCYCLE', 'MOTORCYCLIST', 'WHEELED_DEVICE', 'WHEELED_RIDER']
OTHER_VEHICLES = ['BOX_TRUCK', 'LARGE_VEHICLE', 'RAILED_VEHICLE', 'TRUCK', 'TRUCK_CAB', 'VEHICULAR_TRAILER',
                  'ARTICULATED_BUS', 'BUS', 'SCHOOL_BUS']
META_CLASSES: dict[str, list[str]] = {
    'BACKGROUND': BACKGROUND,
    'CAR': CAR,
    'PEDESTRIAN': PEDESTRIAN,
    'WHEELED_VRU': WHEELED_VRU,
    'OTHER_VEHICLES': OTHER_VEHICLES,
}
BUCKET_MAX_SPEED = 2.0      # metres per frame
NUM_BUCKETS = 51
DISTANCE_THRESHOLDS = (35.0, float('inf'))
REPORTED_DISTANCE = 35.0


def speed_bucket_edges(max_speed: float = BUCKET_MAX_SPEED, num_buckets: int = NUM_BUCKETS) -> np.ndarray:
    """Edges of the speed buckets (len = buckets + 1), the last bucket open to inf."""
    return np.concatenate([np.linspace(0.0, max_speed, num_buckets), [np.inf]])


def bucket_index(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bucket of each value for half-open buckets ``[edges[i], edges[i+1])``; below/above clip to the ends."""
    # searchsorted 'right' puts a value equal to an edge into the bucket starting at that edge.
    idx = np.searchsorted(edges, values, side='right') - 1
    return np.clip(idx, 0, len(edges) - 2)


def _index_to_meta() -> np.ndarray:
    """Lookup av2 category index (0..30, 0 = background) -> meta-class row, -1 = not evaluated."""
    lut = np.full(len(CATEGORY_TO_INDEX), -1, dtype=np.int64)
    names = list(META_CLASSES)
    for row, meta in enumerate(names):
        for cat in META_CLASSES[meta]:
            lut[0 if cat == 'BACKGROUND' else CATEGORY_TO_INDEX[cat]] = row
    return lut


@dataclass
class BucketedResult:
    classes: list[str]
    edges: np.ndarray                 # (B+1,)
    epe: np.ndarray                   # (C, B) mean EPE per cell, NaN where empty
    speed: np.ndarray                 # (C, B) mean ground-truth speed per cell
    count: np.ndarray                 # (C, B) int

    def normalized(self) -> np.ndarray:
        out = self.epe.copy()
        with np.errstate(invalid='ignore', divide='ignore'):
            out[:, 1:] = out[:, 1:] / self.speed[:, 1:]
        return out

    def per_class(self) -> dict[str, tuple[float, float]]:
        """meta-class -> (static EPE, dynamic normalised EPE); NaN where a class has no points."""
        norm = self.normalized()
        out = {}
        for i, c in enumerate(self.classes):
            dyn = norm[i, 1:]
            dyn = dyn[~np.isnan(dyn)]
            out[c] = (float(norm[i, 0]), float(dyn.mean()) if len(dyn) else float('nan'))
        return out

    def mean(self) -> tuple[float, float]:
        """(mean static EPE, mean dynamic normalised EPE) over meta-classes, NaN-aware."""
        vals = np.array(list(self.per_class().values()), dtype=np.float64).reshape(-1, 2)
        res = []
        for col in vals.T:
            col = col[~np.isnan(col)]
            res.append(float(col.mean()) if len(col) else float('nan'))
        return res[0], res[1]

    def to_dict(self) -> dict:
        per = self.per_class()
        mean_static, mean_dynamic = self.mean()

        def clean(a: np.ndarray) -> list:
            return [[None if not np.isfinite(v) else float(v) for v in row] for row in a]
        return {
            'classes': self.classes,
            'bucket_edges_m_per_frame': [float(e) for e in self.edges],
            'per_class': {c: {'static_epe': s, 'dynamic_normalized_epe': d} for c, (s, d) in per.items()},
            'mean_static_epe': mean_static,
            'mean_dynamic_normalized_epe': mean_dynamic,
            'epe': clean(self.epe), 'speed': clean(self.speed),
            'count': [[int(v) for v in row] for row in self.count],
        }


class BucketedAccumulator:
    """Sums EPE, speed and counts per (meta-class, distance threshold, speed bucket) over examples."""

    def __init__(self, max_speed: float = BUCKET_MAX_SPEED, num_buckets: int = NUM_BUCKETS,
                 distance_thresholds: tuple[float, ...] = DISTANCE_THRESHOLDS) -> None:
        self.edges = speed_bucket_edges(max_speed, num_buckets)
        self.classes = list(META_CLASSES)
        self.distances = tuple(float(d) for d in distance_thresholds)
        shape = (len(self.distances), len(self.classes), len(self.edges) - 1)
        self._epe = np.zeros(shape)
        self._speed = np.zeros(shape)
        self._count = np.zeros(shape, dtype=np.int64)
        self._lut = _index_to_meta()

    def add(self, points: np.ndarray, pred_residual: np.ndarray, gt_residual: np.ndarray,
            category_indices: np.ndarray) -> None:
        """Add the evaluated points of one example (already masked), flows with ego motion removed."""
        n = len(points)
        for name, arr, shape in (('points', points, (n, 3)), ('pred_residual', pred_residual, (n, 3)),
                                 ('gt_residual', gt_residual, (n, 3)),
                                 ('category_indices', category_indices, (n,))):
            if np.shape(arr) != shape:
                raise MetricsError(f'{name}: expected shape {shape}, got {np.shape(arr)}')
        cats = np.asarray(category_indices).astype(np.int64)
        if n and (cats.min() < 0 or cats.max() >= len(self._lut)):
            raise MetricsError(f'category_indices: expected 0..{len(self._lut) - 1}, '
                               f'got {cats.min()}..{cats.max()}')
        pred = np.asarray(pred_residual, dtype=np.float64)
        gt = np.asarray(gt_residual, dtype=np.float64)
        epe = np.linalg.norm(pred - gt, axis=1)
        speed = np.linalg.norm(gt, axis=1)
        meta = self._lut[cats]
        bucket = bucket_index(speed, self.edges)
        cheb = np.max(np.abs(np.asarray(points, dtype=np.float64)[:, :2]), axis=1) if n else np.zeros(0)
        for di, d in enumerate(self.distances):
            sel = (meta >= 0) & (cheb < d)
            flat = meta[sel] * (len(self.edges) - 1) + bucket[sel]
            shape = self._epe[di].shape
            size = shape[0] * shape[1]
            self._epe[di] += np.bincount(flat, weights=epe[sel], minlength=size).reshape(shape)
            self._speed[di] += np.bincount(flat, weights=speed[sel], minlength=size).reshape(shape)
            self._count[di] += np.bincount(flat, minlength=size).reshape(shape)

    def merge(self, other: 'BucketedAccumulator') -> None:
        """Add another accumulator's sums (same buckets and thresholds), e.g. from a worker process."""
        if not (np.array_equal(self.edges, other.edges) and self.distances == other.distances):
            raise MetricsError('cannot merge bucketed accumulators with different buckets or thresholds')
        self._epe += other._epe
        self._speed += other._speed
        self._count += other._count

    def result(self, distance: float = REPORTED_DISTANCE) -> BucketedResult:
        try:
            di = self.distances.index(float(distance))
        except ValueError:
            raise MetricsError(
                f'distance threshold {distance} not accumulated; have {self.distances}') from None
        cnt = self._count[di]
        with np.errstate(invalid='ignore', divide='ignore'):
            epe = np.where(cnt > 0, self._epe[di] / np.maximum(cnt, 1), np.nan)
            speed = np.where(cnt > 0, self._speed[di] / np.maximum(cnt, 1), np.nan)
        return BucketedResult(list(self.classes), self.edges.copy(), epe, speed, cnt.copy())


# --- Foreground/Dynamic EPE per ground-truth speed bucket ------------------------------------------

SPEED_BUCKET_EDGES_MPS = (0.0, 2.0, 5.0, 10.0, 20.0, float('inf'))
_FOREGROUND = np.array(FOREGROUND_BACKGROUND_BREAKDOWN['Foreground'])


def _bucket_label(lo: float, hi: float) -> str:
    return f'{lo:g}+' if not np.isfinite(hi) else f'{lo:g}-{hi:g}'


class SpeedBucketEPE:
    """Foreground/Dynamic EPE per ground-truth speed bucket (m/s), summed over examples.

    The subset is exactly the three-way metric's Foreground/Dynamic: a foreground category (any of
    av2's 30 annotation categories) and ground-truth ``is_dynamic``. A point's speed is its own
    motion: the norm of the ground-truth flow with ego motion removed (residual flow), divided by
    the pair's time step in seconds. The EPE is the three-way metric's (AV2-convention flow, against
    the same ground truth it scores), so the count-weighted mean over the buckets equals
    ``EPE/Foreground/Dynamic``. Buckets are half-open ``[lo, hi)``; the last is open to inf.
    """

    def __init__(self, edges_mps: tuple[float, ...] = SPEED_BUCKET_EDGES_MPS) -> None:
        self.edges = np.asarray(edges_mps, dtype=np.float64)
        if len(self.edges) < 2 or self.edges[0] != 0.0 or np.any(np.diff(self.edges) <= 0):
            raise MetricsError(f'speed bucket edges: expected increasing from 0, got {tuple(edges_mps)}')
        self._sum = np.zeros(len(self.edges) - 1)
        self._count = np.zeros(len(self.edges) - 1, dtype=np.int64)

    def add(self, pred_flow: np.ndarray, gt_flow: np.ndarray, speed_mps: np.ndarray,
            category_indices: np.ndarray, is_dynamic: np.ndarray) -> None:
        """Add the evaluated points of one example (already masked to valid, scored points)."""
        n = len(gt_flow)
        for name, arr, shape in (('pred_flow', pred_flow, (n, 3)), ('gt_flow', gt_flow, (n, 3)),
                                 ('speed_mps', speed_mps, (n,)), ('category_indices', category_indices, (n,)),
                                 ('is_dynamic', is_dynamic, (n,))):
            if np.shape(arr) != shape:
                raise MetricsError(f'{name}: expected shape {shape}, got {np.shape(arr)}')
        sel = np.isin(np.asarray(category_indices).astype(np.int64), _FOREGROUND)
        sel &= np.asarray(is_dynamic, dtype=bool)
        speed = np.asarray(speed_mps, dtype=np.float64)[sel]
        if not np.isfinite(speed).all():
            raise MetricsError('speed_mps: non-finite values on foreground dynamic points')
        epe = end_point_error(np.asarray(pred_flow, np.float64)[sel], np.asarray(gt_flow, np.float64)[sel])
        bucket = bucket_index(speed, self.edges)
        size = len(self._sum)
        self._sum += np.bincount(bucket, weights=epe, minlength=size)
        self._count += np.bincount(bucket, minlength=size)

    def merge(self, other: 'SpeedBucketEPE') -> None:
        """Add another accumulator's sums (same edges), e.g. from a worker process."""
        if not np.array_equal(self.edges, other.edges):
            raise MetricsError(f'cannot merge speed buckets {other.edges} into {self.edges}')
        self._sum += other._sum
        self._count += other._count

    def rows(self) -> list[tuple[str, float, int]]:
        """(label, mean EPE or NaN when empty, point count) per bucket, slowest first."""
        out = []
        for i, (lo, hi) in enumerate(zip(self.edges[:-1], self.edges[1:])):
            c = int(self._count[i])
            out.append((_bucket_label(lo, hi), float(self._sum[i] / c) if c else float('nan'), c))
        return out

    def to_dict(self) -> dict:
        def clean(v: float):
            return None if not np.isfinite(v) else float(v)
        return {
            'subset': 'Foreground/Dynamic',
            'speed': 'norm of ground-truth flow minus ego motion, divided by the pair time step (m/s)',
            'buckets': [{'bucket_mps': label, 'lo_mps': float(lo), 'hi_mps': clean(hi), 'epe': clean(e),
                         'count': c}
                        for (label, e, c), lo, hi in zip(self.rows(), self.edges[:-1], self.edges[1:])],
        }
