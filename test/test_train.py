"""Training: dataset + augmentation, overfitting one pair, exact resume, CLI and config errors (CPU)."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.feather as feather
import pytest
import torch

from zeroflow_ros.model import get_config, load_checkpoint, read_checkpoint
from zeroflow_training.dataset import AugmentConfig, DatasetError, PairDataset, collate, list_pairs
from zeroflow_training.losses import get_loss
from zeroflow_training.train import TrainConfig, TrainError, train

# 64x64 pillars of 0.8 m and narrow stages: a few ms per step on one core
TINY = dict(point_cloud_range=[-25.6, -25.6, -3.0, 25.6, 25.6, 3.0], pillar_size=0.8, embed_channels=8,
            stage_channels=[16, 16, 16], stage_blocks=[1, 1, 1], head_hidden=16)


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    """One synthetic train log of 4 sweeps (3 pairs), one val log of 2, labels = its exact GT flow."""
    from zeroflow_training.data.synth import make_tiny_dataset
    root = tmp_path_factory.mktemp('synth')
    make_tiny_dataset(root, logs=1, sweeps=4, split='train', seed=0)
    make_tiny_dataset(root, logs=1, sweeps=2, split='val', seed=0)
    labels = root / 'labels'
    for f in sorted((root / 'train').glob('*/scene_flow/*.feather')):
        t = feather.read_table(f)
        out = labels / f.parent.parent.name / f.name
        out.parent.mkdir(parents=True, exist_ok=True)
        cols = ['flow_tx_m', 'flow_ty_m', 'flow_tz_m', 'is_valid', 'is_dynamic']
        feather.write_feather(t.select(cols), out)
    return root, labels


def _cfg(**kw) -> TrainConfig:
    base = dict(model='cpu_small', model_overrides=dict(TINY), lr=3e-3, scheduler='constant', epochs=2,
                batch_size=1, num_workers=0, amp='none', seed=3, val_max_pairs=1)
    base.update(kw)
    return TrainConfig.from_dict(base)


def _kabsch(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Orthogonal R (rotation or reflection) minimising |R a - b| (points through the origin)."""
    u, _, vt = np.linalg.svd(a.T.astype(np.float64) @ b.astype(np.float64))
    return (u @ vt).T


def test_augmentation_moves_points_and_labels_together(data):
    root, labels = data
    cfg = get_config('cpu_small', **TINY)
    plain = PairDataset(root, 'train', labels, cfg)
    aug = PairDataset(root, 'train', labels, cfg, augment=AugmentConfig(yaw=True, flip=True), seed=7)
    flips = set()
    for epoch in range(4):
        a, b = plain.load(1, 0), aug.load(1, epoch)
        # recover the transform from the points alone (index maps the kept rows of the sweep)
        _, ia, ib = np.intersect1d(a['index0'], b['index0'], return_indices=True)
        assert len(ia) > 0.5 * len(a['index0'])
        R = _kabsch(a['pc0'][ia], b['pc0'][ib])
        np.testing.assert_allclose(a['pc0'][ia] @ R.T, b['pc0'][ib], atol=2e-4)
        np.testing.assert_allclose(R[2], [0, 0, 1], atol=1e-6)  # about z only
        # the labels and the second sweep followed the same transform
        np.testing.assert_allclose(a['target'][ia] @ R.T, b['target'][ib], atol=2e-5)
        np.testing.assert_array_equal(a['valid'][ia], b['valid'][ib])
        _, ja, jb = np.intersect1d(a['index1'], b['index1'], return_indices=True)
        np.testing.assert_allclose(a['pc1'][ja] @ R.T, b['pc1'][jb], atol=2e-4)
        flips.add(bool(np.linalg.det(R) < 0))
        # same seed/epoch/index: same draw (workers and resumes do not change augmentation)
        np.testing.assert_array_equal(aug.load(1, epoch)['pc0'], b['pc0'])
    assert flips == {True, False}


