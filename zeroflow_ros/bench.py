"""``zeroflow bench``: latency per backend, precision and point count, beside torch eager.

Each figure is the wall time of :meth:`Backend.infer` split into pre-processing (shared numpy
pillar step), inference (the network) and post-processing (scatter back), as p50/p99 over
``--repeats`` calls after ``--warmup`` calls. The input is real lidar (two consecutive KITTI
sweeps shipped in data/samples), evenly subsampled or tiled to the requested point count, so
the in-range fraction and pillar occupancy are those of a real sensor. Every row is also given as
a speed-up over torch eager fp32 on the same device, measured in the same run.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from zeroflow_ros.backends import BACKEND_NAMES, BackendError, create_backend, default_threads

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
KITTI_DIR = REPO_ROOT / 'data' / 'samples' / 'kitti_raw_sfnd_seq' / 'velodyne_points' / 'data'
DEFAULT_POINTS = (30_000, 60_000, 100_000)
PHASES = ('preprocess_ms', 'inference_ms', 'postprocess_ms', 'total_ms')


class BenchError(ValueError):
    """Bench options or input data are not what the bench expects."""


def lidar_pair(n: int, sweeps: tuple[int, int] = (0, 1)) -> tuple[np.ndarray, np.ndarray]:
    """Two consecutive real KITTI sweeps resampled to ``n`` points each (xyz float32).

    Fewer points: an even stride over the scan (keeps the ring structure). More points: the scan
    is repeated; duplicates land in the same pillars, like a denser sensor would.
    """
    out = []
    for i in sweeps:
        path = KITTI_DIR / f'{i:010d}.bin'
        if not path.is_file():
            raise BenchError(f'{path}: KITTI sample sweep not found (data/samples is part of the repo)')
        pts = np.fromfile(path, dtype='<f4').reshape(-1, 4)[:, :3]
        idx = np.linspace(0, len(pts) - 1, n).round().astype(np.int64) if n <= len(pts) \
            else np.arange(n) % len(pts)
        out.append(np.ascontiguousarray(pts[idx]))
    return out[0], out[1]


def _stats(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    return {'p50': float(np.percentile(a, 50)), 'p99': float(np.percentile(a, 99)),
            'mean': float(a.mean()), 'min': float(a.min())}


def time_backend(backend: Any, points: Iterable[int], repeats: int, warmup: int) -> dict[int, dict[str, Any]]:
    """Per point count: p50/p99/mean/min of each phase, in ms, plus in-range counts."""
    out: dict[int, dict[str, Any]] = {}
    for n in points:
        p0, p1 = lidar_pair(n)
        for _ in range(warmup):
            backend.infer(p0, p1)
        samples: dict[str, list[float]] = {k: [] for k in PHASES + ('process_cpu_ms',)}
        for _ in range(repeats):
            c0 = time.process_time()
            backend.infer(p0, p1)
            # CPU time of this process (all its threads): on a shared box, wall time includes
            # waiting for other jobs, CPU time does not
            samples['process_cpu_ms'].append((time.process_time() - c0) * 1e3)
            t = backend.last_timing.as_dict()
            for k in PHASES:
                samples[k].append(t[k])
        t = backend.last_timing
        out[n] = {'points': n, 'in_range0': t.in_range0, 'in_range1': t.in_range1,
                  'repeats': repeats, **{k: _stats(v) for k, v in samples.items()}}
    return out


def parse_runs(backends: list[str], precisions: list[str]) -> list[tuple[str, str]]:
    """(backend, precision) pairs to run; torch fp32 always comes first as the reference."""
    for b in backends:
        if b not in BACKEND_NAMES:
            raise BenchError(f'--backends: unknown backend {b!r}; valid: {", ".join(BACKEND_NAMES)}')
    for p in precisions:
        if p not in ('fp32', 'fp16'):
            raise BenchError(f"--precisions: unknown precision {p!r}; valid: fp32, fp16")
    runs = [('torch', 'fp32')]
    for b in backends:
        for p in precisions:
            if (b, p) not in runs:
                runs.append((b, p))
    return runs


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {'hostname': platform.node(), 'python': platform.python_version(),
                            'cpu_threads_available': default_threads(), 'cpu_count': os.cpu_count()}
    if hasattr(os, 'getloadavg'):
        # other processes on the box distort CPU figures; record how busy it was
        info['loadavg_1_5_15'] = [round(v, 2) for v in os.getloadavg()]
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'):
                info['cpu'] = line.split(':', 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import torch
        info['torch'] = torch.__version__
        if torch.cuda.is_available():
            info['gpu'] = torch.cuda.get_device_name(0)
            info['cuda'] = torch.version.cuda
    except ImportError:
        pass
    try:
        import onnxruntime as ort
        info['onnxruntime'] = ort.__version__
        info['onnxruntime_providers'] = ort.get_available_providers()
    except ImportError:
        pass
    try:
        import tensorrt as trt
        info['tensorrt'] = trt.__version__
    except ImportError:
        info['tensorrt'] = None
    return info


def run_bench(model: str | os.PathLike, runs: list[tuple[str, str]], points: Iterable[int] = DEFAULT_POINTS,
              device: str = 'auto', repeats: int = 10, warmup: int = 2, threads: int | None = None,
              options: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Time every (backend, precision) in ``runs`` on ``model``; unavailable ones are recorded, not fatal."""
    points = list(points)
    results: list[dict[str, Any]] = []
    for name, precision in runs:
        entry: dict[str, Any] = {'backend': name, 'precision': precision}
        try:
            t0 = time.perf_counter()
            b = create_backend(model, backend=name, device=device, precision=precision, threads=threads,
                               options={k: v for k, v in (options or {}).items() if k == name})
            entry['load_s'] = time.perf_counter() - t0
        except BackendError as exc:
            entry['unavailable'] = str(exc)
            log.warning('bench: %s %s unavailable: %s', name, precision, exc)
            results.append(entry)
            continue
        entry.update(device=b.device, describe=b.describe())
        log.info('bench: %s/%s/%s ...', b.name, b.device, b.precision)
        entry['by_points'] = {str(k): v for k, v in time_backend(b, points, repeats, warmup).items()}
        results.append(entry)
        del b
    _add_ratios(results)
    return {'model': str(model), 'points': points, 'repeats': repeats, 'warmup': warmup,
            'threads': threads or default_threads(), 'machine': machine_info(),
            'date': dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ'), 'results': results}


def _add_ratios(results: list[dict[str, Any]]) -> None:
    """speedup_vs_torch[phase] = torch-eager fp32 p50 / this p50, same device, same run."""
    refs = {r.get('device'): r for r in results
            if r['backend'] == 'torch' and r['precision'] == 'fp32' and 'by_points' in r}
    for r in results:
        ref = refs.get(r.get('device'))
        if ref is None or 'by_points' not in r:
            continue
        for n, row in r['by_points'].items():
            base = ref['by_points'].get(n)
            if base is not None:
                row['speedup_vs_torch'] = {k: base[k]['p50'] / max(row[k]['p50'], 1e-9) for k in PHASES}


def format_table(report: dict[str, Any]) -> str:
    head = (f'{"backend":<12} {"dev":<5} {"prec":<5} {"points":>7} {"in-range":>8} '
            f'{"pre p50":>8} {"inf p50":>8} {"inf p99":>8} {"post p50":>8} {"total p50":>9} '
            f'{"total p99":>9} {"Hz":>6} {"vs torch":>8} {"cpu p50":>8}')
    lines = [head, '-' * len(head)]
    for r in report['results']:
        if 'by_points' not in r:
            lines.append(f'{r["backend"]:<12} {"-":<5} {r["precision"]:<5} unavailable: {r["unavailable"]}')
            continue
        for n, row in r['by_points'].items():
            sp = row.get('speedup_vs_torch', {}).get('total_ms')
            lines.append(
                f'{r["backend"]:<12} {r["device"]:<5} {r["precision"]:<5} {int(n):>7} {row["in_range0"]:>8} '
                f'{row["preprocess_ms"]["p50"]:>8.1f} {row["inference_ms"]["p50"]:>8.1f} '
                f'{row["inference_ms"]["p99"]:>8.1f} {row["postprocess_ms"]["p50"]:>8.1f} '
                f'{row["total_ms"]["p50"]:>9.1f} {row["total_ms"]["p99"]:>9.1f} '
                f'{1000.0 / row["total_ms"]["p50"]:>6.1f} {("x%.2f" % sp) if sp else "-":>8} '
                f'{row["process_cpu_ms"]["p50"]:>8.1f}')
    lines.append('times in ms (wall); "vs torch" = torch-eager fp32 total p50 / this total p50 '
                 '(same device, same run); cpu = process CPU ms per call, all threads')
    return '\n'.join(lines)


def prepare_model(config: str, workdir: str | os.PathLike) -> Path:
    """Export an untrained model of a registered config (latency does not depend on the weights)."""
    from zeroflow_training.export import export_onnx, make_random_checkpoint

    d = Path(workdir) / config
    ckpt = make_random_checkpoint(config, d / 'model.pt')
    export_onnx(ckpt, d / 'model.onnx', verify=False)
    return d


def _csv(text: str, cast: type = str) -> list:
    try:
        return [cast(v.strip()) for v in text.split(',') if v.strip()]
    except ValueError:
        raise BenchError(f'expected a comma-separated list of {cast.__name__}, got {text!r}') from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--model', help='model folder (manifest.yaml + model.onnx/model.pt); '
                        'default: an untrained --config model exported to a temp folder')
    parser.add_argument('--config', default='cpu_small',
                        help='registered config for the untrained model when --model is not given '
                        '(default %(default)s)')
    parser.add_argument('--backends', default='onnxruntime,torch,tensorrt',
                        help='comma-separated, of: ' + ', '.join(BACKEND_NAMES) + ' (default %(default)s)')
    parser.add_argument('--precisions', default='fp32',
                        help='comma-separated fp32,fp16 (default %(default)s)')
    parser.add_argument('--device', default='auto', choices=('auto', 'cpu', 'cuda'))
    parser.add_argument('--points', default=','.join(map(str, DEFAULT_POINTS)),
                        help='input points per sweep (default %(default)s)')
    parser.add_argument('--repeats', type=int, default=10, help='timed calls per row (default %(default)s)')
    parser.add_argument('--warmup', type=int, default=2, help='untimed calls first (default %(default)s)')
    parser.add_argument('--threads', type=int, default=None,
                        help='CPU threads for onnxruntime/torch (default: all cores)')
    parser.add_argument('--ort-spin', action='store_true',
                        help='let onnxruntime worker threads busy-wait (off by default, as in the node)')
    parser.add_argument('--json', metavar='OUT', help='write the full report as JSON')
    parser.add_argument('--node', action='store_true',
                        help="the node's per-sweep cost stage by stage (decode, checks, odometry, ground, "
                        'pillars, network, scatter, encode, markers) with --model (default models/default); '
                        '--repeats = timed sweeps')
    parser.add_argument('--ego-motion', default='lidar', choices=('lidar', 'none'),
                        help='--node: ego motion source (default %(default)s, as the node)')


