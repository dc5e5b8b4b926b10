"""The GPU half of issue #7, run once on a lent H100/H200 by bench/gpu_check.sh.

Steps (each guarded by the time budget; the JSON is rewritten after every step so a timeout
still leaves what was measured):

1. export the paper config (untrained, randomised BatchNorm) to ONNX, with the onnxruntime-vs-torch
   parity check on a real KITTI pair; the same for cpu_small;
2. build TensorRT fp32 and fp16 engines (if the tensorrt package is there; else say why not);
3. latency at 30k/60k/100k input points, inference only and end to end (p50/p99):
   TensorRT fp16/fp32, onnxruntime-CUDA (if its CUDA provider is there), torch-CUDA fp32/fp16,
   with each figure's speed-up over torch-CUDA eager fp32 from the same run;
4. fp16 vs fp32 flow difference on the real pair (TensorRT, and torch autocast);
5. a CPU reference row (onnxruntime-CPU with all cores) for the same models.

``--dry-run`` runs the same code on CPU with small settings, to check the script before using
device time.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from zeroflow_ros.backends import BackendError, create_backend  # noqa: E402
from zeroflow_ros.bench import format_table, machine_info, run_bench  # noqa: E402

log = logging.getLogger('gpu_check')


class Check:
    def __init__(self, out: Path, budget_s: float) -> None:
        self.out = out
        self.t0 = time.monotonic()
        self.budget_s = budget_s
        self.report: dict[str, Any] = {'machine': machine_info(), 'steps': {}}
        self.save()

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def save(self) -> None:
        self.report['elapsed_s'] = round(self.elapsed(), 1)
        (self.out / 'gpu_check.json').write_text(json.dumps(self.report, indent=1, default=str))

    def step(self, name: str, fn: Callable[[], Any], need_s: float) -> Any:
        left = self.budget_s - self.elapsed()
        if left < need_s:
            why = f'time budget: {left:.0f} s left, step needs ~{need_s:.0f} s'
            self.report['steps'][name] = {'skipped': why}
            log.warning('skip %s: %.0f s left', name, left)
            self.save()
            return None
        log.info('== %s (%.0f s elapsed)', name, self.elapsed())
        t = time.monotonic()
        try:
            result = fn()
            self.report['steps'][name] = {'seconds': round(time.monotonic() - t, 1), 'result': result}
        except Exception as exc:  # a broken step must not hide the others' results
            self.report['steps'][name] = {'seconds': round(time.monotonic() - t, 1),
                                          'error': f'{type(exc).__name__}: {exc}',
                                          'traceback': traceback.format_exc(limit=6)}
            log.error('%s failed: %s', name, exc)
            result = None
        self.save()
        return result


def _export(config: str, work: Path) -> dict[str, Any]:
    from zeroflow_training.export import export_onnx, make_random_checkpoint

    ckpt = make_random_checkpoint(config, work / config / 'model.pt')
    m = export_onnx(ckpt, work / config / 'model.onnx', verify=True)
    return {'dir': str(m.directory), 'onnx_mb': round(m.onnx_bytes / 1e6, 2), 'opset': m.opset,
            'export_seconds': m.producer.get('export_seconds'), 'params': m.producer.get('params'),
            'parity_vs_torch_cpu': m.verification}


def _build_engines(model: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for precision in ('fp32', 'fp16'):
        t = time.monotonic()
        try:
            b = create_backend(model, backend='tensorrt', precision=precision)
            out[precision] = {'engine': str(b.engine_path), 'built_now': b.built_now,
                              'seconds': round(time.monotonic() - t, 1),
                              'engine_mb': round(b.engine_path.stat().st_size / 1e6, 2)}
            del b
        except BackendError as exc:
            out[precision] = {'unavailable': str(exc)}
    return out


def _fp16_vs_fp32(model: Path) -> dict[str, Any]:
    from zeroflow_training.export import sample_pair

    p0, p1 = sample_pair()
    out: dict[str, Any] = {'pair': 'KITTI 0000000000/0000000001', 'points': [len(p0), len(p1)]}
    for name in ('tensorrt', 'torch'):
        try:
            f32, v32 = create_backend(model, backend=name, device='cuda', precision='fp32').infer(p0, p1)
            f16, v16 = create_backend(model, backend=name, device='cuda', precision='fp16').infer(p0, p1)
        except BackendError as exc:
            out[name] = {'unavailable': str(exc)}
            continue
        v = v32 & v16
        d = np.linalg.norm(f16[v] - f32[v], axis=1)
        out[name] = {'mean_abs_diff_m': float(d.mean()), 'p99_diff_m': float(np.percentile(d, 99)),
                     'max_diff_m': float(d.max()),
                     'mean_flow_norm_fp32_m': float(np.linalg.norm(f32[v], axis=1).mean()),
                     'valid_equal': bool(np.array_equal(v32, v16))}
    return out


def _bench(model: Path, runs: list[tuple[str, str]], device: str, points: list[int], repeats: int,
           out: Path, tag: str, options: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    rep = run_bench(model, runs, points, device=device, repeats=repeats, warmup=3, options=options)
    table = format_table(rep)
    print(f'\n[{tag}]\n{table}\n', flush=True)
    (out / f'table_{tag}.txt').write_text(table + '\n')
    return rep


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--out', required=True, help='folder for gpu_check.json and tables')
    ap.add_argument('--budget-s', type=float, default=270.0, help='stop starting new steps after this')
    ap.add_argument('--points', default='30000,60000,100000')
    ap.add_argument('--repeats', type=int, default=30)
    ap.add_argument('--dry-run', action='store_true',
                    help='CPU, cpu_small only, few repeats: checks the script')
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(name)s: %(message)s')
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    points = [int(v) for v in args.points.split(',')]
    chk = Check(out, args.budget_s)
    dev = 'cpu' if args.dry_run else 'cuda'
    if not args.dry_run:
        import torch
        if not torch.cuda.is_available():
            chk.report['error'] = 'no CUDA device visible to torch'
            chk.save()
            print('no CUDA device visible to torch', file=sys.stderr)
            return 2
        torch.backends.cudnn.benchmark = True
    configs = ['cpu_small'] if args.dry_run else ['paper', 'cpu_small']
    gpu_runs = [('torch', 'fp32'), ('torch', 'fp16'), ('tensorrt', 'fp32'), ('tensorrt', 'fp16'),
                ('onnxruntime', 'fp32')]
    if args.dry_run:
        gpu_runs = [('torch', 'fp32'), ('onnxruntime', 'fp32'), ('tensorrt', 'fp32')]
    with tempfile.TemporaryDirectory(prefix='zf_gpu_check_') as tmp:
        work = Path(tmp)
        models: dict[str, Path] = {}
        for cfg in configs:
            r = chk.step(f'export_{cfg}', lambda cfg=cfg: _export(cfg, work), need_s=60)
            if r:
                models[cfg] = Path(r['dir'])
        if 'paper' in models:
            chk.step('tensorrt_build_paper', lambda: _build_engines(models['paper']), need_s=150)
        for cfg, model in models.items():
            reps = args.repeats if cfg == 'paper' else max(5, args.repeats // 2)
            chk.step(f'latency_{cfg}_{dev}',
                     lambda m=model, c=cfg, r=reps: _bench(m, gpu_runs, dev, points, r, out, f'{c}_{dev}'),
                     need_s=40 if not args.dry_run else 5)
        if 'paper' in models:
            chk.step('fp16_vs_fp32_paper', lambda: _fp16_vs_fp32(models['paper']), need_s=20)
            # the same torch-CUDA rows with the numpy pre/post step, to show what the GPU-side one saves
            chk.step(f'latency_paper_{dev}_host_preprocess',
                     lambda: _bench(models['paper'], [('torch', 'fp32')], dev, points,
                                    max(5, args.repeats // 2), out, f'paper_{dev}_host_pre',
                                    {'torch': {'device_preprocess': False}}),
                     need_s=20)
        if not args.dry_run:
            for cfg, model in models.items():
                chk.step(f'latency_{cfg}_cpu_reference',
                         lambda m=model, c=cfg: _bench(m, [('onnxruntime', 'fp32')], 'cpu', [60_000], 5, out,
                                                       f'{c}_cpu'),
                         need_s=40)
    chk.report['done'] = True
    chk.save()
    print(f'wrote {out / "gpu_check.json"} after {chk.elapsed():.0f} s')
    return 0


if __name__ == '__main__':
    sys.exit(main())
