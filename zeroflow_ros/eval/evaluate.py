"""``zeroflow eval``: official AV2 scene-flow metrics and the bucket-normalised EPE of a prediction folder.

``PRED_DIR`` holds ``<log_id>/<ts_ns>.feather`` files as ``zeroflow predict`` writes them (one row per
lidar point of sweep t), or is an AV2 submission archive / folder in the challenge format (one row per
point of the evaluation mask, float16 flow). Every sweep t of every log of ``DATA_ROOT/<split>`` that
has a successor is evaluated (``--every 5`` takes every 5th pair of the split, in (log_id, timestamp)
order, as the AV2 leaderboard's ``get_eval_subset``; ``--masks MASKS.zip`` takes exactly the sweeps
and masks of an official mask archive). A missing or malformed prediction is an error naming the
file, never a partial score. ``--workers N`` scores pairs in N processes (same result).

Per pair, as the official pipeline (``make_mask_files`` + ``make_annotation_files`` + ``eval``):

* evaluation mask: non-ground and ``|x|, |y| <= 50 m`` in the ego frame of sweep t. Ground is the map
  raster rule when the log has a raster (as av2), else the ``is_ground`` column of the synthetic
  ground-truth file;
* ground truth: :meth:`zeroflow_ros.data.av2.AV2Log.gt_flow`, rounded to float16 as the official
  annotation files store it (three-way metrics only; the bucketed metric uses it unrounded, as the
  reference's own flow files do);
* metrics: :mod:`zeroflow_ros.eval.metrics` (three-way EPE, accuracies, angle error, dynamic IoU) and
  :mod:`zeroflow_ros.eval.bucketed` (bucket-normalised EPE of the AV2 2024 challenge), and the
  Foreground/Dynamic EPE per ground-truth speed bucket 0-2, 2-5, 5-10, 10-20, 20+ m/s
  (:class:`~zeroflow_ros.eval.bucketed.SpeedBucketEPE`: same points and EPE as the three-way
  Foreground/Dynamic, the speed is the point's own motion, GT flow minus ego motion, over the pair's
  time step), with point counts, under ``fg_dynamic_by_speed`` in ``metrics.json``.

Writes a table to stdout, ``metrics.json`` and ``bucketed_epe.png`` to ``--out``.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from zeroflow_ros.core.geometry import av2_to_residual
from zeroflow_ros.eval.bucketed import BucketedAccumulator, BucketedResult, SpeedBucketEPE
from zeroflow_ros.eval.masks import mask_names, parse_name, read_mask
from zeroflow_ros.eval.metrics import (FLOW_METRICS, ExampleRows, MetricsError, ThreeWayAccumulator,
                                       close_mask, compute_example, eval_point_mask, official_gt_flow)

log = logging.getLogger(__name__)

FLOW_COLUMNS = ('flow_tx_m', 'flow_ty_m', 'flow_tz_m')
FLOAT_TYPES = (np.float16, np.float32, np.float64)


class EvalError(ValueError):
    """A prediction or ground-truth file is missing or malformed (names the file and what was expected)."""


@dataclass
class EvalPair:
    log_id: str
    ts0: int
    points0: np.ndarray       # (N,3) float32, ego0
    ego1_T_ego0: np.ndarray
    gt_flow: np.ndarray       # (N,3) float32, AV2 convention
    is_valid: np.ndarray
    is_dynamic: np.ndarray
    category_indices: np.ndarray
    eval_mask: np.ndarray     # (N,) bool
    dt_s: float               # time from sweep t to sweep t+1


class PredictionSource:
    """Reads ``<log_id>/<ts>.feather`` from a folder or a zip archive."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._zip: zipfile.ZipFile | None = None
        if self.path.is_file() and zipfile.is_zipfile(self.path):
            self._zip = zipfile.ZipFile(self.path)
            self._names = set(self._zip.namelist())
        elif not self.path.is_dir():
            raise EvalError(f'{self.path}: prediction folder or .zip archive not found')

    def where(self, log_id: str, ts0: int) -> str:
        name = f'{log_id}/{int(ts0)}.feather'
        return f'{self.path}:{name}' if self._zip is not None else str(self.path / name)

    def read(self, log_id: str, ts0: int):
        import pyarrow.feather as feather
        name = f'{log_id}/{int(ts0)}.feather'
        where = self.where(log_id, ts0)
        try:
            if self._zip is not None:
                if name not in self._names:
                    raise EvalError(f'{where}: prediction missing')
                return feather.read_table(io.BytesIO(self._zip.read(name)))
            p = self.path / name
            if not p.is_file():
                raise EvalError(f'{where}: prediction missing')
            return feather.read_table(p)
        except EvalError:
            raise
        except Exception as exc:  # pyarrow raises many types for corrupt files
            raise EvalError(f'{where}: cannot read as feather ({exc})') from None

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()


