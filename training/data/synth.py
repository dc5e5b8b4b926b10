"""Synthetic lidar sequences in the Argoverse 2 sensor layout, with exact scene-flow ground truth.

A procedural urban scene (:mod:`training.data.scene`) is swept by a spinning multi-beam lidar
(:mod:`training.data.raycast`) at 10 Hz, and each log is written as AV2 writes its sensor
dataset, plus a ``scene_flow/`` folder with the ground truth::

    OUT/<split>/<log_id>/
      sensors/lidar/<ts_ns>.feather     x, y, z (float32, ego frame), intensity, laser_number (uint8),
                                        offset_ns (int32)
      city_SE3_egovehicle.feather       one pose per sweep
      annotations.feather               cuboids of every track at every sweep (ego frame), av2 columns
      calibration/egovehicle_SE3_sensor.feather   'up_lidar' = the simulated sensor's mount
      map/<log_id>_ground_height_surface____SYN.npy, <log_id>___img_Sim2_city.json,
          log_map_archive_<log_id>____SYN_city_<n>.json
      scene_flow/<ts_ns>.feather        GT of the pair (ts, next ts); absent for the last sweep
      synth.json                        generator version, seed and settings

Conventions and simplifications (say them out loud, they matter for what a model can learn):

* **Shutter** (``LidarConfig.shutter``). ``global`` (the generic default): every ray is cast at
  the sweep timestamp, ``offset_ns`` records its column's spin time, no distortion. The sensor
  presets (:mod:`.sensors`) use a rolling shutter: column c is fired ``offset_ns`` after the
  stamp while the ego and the traffic move (cast in 20 azimuth slices of 5 ms, each return then
  carried rigidly with what it hit to its own column's time). ``raw`` writes each point in the
  sensor pose of its firing time (not de-skewed, as KITTI); ``ego_deskewed`` in the ego frame
  of the stamp (AV2). Cuboids are placed at the firing time of the column through their centre,
  in the frame their points are written in (static objects in raw sweeps: carried by the ego
  motion from the first sweep, so they move exactly by the ego rule). A mover cut by the seam
  of the revolution (straight behind) shows up twice, 100 ms apart, as on real sensors; its box
  holds one part, the other takes the static rule.
* The ego's body (4.9 x 2.0 m up to 1.0 m, a cabin up to the roof 0.6 m under the sensor, at
  most 1.5 m) occludes the rays that would hit it; such self-returns are dropped, as are
  returns nearer than ``min_range_m``.
* Ego frame as AV2: x forward, y left, z up, origin on the ground under the rear axle; the
  sensor sits at ``LidarConfig.sensor_xyz`` (default 1.35, 0, 1.8 m).
* **Ground truth is the official AV2 rule, reimplemented in numpy** (av2
  ``Flow.from_sweep_pair``): each cuboid of sweep t, length and width grown by 0.2 m, claims
  the points inside it (av2's vertex test, same arithmetic); they move with the cuboid's rigid
  motion ``c1_SE3_c0`` when the track exists at t+1, else ``is_valid`` is False; everything
  else gets the ego motion ``ego1_T_ego0 p - p``; ``is_dynamic = |flow - rigid| >= 0.05``;
  ``category_indices`` from av2's ``CATEGORY_TO_INDEX``; a point in several cuboids takes the
  last one in annotation order, as in av2. ``is_ground`` is the simulator's knowledge (the ray
  hit the road, a sidewalk or a curb); ``instance_id`` is the object whose surface the ray hit
  (-1 for the unannotated static world).
* A track is annotated at a sweep when its centre lies within ``max_range`` of the ego and its
  cuboid holds at least one point of that sweep (``num_interior_pts`` > 0; av2's loader drops
  the others, so a track that loses all its points at t+1 makes its points at t invalid).
* The map raster holds the ground surface height (sidewalks included) at each 0.3 m cell centre
  and NaN under buildings, walls and hedges (grown by 0.2 m), so av2's ground rule flags the
  returns of facades as non-ground, as on real AV2 maps.
* Intensity is plausible, not physical: surface reflectivity, range fall-off, incidence on the
  ground, and noise. Returns drop out at random, more so far away, on dark surfaces and on
  ground seen at grazing angles.

Splits and seeds: ``train`` log i uses seed ``S + i``; ``val`` log i uses seed
``VAL_SEED_BASE + i`` (1,000,000 + i); :func:`split_seeds` refuses train seeds that would reach
that range. Output is bit-identical for a given seed, settings and ``GENERATOR_VERSION`` on one
machine (numpy's vectorised sin/cos may differ in the last bit between CPU generations).
"""
from __future__ import annotations

import json
import logging
import os
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from zeroflow_ros.core.geometry import matrix_to_quat
from zeroflow_ros.data.av2 import (  # noqa: F401  (re-exported)
    BOUNDING_BOX_EXPANSION, CATEGORY_TO_INDEX, SCENE_FLOW_DYNAMIC_THRESHOLD)

from .raycast import Primitives, SynthError, cast, default_elevations, yaw_matrix
from .scene import EGO_LENGTH, EGO_REAR_OVERHANG, EGO_WIDTH, Agent, Scene, SceneConfig, generate_scene

log = logging.getLogger(__name__)

GENERATOR_VERSION = 6
SHUTTERS = ('global', 'raw', 'ego_deskewed')
ROLLING_SLICES = 20     # a revolution is cast in 20 azimuth slices of 5 ms (see _cast_sweep)
VAL_SEED_BASE = 1_000_000
TIMESTAMP_BASE_NS = 315_000_000_000_000_000
SWEEP_PERIOD_NS = 100_000_000
CITY = 'SYN'
RASTER_RES_M = 0.3

# The av2 labelling constants live in one place, shared with the reader (checked against av2 in tests).
ANNOTATION_COLUMNS = ('timestamp_ns', 'track_uuid', 'category', 'length_m', 'width_m', 'height_m',
                      'qw', 'qx', 'qy', 'qz', 'tx_m', 'ty_m', 'tz_m', 'num_interior_pts')