def test_tiny_model_overfits_one_pair(data):
    root, labels = data
    cfg = get_config('cpu_small', **TINY)
    item = PairDataset(root, 'train', labels, cfg).load(0)
    b = collate([item], cfg.grid.num_pillars)
    target = b['target'][b['valid']]
    moving = target.norm(dim=1) > 0.05
    assert b['valid'].sum() > 1000 and moving.sum() > 50  # something moves
    torch.manual_seed(0)
    from zeroflow_ros.model import FastFlow3D
    model = FastFlow3D(cfg)
    steps = 120
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    loss_fn = get_loss('zeroflow_speed_scaled')
    losses = []
    for _ in range(steps):
        out = loss_fn(model(b['pc0'], b['idx0'], b['pc1'], b['idx1']), b['target'], b['valid'])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        sched.step()
        losses.append(out.logs['loss'])
    assert losses[-1] < losses[0] / 10, losses[::10]
    with torch.no_grad():
        err = (model(b['pc0'], b['idx0'], b['pc1'], b['idx1']) - b['target']).norm(dim=1)
    err = err[b['valid']]
    # movers are learnt to a few % of their motion; static points (weight 0.1) to centimetres
    assert err[moving].mean() < 0.15 * target[moving].norm(dim=1).mean(), err[moving].mean()
    assert err[~moving].mean() < 0.1 and err.mean() < 0.1, (err[~moving].mean(), err.mean())


def _train_losses(run: Path) -> list[tuple[int, str]]:
    with open(run / 'metrics.csv') as f:
        return [(int(r['step']), r['loss']) for r in csv.DictReader(f) if r['split'] == 'train']


def test_resume_reproduces_the_uninterrupted_run_exactly(data, tmp_path):
    root, labels = data
    # 3 pairs, batch 1: 3 steps per epoch; stops at 2 (mid-epoch) and 4 (after the warm-up loss ends)
    cfg = _cfg(epochs=2, warmup_loss='zeroflow_speed_scaled_sq', warmup_loss_epochs=1)
    a = train(cfg, root, labels, tmp_path / 'a', val_split=None, max_steps=4, progress=False)
    assert a['stopped'] == 'max_steps' and a['step'] == 4
    b1 = train(cfg, root, labels, tmp_path / 'b', val_split=None, max_steps=2, progress=False)
    assert b1['step'] == 2
    with pytest.raises(TrainError, match='pass --resume'):
        train(cfg, root, labels, tmp_path / 'b', val_split=None, max_steps=4, progress=False)
    b2 = train(cfg, root, labels, tmp_path / 'b', resume=True, val_split=None, max_steps=4, progress=False)
    assert b2['step'] == 4
    la, lb = _train_losses(tmp_path / 'a'), _train_losses(tmp_path / 'b')
    assert [s for s, _ in la] == [1, 2, 3, 4] and la == lb  # bit-identical loss curve
    sa = read_checkpoint(tmp_path / 'a' / 'last.pt')
    sb = read_checkpoint(tmp_path / 'b' / 'last.pt')
    assert sa['step'] == sb['step'] == 4 and sa['epoch'] == sb['epoch'] == 1
    for k, v in sa['state_dict'].items():
        assert torch.equal(v, sb['state_dict'][k]), k
    # the warm-up loss really ran: same weights and batch at step 1, same EPE, a different loss
    plain = train(_cfg(epochs=1), root, labels, tmp_path / 'p', val_split=None, max_steps=1, progress=False)
    assert plain['step'] == 1
    first_a = next(csv.DictReader(open(tmp_path / 'a' / 'metrics.csv')))
    first_p = next(csv.DictReader(open(tmp_path / 'p' / 'metrics.csv')))
    assert first_a['epe'] == first_p['epe'] and first_a['loss'] != first_p['loss']
    wider = _cfg(epochs=2, model_overrides={**TINY, 'head_hidden': 32})
    with pytest.raises(TrainError, match='differs from the config'):
        train(wider, root, labels, tmp_path / 'b', resume=True, val_split=None, max_steps=5, progress=False)
    with pytest.raises(TrainError, match='nothing to resume'):
        train(cfg, root, labels, tmp_path / 'c', resume=True, val_split=None, progress=False)


