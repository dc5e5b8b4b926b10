"""AV2 reader against the official av2 package and the facts of the real sample (data/samples/SOURCES.md)."""
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.feather as feather
import pytest

from zeroflow_ros.core.geometry import (invert, make_transform, matrix_to_quat, quat_to_matrix,
                                        transform_points, yaw_transform)
from zeroflow_ros.data import av2 as zav2

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / 'data' / 'samples' / 'av2_sample'
LOG_ID = 'adcf7d18-0510-35b0-a2fa-b4cea13a6d76'
TS0 = 315973157959879000


@pytest.fixture(scope='module')
def sample_log():
    return zav2.AV2Log(SAMPLE / LOG_ID)


def test_sample_points_pose_and_listing(sample_log):
    assert [log.log_id for log in zav2.list_logs(SAMPLE, None)] == [LOG_ID]  # test_log has no sensors
    assert sample_log.timestamps.tolist() == [TS0]
    pts = sample_log.points(TS0)
    assert pts.shape == (100_660, 3) and pts.dtype == np.float32
    raw = feather.read_table(sample_log.lidar_path(TS0)).to_pandas()
    np.testing.assert_array_equal(pts[:, 0], raw['x'].to_numpy().astype(np.float32))
    # The exact pose row given in SOURCES.md.
    T = sample_log.pose(TS0)
    np.testing.assert_allclose(T[:3, 3], [1468.8715, 211.5118, 13.1372], atol=1e-4)
    np.testing.assert_allclose(T[:3, :3], quat_to_matrix(0.98601, 0.00508, 0.00324, 0.16657), atol=1e-4)
    assert len(sample_log.cuboids(TS0)) == 47
    assert list(sample_log.pairs()) == []  # one sweep: no pair


def test_sample_ground_matches_av2_map(sample_log):
    pytest.importorskip('av2')
    from av2.map.map_api import ArgoverseStaticMap
    avm = ArgoverseStaticMap.from_map_dir(SAMPLE / LOG_ID / 'map', build_raster=True)
    pts = sample_log.points(TS0)
    city = transform_points(sample_log.pose(TS0), pts.astype(np.float64))
    ref = avm.get_ground_points_boolean(city).astype(bool)
    ours = sample_log.ground_mask(pts, TS0)
    assert int(ref.sum()) == 14_549
    assert abs(int(ours.sum()) - 14_549) <= 5
    assert np.count_nonzero(ours != ref) <= 5


def test_category_table_matches_av2():
    pytest.importorskip('av2')
    from av2.evaluation.scene_flow.constants import CATEGORY_TO_INDEX, SCENE_FLOW_DYNAMIC_THRESHOLD
    from av2.torch.structures.flow import BOUNDING_BOX_EXPANSION
    assert zav2.CATEGORY_TO_INDEX == dict(CATEGORY_TO_INDEX)
    assert zav2.SCENE_FLOW_DYNAMIC_THRESHOLD == SCENE_FLOW_DYNAMIC_THRESHOLD
    assert zav2.BOUNDING_BOX_EXPANSION == BOUNDING_BOX_EXPANSION


def test_interior_mask_brute_force():
    """Cuboid interior test against a direct object-frame check on random points."""
    rng = np.random.default_rng(0)
    pose = make_transform(quat_to_matrix(0.9, 0.1, -0.05, 0.3), (2.0, -1.0, 0.5))
    lwh = np.array([4.0, 2.0, 1.5])
    pts = pose[:3, 3] + rng.uniform(-3, 3, (20_000, 3))
    local = transform_points(invert(pose), pts)
    truth = (np.abs(local) <= lwh / 2).all(axis=1)
    ours = zav2.cuboid_interior_mask(pts, zav2.cuboid_vertices(pose, lwh))
    assert truth.sum() > 500
    np.testing.assert_array_equal(ours, truth)


