"""Cheaper network variants beside their accuracy: onnxruntime graph optimisation levels and int8.

Each variant of the shipped ONNX model is timed on real lidar (KITTI sweeps, back to back, rounds
interleaved so machine load hits every variant alike) and scored on a synthetic validation split
with the official metrics (`zeroflow predict` + `zeroflow eval` code paths), so its EPE change
sits beside its latency. int8 variants are static quantisations calibrated on synthetic pairs
of a separate split (never the validation logs).

    zeroflow data synth VAL --sequences 0 --split-val 2 --sweeps 6
    zeroflow data synth CAL --sequences 2 --sweeps 4 --seed 500
    python bench/bench_quant.py --data VAL --calib CAL --json out.json

A variant is adopted only when no metric of the README results table (EPE 3-way, FG dynamic,
FG static, BG static, dynamic IoU) is worse than fp32 by more than ``--max-epe-change`` (2 %).

Measured 2026-12-05 (40 val pairs, load 5 on 2 cores): the graph optimisation levels change
nothing in the flow and 'all' (the default) is the fastest; int8 (Conv, QDQ) takes ~22-30 % of
the network's CPU time at +1.4 % EPE 3-way but +8-10 % static EPE (about 1 mm), so it is not
adopted as the default: ``precision: int8`` is opt-in.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
from zeroflow_ros.backends.int8 import ADOPTED  # noqa: E402

#: name -> (onnxruntime optimisation level, quantisation settings or None)
VARIANTS: dict[str, tuple[str, dict[str, Any] | None]] = {
    'fp32_opt_all': ('all', None),  # the node's default: the reference
    'fp32_opt_extended': ('extended', None),
    'fp32_opt_basic': ('basic', None),
    'fp32_opt_disable': ('disable', None),
    'int8_qdq_conv': ('all', {'format': 'QDQ', 'ops': ['Conv']}),  # adopted: backends/int8.py ADOPTED
    'int8_qdq_conv_gemm': ('all', {'format': 'QDQ', 'ops': ['Conv', 'Gemm', 'MatMul']}),
    'int8_qop_conv': ('all', {'format': 'QOperator', 'ops': ['Conv']}),
    # full-resolution output convs kept in fp32 (static scenery needs flow near 0 to the mm)
    'int8_qdq_conv_fp32_final': ('all', {'format': 'QDQ', 'ops': ['Conv'], 'exclude': ['/unet/final/']}),
    'int8_qdq_conv_fp32_dec2': ('all', {'format': 'QDQ', 'ops': ['Conv'],
                                        'exclude': ['/unet/final/', '/unet/decoders.2/']}),
    'int8_qdq_encoder_only': ('all', {'format': 'QDQ', 'ops': ['Conv'],
                                      'exclude': ['/unet/decoders.', '/unet/final/']}),
    # tighter activation ranges than min-max (outliers widen the int8 step)
    'int8_qdq_conv_percentile': ('all', {'format': 'QDQ', 'ops': ['Conv'], 'calibrate': 'Percentile'}),
    'int8_qdq_conv_entropy': ('all', {'format': 'QDQ', 'ops': ['Conv'], 'calibrate': 'Entropy'}),
}
REFERENCE = 'fp32_opt_all'


def prepared_pairs(root: Path, split: str):
    """Yield every consecutive pair of ``root/split`` prepared exactly as `zeroflow predict` does."""
    from zeroflow_ros.core.preprocess import PreprocessConfig, prepare_pair
    from zeroflow_ros.data.av2 import list_logs
    for lg in list_logs(root, split):
        ts = lg.timestamps
        for t0, t1 in zip(ts[:-1], ts[1:]):
            pair = lg.pair(int(t0), int(t1), with_gt=False)
            yield prepare_pair(pair.points0, pair.points1, pair.ego1_T_ego0, PreprocessConfig(),
                               is_ground0=pair.is_ground0, is_ground1=pair.is_ground1)


def calibration_feeds(calib_root: Path, split: str, grid: Any, limit: int) -> list[dict[str, np.ndarray]]:
    """Network inputs of up to ``limit`` synthetic pairs, prepared exactly as `zeroflow predict` does."""
    from zeroflow_ros.core.voxelize import pillarize

    feeds = []
    for prep in prepared_pairs(calib_root, split):
        _, pc0, idx0 = pillarize(prep.pc0, grid)
        _, pc1, idx1 = pillarize(prep.pc1, grid)
        feeds.append({'pc0': pc0, 'idx0': idx0, 'pc1': pc1, 'idx1': idx1})
        if len(feeds) >= limit:
            return feeds
    if not feeds:
        raise SystemExit(f'bench_quant: no pairs under {calib_root / split} to calibrate on')
    return feeds


def variant_dir(model: Path, work: Path, name: str, feeds: list, q: dict[str, Any] | None) -> Path:
    """Make the model folder of one variant: the same manifest, the (quantised) ONNX and its sha256."""
    from zeroflow_ros.backends.int8 import quantize_onnx
    from zeroflow_ros.manifest import load_manifest, sha256_file
    if q is None:
        return model
    d = work / name
    d.mkdir(parents=True, exist_ok=True)
    m = load_manifest(model / 'manifest.yaml')
    quantize_onnx(m.onnx_path, d / 'model.onnx', feeds, q)
    m.onnx_file, m.onnx_sha256 = 'model.onnx', sha256_file(d / 'model.onnx')
    m.onnx_bytes = (d / 'model.onnx').stat().st_size
    m.source_checkpoint = m.source_sha256 = None  # the checkpoint is fp32: no torch for this folder
    m.save(d / 'manifest.yaml')
    return d


def open_backend(path: Path, level: str, threads: int | None) -> Any:
    from zeroflow_ros.backends import create_backend
    return create_backend(path, backend='onnxruntime', device='cpu', threads=threads,
                          options={'onnxruntime': {'optimization': level}})


def time_variants(backends: dict[str, Any], points: list[int], repeats: int) -> dict[str, dict]:
    """p50 network wall ms and process CPU ms per variant and point count, rounds interleaved."""
    from zeroflow_ros.bench import lidar_pair
    out: dict[str, dict] = {name: {} for name in backends}
    for n in points:
        p0, p1 = lidar_pair(n)
        wall: dict[str, list] = {k: [] for k in backends}
        cpu: dict[str, list] = {k: [] for k in backends}
        for b in backends.values():
            b.infer(p0, p1)  # warm-up
        for _ in range(repeats):
            for name, b in backends.items():
                c0 = time.process_time()
                b.infer(p0, p1)
                cpu[name].append((time.process_time() - c0) * 1e3)
                wall[name].append(b.last_timing.inference_ms)
        for name in backends:
            out[name][str(n)] = {'network_ms_p50': float(np.percentile(wall[name], 50)),
                                 'process_cpu_ms_p50': float(np.percentile(cpu[name], 50))}
    return out


def score(backend: Any, data: Path, split: str, out_dir: Path) -> dict[str, float]:
    """Predict the split with this backend and evaluate it (official three-way metrics)."""
    from zeroflow_ros.data.av2 import AV2Log
    from zeroflow_ros.eval.evaluate import evaluate
    from zeroflow_ros.eval.predict import list_jobs, make_method, predict_pair

    method = make_method('student', model=str(backend.source.path), backend='onnxruntime', device='cpu')
    method.backend = backend  # the variant's session (optimisation level)
    jobs, _ = list_jobs(data, split, out_dir)
    for job in jobs:
        predict_pair(method, AV2Log(Path(job.log_dir)), job.ts0, job.ts1, out_dir)
    t = evaluate(out_dir, data, split).threeway
    return {'epe_3way': float(t['EPE 3-Way Average']),
            'epe_fg_dynamic': float(t.get('EPE/Foreground/Dynamic', float('nan'))),
            'epe_fg_static': float(t.get('EPE/Foreground/Static', float('nan'))),
            'epe_bg_static': float(t.get('EPE/Background/Static', float('nan'))),
            'dynamic_iou': float(t.get('Dynamic IoU', float('nan'))), 'pairs': len(jobs)}


#: metric -> True when larger is better (the README results table's columns we can score here)
METRICS = {'epe_3way': False, 'epe_fg_dynamic': False, 'epe_fg_static': False, 'epe_bg_static': False,
           'dynamic_iou': True}


def changes(e: dict[str, float], ref: dict[str, float]) -> dict[str, float]:
    """Percent change of each metric vs the reference, signed so that positive is worse."""
    return {k: (-1 if up else 1) * (e[k] - ref[k]) / ref[k] * 100.0 for k, up in METRICS.items() if ref[k]}


def format_table(res: dict[str, Any], points: list[int], max_change: float) -> str:
    refe = res['variants'][REFERENCE]['eval']
    ref = refe['epe_3way']
    cols = ''.join(f'{f"net ms {n}":>13}{f"cpu ms {n}":>13}' for n in points)
    head = (f'{"variant":<26}{"EPE 3-way":>10}{"change":>9}{"FG dyn":>8}{"FG stat":>9}{"BG stat":>9}'
            f'{"dyn IoU":>8}{"worst":>8}{"max|dflow|":>11}{cols}  adopt')
    lines = [head, '-' * len(head)]
    for name, v in res['variants'].items():
        e = v['eval']
        change = (e['epe_3way'] - ref) / ref * 100.0
        worst = max(changes(e, refe).items(), key=lambda kv: kv[1])
        ok = worst[1] <= max_change
        lat = ''.join(f'{v["latency"][str(n)]["network_ms_p50"]:>13.1f}'
                      f'{v["latency"][str(n)]["process_cpu_ms_p50"]:>13.1f}' for n in points)
        lines.append(f'{name:<26}{e["epe_3way"]:>10.4f}{change:>+8.2f}%{e["epe_fg_dynamic"]:>8.3f}'
                     f'{e["epe_fg_static"]:>9.4f}{e["epe_bg_static"]:>9.4f}{e["dynamic_iou"]:>8.3f}'
                     f'{worst[1]:>+7.1f}%{v["max_abs_flow_diff_m"]:>11.4f}{lat}  '
                     f'{"yes" if ok else "no (" + worst[0] + ")"}')
    lines.append(f'EPE on {res["val_pairs"]} synthetic val pairs ({res["data"]}); change vs {REFERENCE}; '
                 f'worst = the metric that got most worse (%); adopt = worst <= {max_change:g} %. '
                 'Latency: network p50 (wall) and process CPU ms per call on KITTI sweeps, '
                 f'load {res["load_before"]} -> {res["load_after"]} '
                 f'on {os.cpu_count()} cores (shared machine: compare rows, not absolute values).')
    return '\n'.join(lines)


def max_flow_diff(backends: dict[str, Any], data: Path, split: str) -> dict[str, float]:
    """Largest |flow - reference flow| (m) over the val pairs: what quantisation moves."""
    worst = {k: 0.0 for k in backends}
    for prep in prepared_pairs(data, split):
        ref, _ = backends[REFERENCE].infer(prep.pc0, prep.pc1)
        for k, b in backends.items():
            worst[k] = max(worst[k], float(np.abs(b.infer(prep.pc0, prep.pc1)[0] - ref).max()))
    return worst


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--model', type=Path, default=ROOT / 'models' / 'default')
    ap.add_argument('--data', type=Path, default=None,
                    help='synthetic data root with the val split (EPE per variant; without it: '
                    '--write-int8 only)')
    ap.add_argument('--split', default='val')
    ap.add_argument('--calib', type=Path, required=True, help='synthetic data root to calibrate int8 on')
    ap.add_argument('--calib-split', default='train')
    ap.add_argument('--calib-pairs', type=int, default=6)
    ap.add_argument('--variants', default=','.join(VARIANTS),
                    help='comma-separated, of: ' + ', '.join(VARIANTS))
    ap.add_argument('--points', default='60000,100000')
    ap.add_argument('--repeats', type=int, default=8)
    ap.add_argument('--threads', type=int, default=None, help='onnxruntime threads (default: all cores)')
    ap.add_argument('--max-epe-change', type=float, default=2.0, help='percent')
    ap.add_argument('--keep', type=Path, default=None, help='keep the variant model folders here')
    ap.add_argument('--json', type=Path, default=None)
    ap.add_argument('--write-int8', action='store_true',
                    help='write the adopted int8 variant into --model (model.int8.onnx + model.int8.yaml, '
                    'used with precision: int8), with the accuracy measured here when --data is given')
    a = ap.parse_args(argv)
    if a.data is None:
        if not a.write_int8:
            raise SystemExit('bench_quant: give --data (a synthetic val split) or --write-int8')
        return write_adopted(a, None)
    names = [v.strip() for v in a.variants.split(',') if v.strip()]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        raise SystemExit(f'--variants: unknown {unknown}; valid: {", ".join(VARIANTS)}')
    if REFERENCE not in names:
        names.insert(0, REFERENCE)
    points = [int(x) for x in a.points.split(',')]
    from zeroflow_ros.pipeline import limit_blas_threads
    from zeroflow_ros.backends.base import resolve_model
    limit_blas_threads(1)
    load_before = round(os.getloadavg()[0], 2)
    work = Path(tempfile.mkdtemp(prefix='zeroflow_quant_'))
    try:
        grid = resolve_model(a.model).grid()
        feeds = calibration_feeds(a.calib, a.calib_split, grid, a.calib_pairs) \
            if any(VARIANTS[n][1] for n in names) else []
        backends = {n: open_backend(variant_dir(a.model, work, n, feeds, VARIANTS[n][1]), VARIANTS[n][0],
                                    a.threads) for n in names}
        evals = {n: score(b, a.data, a.split, work / f'pred_{n}') for n, b in backends.items()}
        diffs = max_flow_diff(backends, a.data, a.split)
        lat = time_variants(backends, points, a.repeats)
        if a.keep:
            for n in names:
                if (work / n).is_dir():
                    shutil.copytree(work / n, a.keep / n, dirs_exist_ok=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res = {'model': str(a.model), 'data': str(a.data), 'val_pairs': evals[REFERENCE]['pairs'],
           'calibration': {'root': str(a.calib), 'split': a.calib_split, 'pairs': len(feeds)},
           'load_before': load_before, 'load_after': round(os.getloadavg()[0], 2),
           'variants': {n: {'optimization': VARIANTS[n][0], 'quantization': VARIANTS[n][1], 'eval': evals[n],
                            'max_abs_flow_diff_m': diffs[n], 'latency': lat[n]} for n in names}}
    print(format_table(res, points, a.max_epe_change))
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))
    if a.write_int8:
        adopted = next((n for n in names if VARIANTS[n][1] == ADOPTED), None)
        acc = None
        if adopted is not None:
            ref, e = res['variants'][REFERENCE]['eval'], res['variants'][adopted]['eval']
            acc = {'data': str(a.data), 'split': a.split, 'pairs': e['pairs'], 'fp32': ref, 'int8': e,
                   'epe_3way_change_percent':
                       round((e['epe_3way'] - ref['epe_3way']) / ref['epe_3way'] * 100, 2)}
        return write_adopted(a, acc)
    return 0


def write_adopted(a: argparse.Namespace, accuracy: dict[str, Any] | None) -> int:
    from zeroflow_ros.backends.base import resolve_model
    from zeroflow_ros.backends.int8 import write_int8
    src = resolve_model(a.model)
    feeds = calibration_feeds(a.calib, a.calib_split, src.grid(), a.calib_pairs)
    calibration = {'root': str(a.calib), 'split': a.calib_split, 'pairs': len(feeds)}
    path = write_int8(src.manifest, feeds, calibration, accuracy)
    print(f'wrote {path} (+ model.int8.yaml); the node runs it with precision: int8')
    return 0


if __name__ == '__main__':
    sys.exit(main())
