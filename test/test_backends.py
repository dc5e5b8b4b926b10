"""Backends behind create_backend: agreement, scatter-back contract, fallback chain, engine cache."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

pytest.importorskip('onnxruntime')
torch = pytest.importorskip('torch')

from zeroflow_ros.backends import (AUTO_ORDER, BACKEND_NAMES, BackendError,  # noqa: E402
                                   create_backend, resolve_model)
from zeroflow_ros.backends.trt_backend import (EngineMismatch, engine_filename, gpu_slug,  # noqa: E402
                                               load_or_build)
from zeroflow_ros.core.voxelize import pillarize  # noqa: E402
from zeroflow_ros.manifest import MANIFEST_NAME, sha256_file  # noqa: E402
from zeroflow_ros.model import FastFlow3DConfig, load_checkpoint  # noqa: E402
from zeroflow_training.export import export_onnx, make_random_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KITTI = ROOT / 'data' / 'samples' / 'kitti_raw_sfnd_seq' / 'velodyne_points' / 'data'
TINY = dict(name='test_tiny', pillar_size=0.8, embed_channels=8, stage_channels=(8, 16),
            stage_blocks=(1, 2), head_hidden=8)


def _kitti(i: int, step: int = 4) -> np.ndarray:
    return np.fromfile(KITTI / f'{i:010d}.bin', dtype='<f4').reshape(-1, 4)[::step, :3].copy()


@pytest.fixture(scope='module')
def model_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp('tiny_model')
    ckpt = make_random_checkpoint(FastFlow3DConfig(**TINY), d / 'model.pt', seed=7)
    export_onnx(ckpt, d / 'model.onnx', verify=False)
    return d


@pytest.fixture
def model_copy(model_dir, tmp_path) -> Path:
    d = tmp_path / 'model'
    shutil.copytree(model_dir, d)
    return d


@pytest.fixture(scope='module')
def pair() -> tuple[np.ndarray, np.ndarray]:
    p0, p1 = _kitti(0), _kitti(1)
    # hand-built rows: far outside the grid, above it, NaN -> must come back invalid with flow 0
    extra = np.array([[80.0, 0.0, 0.0], [0.0, 0.0, 9.0], [np.nan, 1.0, 1.0], [-51.0, 51.0, -2.9]],
                     dtype=np.float32)
    return np.concatenate([p0, extra]), p1


def test_torch_and_onnxruntime_agree_and_follow_the_contract(model_dir, pair):
    p0, p1 = pair
    ort_b = create_backend(model_dir, backend='onnxruntime', device='cpu', threads=1)
    tch_b = create_backend(model_dir / 'model.pt', backend='torch', device='cpu', threads=1)
    assert (ort_b.name, ort_b.device, tch_b.name, tch_b.device) == ('onnxruntime', 'cpu', 'torch', 'cpu')
    f_o, v_o = ort_b.infer(p0, p1)
    f_t, v_t = tch_b.infer(p0, p1)
    assert f_o.shape == (len(p0), 3) and f_o.dtype == np.float32 and v_o.dtype == bool
    assert np.array_equal(v_o, v_t)
    assert float(np.abs(f_o - f_t).max()) <= 1e-4
    # independent reference: the model called directly on the in-range points, scattered by hand
    model, _ = load_checkpoint(model_dir / 'model.pt')
    keep, c0, i0 = pillarize(p0, model.cfg)
    _, c1, i1 = pillarize(p1, model.cfg)
    with torch.no_grad():
        ref_k = model(*(torch.from_numpy(a) for a in (c0, i0, c1, i1))).numpy()
    assert np.array_equal(v_t, keep)
    assert np.abs(f_t[keep] - ref_k).max() <= 1e-5
    assert float(np.abs(ref_k).mean()) > 1e-2          # non-trivial flow, so agreement means something
    # the four hand-built rows: three out of range / NaN, the last inside a corner pillar
    assert not v_o[-4:-1].any() and np.all(f_o[-4:-1] == 0) and v_o[-1]
    t = ort_b.last_timing
    assert t.points0 == len(p0) and t.in_range0 == int(keep.sum()) and t.in_range1 == len(c1)
    assert min(t.preprocess_ms, t.inference_ms, t.postprocess_ms) > 0
    assert t.total_ms == pytest.approx(t.preprocess_ms + t.inference_ms + t.postprocess_ms)
    d = ort_b.describe()
    assert d['backend'] == 'onnxruntime' and d['threads'] == 1 and d['grid']['shape'] == [128, 128]
    assert d['onnx_sha256'] == sha256_file(model_dir / 'model.onnx')


def test_auto_on_cpu_prefers_onnxruntime_and_says_why(model_dir, caplog):
    with caplog.at_level(logging.INFO, logger='zeroflow_ros.backends'):
        b = create_backend(model_dir, device='cpu', threads=1)
    assert (b.name, b.device) == ('onnxruntime', 'cpu')
    assert any('auto -> onnxruntime/cpu' in r.getMessage() for r in caplog.records)


def test_empty_and_degenerate_inputs(model_dir):
    b = create_backend(model_dir, backend='onnxruntime', device='cpu', threads=1)
    f, v = b.infer(np.zeros((0, 3), np.float32), _kitti(1))
    assert f.shape == (0, 3) and v.shape == (0,)
    far = np.full((10, 3), 500.0, np.float32)
    f, v = b.infer(_kitti(0, 50), far)      # nothing of sweep t+1 in range: no claim of flow
    assert not v.any() and not f.any()
    f, v = b.infer(_kitti(0, 50).astype(np.float64), _kitti(1, 50))  # float64 input is accepted
    assert v.any()
    with pytest.raises(BackendError, match='points0.*shape'):
        b.infer(np.zeros((5, 4), np.float32), far)
    with pytest.raises(BackendError, match='points1.*dtype'):
        b.infer(far, np.zeros((5, 3), np.int32))


def test_clip_above_max_points_keeps_an_even_subset(model_dir, pair, caplog):
    p0, p1 = pair
    b = create_backend(model_dir, backend='onnxruntime', device='cpu', threads=1)
    b.max_points = 1000
    with caplog.at_level(logging.WARNING):
        f, v = b.infer(p0, p1)
    assert v.sum() == 1000 and not f[~v].any()
    assert any('exceed the engine maximum 1000' in r.getMessage() for r in caplog.records)
    # the subset is spread over the cloud, not its first 1000 rows
    rows = np.flatnonzero(v)
    assert rows[-1] > len(p0) * 0.9


def test_unknown_names_raise_listing_valid_ones(model_dir):
    with pytest.raises(BackendError) as exc:
        create_backend(model_dir, backend='tensorflow')
    assert all(n in str(exc.value) for n in ('auto',) + BACKEND_NAMES)
    with pytest.raises(BackendError, match='cpu, cuda'):
        create_backend(model_dir, device='tpu')
    with pytest.raises(BackendError, match='fp32, fp16, int8'):
        create_backend(model_dir, precision='int4')
    with pytest.raises(BackendError, match='no such file'):
        create_backend(model_dir / 'nope')
    assert [n for n, _ in AUTO_ORDER] == ['tensorrt', 'onnxruntime', 'torch', 'onnxruntime', 'torch']


def test_corrupt_onnx_falls_back_to_torch_with_a_log_line(model_copy, pair, caplog):
    p0, p1 = pair
    blob = bytearray((model_copy / 'model.onnx').read_bytes())
    for i in range(len(blob) // 3, len(blob) // 3 + 64):
        blob[i] ^= 0xA5          # flips bits whatever is there (the graph holds zero-filled constants)
    (model_copy / 'model.onnx').write_bytes(bytes(blob))
    with caplog.at_level(logging.INFO, logger='zeroflow_ros.backends'):
        b = create_backend(model_copy, device='cpu', threads=1)
    assert (b.name, b.device) == ('torch', 'cpu')
    warn = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any('onnxruntime-cpu failed' in w and 'sha256' in w for w in warn), warn
    chosen = [r.getMessage() for r in caplog.records if 'auto -> torch/cpu' in r.getMessage()]
    assert chosen and 'onnxruntime-cpu: failed' in chosen[0]
    f, v = b.infer(p0, p1)
    assert v.any() and np.isfinite(f).all()
    # an explicit backend never falls back
    with pytest.raises(BackendError, match='sha256'):
        create_backend(model_copy, backend='onnxruntime', device='cpu')


def test_unloadable_onnx_with_matching_hash_also_falls_back(model_copy, caplog):
    # the sha check passes (manifest updated), so this exercises onnxruntime's own load error
    (model_copy / 'model.onnx').write_bytes(b'not an onnx model at all')
    data = yaml.safe_load((model_copy / MANIFEST_NAME).read_text())
    data['onnx']['sha256'] = sha256_file(model_copy / 'model.onnx')
    (model_copy / MANIFEST_NAME).write_text(yaml.safe_dump(data))
    with caplog.at_level(logging.WARNING, logger='zeroflow_ros.backends'):
        b = create_backend(model_copy, device='cpu', threads=1)
    assert b.name == 'torch'
    assert any('cannot load' in r.getMessage() for r in caplog.records)


def test_unknown_manifest_version_is_reported(model_copy):
    data = yaml.safe_load((model_copy / MANIFEST_NAME).read_text())
    data['format_version'] = 7
    (model_copy / MANIFEST_NAME).write_text(yaml.safe_dump(data))
    with pytest.raises(BackendError, match='format_version 7 is not supported.*version'):
        create_backend(model_copy, device='cpu')


def test_resolve_model_kinds(model_dir, tmp_path):
    src = resolve_model(model_dir)
    assert src.onnx == model_dir / 'model.onnx' and src.checkpoint == model_dir / 'model.pt'
    assert src.offers() == {'tensorrt': None, 'onnxruntime': None, 'torch': None}
    only_onnx = tmp_path / 'only_onnx'
    only_onnx.mkdir()
    for name in ('model.onnx', MANIFEST_NAME):
        shutil.copy(model_dir / name, only_onnx / name)
    src = resolve_model(only_onnx / 'model.onnx')
    assert src.checkpoint is None and 'model.pt' in src.offers()['torch']
    with pytest.raises(BackendError, match='torch: no checkpoint'):
        create_backend(only_onnx, backend='torch')
    lone = tmp_path / 'lone'
    lone.mkdir()
    shutil.copy(model_dir / 'model.onnx', lone / 'model.onnx')
    with pytest.raises(BackendError, match=f'no {MANIFEST_NAME} beside it'):
        resolve_model(lone / 'model.onnx')
    (lone / 'model.engine').write_bytes(b'x')
    with pytest.raises(BackendError, match='check the engine against'):
        resolve_model(lone / 'model.engine')


# ------------------------------------------------------------------ engine cache (no GPU needed)

def test_engine_filename_names_everything_it_depends_on():
    sha = 'ab12cd34' + '0' * 56
    assert engine_filename(sha, 'fp16', '10.3.0.26', 'NVIDIA H100 80GB HBM3') == \
        'model.ab12cd34.fp16.trt10.3.0.nvidia-h100-80gb-hbm3.engine'
    assert gpu_slug('  ') == 'unknown-gpu'
    with pytest.raises(BackendError, match='precision'):
        engine_filename(sha, 'int8', '10.3', 'x')


class _FakeRuntime:
    """Serialised 'engines' are b'ENGINE:<io>'; anything else fails to deserialize like a corrupt file."""

    def __init__(self, io: str):
        self.io = io
        self.builds = 0

    def build(self, tmp: Path) -> None:
        self.builds += 1
        tmp.write_bytes(b'ENGINE:' + self.io.encode())

    def load(self, blob: bytes) -> str:
        if not blob.startswith(b'ENGINE:'):
            raise EngineMismatch('cannot deserialize')
        return blob[7:].decode()

    def check(self, engine: str) -> None:
        if engine != self.io:
            raise EngineMismatch(f'I/O {engine} differs from the manifest {self.io}')


def test_engine_cache_builds_once_then_reuses(tmp_path):
    rt = _FakeRuntime('pc0,idx0,pc1,idx1->flow')
    path = tmp_path / 'model.engine'
    eng, built = load_or_build(path, rt.build, rt.load, rt.check)
    assert built and rt.builds == 1 and path.read_bytes().startswith(b'ENGINE:')
    eng2, built2 = load_or_build(path, rt.build, rt.load, rt.check)
    assert not built2 and rt.builds == 1 and eng2 == eng
    assert not list(tmp_path.glob('*.tmp'))


@pytest.mark.parametrize('content, why', [(b'\x00garbage', 'cannot deserialize'),
                                          (b'ENGINE:old->io', 'differs from the manifest')])
def test_engine_cache_rebuilds_corrupt_or_mismatching_engine(tmp_path, caplog, content, why):
    rt = _FakeRuntime('pc0,idx0,pc1,idx1->flow')
    path = tmp_path / 'model.engine'
    path.write_bytes(content)
    with caplog.at_level(logging.WARNING):
        eng, built = load_or_build(path, rt.build, rt.load, rt.check)
    assert built and rt.builds == 1 and eng == rt.io
    lines = [r.getMessage() for r in caplog.records if 'rebuilding TensorRT engine' in r.getMessage()]
    assert len(lines) == 1 and why in lines[0]


def test_engine_cache_failed_build_leaves_old_file_and_no_temp(tmp_path):
    rt = _FakeRuntime('io')
    path = tmp_path / 'model.engine'
    path.write_bytes(b'ENGINE:stale')

    def broken_build(tmp: Path) -> None:
        tmp.write_bytes(b'half an eng')
        raise BackendError('builder ran out of memory')

    with pytest.raises(BackendError, match='out of memory'):
        load_or_build(path, broken_build, rt.load, rt.check)
    assert path.read_bytes() == b'ENGINE:stale' and not list(tmp_path.glob('*.tmp'))


# ------------------------------------------------------------------ GPU (skipped on CPU machines)

def _cuda_or_skip():
    if not torch.cuda.is_available():
        pytest.skip('no CUDA device on this machine (GPU-only check)')


@pytest.mark.gpu
def test_torch_cuda_matches_onnxruntime_cpu(model_dir, pair):
    _cuda_or_skip()
    p0, p1 = pair
    gpu = create_backend(model_dir, backend='torch', device='cuda')
    assert gpu.device_preprocess      # pillars and scatter-back on the GPU by default
    cpu = create_backend(model_dir, backend='onnxruntime', device='cpu')
    f_g, v_g = gpu.infer(p0, p1)
    f_c, v_c = cpu.infer(p0, p1)
    assert np.array_equal(v_g, v_c) and float(np.abs(f_g - f_c).max()) <= 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize('precision, tol', [('fp32', 1e-3), ('fp16', 5e-2)])
def test_tensorrt_matches_onnxruntime_and_rebuilds_corrupt_engine(model_copy, pair, precision, tol, caplog):
    _cuda_or_skip()
    pytest.importorskip('tensorrt', reason='tensorrt not installed (gpu extra)')
    p0, p1 = pair
    trt_b = create_backend(model_copy, backend='tensorrt', precision=precision)
    assert trt_b.built_now and trt_b.engine_path.parent == model_copy
    cpu = create_backend(model_copy, backend='onnxruntime', device='cpu')
    f_t, v_t = trt_b.infer(p0, p1)
    f_c, v_c = cpu.infer(p0, p1)
    assert np.array_equal(v_t, v_c)
    assert float(np.abs(f_t - f_c)[v_c].mean()) <= tol / 10 and float(np.abs(f_t - f_c).max()) <= tol
    # second open reuses the cache; a corrupted cache is rebuilt with one log line
    assert not create_backend(model_copy, backend='tensorrt', precision=precision).built_now
    trt_b.engine_path.write_bytes(b'corrupt')
    with caplog.at_level(logging.WARNING):
        again = create_backend(model_copy, backend='tensorrt', precision=precision)
    assert again.built_now and any('rebuilding TensorRT engine' in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------ bench (same interface)

def test_bench_rows_ratios_and_resampling(model_dir):
    from zeroflow_ros.bench import format_table, lidar_pair, parse_runs, run_bench

    raw = np.fromfile(KITTI / '0000000000.bin', dtype='<f4').reshape(-1, 4)[:, :3]
    small, _ = lidar_pair(1000)
    big, _ = lidar_pair(len(raw) + 10)
    assert len(small) == 1000 and np.array_equal(small[0], raw[0]) and np.array_equal(small[-1], raw[-1])
    assert np.array_equal(big[len(raw):], raw[:10])
    runs = parse_runs(['onnxruntime', 'tensorrt'], ['fp32'])
    assert runs[0] == ('torch', 'fp32')
    rep = run_bench(model_dir, runs, points=[3000], device='cpu', repeats=3, warmup=1, threads=1)
    by = {(r['backend'], r['precision']): r for r in rep['results']}
    torch_row = by[('torch', 'fp32')]['by_points']['3000']
    ort_row = by[('onnxruntime', 'fp32')]['by_points']['3000']
    assert torch_row['speedup_vs_torch']['total_ms'] == pytest.approx(1.0)
    assert ort_row['speedup_vs_torch']['total_ms'] == pytest.approx(
        torch_row['total_ms']['p50'] / ort_row['total_ms']['p50'])
    assert ort_row['repeats'] == 3 and ort_row['inference_ms']['p99'] >= ort_row['inference_ms']['p50'] > 0
    assert 'unavailable' in by[('tensorrt', 'fp32')] or 'by_points' in by[('tensorrt', 'fp32')]
    table = format_table(rep)
    assert 'onnxruntime' in table and 'vs torch' in table
    with pytest.raises(ValueError, match='valid: tensorrt, onnxruntime, torch'):
        parse_runs(['tflite'], ['fp32'])


def test_scatter_back_with_a_hand_built_network():
    """Base-class contract with a network whose output is known: flow = the point itself, NaN for x > 20."""
    from zeroflow_ros.backends.base import Backend, ModelSource
    from zeroflow_ros.core.voxelize import PillarGrid

    class Echo(Backend):
        name = 'echo'

        def _run(self, pc0, idx0, pc1, idx1):
            out = pc0.copy()
            out[pc0[:, 0] > 20] = np.nan
            return out

    grid = PillarGrid(pillar_size=0.8, divisor=4)
    b = Echo(ModelSource(path=Path('.')), grid, 'cpu', 'fp32', threads=1)
    p0 = np.array([[1, 2, 0], [30, 0, 0], [99, 0, 0], [-5, -5, 1], [0, 0, 5]], np.float32)
    p1 = np.array([[0, 0, 0]], np.float32)
    f, v = b.infer(p0, p1)
    assert v.tolist() == [True, False, False, True, False]
    assert np.array_equal(f[v], p0[v]) and not f[~v].any()
    f, v = b.infer(p0[[0, 3]], p1)          # all finite: the fast path
    assert v.all() and np.array_equal(f, p0[[0, 3]])
    b.max_points = 1                         # clipped: one of the two kept, the other invalid
    f, v = b.infer(p0[[0, 3]], p1)
    assert v.sum() == 1 and np.array_equal(f[v], p0[[0, 3]][v])


def test_backends_import_without_torch_onnxruntime_or_tensorrt():
    import subprocess
    import sys

    code = ('import sys, zeroflow_ros.backends, zeroflow_ros.manifest, zeroflow_ros.bench\n'
            'from zeroflow_ros.backends import base, ort_backend, torch_backend, trt_backend\n'
            'print(sorted(m for m in ("torch", "onnxruntime", "tensorrt", "onnx") if m in sys.modules))')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == '[]'


def test_bench_cli_writes_json(model_dir, tmp_path, capsys):
    import json

    from zeroflow_ros.cli import main

    out = tmp_path / 'bench.json'
    rc = main(['bench', '--model', str(model_dir), '--backends', 'onnxruntime', '--points', '2000,5000',
               '--repeats', '2', '--warmup', '0', '--device', 'cpu', '--threads', '1', '--json', str(out)])
    assert rc == 0
    rep = json.loads(out.read_text())
    runs = [(r['backend'], r['precision']) for r in rep['results']]
    assert runs == [('torch', 'fp32'), ('onnxruntime', 'fp32')]
    assert set(rep['results'][1]['by_points']) == {'2000', '5000'}
    assert rep['results'][1]['describe']['threads'] == 1 and rep['results'][1]['describe']['spin'] is False
    printed = capsys.readouterr().out
    assert 'onnxruntime  cpu   fp32     5000' in printed


# ------------------------------------------------------------------ GPU-side pre/post (run here on CPU torch)

def test_pillarize_torch_equals_numpy_pillarize_on_real_lidar_and_borders():
    from zeroflow_ros.backends.torch_backend import pillarize_torch
    from zeroflow_ros.core.voxelize import PillarGrid

    rng = np.random.default_rng(0)
    for grid in (PillarGrid(pillar_size=0.2, divisor=8), PillarGrid(pillar_size=0.8, divisor=4)):
        edges = grid.x_min + grid.pillar_size * np.arange(grid.nx + 1)
        # float32 values at, just below and just above every pillar border, and the box faces
        e32 = edges.astype(np.float32)
        border = np.concatenate([e32, np.nextafter(e32, np.float32(-np.inf)),
                                 np.nextafter(e32, np.float32(np.inf))])
        other = rng.choice(border, size=len(border))
        z = rng.uniform(-3.2, 3.2, len(border)).astype(np.float32)
        hand = np.stack([border, other, z], axis=1)
        special = np.array([[np.nan, 0, 0], [np.inf, 0, 0], [0, -np.inf, 0], [0, 0, 3.0], [0, 0, -3.0],
                            [51.2, 0, 0], [-51.2, 0, 0]], dtype=np.float32)
        pts = np.concatenate([_kitti(0, 1), hand, hand[:, [1, 0, 2]], special]).astype(np.float32)
        keep_n, pc_n, idx_n = pillarize(pts, grid)
        keep_t, pc_t, idx_t = pillarize_torch(torch.from_numpy(pts), grid)
        assert np.array_equal(keep_t.numpy(), keep_n)
        assert np.array_equal(pc_t.numpy(), pc_n)
        assert np.array_equal(idx_t.numpy(), idx_n)
        assert 0 < keep_n.sum() < len(pts)


def test_torch_device_preprocess_path_matches_the_numpy_path(model_dir, pair):
    from zeroflow_ros.backends.base import resolve_model
    from zeroflow_ros.backends.torch_backend import TorchBackend

    p0, p1 = pair
    src = resolve_model(model_dir)
    host = TorchBackend(src, 'cpu', threads=1)
    dev = TorchBackend(src, 'cpu', threads=1, device_preprocess=True)
    assert not host.device_preprocess and dev.device_preprocess
    f_h, v_h = host.infer(p0, p1)
    f_d, v_d = dev.infer(p0, p1)
    assert np.array_equal(v_h, v_d) and float(np.abs(f_h - f_d).max()) <= 1e-6
    assert f_d.dtype == np.float32 and v_d.dtype == bool
    t = dev.last_timing
    assert t.points0 == len(p0) and t.in_range0 == int(v_h.sum()) and t.inference_ms > 0
    f, v = dev.infer(p0[:100], np.full((3, 3), 500.0, np.float32))
    assert not v.any() and not f.any()
    with pytest.raises(BackendError, match='points1'):
        dev.infer(p0, np.zeros((4, 2), np.float32))


def test_infer_pillars_equals_infer_and_keeps_cached_pillars_intact(model_dir, pair):
    """Pillarise once, infer later (the node's per-sweep cache): same flow and mask as infer()."""
    p0, p1 = pair
    for name in ('onnxruntime', 'torch'):
        b = create_backend(model_dir, backend=name, device='cpu', threads=1)
        flow, valid = b.infer(p0, p1)
        pil0, pil1 = b.pillarize(p0), b.pillarize(p1)
        keep0 = pil0.keep.copy()
        f2, v2 = b.infer_pillars(pil0, pil1)
        assert np.array_equal(flow, f2) and np.array_equal(valid, v2)
        v2[:] = False  # the caller owns the result: the cached sweep is not touched
        assert np.array_equal(pil0.keep, keep0)
        assert b.last_timing.in_range0 == int(keep0.sum())


def test_int8_model_is_checked_against_its_source_and_auto_falls_back(model_copy, pair, caplog):
    """model.int8.onnx: close to fp32 (independent reference: the fp32 session), refused when made
    from another model.onnx (with the command that rebuilds it), fp32 under 'auto' when missing."""
    from zeroflow_ros.backends.int8 import INT8_INFO, INT8_ONNX, write_int8
    p0, p1 = pair
    src = resolve_model(model_copy)
    with pytest.raises(BackendError, match='bench_quant.py'):  # none yet, explicit: clear error
        create_backend(model_copy, backend='onnxruntime', device='cpu', precision='int8')
    with caplog.at_level(logging.WARNING):
        b = create_backend(model_copy, device='cpu', precision='int8')
    assert (b.name, b.precision) == ('onnxruntime', 'fp32') and 'running fp32' in caplog.text
    fp32 = create_backend(model_copy, backend='onnxruntime', device='cpu')
    pil = [fp32.pillarize(p) for p in (_kitti(2), _kitti(3), _kitti(4))]
    feeds = [{'pc0': a.points, 'idx0': a.idx, 'pc1': b.points, 'idx1': b.idx} for a, b in zip(pil, pil[1:])]
    write_int8(src.manifest, feeds, {'pairs': len(feeds)})
    q = create_backend(model_copy, backend='onnxruntime', device='cpu', precision='int8')
    assert q.precision == 'int8' and q.describe()['onnx'].endswith(INT8_ONNX)
    f32, v32 = fp32.infer(p0, p1)
    f8, v8 = q.infer(p0, p1)
    assert np.array_equal(v8, v32)
    scale = np.abs(f32[v32]).mean()
    assert np.abs(f8 - f32)[v32].mean() < 0.2 * scale  # quantised, not another network
    info = yaml.safe_load((model_copy / INT8_INFO).read_text())
    info['source_onnx_sha256'] = '0' * 64  # as after re-exporting a retrained model
    (model_copy / INT8_INFO).write_text(yaml.safe_dump(info))
    with pytest.raises(BackendError, match='made from another model.onnx'):
        create_backend(model_copy, backend='onnxruntime', device='cpu', precision='int8')
    with pytest.raises(BackendError, match='int8'):
        create_backend(model_copy, backend='torch', device='cpu', precision='int8')


def test_sweep_part_once_then_pair_part_equals_the_whole_network(model_dir, pair):
    """The node runs the sweep-t-only part (pillar encoder + UNet stages of sweep t) when the sweep
    arrives and the rest per pair: same flow as the whole graph (reference: one session, infer)."""
    from zeroflow_ros.backends.split import split_sweep_part
    p0, p1 = pair
    b = create_backend(model_dir, backend='onnxruntime', device='cpu', threads=1)
    flow, valid = b.infer(p0, p1)
    enc = b.encode_sweep(b.pillarize(p0))
    assert enc.encoded is not None  # it did split: the pair call below runs the pair part only
    f2, v2 = b.infer_pillars(enc, b.pillarize(p1))
    assert np.array_equal(v2, valid) and np.abs(f2 - flow).max() <= 1e-6
    sp = split_sweep_part((model_dir / 'model.onnx').read_bytes())
    assert sp.pass_through == ['idx0'] and sp.sweep_nodes > 10 and len(sp.cut) >= 4
    assert any('/unet/stages.' in c for c in sp.cut)  # the UNet stages of sweep t are in the sweep part
    off = create_backend(model_dir, backend='onnxruntime', device='cpu', threads=1,
                         options={'onnxruntime': {'split': False}})
    assert off.encode_sweep(off.pillarize(p0)).encoded is None