def run(args: argparse.Namespace) -> int:
    points = _csv(args.points, int)
    if not points or min(points) < 1:
        raise BenchError(f'--points {args.points!r}: expected positive integers')
    if args.repeats < 1 or args.warmup < 0:
        raise BenchError('--repeats must be >= 1 and --warmup >= 0')
    if args.node:
        return run_node(args, points)
    runs = parse_runs(_csv(args.backends), _csv(args.precisions))
    with tempfile.TemporaryDirectory(prefix='zeroflow_bench_') as tmp:
        if args.model:
            model = Path(args.model)
        else:
            print(f'exporting an untrained {args.config} model (latency does not depend on weights) ...')
            model = prepare_model(args.config, tmp)
        options = {'onnxruntime': {'spin': True}} if args.ort_spin else None
        report = run_bench(model, runs, points, args.device, args.repeats, args.warmup, args.threads,
                           options)
    report['config'] = args.config if not args.model else None
    if hasattr(os, 'getloadavg'):
        report['machine']['loadavg_after'] = [round(v, 2) for v in os.getloadavg()]
    print(format_table(report))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1))
        print(f'wrote {args.json}')
    return 0


# --------------------------------------------------------------------------------------------
# --node: the node's per-sweep work, stage by stage (ROS-free; DDS publish: bench/bench_node.py)
# --------------------------------------------------------------------------------------------

