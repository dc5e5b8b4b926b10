"""Real spinning-lidar models for the simulator: beam layouts, mounting, noise, dropout, shutter.

Vertical angles follow the makers' datasheets (degrees, ascending); where a datasheet gives only
the field of view and the spacing, the angles are spread as it states:

==========  =====  ================  ========  =======  =====================================
name        beams  elevation (deg)   columns   mount    source / simplification
==========  =====  ================  ========  =======  =====================================
vlp16       16     -15 .. +15        1800      1.60 m   VLP-16: 2 deg steps
hdl32e      32     -30.67 .. +10.67  2170      1.84 m   HDL-32E: 1.33 deg steps (nuScenes)
hdl64e      64     -24.8 .. +2.0     2083      1.73 m   HDL-64E S2 as in KITTI: upper block
                                                        +2..-8.33 (1/3 deg), lower -8.83..-24.8
os1-64      64     -22.5 .. +22.5    1024      1.90 m   Ouster OS1 rev 6/7: 45 deg, uniform
os1-128     128    -22.5 .. +22.5    1024      2.00 m   Ouster OS1-128: 45 deg, uniform
pandar64    64     -24.9 .. +14.9    1800      2.05 m   Hesai Pandar64: 0.167 deg from -6 to +2
                                                        (as the PJLab sweeps)
av2         64     -25 .. +25        1800      1.90 m   AV2's two stacked VLP-32C. SIMPLIFIED:
                                                        one sensor with the union of the upright
                                                        unit's beams and the upside-down unit's
                                                        (negated), half a column apart in azimuth
vlp32c      32     -25 .. +15        1800      1.80 m   the legacy default sensor (VLP-32C)
==========  =====  ================  ========  =======  =====================================

Every preset spins at 10 Hz with a rolling shutter: each column is fired at its own time during
the 100 ms revolution while the ego and the traffic move (:mod:`.synth`). AV2 publishes sweeps
de-skewed for the ego motion, so ``av2`` uses ``shutter='ego_deskewed'``; the others are raw
(points in the sensor pose of their firing time), as KITTI's and most drivers' sweeps are.

Maximum ranges are capped at 120 m (the scene generator builds the world to that radius); the
range at which a 10 %-reflective target fades (``range_10pct_m``) carries each sensor's reach
on dark surfaces.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .raycast import VLP32C_ELEVATIONS_DEG, SynthError

MOUNT_HEIGHT_RANGE_M = (1.4, 2.3)


def _hdl64e() -> tuple[float, ...]:
    upper = np.linspace(2.0, -8.33, 32)
    lower = np.linspace(-8.83, -24.8, 32)
    return tuple(np.round(np.sort(np.concatenate([upper, lower])), 3).tolist())


def _pandar64() -> tuple[float, ...]:
    top = [14.882, 11.032, 8.059, 5.057, 3.04, 2.028]
    fine = np.linspace(1.86, -6.061, 48).tolist()         # 0.167-0.17 deg, the dense horizon band
    bottom = [-7.063, -8.059, -9.06, -9.885, -11.032, -12.006, -12.974, -13.93, -18.889, -24.897]
    return tuple(np.round(np.sort(np.array(top + fine + bottom)), 3).tolist())


def _av2_pair() -> tuple[tuple[float, ...], tuple[float, ...]]:
    up = np.asarray(VLP32C_ELEVATIONS_DEG)
    down = -up[::-1]                     # the upside-down unit sees the mirror image
    el = np.concatenate([up, down])
    az = np.concatenate([np.zeros(32), np.full(32, 0.1)])      # half a 0.2 deg column apart
    order = np.argsort(el, kind='stable')
    return tuple(el[order].tolist()), tuple(az[order].tolist())


@dataclass(frozen=True)
class SensorSpec:
    """One lidar model (nominal mounting); :func:`lidar_config` turns it into a ``LidarConfig``."""

    name: str
    elevations_deg: tuple[float, ...]
    azimuths: int
    mount_height_m: float
    max_range_m: float
    range_10pct_m: float
    range_noise_m: float
    dropout: float
    min_range_m: float
    shutter: str = 'raw'
    azimuth_offsets_deg: tuple[float, ...] | None = None
    mount_x_m: float = 1.35


_AV2_EL, _AV2_AZ = _av2_pair()

SENSORS: dict[str, SensorSpec] = {s.name: s for s in (
    SensorSpec('vlp16', tuple(float(v) for v in np.arange(-15.0, 15.1, 2.0)), 1800, 1.60, 100.0, 50.0,
               0.03, 0.02, 0.8),
    SensorSpec('hdl32e', tuple(np.round(np.linspace(-30.67, 10.67, 32), 3).tolist()), 2170, 1.84, 100.0,
               60.0, 0.02, 0.03, 1.0),
    SensorSpec('hdl64e', _hdl64e(), 2083, 1.73, 120.0, 50.0, 0.02, 0.03, 0.9, mount_x_m=1.0),
    SensorSpec('os1-64', tuple(np.round(np.linspace(-22.5, 22.5, 64), 3).tolist()), 1024, 1.90, 120.0,
               55.0, 0.03, 0.02, 0.3),
    SensorSpec('os1-128', tuple(np.round(np.linspace(-22.5, 22.5, 128), 3).tolist()), 1024, 2.00, 120.0,
               55.0, 0.03, 0.02, 0.3),
    SensorSpec('pandar64', _pandar64(), 1800, 2.05, 120.0, 100.0, 0.02, 0.02, 0.3),
    SensorSpec('av2', _AV2_EL, 1800, 1.90, 100.0, 80.0, 0.02, 0.02, 0.5, shutter='ego_deskewed',
               azimuth_offsets_deg=_AV2_AZ),
    SensorSpec('vlp32c', tuple(VLP32C_ELEVATIONS_DEG), 1800, 1.80, 100.0, 80.0, 0.02, 0.02, 0.5),
)}
SENSOR_NAMES: tuple[str, ...] = tuple(SENSORS)


def lidar_config(name: str, height_m: float | None = None):
    """``LidarConfig`` of sensor ``name`` mounted at ``height_m`` (default: its nominal height)."""
    from .synth import LidarConfig
    if name not in SENSORS:
        raise SynthError(f'sensor: expected one of {", ".join(SENSOR_NAMES)} or random, got {name!r}')
    s = SENSORS[name]
    h = s.mount_height_m if height_m is None else float(height_m)
    if not MOUNT_HEIGHT_RANGE_M[0] <= h <= MOUNT_HEIGHT_RANGE_M[1]:
        raise SynthError(f'sensor height: expected {MOUNT_HEIGHT_RANGE_M[0]}..{MOUNT_HEIGHT_RANGE_M[1]} m, '
                         f'got {h}')
    return LidarConfig(beams=len(s.elevations_deg), azimuths=s.azimuths, elevations_deg=s.elevations_deg,
                       max_range_m=s.max_range_m, range_noise_m=s.range_noise_m, dropout=s.dropout,
                       sensor_xyz=(s.mount_x_m, 0.0, round(h, 3)), name=s.name, min_range_m=s.min_range_m,
                       shutter=s.shutter, range_10pct_m=s.range_10pct_m,
                       azimuth_offsets_deg=s.azimuth_offsets_deg)


def _jittered_height(name: str, rng: np.random.Generator) -> float:
    h = SENSORS[name].mount_height_m + rng.uniform(-0.3, 0.3)
    return float(np.clip(h, *MOUNT_HEIGHT_RANGE_M))


def sensor_for_log(mode: str, seed: int, index: int):
    """``LidarConfig`` of one log: ``mode`` a sensor name, ``random`` or ``cycle``.

    ``random`` draws the model from the seed; ``cycle`` uses model ``index mod 8`` (every model
    equally often in a split); both jitter the mounting height from the seed (1.4-2.3 m).
    """
    rng = np.random.default_rng([int(seed), 0x5E45])
    if mode == 'random':
        name = SENSOR_NAMES[int(rng.integers(len(SENSOR_NAMES)))]
    elif mode == 'cycle':
        name = SENSOR_NAMES[int(index) % len(SENSOR_NAMES)]
    else:
        if mode not in SENSORS:
            raise SynthError(f'--sensor: expected one of {", ".join(SENSOR_NAMES)}, random or cycle, '
                             f'got {mode!r}')
        return lidar_config(mode)          # a named sensor sits at its nominal height
    return lidar_config(name, _jittered_height(name, rng))