def parse_prediction(table, where: str, n_points: int, eval_mask: np.ndarray,
                     finite_points: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Validate a prediction table; returns (flow (N,3) float64, is_dynamic (N,)) over all N points.

    Accepts one row per lidar point, or one row per evaluated point (challenge format); rows outside
    the mask of the second form are filled with NaN (never scored). NaN/inf flow is an error on every
    row whose lidar point is finite (``finite_points``; all rows when not given), scored or not.
    """
    names = table.column_names
    missing = [c for c in FLOW_COLUMNS + ('is_dynamic',) if c not in names]
    if missing:
        raise EvalError(f'{where}: missing columns {missing} (has {names})')
    cols = {}
    for c in FLOW_COLUMNS:
        arr = table.column(c).to_numpy(zero_copy_only=False)
        if arr.dtype not in FLOAT_TYPES:
            raise EvalError(f'{where}: column {c} must be float16/32/64, got {arr.dtype}')
        cols[c] = arr
    dyn = table.column('is_dynamic').to_numpy(zero_copy_only=False)
    if dyn.dtype != bool:
        raise EvalError(f'{where}: column is_dynamic must be bool, got {dyn.dtype}')
    flow = np.stack([cols[c].astype(np.float64) for c in FLOW_COLUMNS], axis=1)
    n_eval = int(eval_mask.sum())
    rows = table.num_rows
    if rows == n_points:
        full_flow, full_dyn = flow, dyn
    elif rows == n_eval:
        full_flow = np.full((n_points, 3), np.nan)
        full_flow[eval_mask] = flow
        full_dyn = np.zeros(n_points, dtype=bool)
        full_dyn[eval_mask] = dyn
    else:
        raise EvalError(f'{where}: {rows} rows, expected {n_points} (one per lidar point) or {n_eval} '
                        '(one per evaluated point)')
    check = eval_mask.copy()
    if rows == n_points:
        check |= np.ones(n_points, bool) if finite_points is None else finite_points
    bad = ~np.isfinite(full_flow[check]).all(axis=1)
    if bad.any():
        raise EvalError(f'{where}: {int(bad.sum())} rows have NaN/inf flow (only non-finite points may)')
    return full_flow, full_dyn


def ground_for_eval(lg, points0: np.ndarray, ts0: int) -> np.ndarray:
    """Ground mask of sweep t for the evaluation mask: the map raster rule, else synthetic ``is_ground``."""
    g = lg.ground_mask(points0, ts0)
    if g is not None:
        return g
    from zeroflow_ros.data.av2 import read_feather
    path = lg.log_dir / 'scene_flow' / f'{int(ts0)}.feather'
    tab = read_feather(path)
    if 'is_ground' not in tab.column_names:
        raise EvalError(f'{path}: log {lg.log_id} has no map ground raster and this file has no is_ground '
                        'column; cannot build the evaluation mask')
    g = tab.column('is_ground').to_numpy(zero_copy_only=False).astype(bool)
    if g.shape != (len(points0),):
        raise EvalError(f'{path}: is_ground has {len(g)} rows, the lidar sweep {len(points0)}')
    return g


@dataclass(frozen=True)
class PairJob:
    log_dir: str
    ts0: int
    ts1: int


def list_eval_pairs(data_root: Path, split: str, every: int = 1,
                    masks: list[str] | None = None) -> list[PairJob]:
    """List the pairs to score: every ``every``-th of the split, or exactly those of a mask archive."""
    from zeroflow_ros.data.av2 import list_logs
    logs = list_logs(Path(data_root), split)
    if not logs:
        raise EvalError(f'{Path(data_root) / split}: no logs with sensors/lidar/ found')
    jobs: list[PairJob] = []
    if masks is not None:
        by_id = {lg.log_id: lg for lg in logs}
        for name in masks:
            log_id, t0 = parse_name(name)
            lg = by_id.get(log_id)
            if lg is None:
                raise EvalError(f'mask entry {name}: no log {log_id} in {Path(data_root) / split}')
            ts = lg.timestamps
            i = int(np.searchsorted(ts, t0))
            if i >= len(ts) - 1 or ts[i] != t0:
                raise EvalError(f'mask entry {name}: no sweep with a successor at that time in {lg.log_dir}')
            jobs.append(PairJob(str(lg.log_dir), int(ts[i]), int(ts[i + 1])))
        return sorted(jobs, key=lambda j: (Path(j.log_dir).name, j.ts0))
    k = -1
    for lg in logs:
        ts = lg.timestamps
        for t0, t1 in zip(ts[:-1], ts[1:]):
            # One counter over the whole split in (log_id, timestamp) order, as av2 get_eval_subset
            # takes every 5th pair of its SceneFlowDataloader.
            k += 1
            if k % every == 0:
                jobs.append(PairJob(str(lg.log_dir), int(t0), int(t1)))
    return jobs


def load_eval_pair(job: PairJob, mask: np.ndarray | None = None) -> EvalPair:
    """Points, ground truth and evaluation mask of one pair (``mask`` from an official archive, if given)."""
    from zeroflow_ros.data.av2 import AV2Log
    lg = AV2Log(Path(job.log_dir))
    t0, t1 = job.ts0, job.ts1
    points0 = lg.points(t0)
    gt = lg.gt_flow(t0)
    if gt is None:
        raise EvalError(f'{lg.log_dir}: no ground-truth flow for sweep {t0} '
                        '(expected scene_flow/<ts>.feather or annotations)')
    n = len(points0)
    for name in ('is_valid', 'is_dynamic', 'category_indices'):
        if getattr(gt, name).shape != (n,):
            raise EvalError(f'{lg.log_dir}: ground truth {name} of sweep {t0} has shape '
                            f'{getattr(gt, name).shape}, the sweep has {n} points')
    if gt.flow.shape != (n, 3):
        raise EvalError(f'{lg.log_dir}: ground-truth flow of sweep {t0} has shape {gt.flow.shape}, '
                        f'expected ({n}, 3)')
    if mask is None:
        mask = eval_point_mask(points0, ground_for_eval(lg, points0, t0))
    elif mask.shape != (n,):
        raise EvalError(f'mask {lg.log_id}/{t0}.feather: {len(mask)} rows, the lidar sweep has {n} points')
    if t1 <= t0:
        raise EvalError(f'{lg.log_dir}: sweep pair {t0} -> {t1}: expected increasing timestamps (ns)')
    return EvalPair(lg.log_id, t0, points0, lg.ego1_T_ego0(t0, t1), gt.flow, gt.is_valid,
                    gt.is_dynamic, gt.category_indices, mask, dt_s=(t1 - t0) * 1e-9)


def iter_eval_pairs(data_root: Path, split: str, every: int = 1) -> Iterator[EvalPair]:
    """Pairs of a split with their ground truth and evaluation mask."""
    for job in list_eval_pairs(data_root, split, every):
        yield load_eval_pair(job)


@dataclass
class EvalResult:
    threeway: dict[str, float]
    bucketed: BucketedResult
    bucketed_all_ranges: BucketedResult
    num_pairs: int
    num_points: int
    speed_buckets: SpeedBucketEPE

    def to_dict(self) -> dict:
        def clean(v: float):
            return None if v is None or not math.isfinite(v) else float(v)
        return {
            'num_pairs': self.num_pairs,
            'num_points': self.num_points,
            'threeway': {k: clean(v) for k, v in self.threeway.items()},
            'bucketed': self.bucketed.to_dict(),
            'bucketed_all_ranges': self.bucketed_all_ranges.to_dict(),
            'fg_dynamic_by_speed': self.speed_buckets.to_dict(),
        }


@dataclass
class PairScore:
    rows: ExampleRows
    buckets: BucketedAccumulator
    speeds: SpeedBucketEPE
    points: int


def score_pair(p: EvalPair, src: PredictionSource) -> PairScore:
    """Three-way rows, bucketed and per-speed sums of one pair (its prediction read and checked first)."""
    where = src.where(p.log_id, p.ts0)
    flow, dyn = parse_prediction(src.read(p.log_id, p.ts0), where, len(p.points0), p.eval_mask,
                                 np.isfinite(p.points0).all(axis=1))
    m = p.eval_mask
    buck = BucketedAccumulator()
    speeds = SpeedBucketEPE()
    try:
        rows = compute_example(flow[m], dyn[m], official_gt_flow(p.gt_flow[m]), p.category_indices[m],
                               p.is_dynamic[m], close_mask(p.points0[m]), p.is_valid[m])
        sel = m & p.is_valid
        pts = p.points0[sel]
        gt_residual = av2_to_residual(pts, p.gt_flow[sel], p.ego1_T_ego0)
        buck.add(pts, av2_to_residual(pts, flow[sel], p.ego1_T_ego0), gt_residual, p.category_indices[sel])
        # Same EPE as the three-way Foreground/Dynamic (float16 GT); speed from the exact GT.
        speeds.add(flow[sel], official_gt_flow(p.gt_flow[sel]), np.linalg.norm(gt_residual, axis=1) / p.dt_s,
                   p.category_indices[sel], p.is_dynamic[sel])
    except MetricsError as exc:
        raise EvalError(f'{p.log_id}/{p.ts0} (prediction {where}): {exc}') from None
    return PairScore(rows, buck, speeds, int(sel.sum()))


_WORKER: dict = {}


def _init_worker(pred_dir: str, masks: str | None) -> None:
    _WORKER['src'] = PredictionSource(Path(pred_dir))
    _WORKER['masks'] = None if masks is None else zipfile.ZipFile(masks)


def _close_worker() -> None:
    for key in ('src', 'masks'):
        obj = _WORKER.pop(key, None)
        if obj is not None:
            obj.close()


def _score_job(job: PairJob) -> PairScore:
    zf = _WORKER['masks']
    mask = None if zf is None else read_mask(zf, f'{Path(job.log_dir).name}/{job.ts0}.feather')
    return score_pair(load_eval_pair(job, mask), _WORKER['src'])


def evaluate(pred_dir: Path, data_root: Path, split: str, every: int = 1, progress=None,
             masks: Path | None = None, workers: int = 1) -> EvalResult:
    """Score a prediction folder/archive against the ground truth of a split.

    ``masks``: an official AV2 mask archive; then exactly its sweeps are scored, on its masks.
    """
    names = mask_names(masks) if masks is not None else None
    jobs = list_eval_pairs(data_root, split, every, names)
    if not jobs:
        raise EvalError(f'{Path(data_root) / split}: no sweep pairs to evaluate')
    PredictionSource(pred_dir).close()  # fail fast on a wrong path, before any worker starts
    bar = progress or (lambda it, total: it)
    three = ThreeWayAccumulator()
    buck = BucketedAccumulator()
    speeds = SpeedBucketEPE()
    n_points = 0

    def collect(scores) -> None:
        nonlocal n_points
        for sc in bar(scores, total=len(jobs)):
            three.add(sc.rows)
            buck.merge(sc.buckets)
            speeds.merge(sc.speeds)
            n_points += sc.points

    init_args = (str(pred_dir), None if masks is None else str(masks))
    if workers <= 1:
        _init_worker(*init_args)
        try:
            collect(_score_job(j) for j in jobs)
        finally:
            _close_worker()
    else:
        from concurrent.futures import ProcessPoolExecutor
        with ProcessPoolExecutor(max_workers=workers, initializer=_init_worker, initargs=init_args) as pool:
            # map keeps the pair order, so the sums are the same as with one process.
            collect(pool.map(_score_job, jobs, chunksize=4))
    return EvalResult(three.results(), buck.result(35.0), buck.result(float('inf')), len(jobs), n_points,
                      speeds)


# --- presentation ------------------------------------------------------------------------------

def _fmt(v: float, nd: int = 4) -> str:
    return '-' if v is None or not math.isfinite(v) else f'{v:.{nd}f}'


def format_table(res: EvalResult) -> str:
    t = res.threeway
    lines = [f'{res.num_pairs} sweep pairs, {res.num_points} evaluated points', '',
             'AV2 scene flow (official three-way metrics)']
    lines.append(f'  {"subset":<22}{"EPE (m)":>10}{"Acc strict":>12}{"Acc relax":>11}{"Angle (rad)":>13}')
    for sub in ('Foreground/Dynamic', 'Foreground/Static', 'Background/Static'):
        for suffix in ('', '/Close', '/Far'):
            key = sub + suffix
            name = ('  ' if suffix else '') + (key if not suffix else suffix[1:])
            vals = [_fmt(t.get(f'{lab}/{key}', float('nan')))
                    for lab in ('EPE', 'Accuracy Strict', 'Accuracy Relax', 'Angle Error')]
            lines.append(f'  {name:<22}{vals[0]:>10}{vals[1]:>12}{vals[2]:>11}{vals[3]:>13}')
    lines.append(f'  EPE 3-Way Average     {_fmt(t["EPE 3-Way Average"])}')
    lines.append(f'  Dynamic IoU           {_fmt(t["Dynamic IoU"])}')
    lines += ['', 'Bucket-normalised EPE (AV2 2024 challenge, points within 35 m)',
              f'  {"class":<16}{"static EPE":>12}{"dynamic norm. EPE":>19}']
    for c, (s, d) in res.bucketed.per_class().items():
        lines.append(f'  {c:<16}{_fmt(s):>12}{_fmt(d):>19}')
    ms, md = res.bucketed.mean()
    lines.append(f'  {"mean":<16}{_fmt(ms):>12}{_fmt(md):>19}')
    lines += ['', 'Foreground/Dynamic EPE per ground-truth speed (own motion, GT flow minus ego, / pair dt)',
              f'  {"speed (m/s)":<16}{"EPE (m)":>10}{"points":>10}']
    for label, epe, count in res.speed_buckets.rows():
        lines.append(f'  {label:<16}{_fmt(epe):>10}{count:>10}')
    return '\n'.join(lines)


def plot_buckets(res: BucketedResult, path: Path, title: str = '') -> None:
    """EPE per speed bucket and meta-class (raw and normalised), matplotlib Agg.

    Each marker is one non-empty (class, bucket) cell at the mean ground-truth speed of its points,
    so the open last bucket (>= 20 m/s) sits where its points are; marker area grows with the count.
    """
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    speeds_ms = res.speed * 10.0  # metres per 0.1 s frame -> m/s
    norm = res.normalized()
    style = dict(BACKGROUND=('tab:gray', 'o'), CAR=('tab:blue', 's'), PEDESTRIAN=('tab:orange', '^'),
                 WHEELED_VRU=('tab:green', 'D'), OTHER_VEHICLES=('tab:red', 'v'))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for i, c in enumerate(res.classes):
        colour, marker = style.get(c, ('k', 'o'))
        ok = res.count[i] > 0
        size = 8 + 40 * np.sqrt(res.count[i] / max(1, res.count.max()))
        if ok.any():
            axes[0].plot(speeds_ms[i, ok], res.epe[i, ok], color=colour, lw=1, alpha=0.6)
            axes[0].scatter(speeds_ms[i, ok], res.epe[i, ok], s=size[ok], color=colour, marker=marker,
                            label=c)
        dyn = ok.copy()
        dyn[0] = False
        if dyn.any():
            axes[1].plot(speeds_ms[i, dyn], norm[i, dyn], color=colour, lw=1, alpha=0.6)
            axes[1].scatter(speeds_ms[i, dyn], norm[i, dyn], s=size[dyn], color=colour, marker=marker,
                            label=c)
    axes[0].axvspan(0, res.edges[1] * 10, color='0.9', zorder=0, label='static bucket (< 0.4 m/s)')
    axes[0].set(xlabel='mean ground-truth speed of the bucket (m/s)', ylabel='mean EPE (m)',
                title='EPE per speed bucket')
    axes[1].axhline(1.0, color='k', lw=0.8, ls='--', label='= predicting no motion')
    axes[1].set(xlabel='mean ground-truth speed of the bucket (m/s)', ylabel='mean EPE / mean speed',
                title='normalised EPE (dynamic buckets)')
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ms, md = res.mean()
    fig.suptitle(f'{title}  mean static EPE {_fmt(ms)} m, mean dynamic normalised EPE {_fmt(md)} '
                 '(points within 35 m)'.strip())
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('pred_dir', type=Path, help='predictions <log_id>/<ts>.feather (folder or .zip)')
    parser.add_argument('data_root', type=Path, help='dataset root holding <split>/<log_id>/...')
    parser.add_argument('--split', required=True, help='split folder under DATA_ROOT (e.g. val)')
    parser.add_argument('--every', type=int, default=1,
                        help='every k-th pair of the split in (log, time) order (AV2 leaderboard: 5)')
    parser.add_argument('--masks', type=Path, metavar='MASKS.zip',
                        help='official AV2 mask archive: score exactly its sweeps, on its masks')
    parser.add_argument('--workers', type=int, default=1, help='processes reading and scoring pairs')
    parser.add_argument('--out', type=Path, help='folder for metrics.json and bucketed_epe.png '
                        '(default: <PRED_DIR>_eval next to PRED_DIR)')


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm
    if args.every < 1:
        raise EvalError(f'--every: expected >= 1, got {args.every}')
    if args.workers < 1:
        raise EvalError(f'--workers: expected >= 1, got {args.workers}')
    res = evaluate(args.pred_dir, args.data_root, args.split, args.every,
                   progress=lambda it, total: tqdm(it, total=total, unit='pair', desc='eval'),
                   masks=args.masks, workers=args.workers)
    out = args.out or args.pred_dir.with_name(args.pred_dir.stem + '_eval')
    out.mkdir(parents=True, exist_ok=True)
    print(format_table(res))
    d = res.to_dict()
    d.update(pred_dir=str(args.pred_dir), data_root=str(args.data_root), split=args.split, every=args.every,
             masks=None if args.masks is None else str(args.masks), flow_metrics=list(FLOW_METRICS))
    (out / 'metrics.json').write_text(json.dumps(d, indent=2))
    plot_buckets(res.bucketed, out / 'bucketed_epe.png', title=f'{args.pred_dir.name} on {args.split}:')
    print(f'\nwrote {out / "metrics.json"} and {out / "bucketed_epe.png"}')
    return 0
