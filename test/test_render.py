"""zeroflow render: BEV pictures whose pixels show the motion where it is.

* a hand-built flow bag: an object moving forward (+x) and one moving left (+y) appear at their
  pixel positions in the hue that stdlib ``colorsys`` gives for those screen directions
  (up = 90 deg, left = 180 deg), saturated; static points stay grey; image sizes exact.
* a predictions folder on a synthetic log: predictions = ground truth -> coloured at the fastest
  ground-truth mover and EPE ~ 0; predictions = ego motion only (static world) -> grey there while
  the ground-truth panel is coloured, and the error panel reports the true error.
"""
from __future__ import annotations

import colorsys
from pathlib import Path

import numpy as np
import pytest


def _pixel_hsv(img: np.ndarray, row: int, col: int, half: int = 3) -> list[tuple[float, float, float]]:
    win = img[max(row - half, 0):row + half + 1, max(col - half, 0):col + half + 1, :3]
    return [colorsys.rgb_to_hsv(*px) for px in win.reshape(-1, 3)]


def _coloured(hsv: list[tuple[float, float, float]]) -> int:
    """Pixels clearly coloured (the background is a dark blue-grey, static points are grey)."""
    return sum(1 for _, s, v in hsv if s > 0.5 and v > 0.5)


def _read(path: Path) -> np.ndarray:
    from PIL import Image
    return np.asarray(Image.open(path).convert('RGB'), dtype=np.float64) / 255.0


def _flow_bag(path: Path) -> tuple[Path, dict[str, tuple[float, float]]]:
    """A bag with 2 flow clouds (node layout): static ring, block A moving +x, block B moving +y."""
    from rosbags.rosbag2 import StoragePlugin, Writer

    from zeroflow_ros.core import pointcloud2 as pc2
    from zeroflow_ros.data.bag import typestore
    ts = typestore()
    cls = ts.types['sensor_msgs/msg/PointCloud2']
    ang = np.linspace(0, 2 * np.pi, 2000, endpoint=False)
    ring = np.stack([15 * np.cos(ang), 15 * np.sin(ang), np.zeros_like(ang)], axis=1)
    g = np.stack(np.meshgrid(np.linspace(-0.6, 0.6, 13), np.linspace(-0.6, 0.6, 13)), -1).reshape(-1, 2)
    a = np.c_[g + [8.0, 4.0], np.zeros(len(g))]
    b = np.c_[g + [-6.0, -8.0], np.zeros(len(g))]
    pts = np.concatenate([ring, a, b]).astype(np.float32)
    flow = np.zeros_like(pts)
    flow[len(ring):len(ring) + len(a)] = [1.0, 0, 0]   # 10 m/s forward
    flow[len(ring) + len(a):] = [0, 1.0, 0]             # 10 m/s to the left
    speed = np.linalg.norm(flow, axis=1) * 10
    fields = {'flow_x': flow[:, 0], 'flow_y': flow[:, 1], 'flow_z': flow[:, 2], 'speed': speed,
              'is_dynamic': (speed > 0.5).astype(np.uint8)}
    w = Writer(path, version=Writer.VERSION_LATEST, storage_plugin=StoragePlugin.MCAP)
    w.open()
    conn = w.add_connection('/zf/output/flow', 'sensor_msgs/msg/PointCloud2', typestore=ts)
    for k in range(2):
        stamp = 10**9 + k * 10**8
        msg = pc2.encode(pts, fields, frame_id='lidar', stamp_ns=stamp, msg_cls=cls)
        w.write(conn, stamp, ts.serialize_cdr(msg, 'sensor_msgs/msg/PointCloud2'))
    w.close()
    return path, {'a': (8.0, 4.0), 'b': (-6.0, -8.0), 'ring': (15.0, 0.0)}


def test_bag_render_colours_motion_where_it_is(tmp_path):
    from zeroflow_ros.render import RenderConfig, render
    bag, where = _flow_bag(tmp_path / 'flow')
    cfg = RenderConfig(range_m=20.0, px=200, point_size=6.0, arrow_every=10_000, max_speed=10.0)
    res = render(bag, tmp_path / 'out', cfg, gif=True)
    assert len(res['pngs']) == 2 and res['epe'] is None
    img = _read(res['pngs'][0])
    assert img.shape == (200, 200, 3)
    for key, hue_deg in (('a', 90.0), ('b', 180.0)):
        hsv = _pixel_hsv(img, *cfg.pixel_of(*where[key]))
        match = [h for h, s, v in hsv if s > 0.8 and v > 0.8 and abs(h * 360 - hue_deg) < 6]
        assert match, f'object {key}: no saturated pixel of hue {hue_deg} deg at {cfg.pixel_of(*where[key])}'
    ring = _pixel_hsv(img, *cfg.pixel_of(*where['ring']))
    assert _coloured(ring) == 0                                   # static: no colour
    assert any(s < 0.02 and v > 0.4 for _, s, v in ring)          # ... but drawn, grey
    empty = _pixel_hsv(img, *cfg.pixel_of(0.0, 10.0))              # between the ring and block A
    assert _coloured(empty) == 0 and max(v for _, _, v in empty) < 0.2
    from PIL import Image
    gif = Image.open(res['gif'])
    assert gif.n_frames == 2 and gif.size == (100, 100)