@dataclass(frozen=True)
class LidarConfig:
    """Spinning lidar. Defaults: 32 beams with VLP-32C angles (-25..15 deg) x 1800 azimuths, 10 Hz."""

    beams: int = 32
    azimuths: int = 1800
    elevations_deg: tuple[float, ...] | None = None     # None: VLP-32C-like profile for `beams`
    max_range_m: float = 100.0
    range_noise_m: float = 0.02
    dropout: float = 0.02            # base probability a return is lost
    sensor_xyz: tuple[float, float, float] = (1.35, 0.0, 1.8)
    name: str = ''                   # sensor model (training.data.sensors), '' = this generic one
    min_range_m: float = 0.5         # returns closer than this are not reported
    # 'global': every ray at the sweep time (no motion distortion); 'raw': each column fired at
    # its own time, points in the sensor pose of that time; 'ego_deskewed': fired likewise, points
    # in the ego frame of the sweep time (ego motion removed, object motion kept), as AV2 publishes
    shutter: str = 'global'
    range_10pct_m: float | None = None       # where a 10 % reflective target fades; None: no limit
    azimuth_offsets_deg: tuple[float, ...] | None = None    # per beam, in the order of elevations_deg

    def validate(self) -> None:
        if self.beams < 1 or self.beams > 256:
            raise SynthError(f'lidar beams: expected 1..256, got {self.beams}')
        if self.azimuths < 8 or self.azimuths > 20000:
            raise SynthError(f'lidar azimuths: expected 8..20000, got {self.azimuths}')
        if self.elevations_deg is not None and len(self.elevations_deg) != self.beams:
            raise SynthError(f'lidar elevations_deg: expected {self.beams} angles, '
                             f'got {len(self.elevations_deg)}')
        if not 5.0 <= self.max_range_m <= 500.0:
            raise SynthError(f'lidar max_range_m: expected 5..500 m, got {self.max_range_m}')
        if not 0.0 <= self.dropout < 1.0:
            raise SynthError(f'lidar dropout: expected [0, 1), got {self.dropout}')
        if self.range_noise_m < 0:
            raise SynthError(f'lidar range_noise_m: expected >= 0, got {self.range_noise_m}')
        if self.shutter not in SHUTTERS:
            raise SynthError(f'lidar shutter: expected one of {SHUTTERS}, got {self.shutter!r}')
        if not 0.0 <= self.min_range_m < self.max_range_m:
            raise SynthError(f'lidar min_range_m: expected 0..max_range_m, got {self.min_range_m}')
        if self.range_10pct_m is not None and self.range_10pct_m <= 0:
            raise SynthError(f'lidar range_10pct_m: expected > 0 or None, got {self.range_10pct_m}')
        if self.azimuth_offsets_deg is not None and len(self.azimuth_offsets_deg) != self.beams:
            raise SynthError(f'lidar azimuth_offsets_deg: expected {self.beams} angles, '
                             f'got {len(self.azimuth_offsets_deg)}')

    def elevations(self) -> np.ndarray:
        if self.elevations_deg is None:
            return default_elevations(self.beams)
        e = np.asarray(self.elevations_deg, float)
        return np.sort(e)

    def ray_grid(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Return unit directions (ego frame), laser numbers and column index, in firing order.

        Columns sweep clockwise from straight behind (azimuth +pi), as a Velodyne spins; within a
        column the beams go bottom to top.
        """
        el = np.deg2rad(self.elevations())
        az = np.pi - 2 * np.pi * np.arange(self.azimuths) / self.azimuths
        A, E = np.meshgrid(az, el, indexing='ij')          # (azimuths, beams)
        if self.azimuth_offsets_deg is not None:
            order = np.argsort(np.asarray(self.elevations_deg, float), kind='stable')
            A = A - np.deg2rad(np.asarray(self.azimuth_offsets_deg, float)[order])[None, :]
        d = np.stack([np.cos(E) * np.cos(A), np.cos(E) * np.sin(A), np.sin(E)], axis=-1).reshape(-1, 3)
        laser = np.tile(np.arange(self.beams), self.azimuths)
        column = np.repeat(np.arange(self.azimuths), self.beams)
        return d, laser, column


@dataclass
class Sweep:
    timestamp_ns: int
    points: np.ndarray          # (N,3) float32 ego frame
    intensity: np.ndarray       # (N,) uint8
    laser_number: np.ndarray    # (N,) uint8
    offset_ns: np.ndarray       # (N,) int32
    is_ground: np.ndarray       # (N,) bool
    instance_id: np.ndarray     # (N,) int32


@dataclass
class SynthLog:
    log_id: str
    seed: int
    scene: Scene
    timestamps: np.ndarray                  # (T,) int64
    city_T_ego: np.ndarray                  # (T,4,4)
    sweeps: list[Sweep]
    annotations: 'object'                   # pandas.DataFrame, av2 columns
    flows: list[dict[str, np.ndarray]] = field(default_factory=list)


def log_id_for_seed(seed: int) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f'zeroflow-synth/log/{int(seed)}'))


def timestamps_for_seed(seed: int, sweeps: int) -> np.ndarray:
    start = TIMESTAMP_BASE_NS + (int(seed) % 100_000_000) * 1_000_000_000
    return start + SWEEP_PERIOD_NS * np.arange(sweeps, dtype=np.int64)


# --------------------------------------------------------------------------- av2 rule in numpy

def quat_wxyz_to_mat(q: np.ndarray) -> np.ndarray:
    """As av2.geometry.geometry.quat_to_mat (scipy, normalising), so masks agree bit for bit."""
    from scipy.spatial.transform import Rotation
    q = np.asarray(q, dtype=np.float64)
    return Rotation.from_quat(q[..., [1, 2, 3, 0]]).as_matrix()


_UNIT_VERTICES = np.array([[+1, +1, +1], [+1, -1, +1], [+1, -1, -1], [+1, +1, -1],
                           [-1, +1, +1], [-1, -1, +1], [-1, -1, -1], [-1, +1, -1]])


def cuboid_interior_mask(points: np.ndarray, R: np.ndarray, t: np.ndarray, lwh: np.ndarray) -> np.ndarray:
    """av2 ``Cuboid.compute_interior_points`` mask, same operations in the same order."""
    vertices_obj = (np.stack([lwh[0], lwh[1], lwh[2]]) / 2.0) * _UNIT_VERTICES
    v = vertices_obj @ R.T + t
    vertices = np.stack((v[6], v[3], v[1]))
    ref = v[2]
    uvw = ref - vertices
    sim_points = points @ uvw.transpose()
    sim_ref = uvw @ ref
    sim_vertices = np.diag(uvw @ vertices.transpose())
    a = np.logical_and(sim_ref <= sim_points, sim_points <= sim_vertices)
    b = np.logical_and(sim_ref >= sim_points, sim_points >= sim_vertices)
    return np.logical_or(a, b).all(axis=1)


def _se3(R: np.ndarray, t: np.ndarray) -> np.ndarray:
    T = np.eye(4)
    T[:3, :3] = R
    T[:3, 3] = t
    return T


def _se3_inverse(T: np.ndarray) -> np.ndarray:
    R, t = T[:3, :3], T[:3, 3]
    return _se3(R.T, R.T.dot(-t))


class _PointIndex:
    """Candidate points near a cuboid (kd-tree ball query).

    av2's exact vertex test then runs only on the points that can pass it.
    """

    def __init__(self, points: np.ndarray):
        from scipy.spatial import cKDTree
        self.tree = cKDTree(points.astype(np.float64)) if len(points) else None

    def near(self, center: np.ndarray, lwh: np.ndarray) -> np.ndarray:
        if self.tree is None:
            return np.zeros(0, dtype=np.int64)
        r = 0.5 * float(np.linalg.norm(lwh)) + 0.01
        return np.sort(np.asarray(self.tree.query_ball_point(center, r), dtype=np.int64))


def interior_mask(points: np.ndarray, index: _PointIndex, R: np.ndarray, t: np.ndarray,
                  lwh: np.ndarray) -> np.ndarray:
    mask = np.zeros(len(points), dtype=bool)
    cand = index.near(t, lwh)
    if len(cand):
        mask[cand] = cuboid_interior_mask(points[cand], R, t, lwh)
    return mask


def av2_flow_labels(points: np.ndarray, cuboids0, cuboids1, ego1_T_ego0: np.ndarray,
                    index: _PointIndex | None = None) -> dict[str, np.ndarray]:
    """Scene-flow labels of av2 ``Flow.from_sweep_pair`` for float32 ``points`` of sweep t.

    ``cuboids0/1``: annotation rows (pandas) at t and t+1, in file order. Rigid flow is computed
    in float64 (av2 uses float32 poses; the difference is ~1e-6 m).
    """
    pts = np.asarray(points, dtype=np.float32)
    index = index or _PointIndex(pts)
    p64 = pts.astype(np.float64)
    rigid = ((p64 @ ego1_T_ego0[:3, :3].T + ego1_T_ego0[:3, 3]) - p64).astype(np.float32)
    flow = rigid.copy()
    n = len(pts)
    is_valid = np.ones(n, dtype=bool)
    category = np.zeros(n, dtype=np.uint8)
    quat_cols = ['qw', 'qx', 'qy', 'qz']
    trans_cols = ['tx_m', 'ty_m', 'tz_m']
    R1s = quat_wxyz_to_mat(cuboids1[quat_cols].to_numpy(np.float64)) if len(cuboids1) else np.zeros((0, 3, 3))
    t1s = cuboids1[trans_cols].to_numpy(np.float64)
    nxt = {u: i for i, u in enumerate(cuboids1['track_uuid'].tolist())}
    R0s = quat_wxyz_to_mat(cuboids0[quat_cols].to_numpy(np.float64)) if len(cuboids0) else np.zeros((0, 3, 3))
    t0s = cuboids0[trans_cols].to_numpy(np.float64)
    lwh0 = cuboids0[['length_m', 'width_m', 'height_m']].to_numpy(np.float64)
    for i, (uid, cat) in enumerate(zip(cuboids0['track_uuid'].tolist(), cuboids0['category'].tolist())):
        lwh = np.array([lwh0[i, 0] + BOUNDING_BOX_EXPANSION, lwh0[i, 1] + BOUNDING_BOX_EXPANSION, lwh0[i, 2]])
        mask = interior_mask(pts, index, R0s[i], t0s[i], lwh)
        if not mask.any():
            continue
        category[mask] = CATEGORY_TO_INDEX[str(cat)]
        j = nxt.get(uid)
        if j is None:
            is_valid[mask] = False
            continue
        c1_T_c0 = _se3(R1s[j], t1s[j]) @ _se3_inverse(_se3(R0s[i], t0s[i]))
        obj = pts[mask]
        moved = obj @ c1_T_c0[:3, :3].T + c1_T_c0[:3, 3]
        flow[mask] = moved.astype(np.float32) - obj
    dyn = np.linalg.norm(flow.astype(np.float64) - rigid.astype(np.float64), axis=-1)
    return {'flow': flow, 'is_valid': is_valid, 'category_indices': category,
            'is_dynamic': dyn >= SCENE_FLOW_DYNAMIC_THRESHOLD, 'dynamic_norm': dyn}


# --------------------------------------------------------------------------- simulation

def _agent_primitives(P: Primitives, agent: Agent, city_R_agent: np.ndarray, origin: np.ndarray,
                      yaw: float) -> None:
    for part in agent.parts:
        centre = origin + city_R_agent @ part.center
        if part.kind == 'box':
            P.add_box(centre, part.size, yaw, instance=agent.instance, reflectivity=part.reflectivity,
                      porosity=part.porosity, rotation=city_R_agent)
        else:       # cylinders stay vertical: only agents without them tilt (see Agent.tilts)
            P.add_cylinder(centre, part.size[0], part.size[1], instance=agent.instance,
                           reflectivity=part.reflectivity)


def agent_rotation(scene: Scene, agent: Agent, x: float, y: float, yaw: float) -> np.ndarray:
    """Return city_R_agent: heading ``yaw``; vehicles' z along the ground normal (slopes)."""
    if not agent.tilts:
        return yaw_matrix(yaw)
    return _heading_on_ground(scene, x, y, yaw)


def _heading_on_ground(scene: Scene, x: float, y: float, yaw: float) -> np.ndarray:
    gx, gy = scene.ground.gradient(np.array([x]), np.array([y]))
    n = np.array([-gx[0], -gy[0], 1.0])
    n /= np.linalg.norm(n)
    f = np.array([np.cos(yaw), np.sin(yaw), 0.0])
    ax = f - f.dot(n) * n
    ax /= np.linalg.norm(ax)
    return np.stack([ax, np.cross(n, ax), n], axis=1)


def _copy_static(static: Primitives) -> Primitives:
    P = Primitives()
    for name in ('box_center', 'box_half', 'box_yaw', 'box_rot',
                 'slab_center', 'slab_half', 'slab_yaw', 'slab_offset',
                 'cyl_center', 'cyl_radius', 'cyl_half_h', 'instance', 'ground', 'reflectivity', 'porosity',
                 '_kinds'):
        setattr(P, name, list(getattr(static, name)))
    return P


def simulate_log(seed: int, sweeps: int, lidar: LidarConfig | None = None,
                 scene_cfg: SceneConfig | None = None, with_flow: bool = True) -> SynthLog:
    """Generate one sequence in memory (scene, sweeps, annotations, GT flow)."""
    import pandas as pd

    lidar = lidar or LidarConfig()
    lidar.validate()
    if sweeps < 2:
        raise SynthError(f'sweeps: expected >= 2 (flow needs pairs), got {sweeps}')
    seed = int(seed)
    duration = (sweeps - 1) * 0.1
    scene = generate_scene(seed, duration, lidar.max_range_m, scene_cfg)
    times = np.arange(sweeps) * 0.1
    stamps = timestamps_for_seed(seed, sweeps)
    poses = scene.city_T_ego(times)
    clock = _SweepClock(scene, lidar, times)
    out_sweeps: list[Sweep] = []
    ann_rows: list[tuple] = []
    for k in range(sweeps):
        rng = np.random.default_rng([seed, k, 7])
        sw = _simulate_sweep(scene, lidar, clock, k, int(stamps[k]), rng)
        out_sweeps.append(sw)
        ann_rows += _annotate(scene, lidar, clock, k, int(stamps[k]), sw.points)
    ann = pd.DataFrame(ann_rows, columns=list(ANNOTATION_COLUMNS))
    ann = ann.astype({c: ('int64' if c in ('timestamp_ns', 'num_interior_pts') else
                          str if c in ('track_uuid', 'category') else 'float64') for c in ANNOTATION_COLUMNS})
    out = SynthLog(log_id_for_seed(seed), seed, scene, stamps, poses, out_sweeps, ann)
    if with_flow:
        out.flows = compute_flows(out)
    return out


class _SweepClock:
    """Firing times of a log's rays and the ego/agent poses at them (computed once per log).

    A column is fired ``column * (100 ms // azimuths)`` after its sweep's stamp (``offset_ns``);
    a rolling-shutter revolution is cast in ``ROLLING_SLICES`` azimuth slices, each against the
    world at its mid time, and each return is then carried to its own column's time (see
    :func:`_carry_to_firing_time`), so the written point and its ``offset_ns`` agree exactly.
    """

    def __init__(self, scene: Scene, lidar: LidarConfig, times: np.ndarray):
        self.rolling = lidar.shutter != 'global'
        A = lidar.azimuths
        self.n_slices = ROLLING_SLICES if self.rolling else 1
        self.column_s = np.arange(A) * (SWEEP_PERIOD_NS // A) * 1e-9
        bounds = [j * A // self.n_slices for j in range(self.n_slices + 1)]
        self.slices = list(zip(bounds[:-1], bounds[1:]))
        mids = np.array([(c0 + c1 - 1) / 2 for c0, c1 in self.slices]) * (SWEEP_PERIOD_NS // A) * 1e-9
        self.times = times
        # per sweep: slice times (rolling) or the stamp itself (global)
        self.slice_t = times[:, None] + (mids[None, :] if self.rolling else 0.0)
        self.horizon = float(times[-1]) + 0.1
        self.slice_pose = scene.city_T_ego(self.slice_t.ravel()).reshape(len(times), self.n_slices, 4, 4)
        self.agent_xyyaw = [np.stack(a.poses(self.slice_t.ravel(), self.horizon), 0).reshape(
            3, len(times), self.n_slices) for a in scene.agents]
        self.sweep_pose = scene.city_T_ego(times)

    def column_pose(self, scene: Scene, k: int) -> np.ndarray:
        """(A,4,4) ego pose at each column's firing time in sweep k."""
        return scene.city_T_ego(self.times[k] + self.column_s)


EGO_BODY_INSTANCE = -2


def _world(scene: Scene, lidar: LidarConfig, T: np.ndarray, xyyaw: np.ndarray) -> Primitives:
    """Primitives at one instant: static world, agents within reach of the ego, the ego's body.

    ``xyyaw``: (3, n_agents) agent poses at that instant. The ego's own body occludes the rays
    that would hit it (a shadow around the car, as on a real roof mount); those returns are
    dropped, as drivers and AV2 drop self-returns.
    """
    P = _copy_static(scene.static)
    ego_xy = T[:2, 3]
    if scene.agents:
        zs = scene.surface_height(xyyaw[0], xyyaw[1])
        for agent, x, y, yaw, z in zip(scene.agents, xyyaw[0], xyyaw[1], xyyaw[2], zs):
            if np.hypot(x - ego_xy[0], y - ego_xy[1]) > lidar.max_range_m + 15.0:
                continue        # neither visible nor annotated (tracks lie within a few m of x, y)
            Ra = agent_rotation(scene, agent, float(x), float(y), float(yaw))
            _agent_primitives(P, agent, Ra, np.array([x, y, z]), float(yaw))
    # body (bonnet/boot height) over the whole footprint, and a cabin up to the roof, which sits
    # 0.6 m under the sensor (a roof rack) and at most 1.5 m high: as on KITTI's bundled sweeps,
    # the lowest beam (-24.8 deg) clears the cabin to the front and sides but not the boot
    roof = min(1.5, lidar.sensor_xyz[2] - 0.6)
    yaw = float(np.arctan2(T[1, 0], T[0, 0]))
    nose = EGO_LENGTH - EGO_REAR_OVERHANG
    for x0, x1, half_w, top in ((-EGO_REAR_OVERHANG, nose, EGO_WIDTH / 2, min(1.0, roof)),
                                (0.2, 2.4, EGO_WIDTH / 2 - 0.15, roof)):
        centre = T[:3, :3] @ np.array([(x0 + x1) / 2, 0.0, (0.2 + top) / 2]) + T[:3, 3]
        P.add_box(centre, ((x1 - x0) / 2, half_w, (top - 0.2) / 2), yaw, instance=EGO_BODY_INSTANCE,
                  rotation=T[:3, :3])
    return P


def _cast_sweep(scene: Scene, lidar: LidarConfig, clock: _SweepClock, k: int, rng) -> dict:
    """Cast sweep k slice by slice; per ray: range, what it hit, origin and direction (city)."""
    dirs_e, laser, column = lidar.ray_grid()
    n, B = len(dirs_e), lidar.beams
    out = {'t': np.full(n, np.inf), 'inst': np.full(n, -1, np.int32), 'ground': np.zeros(n, bool),
           'refl': np.zeros(n), 'origin': np.zeros((n, 3)), 'dirs': np.zeros((n, 3)),
           'slice_t': np.zeros(n), 'laser': laser, 'column': column}
    sensor = np.asarray(lidar.sensor_xyz, dtype=np.float64)
    for j, (c0, c1) in enumerate(clock.slices):
        T = clock.slice_pose[k, j]
        xyyaw = (np.stack([p[:, k, j] for p in clock.agent_xyyaw], 1) if clock.agent_xyyaw
                 else np.zeros((3, 0)))
        P = _world(scene, lidar, T, xyyaw)
        sl = slice(c0 * B, c1 * B)
        o = T[:3, :3] @ sensor + T[:3, 3]
        d = dirs_e[sl] @ T[:3, :3].T
        res = cast(o, d, scene.ground, P, lidar.max_range_m, rng)
        tab = P.table()
        pr = np.maximum(res.prim, 0)
        out['t'][sl] = np.where(tab['instance'][pr] == EGO_BODY_INSTANCE, np.inf, res.t)
        out['inst'][sl] = np.where(res.prim >= 0, tab['instance'][pr], -1)
        out['ground'][sl] = tab['ground'][pr] & (res.prim >= 0)
        out['refl'][sl] = tab['reflectivity'][pr]
        out['origin'][sl] = o
        out['dirs'][sl] = d
        out['slice_t'][sl] = clock.slice_t[k, j]
    return out


def _drop_returns(lidar: LidarConfig, ray: dict, rng) -> tuple[np.ndarray, np.ndarray]:
    """Return the indices of the rays that return, and their noisy ranges.

    Dropout grows with range, for dark surfaces and for ground seen at grazing angles (weak
    returns; the ground's normal is taken as up, slopes are a few degrees); with
    ``range_10pct_m`` a return also fades past the range the sensor reaches on its reflectivity
    (lidar equation: reach ~ sqrt(reflectivity)).
    """
    t, refl, dirs = ray['t'], ray['refl'], ray['dirs']
    hit = np.isfinite(t)
    cos_inc = np.where(ray['ground'], np.abs(dirs[:, 2]), 1.0)
    r0 = np.where(hit, t, 0.0)
    p_drop = (lidar.dropout + 0.25 * (r0 / lidar.max_range_m) ** 3 * (1.2 - refl)
              + 0.3 * (1.0 - cos_inc) ** 8)
    if lidar.range_10pct_m is not None:
        reach = lidar.range_10pct_m * np.sqrt(np.maximum(refl, 0.01) / 0.1)
        p_drop = p_drop + 1.0 / (1.0 + np.exp(-np.clip((r0 - reach) / (0.08 * reach), -50, 50)))
    hit &= rng.random(len(hit)) >= p_drop
    noisy = t + rng.normal(0.0, lidar.range_noise_m, size=len(t))
    keep = np.flatnonzero(hit & (noisy > lidar.min_range_m) & (noisy <= lidar.max_range_m))
    return keep, noisy[keep]


def _carry_to_firing_time(scene: Scene, clock: _SweepClock, X: np.ndarray, inst: np.ndarray,
                          t_from: np.ndarray, t_to: np.ndarray) -> np.ndarray:
    """Move returns on moving agents rigidly from their slice time to their column's time.

    The static world stays put; an agent's point turns by its change of heading about its
    origin and follows it (height from the ground under it). At most half a slice (2.5 ms):
    the point stays on the object's surface; its ray direction shifts by <= 8 cm at 30 m/s.
    """
    X = X.copy()
    by_inst = {a.instance: a for a in scene.agents if a.profile is not None}
    for i in np.unique(inst[inst >= 0]):
        agent = by_inst.get(int(i))
        if agent is None:
            continue
        m = np.flatnonzero(inst == i)
        x0, y0, w0 = agent.poses(t_from[m], clock.horizon)
        x1, y1, w1 = agent.poses(t_to[m], clock.horizon)
        c, s = np.cos(w1 - w0), np.sin(w1 - w0)
        dx, dy = X[m, 0] - x0, X[m, 1] - y0
        X[m, 0] = x1 + c * dx - s * dy
        X[m, 1] = y1 + s * dx + c * dy
        X[m, 2] += scene.ground.height(x1, y1) - scene.ground.height(x0, y0)
    return X


def _simulate_sweep(scene: Scene, lidar: LidarConfig, clock: _SweepClock, k: int, stamp: int, rng) -> Sweep:
    """Cast, drop, carry and express one sweep (frame per ``lidar.shutter``)."""
    ray = _cast_sweep(scene, lidar, clock, k, rng)
    keep, r = _drop_returns(lidar, ray, rng)
    column = ray['column'][keep]
    inst = ray['inst'][keep]
    pc = ray['origin'][keep] + r[:, None] * ray['dirs'][keep]
    if clock.rolling:
        t_fire = clock.times[k] + clock.column_s[column]
        pc = _carry_to_firing_time(scene, clock, pc, inst, ray['slice_t'][keep], t_fire)
    if lidar.shutter == 'raw':          # each point in the sensor pose of its own firing time
        Tc = clock.column_pose(scene, k)[column]
        pe = np.einsum('nji,nj->ni', Tc[:, :3, :3], pc - Tc[:, :3, 3])
    else:
        T = clock.sweep_pose[k]
        pe = (pc - T[:3, 3]) @ T[:3, :3]                 # city -> ego (R orthonormal)
    is_ground = ray['ground'][keep]
    cos_inc = np.where(is_ground, np.abs(ray['dirs'][keep, 2]), 1.0)
    falloff = (1.0 - 0.5 * (r / lidar.max_range_m)) * (0.3 + 0.7 * np.sqrt(cos_inc))
    # gains put mean intensities near real AV2 sweeps (ground ~12, the rest ~23, signs bright)
    refl_k = ray['refl'][keep]
    gain = np.where(is_ground, 0.5, np.where(refl_k >= 0.9, 1.0, 0.25))
    inten = np.clip(255.0 * refl_k * gain * falloff + rng.normal(0, 2.0, len(r)), 0, 255)
    return Sweep(stamp, pe.astype(np.float32), inten.astype(np.uint8), ray['laser'][keep].astype(np.uint8),
                 (column * (SWEEP_PERIOD_NS // lidar.azimuths)).astype(np.int32), is_ground.copy(),
                 inst.astype(np.int32))


def _annotate(scene: Scene, lidar: LidarConfig, clock: _SweepClock, k: int, stamp: int,
              pts: np.ndarray) -> list[tuple]:
    """Cuboid rows of sweep k: each track where the sensor saw it (av2 columns).

    With a rolling shutter an object is annotated at the firing time of the column through its
    centre, in the frame its points are written in, as an annotator fits a box to the points.
    """
    t_k = float(clock.times[k])
    T = clock.sweep_pose[k]
    ego_xy = T[:2, 3]
    sensor = np.asarray(lidar.sensor_xyz, dtype=np.float64)
    index = _PointIndex(pts)
    rows = []
    for agent in scene.agents:
        x, y, yaw = (float(v[0]) for v in agent.poses(np.array([t_k]), clock.horizon))
        if np.hypot(x - ego_xy[0], y - ego_xy[1]) > lidar.max_range_m + 15.0:
            continue
        for trk in agent.tracks:
            t_obs, frame = t_k, T
            if clock.rolling:
                # a static object in a raw sweep is boxed where the log's first sweep saw it and
                # carried by the ego motion, so it moves exactly as the static world's ego rule
                # says (never "dynamic"); movers are boxed at their own firing time
                k_ref = 0 if (agent.profile is None and lidar.shutter == 'raw') else k
                t_ref = float(clock.times[k_ref])
                T_ref = clock.sweep_pose[k_ref]
                z = float(scene.surface_height(np.array([x]), np.array([y]))[0])
                c_e = (_pose_of(scene, agent, x, y, yaw, z) @ np.append(trk.offset, 1.0))[:3]
                rel = (c_e - T_ref[:3, 3]) @ T_ref[:3, :3] - sensor
                col = int(np.round((np.pi - np.arctan2(rel[1], rel[0])) / (2 * np.pi) * lidar.azimuths))
                t_obs = t_ref + clock.column_s[col % lidar.azimuths]
                if lidar.shutter == 'raw':
                    frame = T @ _se3_inverse(T_ref) @ scene.city_T_ego(np.array([t_obs]))[0]
                    if k_ref != k:
                        t_obs = t_k          # static: its pose does not depend on time
            xo, yo, wo = (float(v[0]) for v in agent.poses(np.array([t_obs]), clock.horizon))
            zo = float(scene.surface_height(np.array([xo]), np.array([yo]))[0])
            city_obj = _pose_of(scene, agent, xo, yo, wo, zo) @ _se3(np.eye(3), trk.offset)
            if np.hypot(*(city_obj[:2, 3] - ego_xy)) > lidar.max_range_m:
                continue
            ego_T_obj = _se3_inverse(frame) @ city_obj
            q = _matrix_to_quat(ego_T_obj[:3, :3])
            Rq = quat_wxyz_to_mat(q)
            tvec = ego_T_obj[:3, 3]
            n_in = int(interior_mask(pts, index, Rq, tvec, trk.dims).sum())
            if n_in == 0:
                continue    # as AV2: no cuboid without a lidar point (av2's loader drops them too)
            rows.append((stamp, trk.uuid, trk.category, float(trk.dims[0]), float(trk.dims[1]),
                         float(trk.dims[2]), *map(float, q), *map(float, tvec), n_in))
    return rows


def _pose_of(scene: Scene, agent: Agent, x: float, y: float, yaw: float, z: float) -> np.ndarray:
    return _se3(agent_rotation(scene, agent, x, y, yaw), np.array([x, y, z]))


def _matrix_to_quat(R: np.ndarray) -> np.ndarray:
    return matrix_to_quat(R)


def compute_flows(log_: SynthLog) -> list[dict[str, np.ndarray]]:
    """GT for each pair (t, t+1), from the annotations and poses exactly as they are written."""
    ann = log_.annotations
    groups = {int(ts): g for ts, g in ann.groupby('timestamp_ns', sort=False)}
    empty = ann.iloc[0:0]
    flows = []
    for k in range(len(log_.sweeps) - 1):
        ts0, ts1 = int(log_.timestamps[k]), int(log_.timestamps[k + 1])
        city_T_ego1 = _pose_from_row(log_.city_T_ego[k + 1])
        ego1_T_ego0 = _se3_inverse(city_T_ego1) @ _pose_from_row(log_.city_T_ego[k])
        lab = av2_flow_labels(log_.sweeps[k].points, groups.get(ts0, empty), groups.get(ts1, empty),
                              ego1_T_ego0)
        lab['is_ground'] = log_.sweeps[k].is_ground
        lab['instance_id'] = log_.sweeps[k].instance_id
        flows.append(lab)
    return flows


def _pose_quat_trans(T: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return _matrix_to_quat(T[:3, :3]), T[:3, 3].copy()


def _pose_from_row(T: np.ndarray) -> np.ndarray:
    """Rebuild the pose as a reader does from the written (quaternion, translation) row."""
    q, t = _pose_quat_trans(T)
    return _se3(quat_wxyz_to_mat(q), t)


# --------------------------------------------------------------------------- writing

def _write_feather(df, path: Path) -> None:
    import pyarrow as pa
    import pyarrow.feather as feather
    # LZ4 as AV2's own files; the whole log is renamed into place by write_log
    feather.write_feather(pa.Table.from_pandas(df, preserve_index=False), path, compression='lz4')


def _ground_raster(scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    """Ground height (float16, NaN under buildings/walls/hedges) on 0.3 m cells, and img_t_city.

    Cell (row i, col j) holds the surface height at its centre, as av2 reads it back by truncating
    ``img = s * (city + t)``.
    """
    x0, y0, x1, y1 = scene.bounds
    x0, y0 = np.floor(x0), np.floor(y0)
    w = int(np.ceil((x1 - x0) / RASTER_RES_M))
    h = int(np.ceil((y1 - y0) / RASTER_RES_M))
    cx = x0 + (np.arange(w) + 0.5) * RASTER_RES_M
    cy = y0 + (np.arange(h) + 0.5) * RASTER_RES_M
    X, Y = np.meshgrid(cx, cy)                      # [row = y, col = x] as av2 indexes
    Z = scene.ground.height(X, Y)

    def window(c, half):
        """Row/col slices of the cells a rotated rectangle can touch."""
        r = float(np.hypot(*half)) + RASTER_RES_M
        j0, j1 = np.clip(np.floor((np.array([c[0] - r, c[0] + r]) - x0) / RASTER_RES_M).astype(int), 0, w)
        i0, i1 = np.clip(np.floor((np.array([c[1] - r, c[1] + r]) - y0) / RASTER_RES_M).astype(int), 0, h)
        return slice(i0, i1 + 1), slice(j0, j1 + 1)

    def local(c, yaw, win):
        cs, sn = np.cos(yaw), np.sin(yaw)
        dx, dy = X[win] - c[0], Y[win] - c[1]
        return cs * dx + sn * dy, -sn * dx + cs * dy

    prims = scene.static
    for c, half, yaw, off in zip(prims.slab_center, prims.slab_half, prims.slab_yaw, prims.slab_offset):
        win = window(c, half)
        lx, ly = local(c, yaw, win)
        Z[win] = np.where((np.abs(lx) <= half[0]) & (np.abs(ly) <= half[1]), Z[win] + off, Z[win])
    grow = 0.2      # a face's returns (2 cm noise) fall in cells whose centres lie within 0.2 m of it
    for c, half, yaw in scene.unmapped_footprints:
        win = window(c, half + grow)
        lx, ly = local(c, yaw, win)
        # so a wall's returns never read the height of the ground next to it
        inside = (np.abs(lx) <= half[0] + grow) & (np.abs(ly) <= half[1] + grow)
        Z[win] = np.where(inside, np.nan, Z[win])
    return Z.astype(np.float16), np.array([-x0, -y0])


def _polyline(pts: Iterable, z_fn) -> list[dict]:
    return [{'x': round(float(x), 3), 'y': round(float(y), 3), 'z': round(float(z_fn(x, y)), 3)}
            for x, y in pts]


def _vector_map(scene: Scene) -> dict:
    """Minimal AV2 vector map: one drivable area and straight lane segments per road, crosswalks."""
    z = lambda x, y: float(scene.ground.height(np.array(x), np.array(y)))  # noqa: E731
    x0, y0, x1, y1 = scene.bounds
    das, lanes, xings = {}, {}, {}
    next_id = 1
    for road in scene.roads:
        hc = road.half_carriageway
        if road.axis == 0:
            if not y0 <= road.center <= y1:
                continue
            lo, hi = road.center - hc, road.center + hc
            rect = [(x0, lo), (x1, lo), (x1, hi), (x0, hi)]
        else:
            if not x0 <= road.center <= x1:
                continue
            lo, hi = road.center - hc, road.center + hc
            rect = [(lo, y0), (hi, y0), (hi, y1), (lo, y1)]
        das[str(next_id)] = {'area_boundary': _polyline(rect, z), 'id': next_id}
        next_id += 1
        for direction in (1, -1):
            for lane in range(road.lanes):
                a, b = lane * 3.5, (lane + 1) * 3.5          # right-hand lanes, offsets to the right
                lo, hi = (x0, x1) if road.axis == 0 else (y0, y1)
                s0, s1 = (lo, hi) if direction > 0 else (hi, lo)

                def pt(s, off):
                    # right of travel: -y for +x travel, +x for +y travel
                    if road.axis == 0:
                        return (s, road.center - direction * off)
                    return (road.center + direction * off, s)
                lanes[str(next_id)] = {
                    'id': next_id, 'is_intersection': False, 'lane_type': 'VEHICLE',
                    'left_lane_boundary': _polyline([pt(s0, a), pt(s1, a)], z),
                    'right_lane_boundary': _polyline([pt(s0, b), pt(s1, b)], z),
                    'left_lane_mark_type': 'DOUBLE_SOLID_YELLOW' if lane == 0 else 'DASHED_WHITE',
                    'right_lane_mark_type': 'SOLID_WHITE' if lane == road.lanes - 1 else 'DASHED_WHITE',
                    'successors': [], 'predecessors': [], 'right_neighbor_id': None, 'left_neighbor_id': None}
                next_id += 1
    for cw in scene.crosswalks:
        (xa, yc), (xb, _) = cw
        xings[str(next_id)] = {'id': next_id, 'edge1': _polyline([(xa, yc - 1.5), (xb, yc - 1.5)], z),
                               'edge2': _polyline([(xa, yc + 1.5), (xb, yc + 1.5)], z)}
        next_id += 1
    return {'pedestrian_crossings': xings, 'lane_segments': lanes, 'drivable_areas': das}


def write_log(log_: SynthLog, split_dir: Path, lidar: LidarConfig) -> Path:
    """Write one simulated log as ``split_dir/<log_id>/``, replacing any old one as a whole.

    The log is built in ``split_dir/../.synth_partial/`` and renamed into place, so readers never
    see a half-written log and a rerun with other settings leaves no stale sweeps behind.
    """
    import shutil

    final = Path(split_dir) / log_.log_id
    partial_root = Path(split_dir).parent / '.synth_partial'
    d = partial_root / f'{Path(split_dir).name}-{log_.log_id}-{os.getpid()}'
    if d.exists():
        shutil.rmtree(d)
    try:
        _write_log_files(log_, d, lidar)
        if final.exists():
            shutil.rmtree(final)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(d, final)
    finally:
        if d.exists():
            shutil.rmtree(d, ignore_errors=True)
        try:
            partial_root.rmdir()
        except OSError:
            pass        # other workers still busy there
    return final


def _write_log_files(log_: SynthLog, d: Path, lidar: LidarConfig) -> None:
    import pandas as pd

    for sub in ('sensors/lidar', 'scene_flow', 'map', 'calibration'):
        (d / sub).mkdir(parents=True, exist_ok=True)
    for sw in log_.sweeps:
        _write_feather(pd.DataFrame({
            'x': sw.points[:, 0], 'y': sw.points[:, 1], 'z': sw.points[:, 2],
            'intensity': sw.intensity, 'laser_number': sw.laser_number, 'offset_ns': sw.offset_ns}),
            d / 'sensors' / 'lidar' / f'{sw.timestamp_ns}.feather')
    rows = []
    for ts, T in zip(log_.timestamps, log_.city_T_ego):
        q, t = _pose_quat_trans(T)
        rows.append((int(ts), *map(float, q), *map(float, t)))
    poses = pd.DataFrame(rows, columns=['timestamp_ns', 'qw', 'qx', 'qy', 'qz', 'tx_m', 'ty_m', 'tz_m'])
    _write_feather(poses.astype({'timestamp_ns': 'int64'}), d / 'city_SE3_egovehicle.feather')
    _write_feather(log_.annotations, d / 'annotations.feather')
    _write_feather(pd.DataFrame([('up_lidar', 1.0, 0.0, 0.0, 0.0, *map(float, lidar.sensor_xyz))],
                                columns=['sensor_name', 'qw', 'qx', 'qy', 'qz', 'tx_m', 'ty_m', 'tz_m']),
                   d / 'calibration' / 'egovehicle_SE3_sensor.feather')
    for k, lab in enumerate(log_.flows):
        _write_feather(pd.DataFrame({
            'flow_tx_m': lab['flow'][:, 0], 'flow_ty_m': lab['flow'][:, 1], 'flow_tz_m': lab['flow'][:, 2],
            'is_valid': lab['is_valid'], 'is_dynamic': lab['is_dynamic'], 'is_ground': lab['is_ground'],
            'category_indices': lab['category_indices'], 'instance_id': lab['instance_id']}),
            d / 'scene_flow' / f'{int(log_.timestamps[k])}.feather')
    raster, img_t = _ground_raster(log_.scene)
    with open(d / 'map' / f'{log_.log_id}_ground_height_surface____{CITY}.npy', 'wb') as f:
        np.save(f, raster)
    (d / 'map' / f'{log_.log_id}___img_Sim2_city.json').write_text(json.dumps(
        {'R': [1.0, 0.0, 0.0, 1.0], 't': [float(img_t[0]), float(img_t[1])], 's': 1.0 / RASTER_RES_M}))
    map_num = int(log_.seed) % 100_000
    (d / 'map' / f'log_map_archive_{log_.log_id}____{CITY}_city_{map_num}.json').write_text(
        json.dumps(_vector_map(log_.scene)))
    (d / 'synth.json').write_text(json.dumps({
        'generator': 'zeroflow_training.data.synth', 'version': GENERATOR_VERSION, 'seed': int(log_.seed),
        'sweeps': len(log_.sweeps), 'ego_mode': log_.scene.ego_mode, 'scene_kind': log_.scene.kind,
        'lidar': asdict(lidar)}, indent=1,
        sort_keys=True))


def generate_one(seed: int, split_dir: Path, sweeps: int, lidar: LidarConfig | None = None,
                 scene_cfg: SceneConfig | None = None) -> dict:
    """Simulate and write one log; returns a small summary (used by the CLI and its workers)."""
    import time
    lidar = lidar or LidarConfig()
    t0, c0 = time.perf_counter(), time.process_time()
    lg = simulate_log(seed, sweeps, lidar, scene_cfg)
    path = write_log(lg, split_dir, lidar)
    return {'seed': int(seed), 'log_id': lg.log_id, 'path': str(path), 'seconds': time.perf_counter() - t0,
            'cpu_seconds': time.process_time() - c0, 'points': [len(s.points) for s in lg.sweeps],
            'ego_mode': lg.scene.ego_mode, 'scene_kind': lg.scene.kind}


def split_seeds(split: str, count: int, seed: int) -> list[int]:
    """Seeds of a split: train ``seed + i``, val ``VAL_SEED_BASE + i`` (disjoint: seed + count <= 1e6)."""
    if split == 'train':
        if seed < 0 or seed + count > VAL_SEED_BASE:
            raise SynthError(f'seed: train seeds seed..seed+{count - 1} must stay in [0, {VAL_SEED_BASE}) '
                             f'so they never reach the val range; got seed={seed}')
        return [seed + i for i in range(count)]
    if split == 'val':
        return [VAL_SEED_BASE + i for i in range(count)]
    raise SynthError(f'split: expected "train" or "val", got {split!r}')


def make_tiny_dataset(tmp_path: Path, logs: int = 1, sweeps: int = 3, split: str = 'val', seed: int = 0,
                      beams: int = 16, azimuths: int = 600, scene_cfg: SceneConfig | None = None) -> Path:
    """Write ``logs`` x ``sweeps`` test logs under ``tmp_path/<split>/``; return ``tmp_path``.

    Reduced beams/azimuths keep it to a few seconds on one core. Seeds follow :func:`split_seeds`.
    """
    root = Path(tmp_path)
    lidar = LidarConfig(beams=beams, azimuths=azimuths)
    for s in split_seeds(split, logs, seed):
        generate_one(s, root / split, sweeps, lidar, scene_cfg)
    return root