#: Stage order of the node: the sweep worker, the pair worker (publish: bench/bench_node.py, over
#: DDS), and markers on their own best-effort worker (only while someone subscribes to them).
SWEEP_STAGES = ('decode', 'check', 'ground', 'odometry', 'sweep_pillars', 'sweep_encoder')
PAIR_STAGES = ('pair_points', 'network', 'scatter', 'encode')
NODE_STAGES = SWEEP_STAGES + PAIR_STAGES + ('markers',)


def kitti_sequence(n: int) -> list[np.ndarray]:
    """All KITTI sample sweeps resampled to ``n`` points (as :func:`lidar_pair`), in time order."""
    paths = sorted(KITTI_DIR.glob('*.bin'))
    if len(paths) < 2:
        raise BenchError(f'{KITTI_DIR}: expected the KITTI sample sweeps (data/samples is part of the repo)')
    return list(lidar_pair(n, tuple(range(len(paths)))))


def node_stage_times(model: str | os.PathLike, n: int, frames: int = 12, ego_motion: str = 'lidar',
                     backend: str = 'onnxruntime', precision: str = 'fp32') -> dict[str, Any]:
    """Wall and thread-CPU ms per node stage at ``n`` points, sweeps played back and forth at 10 Hz."""
    from zeroflow_ros import visualization as vis
    from zeroflow_ros.core import pointcloud2 as pc2
    from zeroflow_ros.pipeline import Pipeline, PipelineConfig, limit_blas_threads

    limit_blas_threads(1)
    pipe = Pipeline(PipelineConfig(model=str(model), backend=backend, ego_motion=ego_motion,
                                   precision=precision, max_sweep_gap_s=10.0))
    clouds = kitti_sequence(n)
    msgs = [pc2.encode(c, {}, frame_id='velodyne', stamp_ns=0) for c in clouds]
    rows: list[dict[str, float]] = []
    for i in range(frames + 2):
        k = i % (2 * len(msgs) - 2)  # back and forth: no jump for the lidar odometry
        msg = msgs[k if k < len(msgs) else 2 * len(msgs) - 2 - k]
        msg.header.stamp.sec, msg.header.stamp.nanosec = divmod((i + 1) * 100_000_000, 10**9)
        t0, c0 = time.perf_counter(), time.process_time()
        cloud = pc2.decode(msg)
        decode_ms = (time.perf_counter() - t0) * 1e3
        job = pipe.prepare(cloud.xyz, cloud.stamp_ns, frame_id=cloud.frame_id)
        c1 = time.process_time()
        if job is None:
            continue
        frame = pipe.run_pair(job)
        t1 = time.perf_counter()
        pc2.encode(frame.points, {'flow_x': frame.flow[:, 0], 'flow_y': frame.flow[:, 1],
                                  'flow_z': frame.flow[:, 2], 'speed': frame.speed,
                                  'is_dynamic': frame.is_dynamic.astype(np.uint8)}, frame_id='velodyne')
        t2, c2 = time.perf_counter(), time.process_time()
        verts, rgb = vis.arrow_segments(frame.points, frame.flow, frame.speed, frame.is_dynamic,
                                        decimation=4, length_scale=1.0, max_arrows=2000, max_speed=15.0)
        try:
            vis.flow_marker(msg.header, verts, rgb)
        except ImportError:  # no visualization_msgs: arrows only
            pass
        t3, c3 = time.perf_counter(), time.process_time()
        if i >= 3:  # the first pairs warm the backend and the odometry map up
            rows.append({'decode': decode_ms, **frame.stages_ms, 'encode': (t2 - t1) * 1e3,
                         'markers': (t3 - t2) * 1e3, 'cpu_sweep': (c1 - c0) * 1e3,
                         'cpu_pair': (c2 - c1) * 1e3, 'cpu_markers': (c3 - c2) * 1e3})
    p50 = {k: float(np.percentile([r.get(k, 0.0) for r in rows], 50)) for k in NODE_STAGES}
    cpu = {k: float(np.percentile([r[k] for r in rows], 50))
           for k in ('cpu_sweep', 'cpu_pair', 'cpu_markers')}
    sweep = sum(p50[k] for k in SWEEP_STAGES)
    pair = sum(p50[k] for k in PAIR_STAGES)
    # process CPU time (all threads) is what other jobs on the machine inflate least: sweep + pair
    # CPU per flow bounds the rate the cores can sustain, 1000 ms x cores / that
    return {'points': n, 'frames': len(rows), 'stages_ms_p50': p50, 'sweep_worker_ms': sweep,
            'pair_worker_ms': pair, 'serial_ms': sweep + pair, 'cpu_ms_p50': cpu,
            'cpu_bound_hz': 1000.0 * default_threads() / max(cpu['cpu_sweep'] + cpu['cpu_pair'], 1e-9),
            'in_range_scored': int(pipe.backend.last_timing.in_range0)}


