"""``zeroflow data synth``: write synthetic AV2-layout logs with exact scene-flow ground truth.

Called by ``zeroflow_ros.data.cli`` (``zeroflow data synth ...``)::

    zeroflow data synth OUT --sequences 20 --sweeps 20 --seed 0 --split-val 4 --workers 2

writes ``OUT/train/<log_id>/`` (seeds S..S+N-1) and ``OUT/val/<log_id>/`` (seeds 1,000,000 + i,
a range training never uses). Logs already complete with the same settings are skipped, so an
interrupted run resumes; ``--overwrite`` regenerates them.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)

# fraction of rays that return in the default scenes (measured: 50-55k of 57.6k rays)
RETURN_RATE = 0.9


def add_synth_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('out', type=Path, metavar='OUT',
                        help='dataset root; logs go to OUT/<split>/<log_id>/')
    parser.add_argument('--sequences', type=int, default=20, help='train logs (default 20)')
    parser.add_argument('--sweeps', type=int, default=20, help='sweeps per log at 10 Hz (default 20)')
    parser.add_argument('--seed', type=int, default=0, help='train log i uses seed SEED+i (default 0)')
    parser.add_argument('--split-val', type=int, default=0, metavar='K',
                        help='also write K val logs (seeds 1000000+i; default 0)')
    parser.add_argument('--workers', type=int, default=1, help='processes, one log each (default 1)')
    parser.add_argument('--beams', type=int, default=32,
                        help='lidar beams (VLP-32C angle profile; default 32)')
    parser.add_argument('--azimuths', type=int, default=1800, help='columns per revolution (default 1800)')
    parser.add_argument('--points', type=int, default=None, metavar='N',
                        help='target returns per sweep: sets --azimuths for the beam count, assuming the '
                             '~90 %% return rate of the default scenes (approximate)')
    parser.add_argument('--elevations', type=str, default=None, metavar='DEG,DEG,...',
                        help='explicit vertical beam angles in degrees, e.g. --elevations=-15,-5,0,5 '
                             '(their count sets --beams)')
    parser.add_argument('--max-range', type=float, default=100.0, help='lidar max range in m (default 100)')
    parser.add_argument('--range-noise', type=float, default=0.02,
                        help='range noise sigma in m (default 0.02)')
    parser.add_argument('--dropout', type=float, default=0.02,
                        help='base return dropout probability (default 0.02)')
    parser.add_argument('--sensor', type=str, default=None, metavar='NAME|random|cycle',
                        help='real lidar model per log (beam layout, mount, noise, dropout, rolling '
                             'shutter; see training/data/sensors.py): one of '
                             'vlp16, hdl32e, hdl64e, os1-64, os1-128, pandar64, av2, vlp32c; random: '
                             'one per log drawn from its seed; cycle: log i of a split uses model i mod 8; '
                             'random/cycle jitter the mounting height (1.4-2.3 m). Overrides --beams, '
                             '--azimuths, --elevations, --points, --max-range, --range-noise, --dropout')
    parser.add_argument('--scene', type=str, default='mix', metavar='KIND',
                        help='mix (default: urban 50 %%, arterial 25 %%, highway 25 %%, from the seed), '
                             'cycle (log i: highway, arterial, urban, ...), urban, arterial or highway')
    parser.add_argument('--overwrite', action='store_true', help='regenerate logs that already exist')


def _job(job: tuple) -> dict:
    from zeroflow_training.data.synth import generate_one
    seed, split_dir, sweeps, lidar, scene_cfg = job
    r = generate_one(seed, Path(split_dir), sweeps, lidar, scene_cfg)
    r['sensor'] = lidar.name or 'generic'
    return r


def _per_log(args: argparse.Namespace, lidar, seed: int, i: int):
    """(LidarConfig, SceneConfig) of log ``i`` (seed ``seed``) of a split."""
    from zeroflow_training.data.scene import SCENE_KINDS, SceneConfig
    from zeroflow_training.data.sensors import sensor_for_log
    from zeroflow_training.data.synth import SynthError
    if args.sensor is not None:
        lidar = sensor_for_log(args.sensor, seed, i)
    if args.scene == 'mix':
        return lidar, None
    if args.scene == 'cycle':
        return lidar, SceneConfig(kind=('highway', 'arterial', 'urban')[i % 3])
    if args.scene not in SCENE_KINDS:
        raise SynthError(f'--scene: expected mix, cycle or one of {SCENE_KINDS}, got {args.scene!r}')
    return lidar, SceneConfig(kind=args.scene)


def _complete(split_dir: Path, seed: int, sweeps: int, lidar, scene_cfg=None) -> bool:
    from dataclasses import asdict

    from zeroflow_training.data.synth import GENERATOR_VERSION, log_id_for_seed
    meta = split_dir / log_id_for_seed(seed) / 'synth.json'
    try:
        m = json.loads(meta.read_text())
    except (OSError, ValueError):
        return False
    kind_ok = scene_cfg is None or scene_cfg.kind is None or m.get('scene_kind') == scene_cfg.kind
    return (m.get('version') == GENERATOR_VERSION and m.get('seed') == seed and m.get('sweeps') == sweeps
            and m.get('lidar') == json.loads(json.dumps(asdict(lidar))) and kind_ok)


def run_synth(args: argparse.Namespace) -> int:
    from zeroflow_training.data.synth import LidarConfig, SynthError, split_seeds

    for name in ('sequences', 'split_val'):
        if getattr(args, name) < 0:
            raise SynthError(f'--{name.replace("_", "-")}: expected >= 0, got {getattr(args, name)}')
    if args.workers < 1:
        raise SynthError(f'--workers: expected >= 1, got {args.workers}')
    if args.sweeps < 2:
        raise SynthError(f'--sweeps: expected >= 2 (flow needs pairs), got {args.sweeps}')
    elevations = None
    beams = args.beams
    if args.elevations:
        try:
            elevations = tuple(float(v) for v in args.elevations.split(','))
        except ValueError:
            raise SynthError(f'--elevations: expected comma-separated degrees, '
                             f'got {args.elevations!r}') from None
        if any(not -90.0 < e < 90.0 for e in elevations):
            raise SynthError(f'--elevations: angles must lie in (-90, 90) degrees, got {args.elevations!r}')
        beams = len(elevations)
    azimuths = args.azimuths
    if args.points is not None:
        if not 1000 <= args.points <= 2_000_000:
            raise SynthError(f'--points: expected 1000..2000000 returns per sweep, got {args.points}')
        azimuths = int(round(args.points / (RETURN_RATE * beams)))
        print(f'--points {args.points}: {beams} beams x {azimuths} azimuths')
    lidar = LidarConfig(beams=beams, azimuths=azimuths, elevations_deg=elevations,
                        max_range_m=args.max_range, range_noise_m=args.range_noise, dropout=args.dropout)
    lidar.validate()
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise SynthError(f'{out}: OUT exists and is not a folder')
    jobs, skipped = [], 0
    for split, count in (('train', args.sequences), ('val', args.split_val)):
        if count == 0:
            continue
        split_dir = out / split
        split_dir.mkdir(parents=True, exist_ok=True)
        for i, seed in enumerate(split_seeds(split, count, args.seed)):
            log_lidar, scene_cfg = _per_log(args, lidar, seed, i)
            if not args.overwrite and _complete(split_dir, seed, args.sweeps, log_lidar, scene_cfg):
                skipped += 1
                continue
            jobs.append((seed, str(split_dir), args.sweeps, log_lidar, scene_cfg))
    if skipped:
        print(f'{skipped} log(s) already complete, skipped (use --overwrite to regenerate)')
    if not jobs:
        return 0
    from tqdm import tqdm
    t0 = time.perf_counter()
    results = []
    if args.workers == 1:
        for job in tqdm(jobs, desc='synth logs', unit='log'):
            results.append(_job(job))
    else:
        import multiprocessing as mp
        ctx = mp.get_context('spawn')      # fresh interpreters: no forked BLAS/thread state
        with ctx.Pool(min(args.workers, len(jobs))) as pool:
            for r in tqdm(pool.imap_unordered(_job, jobs), total=len(jobs), desc='synth logs', unit='log'):
                results.append(r)
    wall = time.perf_counter() - t0
    sweeps = sum(len(r['points']) for r in results)
    pts = [p for r in results for p in r['points']]
    cpu = sum(r['cpu_seconds'] for r in results)
    busy = sum(r['seconds'] for r in results)
    print(f'wrote {len(results)} log(s), {sweeps} sweeps to {out} in {wall:.1f} s: '
          f'{cpu / sweeps:.2f} CPU s/sweep ({busy / sweeps:.2f} s wall per sweep in a worker), '
          f'{sum(pts) / len(pts):.0f} points/sweep (min {min(pts)}, max {max(pts)})')
    if args.sensor is not None:
        by = {}
        for r in results:
            by.setdefault(r['sensor'], []).append(r)
        for name, rs in sorted(by.items()):
            p = [q for r in rs for q in r['points']]
            n = len(p)
            print(f'  {name:9s} {len(rs):3d} log(s): {sum(p) / n:.0f} points/sweep '
                  f'(min {min(p)}, max {max(p)}), {sum(r["cpu_seconds"] for r in rs) / n:.2f} CPU s/sweep')
    return 0