def _two_sweep_root(tmp: Path) -> tuple[Path, int, int, str, str]:
    """Copy the sample as av2's loader layout with a 2nd sweep at the next annotated time.

    Sweep t+1 reuses the sweep file (its points do not enter sweep t's flow) and the real pose at that
    time. Its annotations are the real ones except: one track with points vanishes (invalid points) and
    another is moved 1.5 m along its heading (dynamic points).
    """
    log = tmp / 'av2' / 'sensor' / 'val' / LOG_ID
    shutil.copytree(SAMPLE / LOG_ID, log)
    ann = feather.read_table(SAMPLE / LOG_ID / 'annotations.feather').to_pandas()
    times = np.unique(ann.timestamp_ns)
    ts0, ts1 = int(times[0]), int(times[1])
    shutil.copy(log / 'sensors' / 'lidar' / f'{ts0}.feather', log / 'sensors' / 'lidar' / f'{ts1}.feather')
    at0 = ann[ann.timestamp_ns == ts0].sort_values('num_interior_pts', ascending=False)
    at1_tracks = set(ann.track_uuid[ann.timestamp_ns == ts1])
    kept = [u for u in at0.track_uuid if u in at1_tracks]
    gone, moved = kept[0], kept[1]
    ann = ann[~((ann.timestamp_ns == ts1) & (ann.track_uuid == gone))].copy()
    sel = (ann.timestamp_ns == ts1) & (ann.track_uuid == moved)
    row = ann[sel].iloc[0]
    heading = quat_to_matrix(row.qw, row.qx, row.qy, row.qz)[:, 0]
    ann.loc[sel, 'tx_m'] += 1.5 * heading[0]
    ann.loc[sel, 'ty_m'] += 1.5 * heading[1]
    feather.write_feather(pa.Table.from_pandas(ann.reset_index(drop=True), preserve_index=False),
                          log / 'annotations.feather')
    return tmp, ts0, ts1, gone, moved


def test_annotation_flow_matches_av2_scene_flow_dataloader(tmp_path):
    pytest.importorskip('av2')
    pytest.importorskip('kornia')
    from av2.torch.data_loaders.scene_flow import SceneFlowDataloader
    root, ts0, ts1, gone, moved = _two_sweep_root(tmp_path)
    dl = SceneFlowDataloader(root, 'av2', 'val')
    assert len(dl) == 1
    s0, _, ego1_SE3_ego0, ref = dl[0]

    pairs = list(zav2.iter_pairs(root / 'av2' / 'sensor', 'val'))
    assert len(pairs) == 1
    p = pairs[0]
    assert (p.ts0, p.ts1) == (ts0, ts1)
    np.testing.assert_allclose(p.ego1_T_ego0, ego1_SE3_ego0.matrix().numpy()[0], atol=1e-4)  # av2 is float32
    np.testing.assert_array_equal(p.points0, s0.lidar.as_tensor()[:, :3].numpy())
    gt = p.gt
    # av2 composes float32 poses about 1.5 km from the city origin: ~1e-4 m of noise.
    np.testing.assert_allclose(gt.flow, ref.flow.numpy(), atol=2e-3)
    np.testing.assert_array_equal(gt.is_valid, ref.is_valid.numpy())
    np.testing.assert_array_equal(gt.is_dynamic, ref.is_dynamic.numpy())
    np.testing.assert_array_equal(gt.category_indices, ref.category_indices.numpy())
    np.testing.assert_array_equal(p.is_ground0, s0.is_ground.numpy())
    # The edits show up: the vanished track is invalid, the moved one dynamic by ~1.5 m.
    assert 0 < np.count_nonzero(~gt.is_valid) < len(gt.is_valid)
    rigid = transform_points(p.ego1_T_ego0, p.points0.astype(float)) - p.points0
    dyn = np.linalg.norm(gt.flow - rigid, axis=1)
    assert np.count_nonzero(np.abs(dyn - 1.5) < 0.05) > 50


def test_scene_flow_file_wins_and_is_checked(tmp_path):
    log = tmp_path / 'val' / 'log0'
    (log / 'sensors' / 'lidar').mkdir(parents=True)
    (log / 'scene_flow').mkdir()
    pts = np.random.default_rng(1).normal(size=(50, 3)).astype(np.float32)
    for ts in (1000, 2000):
        feather.write_feather(pa.table({'x': pts[:, 0], 'y': pts[:, 1], 'z': pts[:, 2]}),
                              log / 'sensors' / 'lidar' / f'{ts}.feather')
    T0, T1 = yaw_transform(0.0), yaw_transform(0.1, (1.0, 0.5, 0.0))
    rows = []
    for ts, T in ((1000, T0), (2000, T1)):
        q = matrix_to_quat(T[:3, :3])
        rows.append([ts, *q, *T[:3, 3]])
    rows = np.array(rows)
    table = pa.table({c: (rows[:, i].astype(np.int64) if i == 0 else rows[:, i])
                      for i, c in enumerate(zav2.POSE_COLUMNS)})
    feather.write_feather(table, log / 'city_SE3_egovehicle.feather')
    flow = np.full((50, 3), 0.25, np.float32)
    sf = {'flow_tx_m': flow[:, 0], 'flow_ty_m': flow[:, 1], 'flow_tz_m': flow[:, 2],
          'is_valid': np.ones(50, bool), 'is_dynamic': np.zeros(50, bool),
          'is_ground': np.arange(50) < 10, 'category_indices': np.zeros(50, np.uint8),
          'instance_id': np.zeros(50, np.int32)}
    feather.write_feather(pa.table(sf), log / 'scene_flow' / '1000.feather')
    (p,) = list(zav2.iter_pairs(tmp_path, 'val'))
    np.testing.assert_array_equal(p.gt.flow, flow)
    assert p.gt.is_ground.sum() == 10 and p.is_ground0 is None
    np.testing.assert_allclose(p.ego1_T_ego0, invert(T1) @ T0, atol=1e-12)

    # Wrong row count names the file.
    sf = {k: v[:40] for k, v in sf.items()}
    feather.write_feather(pa.table(sf), log / 'scene_flow' / '1000.feather')
    with pytest.raises(zav2.DataError, match=r'1000\.feather.*40 rows'):
        list(zav2.iter_pairs(tmp_path, 'val'))


