#!/usr/bin/env python3
"""Teachers side by side (issue #13): official-AV2 EPE on a labelled split and CPU-seconds per pair.

Two measurements in one run, one row per method:

1. **Accuracy**: every method predicts the same pairs of ``DATA_ROOT/<split>`` (``--every N`` as
   ``zeroflow eval``) through ``zeroflow predict``'s own code (``predict_pair``: map ground removal,
   range crop, ego compensation, official file layout), and ``zeroflow eval``'s scorer
   (:func:`zeroflow_ros.eval.evaluate.evaluate`) scores each folder: three-way EPE, its parts and
   foreground-dynamic EPE per ground-truth speed bucket. Teachers: ``rigid``, ``hybrid``, ``nsfp``
   (fast NSFP, today's default settings); baselines ``ego`` (static world) and ``nn``.
   The CPU seconds of the teacher call per pair are recorded too (``time.process_time``).
2. **Cost**: CPU-seconds of one teacher call at 30k/60k/100k points on the real lidar pair
   ``data/samples/opensceneflow_pair`` (AV2-like, ground already removed upstream, ego motion
   compensated), in-range points randomly subsampled to N; above its ~70k in-range points the
   pair is densified with copies of random points jittered by 2 cm (reported as such). These are
   non-ground points, so a raw 100k-point sweep (~40 % ground) costs less than the 100k row.

Single-threaded (BLAS/OpenMP/torch pinned to one thread before import), so CPU-seconds are
one-core seconds; wall time on a shared machine overstates them.

    python bench/bench_teacher.py DATA --split val --every 2 --json bench/results/teacher.json
    python bench/bench_teacher.py DATA --methods rigid ego --sizes 30000   # quick
"""
from __future__ import annotations

import os

for _v in ('OMP_NUM_THREADS', 'OPENBLAS_NUM_THREADS', 'MKL_NUM_THREADS'):
    os.environ[_v] = '1'

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
REAL_PAIR = REPO / 'data' / 'samples' / 'opensceneflow_pair'
TEACHER_NAMES = ('rigid', 'hybrid', 'nsfp')
BASELINES = ('ego', 'nn')


class _Timed:
    """Wrap a predict method: accumulate the CPU seconds of its ``estimate`` calls."""

    def __init__(self, method) -> None:
        self.method = method
        self.cpu: list[float] = []
        self.preprocess = method.preprocess
        self.name = method.name

    def begin_pair(self, ts0: int, ts1: int) -> None:
        self.method.begin_pair(ts0, ts1)

    def estimate(self, points0, prep):
        t0 = time.process_time()
        out = self.method.estimate(points0, prep)
        self.cpu.append(time.process_time() - t0)
        return out


def make_bench_method(name: str):
    from zeroflow_ros.eval import predict as P

    from zeroflow_training.teacher import TeacherConfig
    if name in TEACHER_NAMES:
        return P.TeacherMethod('cpu', config=TeacherConfig(name))
    return P.make_method(name, device='cpu')


def accuracy(data_root: Path, split: str, every: int, methods: list[str], out: Path) -> dict[str, Any]:
    """Predict every selected pair with each method and score it with ``zeroflow eval``'s code."""
    from zeroflow_ros.data.av2 import AV2Log
    from zeroflow_ros.eval.evaluate import evaluate, list_eval_pairs
    from zeroflow_ros.eval.predict import predict_pair
    jobs = list_eval_pairs(data_root, split, every)
    rows = {}
    for name in methods:
        method = _Timed(make_bench_method(name))
        pred = out / name
        t0 = time.perf_counter()
        for j in jobs:
            predict_pair(method, AV2Log(Path(j.log_dir)), j.ts0, j.ts1, pred)
        wall = time.perf_counter() - t0
        res = evaluate(pred, data_root, split, every)
        tw = res.threeway
        rows[name] = {
            'pairs': len(jobs), 'threeway': tw['EPE 3-Way Average'],
            'fg_dynamic': tw['EPE/Foreground/Dynamic'], 'fg_static': tw['EPE/Foreground/Static'],
            'bg_static': tw['EPE/Background/Static'], 'dynamic_iou': tw.get('Dynamic IoU'),
            'by_speed': {b['bucket_mps']: b['epe'] for b in res.speed_buckets.to_dict()['buckets']},
            'speed_counts': {b['bucket_mps']: b['count'] for b in res.speed_buckets.to_dict()['buckets']},
            'cpu_s_per_pair': float(np.mean(method.cpu)) if method.cpu else None,
            'wall_s': wall}
        print(f'{name}: 3-way {rows[name]["threeway"]:.4f}, FG-dynamic {rows[name]["fg_dynamic"]:.4f}, '
              f'{rows[name]["cpu_s_per_pair"] or 0:.2f} CPU-s/pair', file=sys.stderr)
    return rows


def _real_clouds() -> tuple[np.ndarray, np.ndarray]:
    from zeroflow_ros.core.preprocess import PreprocessConfig
    box = PreprocessConfig()
    clouds = []
    for name in ('test_pc0.npy', 'test_pc1.npy'):
        a = np.load(REAL_PAIR / name)[:, :3].astype(np.float32)
        clouds.append(a[box.in_range(a)])
    return clouds[0], clouds[1]


