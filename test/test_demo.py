"""zeroflow demo end to end on the synthetic option: sequence -> bag -> node process -> flow bag -> pictures.

The summary's figures are checked against the files: flow count, backend, and the EPE recomputed
here from the recorded bag and the ground-truth feather files with numpy/pyarrow/scipy only.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip('rclpy')

SWEEPS = 3


def _tiny_model(path: Path) -> Path:
    import torch

    from zeroflow_ros.model import build_model, get_config, save_checkpoint
    torch.manual_seed(1)
    cfg = get_config('cpu_small', pillar_size=0.8, embed_channels=8, stage_channels=(8, 16),
                     stage_blocks=(1, 1), head_hidden=8)
    return save_checkpoint(path, build_model(cfg))


def _flow_messages(bag: Path) -> list:
    from rosbags.rosbag2 import Reader

    from zeroflow_ros.data.bag import typestore
    ts = typestore()
    with Reader(bag) as r:
        conns = [c for c in r.connections if c.topic.endswith('/output/flow')]
        return [ts.deserialize_cdr(raw, c.msgtype) for c, _, raw in r.messages(connections=conns)]


def _field(msg, name: str) -> np.ndarray:
    f = {x.name: x for x in msg.fields}[name]
    raw = np.frombuffer(bytes(msg.data), np.uint8).reshape(-1, msg.point_step)
    return raw[:, f.offset:f.offset + 4].copy().view('<f4').reshape(-1)


def _pose(table, ts: int) -> np.ndarray:
    from scipy.spatial.transform import Rotation
    row = table[table['timestamp_ns'] == ts].iloc[0]
    T = np.eye(4)
    T[:3, :3] = Rotation.from_quat([row.qx, row.qy, row.qz, row.qw]).as_matrix()
    T[:3, 3] = [row.tx_m, row.ty_m, row.tz_m]
    return T


def _reference_epe(flow_bag: Path, data_root: Path) -> float:
    """Mean |pred - GT| over valid non-ground points, GT made residual with the log's poses."""
    import pandas as pd
    log_dir = next(data_root.glob('val/*'))
    poses = pd.read_feather(log_dir / 'city_SE3_egovehicle.feather')
    stamps = sorted(int(p.stem) for p in (log_dir / 'sensors' / 'lidar').glob('*.feather'))
    errs = []
    for msg in _flow_messages(flow_bag):
        t0 = msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec
        t1 = stamps[stamps.index(t0) + 1]
        gt = pd.read_feather(log_dir / 'scene_flow' / f'{t0}.feather')
        p = np.stack([_field(msg, c) for c in 'xyz'], axis=1).astype(np.float64)
        pred = np.stack([_field(msg, c) for c in ('flow_x', 'flow_y', 'flow_z')], axis=1).astype(np.float64)
        f = gt[['flow_tx_m', 'flow_ty_m', 'flow_tz_m']].to_numpy(np.float64)
        ego1_T_ego0 = np.linalg.inv(_pose(poses, t1)) @ _pose(poses, t0)
        inv = np.linalg.inv(ego1_T_ego0)
        gt_res = (p + f) @ inv[:3, :3].T + inv[:3, 3] - p
        valid = gt['is_valid'].to_numpy(bool) & ~gt['is_ground'].to_numpy(bool)
        errs.append(np.linalg.norm(pred - gt_res, axis=1)[valid])
    return float(np.concatenate(errs).mean())


def test_demo_synthetic_end_to_end(ros_domain, tmp_path):
    from PIL import Image

    from zeroflow_ros.demo import run_demo
    model = _tiny_model(tmp_path / 'model.pt')
    frames = []
    res = run_demo('synthetic', tmp_path / 'demo', rate=0.0, sweeps=SWEEPS, model=str(model),
                   node_params=['backend:=torch', 'device:=cpu', 'warmup_iterations:=1'],
                   beams=8, azimuths=400, render_px=160, on_frame=frames.append)
    assert (res.sweeps_in, res.flows_out, res.expected, res.dropped) == (SWEEPS, SWEEPS - 1, SWEEPS - 1, 0)
    assert len(frames) == SWEEPS - 1 and all(f.latency_ms > 0 for f in frames)
    assert 0 < res.latency_p50_ms <= res.latency_p99_ms < 60_000
    assert (res.backend, res.device, res.model_trained) == ('torch', 'cpu', True)
    line = res.line()
    for part in (f'sweeps in {SWEEPS}', f'flows out {SWEEPS - 1}/{SWEEPS - 1}', 'dropped 0', 'latency p50',
                 'backend torch/cpu', 'EPE'):
        assert part in line, line

    # files: input bag, flow bag with one flow per sweep after the first, PNGs, GIF
    assert (res.input_bag / 'metadata.yaml').is_file() and (res.output_bag / 'metadata.yaml').is_file()
    assert len(_flow_messages(res.output_bag)) == SWEEPS - 1
    assert len(res.pngs) == SWEEPS - 1
    for p in res.pngs:
        assert Image.open(p).size == (3 * 160, 160)  # prediction | ground truth | error
    assert Image.open(res.gif).n_frames == SWEEPS - 1

    assert (tmp_path / 'demo' / 'summary.txt').read_text().strip() == line
    assert f'"flows_out": {SWEEPS - 1},' in (tmp_path / 'demo' / 'replay.json').read_text()

    # the reported EPE is the EPE of what was recorded
    assert res.epe_m == pytest.approx(_reference_epe(res.output_bag, tmp_path / 'demo' / 'synthetic'),
                                      rel=1e-5)
    assert res.epe_dynamic_m is not None and res.epe_dynamic_m > 0


def test_demo_rejects_bad_arguments(tmp_path):
    from zeroflow_ros.demo import DemoError, run_demo
    with pytest.raises(DemoError, match='--sequence'):
        run_demo('moon', tmp_path)
    with pytest.raises(DemoError, match='at least 2 sweeps'):
        run_demo('kitti', tmp_path, sweeps=1)


def test_demo_kitti_real_sweeps_through_the_node(ros_domain, tmp_path):
    """The default sequence: real KITTI sweeps, no poses (the node's lidar odometry), into the flow bag."""
    from zeroflow_ros.demo import find_kitti_sequence, run_demo
    model = _tiny_model(tmp_path / 'model.pt')
    res = run_demo('kitti', tmp_path / 'demo', rate=0.0, sweeps=3, model=str(model),
                   node_params=['backend:=torch', 'device:=cpu', 'warmup_iterations:=0'],
                   render_px=120, gif=False)
    assert (res.sweeps_in, res.flows_out, res.dropped, res.epe_m) == (3, 2, 0, None)
    assert 'EPE' not in res.line() and len(res.pngs) == 2
    bins = sorted(find_kitti_sequence().glob('*.bin'))
    for k, msg in enumerate(_flow_messages(res.output_bag)):
        ref = np.fromfile(bins[k], dtype='<f4').reshape(-1, 4)[:, :3]
        got = np.stack([_field(msg, c) for c in 'xyz'], axis=1)
        np.testing.assert_array_equal(got, ref)
        assert msg.header.frame_id == 'velodyne'
        assert msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec == 10**9 + k * 10**8