def _pose_log(tmp_path, ts, cols=None):
    log = tmp_path / 'log'
    (log / 'sensors' / 'lidar').mkdir(parents=True, exist_ok=True)
    n = len(ts)
    data = {'timestamp_ns': np.asarray(ts, np.int64), 'qw': np.ones(n), 'qx': np.zeros(n), 'qy': np.zeros(n),
            'qz': np.zeros(n), 'tx_m': np.zeros(n), 'ty_m': np.zeros(n), 'tz_m': np.zeros(n)}
    data.update(cols or {})
    feather.write_feather(pa.table(data), log / 'city_SE3_egovehicle.feather')
    return zav2.AV2Log(log)


@pytest.mark.parametrize('ts, cols, match', [
    ([1, 3, 2], None, 'non-monotonic pose timestamps'),
    ([1, 2, 2], None, 'duplicate pose timestamps'),
    ([1, 2, 3], {'qw': np.array(['a', 'b', 'c'])}, "column 'qw' has type string"),
    ([1, 2, 3], {'qw': np.full(3, 2.0)}, 'not unit norm'),
])
def test_bad_pose_file(tmp_path, ts, cols, match):
    log = _pose_log(tmp_path, ts, cols)
    with pytest.raises(zav2.DataError, match=match) as exc:
        log.pose(1)
    assert 'city_SE3_egovehicle.feather' in str(exc.value)


def test_bad_lidar_files(tmp_path):
    log = _pose_log(tmp_path, [1, 2])
    lidar = log.log_dir / 'sensors' / 'lidar'
    (lidar / '1.feather').write_bytes(b'not a feather file')
    with pytest.raises(zav2.DataError, match=r'1\.feather: cannot read as feather'):
        log.points(1)
    feather.write_feather(pa.table({'x': [1.0], 'y': [2.0]}), lidar / '1.feather')
    with pytest.raises(zav2.DataError, match=r"1\.feather: missing columns \['z'\]"):
        log.points(1)
    with pytest.raises(zav2.DataError, match=r'2\.feather: file not found'):
        log.points(2)
    with pytest.raises(zav2.DataError, match='no pose at 7'):
        log.pose(7)
    (lidar / '01.feather').write_bytes(b'')
    with pytest.raises(zav2.DataError, match='duplicate lidar file timestamps'):
        zav2.AV2Log(log.log_dir).timestamps
    (lidar / 'abc.feather').write_bytes(b'')
    with pytest.raises(zav2.DataError, match='not a nanosecond timestamp'):
        zav2.AV2Log(log.log_dir).timestamps
    with pytest.raises(zav2.DataError, match='split folder not found'):
        zav2.list_logs(tmp_path, 'nope')


def test_bad_annotations(tmp_path):
    log = _pose_log(tmp_path, [1, 2])
    feather.write_feather(pa.table({'timestamp_ns': np.array([1], np.int64), 'track_uuid': ['a']}),
                          log.log_dir / 'annotations.feather')
    with pytest.raises(zav2.DataError, match=r"annotations\.feather: missing columns \['category', "):
        log.cuboids(1)
    bad = {c: np.array([1.0]) for c in zav2.CUBOID_COLUMNS}
    bad.update(timestamp_ns=np.array([1], np.int64), track_uuid=['a'], category=['UFO'])
    feather.write_feather(pa.table(bad), log.log_dir / 'annotations.feather')
    log = zav2.AV2Log(log.log_dir)
    with pytest.raises(zav2.DataError, match="unknown category 'UFO'"):
        zav2.flow_from_cuboids(np.zeros((3, 3), np.float32), np.eye(4), log.cuboids(1), log.cuboids(2))