def test_wheel_matches_point_colours():
    from zeroflow_ros.render import flow_colors, wheel_image
    img = wheel_image(101)
    # +x flow is "up" on screen: the top of the wheel; +y is "left": the left rim.
    for (row, col), f in (((1, 50), [1.0, 0, 0]), ((50, 1), [0, 1.0, 0]), ((99, 50), [-1.0, 0, 0])):
        ref = flow_colors(np.array([f]), np.array([1.0]), 1.0)[0]
        assert np.abs(img[row, col, :3] - ref).max() < 0.08
    assert img[50, 50, 3] == 1 and img[0, 0, 3] == 0


@pytest.fixture(scope='module')
def synth(tmp_path_factory):
    from zeroflow_ros.data.av2 import list_logs
    from zeroflow_training.data.synth import make_tiny_dataset
    root = make_tiny_dataset(tmp_path_factory.mktemp('render_synth'), logs=1, sweeps=2, beams=16,
                             azimuths=600)
    return root, list_logs(root, 'val')[0]


def _write_predictions(out: Path, log, flow_av2: np.ndarray, dyn: np.ndarray,
                       is_valid: np.ndarray | None = None) -> None:
    import pyarrow as pa
    import pyarrow.feather as feather
    ts0 = int(log.timestamps[0])
    (out / log.log_id).mkdir(parents=True, exist_ok=True)
    cols = {'flow_tx_m': flow_av2[:, 0], 'flow_ty_m': flow_av2[:, 1], 'flow_tz_m': flow_av2[:, 2],
            'is_dynamic': dyn}
    if is_valid is not None:  # pseudo-label files (zeroflow label) carry is_valid
        cols['is_valid'] = is_valid
    feather.write_feather(pa.table(cols), out / log.log_id / f'{ts0}.feather')


def test_predictions_folder_with_ground_truth(synth, tmp_path):
    from zeroflow_ros.core.geometry import av2_to_residual, ego_flow
    from zeroflow_ros.render import RenderConfig, render
    root, log = synth
    t0, t1 = (int(t) for t in log.timestamps[:2])
    pair = log.pair(t0, t1)
    gt = pair.gt
    res_gt = av2_to_residual(pair.points0, gt.flow, pair.ego1_T_ego0)
    speed = np.linalg.norm(res_gt, axis=1) / ((t1 - t0) / 1e9)
    cfg = RenderConfig(range_m=30.0, px=240, point_size=8.0, arrow_every=10_000, max_speed=10.0)
    inside = (np.abs(pair.points0[:, :2]) < 28).all(axis=1) & gt.is_valid & gt.is_dynamic
    assert inside.any(), 'the synthetic scene should have a mover in view'
    k = int(np.argmax(np.where(inside, speed, -1)))
    assert speed[k] > 2.0
    row, col = cfg.pixel_of(*pair.points0[k, :2])

    # 1) predictions = ground truth
    pred = tmp_path / 'pred_gt'
    _write_predictions(pred, log, gt.flow, gt.is_dynamic)
    out = render(pred, tmp_path / 'png_gt', cfg, gt_root=root)
    img = _read(out['pngs'][0])
    assert img.shape == (240, 3 * 240, 3)
    assert out['epe'] < 1e-3
    assert _coloured(_pixel_hsv(img, row, col)) > 0         # coloured in the prediction
    assert _coloured(_pixel_hsv(img, row, col + 240)) > 0   # and in the ground truth

    # 2) predictions = ego motion only: residual 0 everywhere
    pred = tmp_path / 'pred_static'
    _write_predictions(pred, log, ego_flow(pair.points0, pair.ego1_T_ego0), np.zeros(len(gt.flow), bool))
    out = render(pred, tmp_path / 'png_static', cfg, gt_root=root)
    img = _read(out['pngs'][0])
    assert _coloured(_pixel_hsv(img, row, col)) == 0        # grey: nothing moves
    assert _coloured(_pixel_hsv(img, row, col + 240)) > 0   # ground truth still coloured
    valid = gt.is_valid & ~gt.is_ground
    ref = float(np.linalg.norm(res_gt[valid], axis=1).mean())
    assert out['epe'] == pytest.approx(ref, rel=1e-4, abs=1e-6)
    # 3) pseudo-labels: the same flow marked invalid is not shown as motion
    labels = tmp_path / 'labels'
    _write_predictions(labels, log, gt.flow, gt.is_dynamic, is_valid=np.zeros(len(gt.flow), bool))
    img = _read(render(labels, tmp_path / 'png_labels', cfg, gt_root=root)['pngs'][0])
    assert _coloured(_pixel_hsv(img, row, col)) == 0
    # without --gt a predictions folder cannot be placed
    from zeroflow_ros.render import RenderError
    with pytest.raises(RenderError, match='needs --gt DATA_ROOT'):
        render(pred, tmp_path / 'x', cfg)


def test_bad_inputs(tmp_path):
    from zeroflow_ros.data.bag import CloudRecord, write_bag
    from zeroflow_ros.render import RenderConfig, RenderError, render
    (tmp_path / 'empty').mkdir()
    with pytest.raises(RenderError, match='no <log_id>/<ts_ns>.feather'):
        render(tmp_path / 'empty', tmp_path / 'o')
    bag, _ = write_bag(tmp_path / 'in.mcap', [CloudRecord(10**9, np.zeros((5, 3), np.float32), {})])
    with pytest.raises(RenderError,
                       match=r'cannot pick the flow topic.*/lidar \[sensor_msgs/msg/PointCloud2'):
        render(bag, tmp_path / 'o')
    with pytest.raises(RenderError, match=r"lacks fields \['flow_x', 'flow_y', 'flow_z'\]"):
        render(bag, tmp_path / 'o', topic='/lidar')
    with pytest.raises(RenderError, match='px'):
        RenderConfig(px=10)
