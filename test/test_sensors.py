"""Sensor models of the simulator: datasheet beam layouts, per-log choice, rolling shutter, fast traffic."""
from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from zeroflow_training.data import synth
from zeroflow_training.data.scene import SceneConfig, generate_scene
from zeroflow_training.data.sensors import SENSOR_NAMES, SENSORS, lidar_config, sensor_for_log

# (beams, lowest, highest elevation in degrees) as the makers' datasheets state them
DATASHEET = {
    'vlp16': (16, -15.0, 15.0),
    'hdl32e': (32, -30.67, 10.67),
    'hdl64e': (64, -24.8, 2.0),
    'os1-64': (64, -22.5, 22.5),
    'os1-128': (128, -22.5, 22.5),
    'pandar64': (64, -24.897, 14.882),
    'av2': (64, -25.0, 25.0),          # two VLP-32C (-25..+15), one upside down (-15..+25)
    'vlp32c': (32, -25.0, 15.0),
}


def test_every_model_has_a_datasheet_row():
    assert set(SENSOR_NAMES) == set(DATASHEET)


@pytest.mark.parametrize('name', sorted(DATASHEET))
def test_beam_layout_matches_datasheet(name):
    beams, lo, hi = DATASHEET[name]
    cfg = lidar_config(name)
    el = cfg.elevations()
    assert cfg.beams == beams == len(el)
    assert el.min() == pytest.approx(lo, abs=0.01) and el.max() == pytest.approx(hi, abs=0.01)
    assert np.all(np.diff(el) >= 0)
    # the ray grid fires these angles: laser k's rays all have elevation el[k]
    d, laser, column = cfg.ray_grid()
    assert len(d) == beams * cfg.azimuths and laser.max() == beams - 1 and column.max() == cfg.azimuths - 1
    np.testing.assert_allclose(np.degrees(np.arcsin(d[:, 2])), el[laser], atol=1e-9)
    assert 1.4 <= cfg.sensor_xyz[2] <= 2.3


def test_layout_spacings_as_datasheets():
    vlp16 = lidar_config('vlp16').elevations()
    np.testing.assert_allclose(np.diff(vlp16), 2.0)
    hdl64 = lidar_config('hdl64e').elevations()
    np.testing.assert_allclose(np.diff(hdl64[32:]), 1 / 3, atol=0.01)      # upper block: 1/3 deg
    np.testing.assert_allclose(np.diff(hdl64[:32]), 0.515, atol=0.01)     # lower block: ~1/2 deg
    pandar = lidar_config('pandar64').elevations()
    band = pandar[(pandar >= -6.1) & (pandar <= 1.9)]
    assert len(band) == 48 and np.all(np.abs(np.diff(band) - 0.168) < 0.005)
    np.testing.assert_allclose(np.diff(lidar_config('os1-128').elevations()), 45 / 127, atol=1e-3)
    # AV2: the two units' beams, the second one half a column later
    av2 = lidar_config('av2')
    assert len(set(np.round(av2.elevations(), 3))) < 64                 # both units have 0 deg etc.
    assert sorted(set(av2.azimuth_offsets_deg)) == [0.0, 0.1]
    assert SENSORS['hdl64e'].mount_height_m == 1.73 and SENSORS['pandar64'].mount_height_m == 2.05


def test_sensor_choice_per_log_deterministic():
    picks = [sensor_for_log('random', s, 0) for s in range(40)]
    assert picks == [sensor_for_log('random', s, 5) for s in range(40)]     # seed only, not the index
    names = [p.name for p in picks]
    assert len(set(names)) == 8
    heights = np.array([p.sensor_xyz[2] for p in picks])
    assert heights.min() >= 1.4 and heights.max() <= 2.3 and len(np.unique(heights)) > 30
    cycle = [sensor_for_log('cycle', 7, i).name for i in range(10)]
    assert cycle == list(SENSOR_NAMES) + list(SENSOR_NAMES[:2])
    assert sensor_for_log('hdl64e', 3, 0).sensor_xyz[2] == 1.73
    with pytest.raises(synth.SynthError, match='hdl64e'):
        sensor_for_log('hdl-65', 0, 0)
    with pytest.raises(synth.SynthError, match='height'):
        lidar_config('vlp16', 3.0)


def _local(points_city, x, y, yaw, z):
    """Points in an upright agent frame (x forward), origin on the ground under it."""
    c, s = np.cos(yaw), np.sin(yaw)
    dx, dy = points_city[:, 0] - x, points_city[:, 1] - y
    return np.stack([c * dx + s * dy, -s * dx + c * dy, points_city[:, 2] - z], 1)


