"""``zeroflow export onnx|tensorrt``: checkpoint -> ONNX (+ manifest.yaml) -> TensorRT engine.

ONNX: only the dense network is exported (inputs ``pc0 (K0,3) f32, idx0 (K0,) i64, pc1 (K1,3) f32,
idx1 (K1,) i64``, output ``flow (K0,3) f32``); the point counts are dynamic, the grid is static (it
is baked into the graph and written to the manifest, from which every backend runs the shared
numpy pillar pre-step). The graph is checked with ``onnx.checker`` and, unless ``--no-verify``,
compared with torch on a real lidar pair at a point count other than the traced one.

TensorRT: builds (or validates the cached) engine next to the ONNX file, see
:mod:`zeroflow_ros.backends.trt_backend`.
"""
from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from zeroflow_ros.backends.base import INPUT_NAMES, OUTPUT_NAMES
from zeroflow_ros.manifest import (MANIFEST_NAME, Manifest, PointRange, TensorSpec, load_manifest,
                                   sha256_file)

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
REPO_ROOT = Path(__file__).resolve().parents[1]
KITTI_DIR = REPO_ROOT / 'data' / 'samples' / 'kitti_raw_sfnd_seq' / 'velodyne_points' / 'data'
PAIR_DIR = REPO_ROOT / 'data' / 'samples' / 'opensceneflow_pair'


class ExportError(ValueError):
    """Export input (checkpoint, output path, options) is not what the exporter expects."""


def io_specs() -> tuple[list[TensorSpec], list[TensorSpec]]:
    inputs = [TensorSpec('pc0', 'float32', ('K0', 3)), TensorSpec('idx0', 'int64', ('K0',)),
              TensorSpec('pc1', 'float32', ('K1', 3)), TensorSpec('idx1', 'int64', ('K1',))]
    outputs = [TensorSpec('flow', 'float32', ('K0', 3))]
    assert tuple(t.name for t in inputs) == INPUT_NAMES and tuple(t.name for t in outputs) == OUTPUT_NAMES
    return inputs, outputs


def sample_pair(max_points: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Return a real lidar pair for parity checks: two consecutive KITTI sweeps (xyz, float32)."""
    p0 = np.fromfile(KITTI_DIR / '0000000000.bin', dtype='<f4').reshape(-1, 4)[:, :3]
    p1 = np.fromfile(KITTI_DIR / '0000000001.bin', dtype='<f4').reshape(-1, 4)[:, :3]
    if max_points is not None:
        p0, p1 = p0[::max(1, len(p0) // max_points)], p1[::max(1, len(p1) // max_points)]
    return np.ascontiguousarray(p0), np.ascontiguousarray(p1)


def randomize_batchnorm(model: Any, seed: int = 0) -> None:
    """Give every BatchNorm non-trivial running stats and affine params.

    A freshly initialised BN (mean 0, var 1, weight 1, bias 0) is almost an identity in eval
    mode, so a parity test on it would not notice an exporter that drops or mis-folds BN.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            n = m.num_features
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.2)


def make_random_checkpoint(config: Any, path: str | os.PathLike, seed: int = 0, **overrides: Any) -> Path:
    """Write an untrained checkpoint of a config (registered name or FastFlow3DConfig).

    Used by benchmarks and export tests; BatchNorm stats are randomised (see randomize_batchnorm).
    """
    import torch

    from zeroflow_ros.model import build_model, save_checkpoint

    torch.manual_seed(seed)
    model = build_model(config, **overrides)
    randomize_batchnorm(model, seed)
    note = f'randomly initialised {model.cfg.name} (seed {seed}), untrained'
    return save_checkpoint(path, model, extra={'note': note})


def _trace_inputs(grid: Any, k0: int, k1: int, seed: int = 0) -> tuple[Any, ...]:
    import torch

    from zeroflow_ros.core.voxelize import pillarize

    rng = np.random.default_rng(seed)
    lo = np.array([grid.x_min, grid.y_min, grid.z_min], dtype=np.float32)
    hi = np.array([grid.x_max, grid.y_max, grid.z_max], dtype=np.float32)
    out = []
    for k in (k0, k1):
        pts = (lo + (hi - lo) * rng.random((k, 3), dtype=np.float32)).astype(np.float32)
        _, p, i = pillarize(pts, grid)
        out += [torch.from_numpy(p), torch.from_numpy(i)]
    return tuple(out)