def format_node_table(runs: list[dict[str, Any]]) -> str:
    head = f'{"stage":<14} {"worker":<6} ' + ' '.join(f'{str(r["points"]) + " pts":>10}' for r in runs)
    lines = [head, '-' * len(head)]
    for k in NODE_STAGES:
        w = 'sweep' if k in SWEEP_STAGES else 'pair' if k in PAIR_STAGES else 'marker'
        lines.append(f'{k:<14} {w:<6} ' + ' '.join(f'{r["stages_ms_p50"][k]:>10.1f}' for r in runs))
    for k, label in (('sweep_worker_ms', 'sweep worker'), ('pair_worker_ms', 'pair worker'),
                     ('serial_ms', 'sweep + pair')):
        lines.append(f'{label:<21} ' + ' '.join(f'{r[k]:>10.1f}' for r in runs))
    for k, label in (('cpu_sweep', 'CPU ms sweep'), ('cpu_pair', 'CPU ms pair'),
                     ('cpu_markers', 'CPU ms markers')):
        lines.append(f'{label:<21} ' + ' '.join(f'{r["cpu_ms_p50"][k]:>10.1f}' for r in runs))
    lines.append(f'{"CPU-bound rate (Hz)":<21} ' + ' '.join(f'{r["cpu_bound_hz"]:>10.1f}' for r in runs))
    lines.append('p50 wall ms per stage, one sweep at a time. The node runs the workers overlapped: '
                 'throughput is bounded by the slower worker (and the cores), latency by sweep + pair '
                 '+ DDS publish (bench/bench_node.py measures that over real DDS); markers: off that path. '
                 'CPU ms: process CPU time (all threads) per flow; CPU-bound rate = 1000 x cores / '
                 '(sweep + pair CPU ms), the most the cores can sustain when nothing else runs.')
    return '\n'.join(lines)


def run_node(args: argparse.Namespace, points: list[int]) -> int:
    model = Path(args.model or REPO_ROOT / 'models' / 'default')
    precision = _csv(args.precisions)[0]
    runs = [node_stage_times(model, n, frames=args.repeats, ego_motion=args.ego_motion, precision=precision)
            for n in points]
    report = {'model': str(model), 'ego_motion': args.ego_motion, 'precision': precision,
              'machine': machine_info(), 'runs': runs,
              'date': dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ')}
    print(format_node_table(runs))
    print(f'machine load (1/5/15 min) {report["machine"].get("loadavg_1_5_15")} on '
          f'{report["machine"]["cpu_count"]} cores; model {model} ({precision}), '
          f'ego_motion {args.ego_motion}')
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1))
        print(f'wrote {args.json}')
    return 0
