"""FastFlow3D model, pillar pre-step and checkpoints (CPU, tiny grids, seconds)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from zeroflow_ros.core.voxelize import PillarGrid, VoxelizeError, pillar_centers, pillarize
from zeroflow_ros.model import (
    MODEL_CONFIGS, FastFlow3D, FastFlow3DConfig, ModelError, build_model, collate_pillars, dense_macs,
    get_config, load_checkpoint, predict_flow, save_checkpoint)

TINY = FastFlow3DConfig(name='tiny', point_cloud_range=(-6.4, -3.2, -2.0, 6.4, 3.2, 2.0), pillar_size=0.4,
                        embed_channels=8, stage_channels=(8, 16), stage_blocks=(1, 2), head_hidden=16)


def _cloud(n: int, cfg: FastFlow3DConfig, seed: int = 0, margin: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    lo = np.array(cfg.point_cloud_range[:3]) - margin
    hi = np.array(cfg.point_cloud_range[3:]) + margin
    return rng.uniform(lo, hi, (n, 3)).astype(np.float32)


def _randomise_bn(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) * 0.2 - 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


# --- pillar pre-step ------------------------------------------------------------------------

def test_pillarize_matches_brute_force_with_borders_and_garbage():
    g = TINY.grid
    pts = _cloud(3000, TINY)
    # exact borders (min is in, max is out), pillar edges, NaN/inf
    # float32(-6.4) is just below -6.4: out, like the float64 reference says
    extra = np.array([[-6.0, 0.0, -2.0], [6.4, 0, 0], [0, 3.2, 0], [0, 0, 2.0], [6.3999, 3.1999, 1.9999],
                      [0.4, 0.8, 0.0], [np.nan, 0, 0], [0, np.inf, 0], [-0.0, -0.0, 0],
                      [-6.4, -3.2, -2.0]], dtype=np.float32)
    pts = np.concatenate([pts, extra])
    keep, kept, idx = pillarize(pts, TINY)
    # reference: per point, a scalar loop with bin edges from the grid definition
    xe = [g.x_min + i * g.pillar_size for i in range(g.nx + 1)]
    ye = [g.y_min + i * g.pillar_size for i in range(g.ny + 1)]
    ref_keep, ref_idx = [], []
    for x, y, z in pts.astype(np.float64):
        ok = all(map(math.isfinite, (x, y, z))) and g.x_min <= x < g.x_max and g.y_min <= y < g.y_max \
            and g.z_min <= z < g.z_max
        ref_keep.append(ok)
        if ok:
            ix = max(i for i in range(g.nx) if xe[i] <= x + 1e-9)
            iy = max(i for i in range(g.ny) if ye[i] <= y + 1e-9)
            ref_idx.append(iy * g.nx + ix)
    np.testing.assert_array_equal(keep, ref_keep)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_array_equal(kept, pts[keep])
    assert kept.dtype == np.float32 and idx.dtype == np.int64
    assert keep[-10] and not keep[-9] and not keep[-8] and not keep[-7] and keep[-6] and not keep[-4]
    assert not keep[-1] and keep[-2]
    # row y=0 is 8 (of 16), x=-6.0 starts column 1 (of 32)
    assert idx[np.flatnonzero(keep).tolist().index(len(pts) - 10)] == 8 * 32 + 1
    # every kept point lies inside its pillar
    c = pillar_centers(idx, TINY)
    assert np.all(np.abs(kept[:, :2] - c[:, :2]) <= g.pillar_size / 2 + 1e-5)


def test_pillarize_rejects_bad_shapes():
    with pytest.raises(VoxelizeError, match=r'\(N,3\)'):
        pillarize(np.zeros((5, 4), np.float32), TINY)
    with pytest.raises(VoxelizeError, match='float'):
        pillarize(np.zeros((5, 3), np.int32), TINY)
    keep, pts, idx = pillarize(np.zeros((0, 3), np.float32), TINY)
    assert keep.shape == (0,) and pts.shape == (0, 3) and idx.shape == (0,)


def test_grid_rounds_and_fails_fast_with_a_fix():
    assert PillarGrid(pillar_size=0.2).shape == (512, 512)   # 102.4 / 0.2 is 511.99999... in float
    assert get_config('paper').grid.shape == (512, 512)
    with pytest.raises(VoxelizeError, match=r'not a whole number.*102\.2 m or 102\.4 m'):
        PillarGrid(x_min=-51.2, x_max=51.1, pillar_size=0.2)
    with pytest.raises(ModelError, match='multiple of 8'):
        FastFlow3DConfig(point_cloud_range=(-50.0, -50.0, -3, 50.0, 50.0, 3), pillar_size=0.4)  # 250 pillars
    with pytest.raises(ModelError, match="unknown model config 'nope'.*cpu_small.*paper"):
        get_config('nope')


def test_paper_config_matches_zeroflow_size():
    cfg = get_config('paper')
    assert cfg.grid.shape == (512, 512) and cfg.pillar_size == 0.2 and cfg.point_cloud_range[3] == 51.2
    n = FastFlow3D(cfg).num_parameters()
    assert 6.7e6 < n < 6.9e6, n  # ZeroFlow's FastFlow3D is ~6.8 M parameters
    assert set(MODEL_CONFIGS) >= {'paper', 'cpu_small'}


def test_cpu_small_is_at_least_20x_cheaper_and_the_cost_model_is_exact():
    # reference: count the MACs of every Conv2d in an actual forward pass
    model = FastFlow3D(TINY).eval()
    macs = []

    def count(mod, inputs, out):
        macs.append(out.numel() * mod.in_channels * mod.kernel_size[0] * mod.kernel_size[1])
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(count)
    pts, idx = torch.zeros(4, 3), torch.zeros(4, dtype=torch.long)
    with torch.no_grad():
        model(pts, idx, pts, idx)
    assert dense_macs(TINY) == sum(macs)
    assert dense_macs(get_config('paper')) / dense_macs(get_config('cpu_small')) >= 20


# --- network ----------------------------------------------------------------------------------

def test_encoder_is_a_scatter_mean_of_point_embeddings():
    torch.manual_seed(0)
    model = FastFlow3D(TINY).eval()
    _randomise_bn(model)
    pts = _cloud(400, TINY, margin=-0.5)
    pts[:50] = pts[0]  # many duplicates in one pillar
    _, p, i = pillarize(pts, TINY)
    emb, off, image = model.encoder(torch.from_numpy(p), torch.from_numpy(i))
    g = TINY.grid
    # brute force: features and means per pillar with numpy loops
    lin = model.encoder.linear.weight.detach().numpy().astype(np.float64)
    bn = model.encoder.norm
    ref_img = np.zeros((g.num_pillars, TINY.embed_channels))
    centers = pillar_centers(i, TINY)
    for pillar in np.unique(i):
        sel = np.flatnonzero(i == pillar)
        q = p[sel].astype(np.float64)
        f = np.concatenate([q, q - q.mean(0), q - centers[sel]], axis=1) @ lin.T
        scale = bn.weight.detach().numpy() / np.sqrt(bn.running_var.numpy() + bn.eps)
        f = (f - bn.running_mean.numpy()) * scale + bn.bias.detach().numpy()
        f = np.maximum(f, 0)
        np.testing.assert_allclose(emb.detach().numpy()[sel], f, atol=1e-5)
        ref_img[pillar] = f.mean(0)
    got = image[0].permute(1, 2, 0).reshape(-1, TINY.embed_channels).detach().numpy()
    np.testing.assert_allclose(got, ref_img, atol=1e-5)
    np.testing.assert_allclose(off.numpy(), p - centers, atol=1e-5)


def test_forward_equivariance_and_batching():
    torch.manual_seed(0)
    model = FastFlow3D(TINY).eval()
    _randomise_bn(model)
    a, b = _cloud(500, TINY, 1), _cloud(450, TINY, 2)
    _, p0, i0 = pillarize(a, TINY)
    _, p1, i1 = pillarize(b, TINY)
    t = [torch.from_numpy(x) for x in (p0, i0, p1, i1)]
    with torch.no_grad():
        flow = model(*t)
        assert flow.shape == (len(p0), 3) and torch.isfinite(flow).all()
        perm0, perm1 = torch.randperm(len(p0)), torch.randperm(len(p1))
        flow_p = model(t[0][perm0], t[1][perm0], t[2][perm1], t[3][perm1])
        torch.testing.assert_close(flow_p, flow[perm0], atol=1e-5, rtol=1e-5)
        # the second sweep matters: the network is not a per-sweep function
        assert (model(t[0], t[1], t[0], t[1]) - flow).abs().max() > 1e-4
        # a batch of two pairs gives each pair's own flow
        _, q0, j0 = pillarize(b, TINY)
        _, q1, j1 = pillarize(a, TINY)
        u = [torch.from_numpy(x) for x in (q0, j0, q1, j1)]
        bp0, bi0 = collate_pillars([(t[0], t[1]), (u[0], u[1])], TINY)
        bp1, bi1 = collate_pillars([(t[2], t[3]), (u[2], u[3])], TINY)
        batched = model.forward_batch(bp0, bi0, bp1, bi1, 2)
        torch.testing.assert_close(batched[:len(p0)], flow, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(batched[len(p0):], model(*u), atol=1e-5, rtol=1e-5)


def test_predict_flow_covers_every_input_point():
    model = FastFlow3D(TINY).eval()
    pts = _cloud(300, TINY, 3, margin=2.0)
    flow, valid = predict_flow(model, pts, pts + 0.1)
    keep, _, _ = pillarize(pts, TINY)
    np.testing.assert_array_equal(valid, keep)
    assert flow.shape == (300, 3) and not flow[~valid].any() and (~valid).any()


# --- checkpoints --------------------------------------------------------------------------------

def test_checkpoint_round_trip_and_bad_files(tmp_path):
    torch.manual_seed(1)
    model = FastFlow3D(TINY)
    _randomise_bn(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    path = save_checkpoint(tmp_path / 'run' / 'model.pt', model, train_config={'lr': 1e-3}, epoch=3, step=42,
                           optimizer=opt, rng_state={'torch': torch.get_rng_state()})
    loaded, meta = load_checkpoint(path)
    assert not loaded.training and loaded.cfg == TINY
    assert meta['epoch'] == 3 and meta['step'] == 42 and meta['train_config'] == {'lr': 1e-3}
    assert meta['model_config']['stage_channels'] == [8, 16] and 'state_dict' not in meta
    pts = _cloud(200, TINY, 4)
    model.eval()
    np.testing.assert_array_equal(predict_flow(model, pts, pts)[0], predict_flow(loaded, pts, pts)[0])
    assert load_checkpoint(tmp_path / 'run')[0].cfg == TINY  # a model folder works too

    ck = torch.load(path, weights_only=True)
    ck['format_version'] = 99
    torch.save(ck, tmp_path / 'v99.pt')
    with pytest.raises(ModelError, match=r'format_version 99 .*supported: \[1\]'):
        load_checkpoint(tmp_path / 'v99.pt')
    (tmp_path / 'junk.pt').write_bytes(b'not a checkpoint')
    with pytest.raises(ModelError, match='junk.pt: not a zeroflow checkpoint'):
        load_checkpoint(tmp_path / 'junk.pt')
    with pytest.raises(ModelError, match='not found'):
        load_checkpoint(tmp_path / 'missing.pt')
    ck = torch.load(path, weights_only=True)
    ck['model_config']['embed_channels'] = 4
    torch.save(ck, tmp_path / 'mismatch.pt')
    with pytest.raises(ModelError, match='state_dict does not match'):
        load_checkpoint(tmp_path / 'mismatch.pt')


def test_onnx_export_keeps_duplicate_pillar_sums(tmp_path):
    """The exported graph must sum duplicate pillar indices (index_add export keeps only one)."""
    ort = pytest.importorskip('onnxruntime')
    torch.manual_seed(2)
    model = build_model(TINY).eval()
    _randomise_bn(model)
    a = _cloud(600, TINY, 5, margin=-0.2)
    a[:100] = a[:100] * 0.01  # crowd one pillar
    _, p0, i0 = pillarize(a, TINY)
    _, p1, i1 = pillarize(a + 0.3, TINY)
    args = tuple(torch.from_numpy(x) for x in (p0, i0, p1, i1))
    path = tmp_path / 'm.onnx'
    torch.onnx.export(model, args, str(path), input_names=['pc0', 'idx0', 'pc1', 'idx1'],
                      output_names=['flow'],
                      dynamic_axes={'pc0': {0: 'K0'}, 'idx0': {0: 'K0'}, 'pc1': {0: 'K1'}, 'idx1': {0: 'K1'},
                                    'flow': {0: 'K0'}}, opset_version=17, dynamo=False)
    sess = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    b = _cloud(333, TINY, 6)  # another size: the axes really are dynamic
    _, q0, j0 = pillarize(b, TINY)
    _, q1, j1 = pillarize(b[::-1].copy(), TINY)
    for feed in ((p0, i0, p1, i1), (q0, j0, q1, j1)):
        got = sess.run(None, dict(zip(['pc0', 'idx0', 'pc1', 'idx1'], feed)))[0]
        with torch.no_grad():
            ref = model(*(torch.from_numpy(x) for x in feed)).numpy()
        np.testing.assert_allclose(got, ref, atol=1e-4)