def export_onnx(checkpoint: str | os.PathLike, out: str | os.PathLike, opset: int = DEFAULT_OPSET,
                points: PointRange | None = None, verify: bool = True, tolerance: float = 1e-4) -> Manifest:
    """Export ``checkpoint`` to ``out`` (a .onnx path) and write ``manifest.yaml`` beside it."""
    import onnx
    import torch

    from zeroflow_ros.model import load_checkpoint

    checkpoint = Path(checkpoint)
    out = Path(out)
    if out.suffix != '.onnx':
        raise ExportError(f'-o {out}: expected a path ending in .onnx (e.g. models/default/model.onnx)')
    if not checkpoint.is_file():
        raise ExportError(f'{checkpoint}: checkpoint not found')
    model, meta = load_checkpoint(checkpoint, map_location='cpu')
    model.eval()  # BatchNorm must use running stats in the graph
    cfg = model.cfg
    grid = cfg.grid
    out.parent.mkdir(parents=True, exist_ok=True)
    inputs, outputs = io_specs()
    # Traced at point counts unlike any used in verification, so a shape baked in by mistake shows up.
    args = _trace_inputs(grid, 4099, 3851)
    dynamic_axes = {'pc0': {0: 'K0'}, 'idx0': {0: 'K0'}, 'pc1': {0: 'K1'}, 'idx1': {0: 'K1'},
                    'flow': {0: 'K0'}}
    t0 = time.perf_counter()
    fd, tmp_name = tempfile.mkstemp(prefix='.model.', suffix='.onnx.tmp', dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with torch.no_grad():
            # The TorchScript exporter: its handling of scatter_add/index_select is what model.py
            # was written and tested against (the dynamo exporter is a different code path).
            torch.onnx.export(model, args, str(tmp), input_names=list(INPUT_NAMES),
                              output_names=list(OUTPUT_NAMES), dynamic_axes=dynamic_axes,
                              opset_version=opset, do_constant_folding=True, dynamo=False)
        onnx.checker.check_model(str(tmp), full_check=True)
        proto = onnx.load(str(tmp), load_external_data=False)
        opsets = {o.domain or 'ai.onnx': o.version for o in proto.opset_import}
        # mkstemp creates 0600; a model file should be as readable as any other the user writes
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    export_s = time.perf_counter() - t0
    manifest = Manifest(
        model_config=cfg.to_dict(),
        grid=grid.to_dict(),
        inputs=inputs,
        outputs=outputs,
        onnx_file=out.name,
        onnx_sha256=sha256_file(out),
        onnx_bytes=out.stat().st_size,
        opset=int(opsets.get('ai.onnx', opset)),
        points=points or PointRange(),
        source_checkpoint=str(checkpoint.resolve()) if checkpoint.parent.resolve() != out.parent.resolve()
        else checkpoint.name,
        source_sha256=sha256_file(checkpoint),
        exported_at=dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ'),
        producer={'zeroflow_ros': _version(), 'torch': torch.__version__, 'onnx': onnx.__version__,
                  'export_seconds': f'{export_s:.1f}', 'params': str(model.num_parameters()),
                  'epoch': str(meta.get('epoch', '')), 'step': str(meta.get('step', ''))},
    )
    manifest.save(out.parent / MANIFEST_NAME)
    if verify:
        manifest.verification = verify_parity(manifest, model, tolerance)
        manifest.save(out.parent / MANIFEST_NAME)
    log.info('exported %s (%s, opset %d, %.1f MB) in %.1f s', out, cfg.name, manifest.opset,
             manifest.onnx_bytes / 1e6, export_s)
    return manifest


def verify_parity(manifest: Manifest, model: Any, tolerance: float = 1e-4) -> dict[str, Any]:
    """Compare onnxruntime with torch on a real KITTI pair; raise ExportError above ``tolerance`` metres."""
    import onnxruntime as ort
    import torch

    from zeroflow_ros.core.voxelize import pillarize

    p0, p1 = sample_pair()
    grid = model.cfg.grid
    _, c0, i0 = pillarize(p0, grid)
    _, c1, i1 = pillarize(p1, grid)
    with torch.no_grad():
        ref = model(*(torch.from_numpy(a) for a in (c0, i0, c1, i1))).numpy()
    sess = ort.InferenceSession(str(manifest.onnx_path), providers=['CPUExecutionProvider'])
    (got,) = sess.run(['flow'], {'pc0': c0, 'idx0': i0, 'pc1': c1, 'idx1': i1})
    diff = float(np.abs(got - ref).max())
    result = {'pair': 'kitti_raw_sfnd_seq 0000000000/0000000001', 'points0': int(len(c0)),
              'points1': int(len(c1)), 'max_abs_diff_m': diff, 'tolerance_m': tolerance,
              'onnxruntime': ort.__version__}
    if not diff <= tolerance:
        raise ExportError(f'{manifest.onnx_path}: onnxruntime differs from torch by {diff:.3g} m '
                          f'(> {tolerance:g} m) on a real pair; the export is wrong')
    return result


def _version() -> str:
    try:
        from zeroflow_ros import __version__
        return __version__
    except ImportError:
        return 'unknown'


# ------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest='target', metavar='TARGET', required=True)
    p = sub.add_parser('onnx', help='checkpoint -> model.onnx + manifest.yaml',
                       description='Export a checkpoint to ONNX (dynamic point count, static grid).')
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument('checkpoint', nargs='?', help='model.pt written by `zeroflow train`')
    src.add_argument('--random', metavar='CONFIG',
                     help='export an untrained model of a registered config (paper, cpu_small), '
                     'for benchmarks')
    p.add_argument('-o', '--output', required=True,
                   help='output .onnx path (manifest.yaml is written beside it)')
    p.add_argument('--opset', type=int, default=DEFAULT_OPSET, help='ONNX opset (default %(default)s)')
    p.add_argument('--points', default='1,60000,200000',
                   help='in-range points min,opt,max recorded for engine profiles (default %(default)s)')
    p.add_argument('--no-verify', action='store_true',
                   help='skip the onnxruntime-vs-torch check on a real pair')
    p.add_argument('--seed', type=int, default=0, help='seed for --random')

    t = sub.add_parser('tensorrt', help='model.onnx -> cached TensorRT engine (needs a GPU + tensorrt)',
                       description='Build (or validate the cached) TensorRT engine next to the ONNX file.')
    t.add_argument('onnx', help='model.onnx with manifest.yaml beside it (or the folder)')
    t.add_argument('--fp16', action='store_true', help='build an fp16 engine (default fp32)')
    t.add_argument('--workspace', type=int, default=4096, metavar='MB',
                   help='builder workspace (default %(default)s)')
    t.add_argument('--build-only', action='store_true',
                   help='build/validate the engine and exit (no test run)')
    t.add_argument('--rebuild', action='store_true', help='rebuild even if a valid cached engine exists')


def _parse_points(text: str) -> PointRange:
    try:
        a, b, c = (int(v) for v in text.split(','))
        pr = PointRange(a, b, c)
    except ValueError:
        raise ExportError(f'--points {text!r}: expected three integers min,opt,max') from None
    if not 0 < pr.min <= pr.opt <= pr.max:
        raise ExportError(f'--points {text!r}: need 0 < min <= opt <= max')
    return pr


def run(args: argparse.Namespace) -> int:
    if args.target == 'onnx':
        out = Path(args.output)
        points = _parse_points(args.points)
        if args.random:
            ckpt = make_random_checkpoint(args.random, out.parent / 'model.pt', seed=args.seed)
            print(f'wrote untrained {args.random} checkpoint {ckpt}')
        else:
            ckpt = Path(args.checkpoint)
        m = export_onnx(ckpt, out, opset=args.opset, points=points, verify=not args.no_verify)
        print(f'wrote {m.onnx_path} ({m.onnx_bytes / 1e6:.1f} MB, opset {m.opset}, '
              f'sha256 {m.onnx_sha256[:12]}) and {m.path}')
        if m.verification:
            v = m.verification
            print(f'parity onnxruntime vs torch on {v["pair"]} ({v["points0"]} pts): '
                  f'max |dflow| = {v["max_abs_diff_m"]:.2e} m')
        return 0
    return _run_tensorrt(args)


def _run_tensorrt(args: argparse.Namespace) -> int:
    from zeroflow_ros.backends import BackendError

    try:
        return _build_tensorrt(args)
    except BackendError as exc:
        print(f'zeroflow export tensorrt: {exc}', file=sys.stderr)
        return 1


def _build_tensorrt(args: argparse.Namespace) -> int:
    from zeroflow_ros.backends import create_backend

    path = Path(args.onnx)
    manifest = load_manifest(path if path.is_dir() else path.parent)
    precision = 'fp16' if args.fp16 else 'fp32'
    opts = {'tensorrt': {'workspace_mb': args.workspace, 'rebuild': args.rebuild}}
    t0 = time.perf_counter()
    b = create_backend(manifest.onnx_path, backend='tensorrt', device='cuda', precision=precision,
                       options=opts)
    print(f'engine {b.engine_path} ({"built" if b.built_now else "cached, valid"}) in '
          f'{time.perf_counter() - t0:.1f} s')
    if args.build_only:
        return 0
    b.warmup()
    p0, p1 = sample_pair()
    flow, valid = b.infer(p0, p1)
    ref = create_backend(manifest.onnx_path, backend='onnxruntime', device='cpu')
    flow_ref, valid_ref = ref.infer(p0, p1)
    diff = float(np.abs(flow[valid] - flow_ref[valid]).max()) if valid.any() else 0.0
    print(f'TensorRT {precision} vs onnxruntime-CPU on a KITTI pair: max |dflow| = {diff:.2e} m, '
          f'mean = {float(np.abs(flow[valid] - flow_ref[valid]).mean()):.2e} m; '
          f'inference {b.last_timing.inference_ms:.1f} ms')
    return 0