def _resize(cloud: np.ndarray, n: int, rng: np.random.Generator) -> tuple[np.ndarray, bool]:
    """Exactly ``n`` points: a random subset, or all plus jittered copies (densified: True)."""
    if len(cloud) >= n:
        return cloud[rng.choice(len(cloud), n, replace=False)], False
    extra = cloud[rng.choice(len(cloud), n - len(cloud), replace=True)]
    extra = extra + rng.normal(0.0, 0.02, extra.shape).astype(np.float32)
    return np.concatenate([cloud, extra]), True


def cost(sizes: list[int], teachers: list[str], repeats: int) -> dict[str, Any]:
    """CPU-seconds of one teacher call per size (median over ``repeats`` subsamples)."""
    from zeroflow_training.teacher import TeacherConfig, run_teacher
    pc0, pc1 = _real_clouds()
    out: dict[str, Any] = {'in_range_points': [len(pc0), len(pc1)], 'rows': {}}
    for name in teachers:
        cfg = TeacherConfig(name)
        row = {}
        for n in sizes:
            times, dense = [], False
            for r in range(repeats):
                rng = np.random.default_rng(r)
                a, dense = _resize(pc0, n, rng)
                b, _ = _resize(pc1, n, rng)
                t0 = time.process_time()
                _, info = run_teacher(a, b, cfg, 'cpu', seed=r, dt=0.1)
                times.append(time.process_time() - t0)
            row[str(n)] = {'cpu_s': float(np.median(times)), 'densified': dense, 'runs': repeats}
            print(f'cost {name} {n}: {row[str(n)]["cpu_s"]:.2f} CPU-s', file=sys.stderr)
        out['rows'][name] = row
    return out


def _fmt(v) -> str:
    return '-' if v is None else f'{v:.3f}'


def table(acc: dict[str, Any], costs: dict[str, Any] | None) -> str:
    """Markdown table: one row per method, accuracy then CPU-seconds per pair."""
    buckets = ('0-2', '2-5', '5-10', '10-20', '20+')
    sizes = sorted({int(s) for r in (costs or {}).get('rows', {}).values() for s in r})
    head = (['method', '3-way', 'FG-dyn', 'FG-static', 'BG-static']
            + [f'FG-dyn {b} m/s' for b in buckets] + ['CPU-s/pair (val)']
            + [f'CPU-s @{n // 1000}k' for n in sizes])
    lines = ['| ' + ' | '.join(head) + ' |', '|' + ' --- |' * len(head)]
    for name, r in acc.items():
        c = (costs or {}).get('rows', {}).get(name, {})
        cells = ([name, _fmt(r['threeway']), _fmt(r['fg_dynamic']), _fmt(r['fg_static']),
                  _fmt(r['bg_static'])]
                 + [_fmt(r['by_speed'].get(b)) for b in buckets] + [_fmt(r['cpu_s_per_pair'])]
                 + [_fmt(c.get(str(n), {}).get('cpu_s')) for n in sizes])
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('data_root', type=Path, help='AV2-layout root with ground truth (synthetic val split)')
    ap.add_argument('--split', default='val')
    ap.add_argument('--every', type=int, default=1, help='every N-th pair, as zeroflow eval --every')
    ap.add_argument('--methods', nargs='+', default=list(TEACHER_NAMES + BASELINES),
                    choices=TEACHER_NAMES + BASELINES)
    ap.add_argument('--sizes', nargs='*', type=int, default=[30000, 60000, 100000],
                    help='cost measurement sizes (none: skip the cost part)')
    ap.add_argument('--cost-teachers', nargs='*', default=None, choices=TEACHER_NAMES,
                    help='teachers timed at --sizes (default: the teachers among --methods)')
    ap.add_argument('--repeats', type=int, default=1, help='cost runs per size (median)')
    ap.add_argument('--out', type=Path, default=None, help='prediction folders (default: a temporary one)')
    ap.add_argument('--json', type=Path, default=None, help='write all numbers here')
    args = ap.parse_args(argv)
    try:
        import torch
        torch.set_num_threads(1)
    except ImportError:
        pass
    tmp = None
    out = args.out
    if out is None:
        tmp = tempfile.TemporaryDirectory(prefix='bench_teacher_')
        out = Path(tmp.name)
    acc = accuracy(args.data_root, args.split, args.every, args.methods, out)
    teachers = args.cost_teachers if args.cost_teachers is not None else [
        m for m in args.methods if m in TEACHER_NAMES]
    costs = cost(args.sizes, teachers, args.repeats) if args.sizes and teachers else None
    print(table(acc, costs))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            'data_root': str(args.data_root), 'split': args.split, 'every': args.every,
            'accuracy': acc, 'cost': costs, 'machine': platform.processor() or platform.machine(),
            'load_1min': os.getloadavg()[0], 'cpu_count': os.cpu_count()}, indent=1))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == '__main__':
    sys.exit(main())