def test_cli_full_run_validates_and_writes_a_loadable_model(data, tmp_path):
    from zeroflow_ros.cli import main
    root, labels = data
    cfg_file = tmp_path / 'tiny.yaml'
    import yaml
    cfg_file.write_text(yaml.safe_dump(_cfg(epochs=1).to_dict()))
    run = tmp_path / 'run'
    rc = main(['train', '--labels', str(labels), '--data', str(root), '--config', str(cfg_file),
               '--out', str(run), '--no-progress', '--set', 'augment_yaw=false'])
    assert rc == 0
    rows = list(csv.DictReader(open(run / 'metrics.csv')))
    val = [r for r in rows if r['split'] == 'val']
    assert len(val) == 1 and float(val[0]['epe_3way']) > 0 and int(val[0]['pairs']) == 1
    model, meta = load_checkpoint(run / 'model.pt')
    assert meta['optimizer'] is None and meta['train_config']['augment_yaw'] is False
    assert model.cfg == get_config('cpu_small', **TINY) and meta['epoch'] == 1
    assert (run / 'last.pt').is_file() and (run / 'best.pt').is_file() and (run / 'config.yaml').is_file()
    # the epoch validation is the official evaluation: zeroflow predict + zeroflow eval agree
    import json
    pred = tmp_path / 'pred'
    # validation scores the network itself: predict without the node's post-network check
    assert main(['predict', str(root), '--split', 'val', '--method', 'student', '--model',
                 str(run / 'model.pt'), '--backend', 'torch', '--device', 'cpu', '--out', str(pred),
                 '--workers', '1', '--no-motion-evidence']) == 0
    assert main(['eval', str(pred), str(root), '--split', 'val', '--out', str(tmp_path / 'ev')]) == 0
    official = json.loads((tmp_path / 'ev' / 'metrics.json').read_text())['threeway']
    assert float(val[0]['epe_3way']) == pytest.approx(official['EPE 3-Way Average'], rel=1e-5)
    assert float(val[0]['dynamic_iou']) == pytest.approx(official['Dynamic IoU'], rel=1e-5)
    # bad input gives a clear message and exit code 2, not a traceback
    assert main(['train', '--labels', str(tmp_path / 'nope'), '--data', str(root), '--config', str(cfg_file),
                 '--out', str(tmp_path / 'r2')]) == 2


def test_config_and_label_errors(data, tmp_path):
    root, labels = data
    with pytest.raises(TrainError, match=r"unknown keys \['lrr'\]; valid: \['model'"):
        TrainConfig.from_dict({'lrr': 1})
    with pytest.raises(TrainError, match=r"unknown 'big'; valid: \['cpu_small', 'paper'\]"):
        TrainConfig.from_dict({'model': 'big'})
    with pytest.raises(TrainError, match="warmup_loss: unknown 'l3'"):
        TrainConfig.from_dict({'warmup_loss': 'l3', 'warmup_loss_epochs': 1})
    with pytest.raises(TrainError, match='set warmup_loss too'):
        TrainConfig.from_dict({'warmup_loss_epochs': 2})
    with pytest.raises(TrainError, match="amp: 'fp8'"):
        TrainConfig.from_dict({'amp': 'fp8'})
    with pytest.raises(TrainError, match='lr must be float'):
        TrainConfig.from_dict({'lr': 'fast'})
    assert TrainConfig.from_dict({'lr': '1e-4'}).lr == 1e-4  # YAML 1.1 reads 1e-4 as a string
    with pytest.raises(TrainError, match='shipped configs'):
        TrainConfig.from_yaml('no_such_config')
    assert TrainConfig.from_yaml('default').model == 'paper'
    assert TrainConfig.from_yaml('cpu_small').model == 'cpu_small'
    with pytest.raises(DatasetError, match='no sweep pair has a label file'):
        list_pairs(root, 'train', tmp_path)
    # a label file with the wrong number of rows names the file
    bad = tmp_path / 'bad'
    src = sorted(labels.glob('*/*.feather'))[0]
    (bad / src.parent.name).mkdir(parents=True)
    t = feather.read_table(src)
    feather.write_feather(t.slice(0, t.num_rows - 1), bad / src.parent.name / src.name)
    ds = PairDataset(root, 'train', bad, get_config('cpu_small', **TINY))
    assert len(ds) == 1
    with pytest.raises(DatasetError, match=rf'{src.name}: {t.num_rows - 1} rows, but the lidar sweep'):
        ds.load(0)
    feather.write_feather(pa.table({'flow_tx_m': t.column('flow_tx_m')}), bad / src.parent.name / src.name)
    with pytest.raises(DatasetError, match=r"missing columns \['flow_ty_m', 'flow_tz_m', 'is_valid'\]"):
        ds.load(0)