@pytest.mark.parametrize('shutter', ['raw', 'ego_deskewed'])
def test_rolling_shutter_points_consistent_with_their_time(shutter):
    """Each return on a fast vehicle, taken to the city with the ego pose of ITS firing time
    (offset_ns) and into the vehicle's frame at that time, lies on the vehicle; at the sweep time
    instead it would miss it by metres."""
    lidar = synth.LidarConfig(beams=16, azimuths=900, shutter=shutter, sensor_xyz=(1.35, 0.0, 1.9))
    lg = synth.simulate_log(11, 2, lidar, SceneConfig(kind='highway'), with_flow=False)
    sc, sw = lg.scene, lg.sweeps[0]
    t = sw.offset_ns.astype(np.float64) * 1e-9
    E = sc.city_T_ego(t) if shutter == 'raw' else np.repeat(lg.city_T_ego[:1], len(t), 0)
    pc = np.einsum('nij,nj->ni', E[:, :3, :3], sw.points.astype(np.float64)) + E[:, :3, 3]
    checked = 0
    for a in sc.agents:
        m = sw.instance_id == a.instance
        if a.profile is None or a.kind != 'vehicle' or m.sum() < 20 or a.profile.v0 < 10:
            continue
        dims = a.tracks[0].dims
        x, y, yaw = a.poses(t[m], 1.0)
        loc = np.stack([_local(pc[m][i:i + 1], x[i], y[i], yaw[i], 0.0)[0] for i in range(m.sum())])
        half = dims[:2] / 2 + 0.1                    # range noise (2 cm) and the tilt on slopes
        assert np.all(np.abs(loc[:, :2]) <= half), (a.instance, np.abs(loc[:, :2]).max(0))
        x0, y0, yaw0 = a.poses(np.zeros(m.sum()), 1.0)       # the sweep stamp: the wrong time
        wrong = _local(pc[m], x0[0], y0[0], yaw0[0], 0.0)
        moved = a.profile.v0 * t[m].mean()
        assert abs(wrong[:, 0].mean() - loc[:, 0].mean()) > 0.8 * moved
        checked += 1
    assert checked >= 3
    if shutter == 'raw':            # rolling shutter output is deterministic too
        again = synth.simulate_log(11, 2, lidar, SceneConfig(kind='highway'), with_flow=False).sweeps[0]
        np.testing.assert_array_equal(again.points, sw.points)
    # offset_ns is the column's time: one value per column, rising with the spin
    col = np.round(sw.offset_ns / (synth.SWEEP_PERIOD_NS // 900)).astype(int)
    assert np.all(col * (synth.SWEEP_PERIOD_NS // 900) == sw.offset_ns)


def test_fast_traffic_scene_has_highway_speeds_and_manoeuvres():
    """Annotated cuboids move >= 10 m/s on arterials/highways; the mix has trucks/buses and cut-ins."""
    fast, cats, lateral = 0, set(), 0
    for seed, kind in ((0, 'highway'), (1, 'arterial')):
        lg = synth.simulate_log(seed, 2, synth.LidarConfig(beams=16, azimuths=600), SceneConfig(kind=kind),
                                with_flow=False)
        ann = lg.annotations
        a0 = ann[ann.timestamp_ns == lg.timestamps[0]].set_index('track_uuid')
        a1 = ann[ann.timestamp_ns == lg.timestamps[1]].set_index('track_uuid')
        common = a0.index.intersection(a1.index)
        P0, P1 = lg.city_T_ego[0], lg.city_T_ego[1]
        c0 = a0.loc[common, ['tx_m', 'ty_m', 'tz_m']].to_numpy() @ P0[:3, :3].T + P0[:3, 3]
        c1 = a1.loc[common, ['tx_m', 'ty_m', 'tz_m']].to_numpy() @ P1[:3, :3].T + P1[:3, 3]
        v = np.linalg.norm(c1 - c0, axis=1) / 0.1
        fast += int((v >= 10).sum())
        cats |= set(a0.loc[common[v >= 10], 'category'])
        ego_v = np.linalg.norm(lg.city_T_ego[1][:3, 3] - lg.city_T_ego[0][:3, 3]) / 0.1
        assert ego_v >= 10
        sc = lg.scene
        for a in sc.agents:            # the cut-in: moving sideways (in y) at speed near the ego
            if a.profile is not None and a.kind == 'vehicle':
                x, y, _ = a.poses(np.array([0.0, 0.1]), 0.2)
                lateral += bool(abs(y[1] - y[0]) > 0.03 and abs(x[1] - x[0]) > 0.8 and abs(y[0]) < 15)
    assert fast >= 6 and lateral >= 1
    assert cats & {'BUS', 'TRUCK', 'BOX_TRUCK', 'LARGE_VEHICLE'}
    kinds = [generate_scene(s, 0.1, 100.0).kind for s in range(12)]
    assert {'urban', 'arterial', 'highway'} <= set(kinds)


def _files(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob('*')) if p.is_file()}


def test_cli_sensor_random_deterministic_per_seed(tmp_path: Path):
    from zeroflow_training.data.cli_synth import add_synth_arguments, run_synth
    p = argparse.ArgumentParser()
    add_synth_arguments(p)
    argv = ['--sequences', '1', '--sweeps', '2', '--seed', '4', '--sensor', 'random', '--scene', 'urban']
    assert run_synth(p.parse_args([str(tmp_path / 'a')] + argv)) == 0
    before = _files(tmp_path / 'a')
    assert run_synth(p.parse_args([str(tmp_path / 'a')] + argv)) == 0      # same sensor: complete, kept
    assert _files(tmp_path / 'a') == before
    meta = json.loads((tmp_path / 'a' / 'train' / synth.log_id_for_seed(4) / 'synth.json').read_text())
    want = sensor_for_log('random', 4, 0)
    assert meta['lidar']['name'] == want.name and meta['lidar']['sensor_xyz'] == list(want.sensor_xyz)
    assert meta['scene_kind'] == 'urban' and meta['version'] == synth.GENERATOR_VERSION
    with pytest.raises(synth.SynthError, match='--sensor'):
        run_synth(p.parse_args([str(tmp_path / 'c'), '--sensor', 'lidar9000']))
