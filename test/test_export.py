"""ONNX export and manifest: graph validity, dynamic point count, parity with torch on real lidar."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import yaml

onnx = pytest.importorskip('onnx')
ort = pytest.importorskip('onnxruntime')
torch = pytest.importorskip('torch')

from zeroflow_ros.core.voxelize import PillarGrid, pillarize  # noqa: E402
from zeroflow_ros.manifest import (MANIFEST_NAME, SUPPORTED_VERSIONS, ManifestError,  # noqa: E402
                                   load_manifest)
from zeroflow_ros.model import FastFlow3DConfig, load_checkpoint  # noqa: E402
from zeroflow_training.export import (ExportError, export_onnx, make_random_checkpoint,  # noqa: E402
                                      randomize_batchnorm)

ROOT = Path(__file__).resolve().parents[1]
PAIR = ROOT / 'data' / 'samples' / 'opensceneflow_pair'
KITTI = ROOT / 'data' / 'samples' / 'kitti_raw_sfnd_seq' / 'velodyne_points' / 'data'
# A small grid and narrow UNet keep export + runs to seconds; the structure is the paper's.
TINY = dict(name='test_tiny', pillar_size=0.8, embed_channels=8, stage_channels=(8, 16),
            stage_blocks=(1, 2), head_hidden=8)


def _kitti(i: int) -> np.ndarray:
    return np.fromfile(KITTI / f'{i:010d}.bin', dtype='<f4').reshape(-1, 4)[:, :3].copy()


def _spread(points: np.ndarray, n: int) -> np.ndarray:
    """N in-range points spread over the scan (so n == 1 still reaches the network)."""
    inside = points[np.abs(points[:, :2]).max(axis=1) < 50.0]
    inside = inside[np.abs(inside[:, 2]) < 2.9]
    return inside[np.linspace(0, len(inside) - 1, n).astype(int)]


@pytest.fixture(scope='module')
def tiny_export(tmp_path_factory):
    d = tmp_path_factory.mktemp('tiny')
    ckpt = make_random_checkpoint(FastFlow3DConfig(**TINY), d / 'model.pt', seed=3)
    manifest = export_onnx(ckpt, d / 'model.onnx', verify=False)
    return d, manifest


def _run_both(model_dir: Path, p0: np.ndarray, p1: np.ndarray):
    model, _ = load_checkpoint(model_dir / 'model.pt')
    _, c0, i0 = pillarize(p0, model.cfg)
    _, c1, i1 = pillarize(p1, model.cfg)
    with torch.no_grad():
        ref = model(*(torch.from_numpy(a) for a in (c0, i0, c1, i1))).numpy()
    sess = ort.InferenceSession(str(model_dir / 'model.onnx'), providers=['CPUExecutionProvider'])
    (got,) = sess.run(['flow'], {'pc0': c0, 'idx0': i0, 'pc1': c1, 'idx1': i1})
    return ref, got


def test_graph_is_valid_with_dynamic_points_and_manifest_matches(tiny_export):
    d, m = tiny_export
    path = d / 'model.onnx'
    onnx.checker.check_model(str(path), full_check=True)
    proto = onnx.load(str(path))
    # manifest facts against independent readings of the file
    assert m.onnx_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert m.onnx_bytes == path.stat().st_size
    assert m.opset == {o.domain or 'ai.onnx': o.version for o in proto.opset_import}['ai.onnx'] == 17
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
            for i in proto.graph.input}
    assert dims == {'pc0': ['K0', 3], 'idx0': ['K0'], 'pc1': ['K1', 3], 'idx1': ['K1']}
    types = {i.name: i.type.tensor_type.elem_type for i in proto.graph.input}
    assert types == {'pc0': onnx.TensorProto.FLOAT, 'idx0': onnx.TensorProto.INT64,
                     'pc1': onnx.TensorProto.FLOAT, 'idx1': onnx.TensorProto.INT64}
    assert [o.name for o in proto.graph.output] == ['flow']
    on_disk = yaml.safe_load((d / MANIFEST_NAME).read_text())
    assert on_disk['grid']['pillar_size'] == 0.8 and on_disk['model_config']['name'] == 'test_tiny'
    assert [t['name'] for t in on_disk['inputs']] == ['pc0', 'idx0', 'pc1', 'idx1']
    assert on_disk['source_checkpoint']['sha256'] == hashlib.sha256((d / 'model.pt').read_bytes()).hexdigest()
    assert on_disk['exported_at'].endswith('Z')
    loaded = load_manifest(d)
    assert loaded.inputs == m.inputs and loaded.onnx_sha256 == m.onnx_sha256


def test_dynamic_point_counts_match_torch(tiny_export):
    # several counts unlike the traced ones (4099/3851), including K1 != K0 and very few points
    d, _ = tiny_export
    p0, p1 = _kitti(0), _kitti(1)
    for n0, n1 in ((1, 1), (50, 20_000), (7_001, 300), (60_000, 60_000)):
        ref, got = _run_both(d, _spread(p0, n0), _spread(p1, n1))
        assert len(ref) == n0
        assert got.shape == ref.shape
        assert float(np.abs(got - ref).max()) <= 1e-4


def test_batchnorm_randomisation_is_not_identity():
    from zeroflow_ros.model import build_model

    model = build_model(FastFlow3DConfig(**TINY))
    randomize_batchnorm(model, seed=1)
    bn = model.encoder.norm
    assert float(bn.running_var.min()) >= 0.5 and float(bn.running_mean.abs().max()) > 0.1
    assert not torch.allclose(bn.weight, torch.ones_like(bn.weight))


def test_parity_paper_config_real_pair(tmp_path):
    """The one paper-config export: onnxruntime vs torch on the real OpenSceneFlow (AV2) pair."""
    ckpt = make_random_checkpoint('paper', tmp_path / 'model.pt', seed=0)
    m = export_onnx(ckpt, tmp_path / 'model.onnx', verify=False)
    assert m.model_config['name'] == 'paper' and PillarGrid.from_dict(m.grid).shape == (512, 512)
    p0 = np.load(PAIR / 'test_pc0.npy')[:, :3].astype(np.float32)
    p1 = np.load(PAIR / 'test_pc1.npy')[:, :3].astype(np.float32)
    ref, got = _run_both(tmp_path, p0, p1)
    assert len(ref) > 40_000
    # a parity test is only meaningful if the flow is not ~0 everywhere
    assert float(np.abs(ref).mean()) > 1e-2
    assert float(np.abs(got - ref).max()) <= 1e-4


def test_export_rejects_bad_paths(tmp_path, tiny_export):
    d, _ = tiny_export
    with pytest.raises(ExportError, match='.onnx'):
        export_onnx(d / 'model.pt', tmp_path / 'model.bin', verify=False)
    with pytest.raises(ExportError, match='not found'):
        export_onnx(tmp_path / 'missing.pt', tmp_path / 'model.onnx', verify=False)


def test_manifest_rejects_unknown_version_naming_supported(tmp_path, tiny_export):
    d, _ = tiny_export
    data = yaml.safe_load((d / MANIFEST_NAME).read_text())
    data['format_version'] = 99
    (tmp_path / MANIFEST_NAME).write_text(yaml.safe_dump(data))
    with pytest.raises(ManifestError) as exc:
        load_manifest(tmp_path)
    msg = str(exc.value)
    assert '99' in msg and str(SUPPORTED_VERSIONS[0]) in msg and MANIFEST_NAME in msg


@pytest.mark.parametrize('mutate, field', [
    (lambda d: d.pop('grid'), 'grid'),
    (lambda d: d['inputs'][0].update(dtype='float64'), 'dtype'),
    (lambda d: d['onnx'].pop('opset'), 'opset'),
    (lambda d: d.update(points={'min': 10, 'opt': 5, 'max': 20}), 'points'),
    (lambda d: d.update(inputs=[]), 'inputs'),
])
def test_manifest_bad_fields_are_named(tmp_path, tiny_export, mutate, field):
    d, _ = tiny_export
    data = yaml.safe_load((d / MANIFEST_NAME).read_text())
    mutate(data)
    (tmp_path / MANIFEST_NAME).write_text(yaml.safe_dump(data))
    with pytest.raises(ManifestError, match=field):
        load_manifest(tmp_path)


def test_verify_onnx_detects_changed_file(tmp_path, tiny_export):
    d, _ = tiny_export
    for name in ('model.onnx', MANIFEST_NAME):
        (tmp_path / name).write_bytes((d / name).read_bytes())
    m = load_manifest(tmp_path)
    m.verify_onnx()
    blob = bytearray((tmp_path / 'model.onnx').read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (tmp_path / 'model.onnx').write_bytes(bytes(blob))
    with pytest.raises(ManifestError, match='sha256'):
        m.verify_onnx()


def test_verify_parity_on_real_kitti_pair(tiny_export):
    from zeroflow_training.export import verify_parity

    d, m = tiny_export
    model, _ = load_checkpoint(d / 'model.pt')
    v = verify_parity(m, model)
    assert v['max_abs_diff_m'] <= 1e-4 and v['points0'] > 100_000 and v['points1'] > 100_000


def test_cli_export_random(tmp_path, capsys):
    from zeroflow_ros.cli import main

    rc = main(['export', 'onnx', '--random', 'cpu_small', '-o', str(tmp_path / 'm' / 'model.onnx'),
               '--points', '1,30000,120000', '--no-verify'])
    assert rc == 0
    assert 'model.onnx' in capsys.readouterr().out
    m = load_manifest(tmp_path / 'm')
    assert (m.points.min, m.points.opt, m.points.max) == (1, 30000, 120000)
    assert m.model_config['name'] == 'cpu_small' and m.verification == {}
    assert m.checkpoint_path == tmp_path / 'm' / 'model.pt'
    with pytest.raises(ExportError, match='--points'):
        main(['export', 'onnx', '--random', 'cpu_small', '-o', str(tmp_path / 'x.onnx'), '--points', 'a,b'])


def test_cli_tensorrt_reports_missing_gpu_or_tensorrt(tiny_export, capsys):
    from zeroflow_ros.cli import main

    d, _ = tiny_export
    try:
        import tensorrt  # noqa: F401
        has_trt = torch.cuda.is_available()
    except ImportError:
        has_trt = False
    if has_trt:
        pytest.skip('TensorRT and a GPU are present: the GPU tests in test_backends cover the build')
    rc = main(['export', 'tensorrt', str(d / 'model.onnx'), '--build-only'])
    assert rc == 1
    err = capsys.readouterr().err
    assert 'tensorrt' in err and ('not installed' in err or 'CUDA' in err)