def test_ctrl_c_saves_a_checkpoint_and_resume_continues(data, tmp_path):
    """SIGINT to the whole process group (as a terminal's Ctrl-C, DataLoader worker included)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import yaml
    root, labels = data
    cfg_file = tmp_path / 'tiny.yaml'
    cfg_file.write_text(yaml.safe_dump(_cfg(epochs=1000, num_workers=1).to_dict()))
    run = tmp_path / 'run'
    cmd = [sys.executable, '-m', 'zeroflow_training.train', '--labels', str(labels), '--data', str(root),
           '--config', str(cfg_file), '--out', str(run), '--val-split', 'none', '--no-progress']
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    proc = subprocess.Popen(cmd, start_new_session=True, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and proc.poll() is None:
            if (run / 'metrics.csv').exists() and len(_train_losses(run)) >= 2:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.stdout.read()
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, out
    ck = read_checkpoint(run / 'last.pt')
    done = _train_losses(run)
    assert ck['step'] == len(done) >= 2 and ck['optimizer'] is not None
    slim = read_checkpoint(run / 'model.pt')  # the weights at the interrupt, ready for export
    assert slim['optimizer'] is None and slim['step'] == ck['step']
    assert all(torch.equal(v, ck['state_dict'][k]) for k, v in slim['state_dict'].items())
    assert 'SIGINT' in out and '--resume' in out
    # resume picks up at the next step
    cfg = _cfg(epochs=1000, num_workers=0)
    res = train(cfg, root, labels, run, resume=True, val_split=None, max_steps=ck['step'] + 1, progress=False)
    assert res['step'] == ck['step'] + 1
    assert [s for s, _ in _train_losses(run)] == list(range(1, ck['step'] + 2))


def test_dataset_applies_the_label_refinement(data):
    from zeroflow_training.refine import RefineConfig
    root, labels = data
    cfg = get_config('cpu_small', **TINY)
    raw = PairDataset(root, 'train', labels, cfg)
    ref = PairDataset(root, 'train', labels, cfg, refine=RefineConfig())
    for i in range(len(raw)):
        a, b = raw.load(i), ref.load(i)
        np.testing.assert_array_equal(a['pc0'], b['pc0'])
        np.testing.assert_array_equal(a['valid'], b['valid'])
        speed = np.linalg.norm(b['target'], axis=1)
        # below 0.05 m/frame exactly zero; every moving cluster carries one flow (its median)
        assert np.all(b['target'][speed < 0.05] == 0)
        moving = b['target'][speed > 0]
        assert len(np.unique(moving, axis=0)) < max(1, len(np.unique(a['target'], axis=0)) // 10)
        # the simulator's labels are exact, so the refinement moves movers by little
        dyn = np.linalg.norm(a['target'], axis=1) > 0.1
        if dyn.any():
            assert np.median(np.linalg.norm(a['target'][dyn] - b['target'][dyn], axis=1)) < 0.05


def test_init_from_a_checkpoint_starts_from_its_weights(data, tmp_path):
    root, labels = data
    a = train(_cfg(epochs=1), root, labels, tmp_path / 'a', val_split=None, progress=False)
    assert a['step'] == 3
    src = read_checkpoint(tmp_path / 'a' / 'model.pt')['state_dict']
    # a step at a negligible lr leaves every learned weight where the checkpoint had it
    b = train(_cfg(epochs=1, lr=1e-12, init_from=str(tmp_path / 'a' / 'model.pt')), root, labels,
              tmp_path / 'b', val_split=None, max_steps=1, progress=False)
    assert b['step'] == 1
    got = read_checkpoint(tmp_path / 'b' / 'model.pt')['state_dict']
    fresh = train(_cfg(epochs=1, lr=1e-12), root, labels, tmp_path / 'c', val_split=None, max_steps=1,
                  progress=False)
    assert fresh['step'] == 1
    other = read_checkpoint(tmp_path / 'c' / 'model.pt')['state_dict']
    weights = [k for k in src if k.endswith('weight') and src[k].ndim > 1]
    assert weights
    for k in weights:
        torch.testing.assert_close(got[k], src[k], rtol=0, atol=1e-9)
    assert any(not torch.allclose(other[k], src[k]) for k in weights)
    wider = _cfg(epochs=1, model_overrides={**TINY, 'head_hidden': 32},
                 init_from=str(tmp_path / 'a' / 'model.pt'))
    with pytest.raises(TrainError, match='init_from: .* holds model .* but this run trains'):
        train(wider, root, labels, tmp_path / 'd', val_split=None, progress=False)
    with pytest.raises(TrainError, match='init_from: .*checkpoint not found'):
        train(_cfg(init_from=str(tmp_path / 'nope.pt')), root, labels, tmp_path / 'e', val_split=None,
              progress=False)
