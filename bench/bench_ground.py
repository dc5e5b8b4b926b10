"""Geometric ground removal: latency per cloud and precision/recall against a reference.

::

    python bench/bench_ground.py                       # real AV2 sample (vs map rule) + KITTI latency
    python bench/bench_ground.py --synth 2 --sweeps 4  # also B's simulator (vs its exact is_ground)

References: the AV2 map rule (``|z - h| <= 0.3 m`` or below the map surface; NaN map = not ground)
on the real AV2 sample, and the simulator's exact ``is_ground`` on synthetic logs. Figures are wall
times on whatever else the machine does; the load average is printed with them.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from zeroflow_ros.core.ground import geometric_ground, precision_recall  # noqa: E402
from zeroflow_ros.core.preprocess import PreprocessConfig  # noqa: E402


def timed(points: np.ndarray, repeats: int, warmup: int) -> str:
    """Median wall and CPU time (ms): on a shared box CPU time is the fairer cost figure."""
    for _ in range(warmup):
        geometric_ground(points)
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        geometric_ground(points)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return f'{np.median(wall) * 1e3:.1f} ms wall / {np.median(cpu) * 1e3:.1f} ms CPU median'


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--repeats', type=int, default=20)
    ap.add_argument('--warmup', type=int, default=3)
    ap.add_argument('--synth', type=int, default=0, help='synthetic logs to generate and score (default 0)')
    ap.add_argument('--sweeps', type=int, default=4)
    args = ap.parse_args(argv)
    print(f'load average before: {os.getloadavg()}')
    from zeroflow_ros.data.av2 import AV2Log, list_logs
    from zeroflow_ros.data.sweeps import read_sweep
    in_range = PreprocessConfig().in_range

    log = AV2Log(ROOT / 'data' / 'samples' / 'av2_sample' / 'adcf7d18-0510-35b0-a2fa-b4cea13a6d76')
    ts = int(log.timestamps[0])
    pts = log.points(ts)
    ref = log.ground_mask(pts, ts)
    pred = geometric_ground(pts)
    mapped = np.isfinite(log.ground_raster.height_at(
        (log.pose(ts)[:3, :3] @ pts.T.astype(float)).T + log.pose(ts)[:3, 3]))
    r = in_range(pts)
    print(f'AV2 sample ({len(pts)} pts): {timed(pts, args.repeats, args.warmup)}; vs map rule '
          'P/R all %.3f/%.3f, in range %.3f/%.3f, mapped cells only %.3f/%.3f' % (
              *precision_recall(pred, ref), *precision_recall(pred[r], ref[r]),
              *precision_recall(pred[mapped], ref[mapped])))
    kitti = read_sweep(ROOT / 'data' / 'samples' / 'kitti_raw_sfnd_seq' / 'velodyne_points' / 'data'
                       / '0000000000.bin').points
    print(f'KITTI sweep ({len(kitti)} pts): {timed(kitti, args.repeats, args.warmup)}')

    if args.synth:
        from zeroflow_training.data.synth import make_tiny_dataset
        with tempfile.TemporaryDirectory() as tmp:
            root = make_tiny_dataset(Path(tmp), logs=args.synth, sweeps=args.sweeps, beams=32, azimuths=1800)
            pr, pr_map, n = [], [], 0
            for lg in list_logs(root, 'val'):
                for t in lg.timestamps[:-1]:
                    p = lg.points(int(t))
                    truth = lg.gt_flow(int(t)).is_ground
                    pr.append(precision_recall(geometric_ground(p), truth))
                    pr_map.append(precision_recall(lg.ground_mask(p, int(t)), truth))
                    n = len(p)
            figures = (len(pr), n, *np.mean(pr, 0), *np.mean(pr_map, 0))
            print('synthetic (%d sweeps, ~%d pts): geometric P/R %.3f/%.3f; map rule P/R %.3f/%.3f '
                  '(vs the simulator\'s exact is_ground)' % figures)
    print(f'load average after: {os.getloadavg()}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
