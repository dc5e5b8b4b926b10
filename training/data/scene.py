"""Procedural urban scenes for the synthetic lidar: road grid, static world, agents, ego route.

Everything here is in the **city frame** (x east, y north, z up, metres) and depends only on
the sequence seed. A scene is a Manhattan grid of roads (1-2 lanes each way, optional parking
lanes, raised sidewalks with curbs) on a gently sloped, undulating ground; blocks hold
buildings, walls, hedges, trees, poles, signs and bollards. Agents (cars, box trucks, buses,
cyclists, pedestrians) follow lane or sidewalk paths with speed profiles (cruise, brake to a
stop, wait then pull away, turn at intersections). Vehicles sharing a lane form a platoon that
shares one speed profile, so they never run into each other; the ego's own lane platoon
shares the ego's profile (the car ahead stops when the ego stops).

Three kinds of scene (:class:`SceneConfig` ``kind_mix``, drawn from the seed on a stream of its
own so urban scenes are unchanged): ``urban`` as above; ``arterial`` (the ego's road 3 lanes each
way, crossings 100-200 m apart, ego 12-20 m/s, its traffic 8-20 m/s) and ``highway`` (4 lanes
each way, a median barrier, crossings 250-450 m apart, ego 18-30 m/s, traffic 10-30 m/s, more
trucks and buses). Fast scenes always hold a close cut-in (a car merging into the ego's lane 3-15 m
ahead, urban scenes sometimes) and vehicles turning off a crossing road at 7-13 m/s on 15-35 m
radii. Bushes, grass verges, bins, benches and hydrants stand behind the sidewalks.

Each annotated object is a *track* with a cuboid rigidly attached to its agent; its geometry
(boxes, cylinders) lies strictly inside the cuboid, as a good annotation would.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import numpy as np

from .raycast import GroundSurface, Primitives, SynthError

LANE_W = 3.5
CURB_H = 0.15
DT_FINE = 0.005


# --------------------------------------------------------------------------- paths and motion

class Path2D:
    """Polyline with arc length; poses beyond either end extrapolate along the end tangents."""

    def __init__(self, pts: np.ndarray):
        pts = np.asarray(pts, float)
        keep = np.concatenate([[True], np.linalg.norm(np.diff(pts, axis=0), axis=1) > 1e-9])
        self.pts = pts[keep]
        seg = np.linalg.norm(np.diff(self.pts, axis=0), axis=1)
        self.s = np.concatenate([[0.0], np.cumsum(seg)])
        self.length = float(self.s[-1])

    def pose(self, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(x, y, yaw) at arc lengths ``s``; yaw is the smoothed tangent direction."""
        s = np.atleast_1d(np.asarray(s, float))
        x = np.interp(s, self.s, self.pts[:, 0])
        y = np.interp(s, self.s, self.pts[:, 1])
        d0 = self.pts[1] - self.pts[0]
        d1 = self.pts[-1] - self.pts[-2]
        lo, hi = s < 0, s > self.length
        x = np.where(lo, self.pts[0, 0] + s * d0[0] / np.linalg.norm(d0), x)
        y = np.where(lo, self.pts[0, 1] + s * d0[1] / np.linalg.norm(d0), y)
        ex = s - self.length
        x = np.where(hi, self.pts[-1, 0] + ex * d1[0] / np.linalg.norm(d1), x)
        y = np.where(hi, self.pts[-1, 1] + ex * d1[1] / np.linalg.norm(d1), y)
        # tangent from a centred difference over +-0.5 m (smooth through polyline kinks)
        sa, sb = s - 0.5, s + 0.5
        xa = np.interp(sa, self.s, self.pts[:, 0]) + np.where(sa < 0, sa * d0[0] / np.linalg.norm(d0), 0)
        ya = np.interp(sa, self.s, self.pts[:, 1]) + np.where(sa < 0, sa * d0[1] / np.linalg.norm(d0), 0)
        ex = np.where(sb > self.length, sb - self.length, 0.0) / np.linalg.norm(d1)
        xb = np.interp(sb, self.s, self.pts[:, 0]) + ex * d1[0]
        yb = np.interp(sb, self.s, self.pts[:, 1]) + ex * d1[1]
        return x, y, np.arctan2(yb - ya, xb - xa)


@dataclass
class SpeedProfile:
    """Piecewise-constant acceleration, speed clipped to [0, v_max]; s(t) integrated finely."""

    v0: float
    phases: list[tuple[float, float]]   # (start time s, acceleration m/s^2), sorted by time
    v_max: float = 20.0

    def arc_length(self, times: np.ndarray, horizon: float) -> np.ndarray:
        tf = np.arange(0.0, horizon + 2 * DT_FINE, DT_FINE)
        v = np.empty_like(tf)
        starts = [0.0] + [max(t0, 0.0) for t0, _ in self.phases]
        accs = [0.0] + [a for _, a in self.phases]
        v_start = min(max(self.v0, 0.0), self.v_max)
        for i, (t0, a) in enumerate(zip(starts, accs)):
            t1 = starts[i + 1] if i + 1 < len(starts) else np.inf
            sel = (tf >= t0) & (tf < t1)
            # constant acceleration within a phase: the speed is monotone, so clipping it is exact
            v[sel] = np.clip(v_start + a * (tf[sel] - t0), 0.0, self.v_max)
            if np.isfinite(t1):
                v_start = float(np.clip(v_start + a * (t1 - t0), 0.0, self.v_max))
        s = np.concatenate([[0.0], np.cumsum(0.5 * (v[1:] + v[:-1]) * DT_FINE)])
        return np.interp(times, tf, s)


# --------------------------------------------------------------------------- road grid

@dataclass
class Road:
    axis: int            # 0: runs along x (centre is a y value); 1: runs along y (centre is an x value)
    center: float
    lanes: int           # per direction
    parking: float       # parking lane width each side (0 = none)
    sidewalk: float

    @property
    def half_carriageway(self) -> float:
        return self.lanes * LANE_W + self.parking

    @property
    def half_width(self) -> float:
        return self.half_carriageway + self.sidewalk


def _spacings(rng: np.random.Generator, start: float, lo: float, hi: float, n: int,
              sign: float) -> list[float]:
    out, c = [], start
    for _ in range(n):
        c += sign * rng.uniform(lo, hi)
        out.append(c)
    return out


def _make_road(rng: np.random.Generator, axis: int, center: float) -> Road:
    return Road(axis, center, int(rng.choice([1, 2], p=[0.55, 0.45])),
                float(rng.choice([0.0, 2.4], p=[0.3, 0.7])), float(rng.uniform(2.5, 4.0)))


# --------------------------------------------------------------------------- agents and tracks

@dataclass
class Part:
    kind: str                 # 'box' | 'cyl'
    center: np.ndarray        # agent frame (origin on the ground under the agent's centre)
    size: np.ndarray          # box: half extents; cyl: (radius, half height, 0)
    reflectivity: float
    porosity: float = 0.0


@dataclass
class Track:
    uuid: str
    category: str
    dims: np.ndarray          # length, width, height
    offset: np.ndarray        # cuboid centre in the agent frame


@dataclass
class Agent:
    instance: int
    path: Path2D
    s0: float
    profile: SpeedProfile | None       # None: static
    parts: list[Part]
    tracks: list[Track]
    kind: str

    @property
    def tilts(self) -> bool:
        """Vehicles follow the ground's slope; people, two-wheelers and street furniture stay upright."""
        return self.kind in ('vehicle', 'parked')

    def poses(self, times: np.ndarray, horizon: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        s = self.s0 + (self.profile.arc_length(times, horizon) if self.profile else np.zeros(len(times)))
        return self.path.pose(s)


def _box(cx, cy, z0, z1, hl, hw, refl, por=0.0) -> Part:
    return Part('box', np.array([cx, cy, (z0 + z1) / 2]), np.array([hl, hw, (z1 - z0) / 2]), refl, por)


def _cyl(cx, cy, z0, z1, r, refl) -> Part:
    return Part('cyl', np.array([cx, cy, (z0 + z1) / 2]), np.array([r, (z1 - z0) / 2, 0.0]), refl)


VEHICLE_MIX = (('REGULAR_VEHICLE', 0.72), ('LARGE_VEHICLE', 0.08), ('BOX_TRUCK', 0.09), ('BUS', 0.06),
               ('TRUCK', 0.05))
# arterials and highways carry more long vehicles
FAST_VEHICLE_MIX = (('REGULAR_VEHICLE', 0.55), ('LARGE_VEHICLE', 0.1), ('BOX_TRUCK', 0.12), ('BUS', 0.08),
                    ('TRUCK', 0.15))


def vehicle_body(rng: np.random.Generator, category: str) -> tuple[list[Part], np.ndarray]:
    """Parts and cuboid dims (l, w, h) of a vehicle; parts sit >= 2 cm inside the cuboid."""
    refl = float(rng.uniform(0.3, 0.8))
    if category == 'REGULAR_VEHICLE':
        L, W, H = rng.uniform(4.0, 5.1), rng.uniform(1.75, 2.0), rng.uniform(1.42, 1.9)
        z_belt = 0.55 * H
        cab_len = rng.uniform(0.45, 0.6) * L
        parts = [_box(0, 0, 0.18, z_belt, L / 2 - 0.03, W / 2 - 0.03, refl),
                 _box(-0.06 * L, 0, z_belt, H - 0.03, cab_len / 2, W / 2 - 0.12, refl * 0.8)]
    elif category == 'BOX_TRUCK':
        L, W, H = rng.uniform(6.5, 9.0), rng.uniform(2.3, 2.55), rng.uniform(3.0, 3.7)
        cab = 1.9
        parts = [_box(L / 2 - cab / 2 - 0.03, 0, 0.35, 2.6, cab / 2 - 0.03, W / 2 - 0.08, refl),
                 _box(-cab / 2, 0, 0.6, H - 0.03, (L - cab) / 2 - 0.1, W / 2 - 0.03, refl * 0.9)]
    elif category == 'LARGE_VEHICLE':     # vans, large pick-ups
        L, W, H = rng.uniform(5.0, 6.2), rng.uniform(1.95, 2.15), rng.uniform(1.9, 2.7)
        parts = [_box(0.3, 0, 0.25, H - 0.03, L / 2 - 0.33, W / 2 - 0.03, refl),
                 _box(L / 2 - 0.3, 0, 0.3, 0.55 * H, 0.27, W / 2 - 0.06, refl)]
    elif category == 'TRUCK':             # rigid truck: cab and a lower flatbed load
        L, W, H = rng.uniform(7.0, 10.0), rng.uniform(2.4, 2.55), rng.uniform(3.0, 3.5)
        cab = 2.2
        parts = [_box(L / 2 - cab / 2 - 0.03, 0, 0.4, H - 0.03, cab / 2 - 0.03, W / 2 - 0.05, refl),
                 _box(-cab / 2, 0, 0.9, rng.uniform(1.4, H - 0.1), (L - cab) / 2 - 0.1, W / 2 - 0.03,
                      refl * 0.8)]
    elif category == 'BUS':
        L, W, H = rng.uniform(11.0, 13.0), 2.55, rng.uniform(3.0, 3.3)
        parts = [_box(0, 0, 0.3, H - 0.03, L / 2 - 0.03, W / 2 - 0.03, refl)]
    else:
        raise SynthError(f'vehicle category: expected one of {[c for c, _ in VEHICLE_MIX]}, got {category!r}')
    return parts, np.array([L, W, H])


def pedestrian_body(rng: np.random.Generator) -> tuple[list[Part], np.ndarray]:
    H = rng.uniform(1.5, 1.95)
    refl = float(rng.uniform(0.15, 0.5))
    parts = [_cyl(0, 0, 0.0, 0.5 * H, 0.15, refl),
             _cyl(0, 0, 0.5 * H, 0.85 * H, rng.uniform(0.18, 0.24), refl),
             _cyl(0, 0, 0.85 * H, H - 0.02, 0.1, refl)]
    return parts, np.array([0.6, 0.6, H])


def motorcyclist_body(rng: np.random.Generator) -> tuple[list[Part], list[tuple]]:
    refl = float(rng.uniform(0.3, 0.8))
    parts = [_box(0, 0, 0.2, 1.0, 1.0, 0.18, refl),
             _cyl(-0.2, 0, 0.9, 1.45, 0.22, refl * 0.7),
             _cyl(-0.1, 0, 1.45, 1.68, 0.13, refl)]
    tracks = [('MOTORCYCLE', np.array([2.15, 0.8, 1.15]), np.array([0.0, 0.0, 0.575])),
              ('MOTORCYCLIST', np.array([0.9, 0.8, 1.72]), np.array([-0.15, 0.0, 0.86]))]
    return parts, tracks


def cyclist_body(rng: np.random.Generator) -> tuple[list[Part], list[tuple[str, np.ndarray, np.ndarray]]]:
    refl = float(rng.uniform(0.2, 0.6))
    parts = [_box(0, 0, 0.25, 1.0, 0.82, 0.05, refl),
             _cyl(-0.15, 0, 1.0, 1.5, 0.2, refl),
             _cyl(-0.05, 0, 1.5, 1.74, 0.1, refl)]
    tracks = [('BICYCLE', np.array([1.8, 0.5, 1.1]), np.array([0.0, 0.0, 0.55])),
              ('BICYCLIST', np.array([0.8, 0.7, 1.78]), np.array([-0.1, 0.0, 0.89]))]
    return parts, tracks


# --------------------------------------------------------------------------- scene

@dataclass
class SceneConfig:
    """Densities and behaviours; defaults give a busy but plausible downtown street."""

    vehicle_lane_prob: float = 0.55         # chance a lane near the route carries a platoon
    parked_density: float = 0.45            # fraction of parking lane length filled
    pedestrians_per_100m: float = 4.0
    cyclist_prob: float = 0.35
    motorcyclist_prob: float = 0.12
    tree_spacing_m: tuple[float, float] = (9.0, 22.0)
    ego_modes: tuple[tuple[str, float], ...] = (
        ('cruise', 0.35), ('turn', 0.25), ('stop', 0.2), ('start', 0.2))
    # urban: the downtown grid above; arterial: the ego on a 3-lane-each-way road at 12-20 m/s;
    # highway: 4 lanes each way, a median barrier, crossings 250-450 m apart, 18-30 m/s traffic
    kind_mix: tuple[tuple[str, float], ...] = (('urban', 0.5), ('arterial', 0.25), ('highway', 0.25))
    kind: str | None = None                 # force a kind (else drawn from the seed by kind_mix)
    cut_in_prob_urban: float = 0.25         # a car merging close ahead of the ego (always on fast roads)


@dataclass
class Scene:
    seed: int
    ground: GroundSurface
    roads: list[Road]
    static: Primitives                      # unannotated static world (instance -1)
    agents: list[Agent]                     # annotated objects, static or moving
    ego_path: Path2D
    ego_profile: SpeedProfile
    ego_s0: float
    ego_mode: str
    duration: float
    bounds: tuple[float, float, float, float]   # xmin, ymin, xmax, ymax of the generated area
    # footprints the map leaves unmapped (NaN ground height): buildings, walls, hedges (centre, half, yaw)
    unmapped_footprints: list[tuple[np.ndarray, np.ndarray, float]] = field(default_factory=list)
    crosswalks: list[np.ndarray] = field(default_factory=list)
    obstacles: list[tuple[float, float, float]] = field(default_factory=list)   # trunks, poles: x, y, r
    removed_agents: int = 0                 # moving agents dropped because they would collide
    kind: str = 'urban'                     # urban | arterial | highway (SceneConfig.kind_mix)
    next_instance: int = 0                  # instance id for the next agent created

    def ego_xy_yaw(self, times: np.ndarray):
        times = np.atleast_1d(np.asarray(times, float))
        # a rolling-shutter sweep fires until 100 ms after the last stamp: integrate that far
        horizon = max(self.duration, float(times.max(initial=0.0)))
        return self.ego_path.pose(self.ego_s0 + self.ego_profile.arc_length(times, horizon))

    def surface_height(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Height of what stands under (x, y): the ground, or a sidewalk top where one is."""
        x, y = np.asarray(x, float), np.asarray(y, float)
        h = self.ground.height(x, y)
        P = self.static
        if not P.slab_center:
            return h
        C, H = np.array(P.slab_center), np.array(P.slab_half)
        Y, OFF = np.array(P.slab_yaw), np.array(P.slab_offset)
        dx, dy = x[..., None] - C[:, 0], y[..., None] - C[:, 1]
        lx = np.cos(Y) * dx + np.sin(Y) * dy
        ly = -np.sin(Y) * dx + np.cos(Y) * dy
        inside = (np.abs(lx) <= H[:, 0]) & (np.abs(ly) <= H[:, 1])
        return h + np.max(np.where(inside, OFF, 0.0), axis=-1)

    def city_T_ego(self, times: np.ndarray) -> np.ndarray:
        """(T,4,4) ego poses: origin on the ground under the rear axle, z along the ground normal."""
        x, y, yaw = self.ego_xy_yaw(times)
        gx, gy = self.ground.gradient(x, y)
        n = np.stack([-gx, -gy, np.ones_like(gx)], -1)
        n /= np.linalg.norm(n, axis=-1, keepdims=True)
        f = np.stack([np.cos(yaw), np.sin(yaw), np.zeros_like(yaw)], -1)
        ax = f - np.sum(f * n, -1, keepdims=True) * n
        ax /= np.linalg.norm(ax, axis=-1, keepdims=True)
        out = np.zeros((len(x), 4, 4))
        out[:, :3, :3] = np.stack([ax, np.cross(n, ax), n], axis=-1)
        out[:, :3, 3] = np.stack([x, y, self.ground.height(x, y)], -1)
        out[:, 3, 3] = 1.0
        return out


def _track_uuid(seed: int, k: int) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f'zeroflow-synth/{seed}/track/{k}'))


def _ego_profile(rng: np.random.Generator, mode: str, T: float) -> SpeedProfile:
    if mode == 'cruise':
        v0 = rng.uniform(5.0, 14.0)
        phases = [(0.0, rng.uniform(-0.4, 0.4)), (rng.uniform(0.3, 0.7) * T, rng.uniform(-0.6, 0.6))]
        return SpeedProfile(v0, phases, v_max=16.0)
    if mode == 'stop':
        a = rng.uniform(2.0, 4.0)
        t_stop = rng.uniform(0.3, 0.7) * T
        v0 = min(a * t_stop, rng.uniform(5.0, 12.0))
        return SpeedProfile(v0, [(0.0, 0.0), (t_stop - v0 / a, -a)])
    if mode == 'start':
        return SpeedProfile(0.0, [(0.0, 0.0), (rng.uniform(0.2, 0.6) * T, rng.uniform(1.5, 2.5))])
    raise SynthError(f'ego mode: expected cruise, turn, stop or start, got {mode!r}')


def _lane_offset(lane: int) -> float:
    return (lane + 0.5) * LANE_W


def build_route(start: np.ndarray, u: np.ndarray, length: float, turns: list[tuple],
                rng: np.random.Generator) -> Path2D:
    """Lane-centre path of ``length`` m from ``start`` along axis direction ``u``.

    ``turns`` lists (distance along the first leg to the crossing road centre, +1 left / -1 right
    [, arc radius]);
    only the first turn is used (sequences last seconds). The new leg uses the right-most lane.
    """
    pts = [start.copy()]
    p = start.copy()
    if turns:
        dist, side = turns[0][:2]
        u2 = np.array([-u[1], u[0]]) * side                  # left: +90 deg
        r2 = np.array([u2[1], -u2[0]])                       # right-hand normal of the new leg
        crossing = p + dist * u
        corner = crossing + r2 * _lane_offset(0)             # new lane line meets the old one
        corner = p + np.dot(corner - p, u) * u
        if len(turns[0]) > 2:
            radius = turns[0][2]
        else:
            radius = rng.uniform(6.0, 8.5) if side < 0 else rng.uniform(9.0, 12.5)
        radius = min(radius, max(np.dot(corner - p, u) - 1.0, 2.0))
        arc_start = corner - radius * u
        pts.append(arc_start)
        centre = arc_start + radius * u2
        for th in np.linspace(0, np.pi / 2, 24)[1:]:
            pts.append(centre - radius * u2 * np.cos(th) + radius * u * np.sin(th))
        p = pts[-1]
        used = np.sum(np.linalg.norm(np.diff(np.array(pts), axis=0), axis=1))
        pts.append(p + max(length - used, 10.0) * u2)
    else:
        pts.append(p + length * u)
    return Path2D(np.array(pts))


def generate_scene(seed: int, duration: float, max_range: float, cfg: SceneConfig | None = None) -> Scene:
    cfg = cfg or SceneConfig()
    rng = np.random.default_rng(seed)
    T = duration

    # ground: grade up to ~3 %, undulation a few cm over tens of metres
    ground = GroundSurface(z0=rng.uniform(-0.5, 0.5), gx=rng.uniform(-0.03, 0.03),
                           gy=rng.uniform(-0.03, 0.03),
                           amp=rng.uniform(0.0, 0.08), kx=2 * np.pi / rng.uniform(40, 100),
                           ky=2 * np.pi / rng.uniform(40, 100), px=rng.uniform(0, 2 * np.pi),
                           py=rng.uniform(0, 2 * np.pi))

    names, probs = zip(*cfg.ego_modes)
    mode = str(rng.choice(names, p=np.array(probs) / sum(probs)))
    turn_side = int(rng.choice([-1, 1]))
    turn_radius = rng.uniform(6.0, 9.0) if turn_side < 0 else rng.uniform(9.0, 13.0)
    # the kind and everything fast traffic adds come from their own stream, so an urban scene
    # draws the main stream exactly as before fast roads existed
    rng_fast = np.random.default_rng([int(seed), 0xFA57])
    kind = scene_kind(seed, cfg)
    if kind != 'urban':
        mode = 'cruise'
        lo, hi = (12.0, 20.0) if kind == 'arterial' else (18.0, 30.0)
        profile = SpeedProfile(rng_fast.uniform(lo, hi), [(0.0, rng_fast.uniform(-0.6, 0.6))], v_max=33.0)
    elif mode == 'turn':
        # through the arc at constant speed with lateral acceleration v^2 / R <= 3.5 m/s^2, the
        # arc starting within the first 40 % of the drive, then pull away on the new road
        v_turn = min(rng.uniform(3.5, 7.0), float(np.sqrt(3.5 * turn_radius)))
        arc_start = rng.uniform(0.0, 0.4) * v_turn * T
        t_exit = (arc_start + np.pi * turn_radius / 2) / v_turn
        pull_away = [(t_exit, rng.uniform(1.0, 2.0))] if t_exit < T else []
        profile = SpeedProfile(v_turn, [(0.0, 0.0)] + pull_away, v_max=13.0)
    else:
        profile = _ego_profile(rng, mode, T)
    travel = float(profile.arc_length(np.array([T]), T)[0])

    # the ego drives +x on the road y = 0; the first crossing road lies d_cross ahead
    if mode == 'turn':
        # corner of the two lane centre lines = crossing centre +- the lane offset
        d_cross = arc_start + turn_radius - turn_side * _lane_offset(0)
    else:
        d_cross = rng.uniform(20.0, 70.0)
    spacing = {'urban': (60.0, 120.0), 'arterial': (100.0, 200.0), 'highway': (250.0, 450.0)}[kind]
    if kind == 'highway':
        d_cross = rng_fast.uniform(100.0, 200.0)
    reach = max_range + travel + 80.0
    xs = sorted(_spacings(rng, d_cross, *spacing, int(reach / spacing[0]) + 2, 1.0)
                + [d_cross] + _spacings(rng, d_cross, *spacing, int(reach / spacing[0]) + 2, -1.0))
    ys = sorted(_spacings(rng, 0.0, 60.0, 120.0, int(reach / 60) + 2, 1.0) + [0.0]
                + _spacings(rng, 0.0, 60.0, 120.0, int(reach / 60) + 2, -1.0))
    v_roads = {x: _make_road(rng, 1, x) for x in xs}
    h_roads = {y: _make_road(rng, 0, y) for y in ys}
    if kind != 'urban':
        h_roads[0.0] = Road(0, 0.0, 3 if kind == 'arterial' else 4, 0.0, float(rng_fast.uniform(3.0, 5.0)))
    ego_road = h_roads[0.0]
    ego_lane = int(rng.integers(0, ego_road.lanes))
    start = np.array([0.0, -_lane_offset(ego_lane)])
    turns = [(d_cross, turn_side, turn_radius)] if mode == 'turn' else []
    back = 60.0
    ego_path = build_route(start - back * np.array([1.0, 0.0]), np.array([1.0, 0.0]), back + travel + 120.0,
                           [(t[0] + back, *t[1:]) for t in turns], rng)
    if turns:
        ego_lane = 0
    times = np.arange(0, T + 1e-9, 0.1)
    ex, ey, _ = ego_path.pose(back + profile.arc_length(times, T))
    pad = max_range + 15.0
    bounds = (ex.min() - pad, ey.min() - pad, ex.max() + pad, ey.max() + pad)

    def in_bounds(x, y, margin=0.0):
        return bounds[0] - margin <= x <= bounds[2] + margin and bounds[1] - margin <= y <= bounds[3] + margin

    scene = Scene(seed, ground, list(h_roads.values()) + list(v_roads.values()), Primitives(), [], ego_path,
                  profile, back, mode, T, bounds, kind=kind)
    _build_static_world(scene, rng, xs, ys, v_roads, h_roads, cfg, in_bounds)
    _add_clutter(scene, rng_fast, xs, ys, v_roads, h_roads, in_bounds)
    if kind == 'highway':
        _add_median(scene, xs, v_roads, in_bounds)
    # fast manoeuvres first: the collision check keeps earlier agents and drops later ones
    if kind != 'urban' or (mode != 'turn' and rng_fast.random() < cfg.cut_in_prob_urban):
        _add_cut_in(scene, rng_fast, ego_road, ego_lane)
    if kind != 'urban':
        _add_fast_turners(scene, rng_fast, xs, v_roads, ego_road, in_bounds)
    _build_agents(scene, rng, xs, ys, v_roads, h_roads, cfg, in_bounds, ego_lane, times, ex, ey)
    _remove_collisions(scene, times)
    return scene


def scene_kind(seed: int, cfg: SceneConfig | None = None) -> str:
    """Kind of the scene of ``seed`` (urban, arterial, highway): ``cfg.kind`` or drawn by ``kind_mix``."""
    cfg = cfg or SceneConfig()
    if cfg.kind is not None:
        if cfg.kind not in SCENE_KINDS:
            raise SynthError(f'scene kind: expected one of {SCENE_KINDS}, got {cfg.kind!r}')
        return cfg.kind
    names, probs = zip(*cfg.kind_mix)
    return str(np.random.default_rng([int(seed), 0x41D]).choice(names, p=np.array(probs) / sum(probs)))


SCENE_KINDS = ('urban', 'arterial', 'highway')


EGO_LENGTH, EGO_WIDTH, EGO_REAR_OVERHANG = 4.9, 2.0, 1.0


def _footprint(agent: Agent) -> tuple[np.ndarray, np.ndarray]:
    """(centre offset in the agent frame, half extents) of a rectangle covering all its cuboids."""
    lo = np.min([t.offset[:2] - t.dims[:2] / 2 for t in agent.tracks], axis=0)
    hi = np.max([t.offset[:2] + t.dims[:2] / 2 for t in agent.tracks], axis=0)
    return (lo + hi) / 2, (hi - lo) / 2


def _rects_overlap(c1, y1, h1, c2, y2, h2) -> np.ndarray:
    """Separating-axis test of oriented rectangles, vectorised over time (c: (T,2), y: (T,))."""
    def axes(y):
        return np.stack([np.cos(y), np.sin(y)], -1), np.stack([-np.sin(y), np.cos(y)], -1)
    a1, b1 = axes(y1)
    a2, b2 = axes(y2)
    d = c2 - c1
    sep = np.zeros(len(d), dtype=bool)
    for ax in (a1, b1, a2, b2):
        r1 = h1[0] * np.abs(np.sum(a1 * ax, -1)) + h1[1] * np.abs(np.sum(b1 * ax, -1))
        r2 = h2[0] * np.abs(np.sum(a2 * ax, -1)) + h2[1] * np.abs(np.sum(b2 * ax, -1))
        sep |= np.abs(np.sum(d * ax, -1)) > r1 + r2
    return ~sep


def _remove_collisions(scene: Scene, times: np.ndarray, margin: float = 0.25) -> None:
    """Drop moving agents whose footprint would overlap the ego, a kept agent or a trunk/pole.

    Static agents are kept as they are; moving ones are accepted greedily in creation order (the
    ego's own platoon first), so traffic never drives through anything at any sweep.
    """
    T = scene.duration
    ex, ey, eyaw = scene.ego_xy_yaw(times)
    off = EGO_LENGTH / 2 - EGO_REAR_OVERHANG
    ego = (np.stack([ex + off * np.cos(eyaw), ey + off * np.sin(eyaw)], -1), eyaw,
           np.array([EGO_LENGTH / 2, EGO_WIDTH / 2]) + margin)
    n = len(scene.agents) + 1
    kc = np.zeros((n, len(times), 2))
    kyaw = np.zeros((n, len(times)))
    kh = np.zeros((n, 2))
    kc[0], kyaw[0], kh[0] = ego
    k = 1
    obstacles = np.array(scene.obstacles).reshape(-1, 3)
    out = []
    for agent in scene.agents:
        x, y, yaw = agent.poses(times, T)
        co, half = _footprint(agent)
        c = np.stack([x + np.cos(yaw) * co[0] - np.sin(yaw) * co[1],
                      y + np.sin(yaw) * co[0] + np.cos(yaw) * co[1]], -1)
        half = half + margin
        if agent.profile is not None:
            radius = float(np.hypot(*half))
            reach = radius + np.hypot(kh[:k, 0], kh[:k, 1])[:, None]
            close = np.linalg.norm(kc[:k] - c[None], axis=-1) <= reach
            hit = False
            for j in np.flatnonzero(close.any(axis=1)):
                m = close[j]
                if _rects_overlap(c[m], yaw[m], half, kc[j, m], kyaw[j, m], kh[j]).any():
                    hit = True
                    break
            if not hit and len(obstacles):
                dist = np.linalg.norm(c[:, None, :] - obstacles[None, :, :2], axis=-1)
                hit = bool((dist <= radius + obstacles[None, :, 2]).any())
            if hit:
                scene.removed_agents += 1
                continue
        kc[k], kyaw[k], kh[k] = c, yaw, half
        k += 1
        out.append(agent)
    scene.agents = out


def _blocks(xs, ys, v_roads, h_roads):
    """Block interiors (inside the sidewalks): (x0, x1, y0, y1)."""
    for xa, xb in zip(xs[:-1], xs[1:]):
        for ya, yb in zip(ys[:-1], ys[1:]):
            yield (xa + v_roads[xa].half_width, xb - v_roads[xb].half_width,
                   ya + h_roads[ya].half_width, yb - h_roads[yb].half_width)


def _build_static_world(scene: Scene, rng, xs, ys, v_roads, h_roads, cfg: SceneConfig, in_bounds) -> None:
    g = scene.ground
    P = scene.static
    agents = scene.agents
    next_id = [0]

    def h(x, y):
        return float(g.height(np.array(x), np.array(y)))

    def static_agent(x, y, yaw, parts, tracks, kind):
        k = next_id[0]
        next_id[0] += 1
        path = Path2D(np.array([[x, y], [x + np.cos(yaw), y + np.sin(yaw)]]))
        trk = [Track(_track_uuid(scene.seed, k * 4 + j), c, dims, off)
               for j, (c, dims, off) in enumerate(tracks)]
        agents.append(Agent(k, path, 0.0, None, parts, trk, kind))

    # sidewalks (draped slabs with curbs), along every road between crossings, corners included
    for ya, road in h_roads.items():
        for xa, xb in zip(xs[:-1], xs[1:]):
            x0, x1 = xa + v_roads[xa].half_carriageway, xb - v_roads[xb].half_carriageway
            if not in_bounds((x0 + x1) / 2, ya, (x1 - x0) / 2 + 20):
                continue
            for side in (-1, 1):
                cy = ya + side * (road.half_carriageway + road.sidewalk / 2)
                P.add_slab(((x0 + x1) / 2, cy), ((x1 - x0) / 2, road.sidewalk / 2), 0.0, CURB_H,
                           reflectivity=0.3)
    for xa, road in v_roads.items():
        for ya, yb in zip(ys[:-1], ys[1:]):
            y0, y1 = ya + h_roads[ya].half_width, yb - h_roads[yb].half_width
            if not in_bounds(xa, (y0 + y1) / 2, (y1 - y0) / 2 + 20):
                continue
            for side in (-1, 1):
                cx = xa + side * (road.half_carriageway + road.sidewalk / 2)
                P.add_slab((cx, (y0 + y1) / 2), (road.sidewalk / 2, (y1 - y0) / 2), 0.0, CURB_H,
                           reflectivity=0.3)

    # buildings, walls and hedges along block edges; trees, poles, signs, bollards on sidewalks
    for bx0, bx1, by0, by1 in _blocks(xs, ys, v_roads, h_roads):
        if not in_bounds((bx0 + bx1) / 2, (by0 + by1) / 2, max(bx1 - bx0, by1 - by0) / 2):
            continue
        edges = [  # (start, direction along edge, inward normal, length)
            (np.array([bx0, by0]), np.array([1.0, 0.0]), np.array([0.0, 1.0]), bx1 - bx0),
            (np.array([bx1, by1]), np.array([-1.0, 0.0]), np.array([0.0, -1.0]), bx1 - bx0),
            (np.array([bx1, by0]), np.array([0.0, 1.0]), np.array([-1.0, 0.0]), by1 - by0),
            (np.array([bx0, by1]), np.array([0.0, -1.0]), np.array([1.0, 0.0]), by1 - by0)]
        depth_max = 0.5 * min(bx1 - bx0, by1 - by0) - 1.0
        for p0, u, nrm, length in edges:
            s = rng.uniform(0.0, 4.0)
            while s < length - 6.0:
                w = min(rng.uniform(8.0, 32.0), length - s)
                setback = rng.choice([0.0, rng.uniform(0.5, 5.0)], p=[0.5, 0.5])
                r = rng.random()
                centre_along = p0 + u * (s + w / 2)
                if r < 0.72:        # building
                    depth = min(rng.uniform(8.0, 22.0), depth_max - setback)
                    if depth > 3.0:
                        c = centre_along + nrm * (setback + depth / 2)
                        z = h(c[0], c[1])
                        height = float(rng.choice([rng.uniform(4, 12), rng.uniform(12, 40)], p=[0.6, 0.4]))
                        yaw = float(np.arctan2(u[1], u[0]))
                        P.add_box((c[0], c[1], z - 1.0 + (height + 1.0) / 2),
                                  (w / 2, depth / 2, (height + 1.0) / 2),
                                  yaw, reflectivity=rng.uniform(0.2, 0.7))
                        scene.unmapped_footprints.append((c.copy(), np.array([w / 2, depth / 2]), yaw))
                        if rng.random() < 0.3 and height > 8:      # setback upper storeys
                            P.add_box((c[0] + nrm[0] * 2, c[1] + nrm[1] * 2, z + height + 3.0),
                                      (w / 2 - 1.0, max(depth / 2 - 2.0, 0.5), 3.0), yaw,
                                      reflectivity=rng.uniform(0.2, 0.7))
                elif r < 0.86:      # wall or fence
                    c = centre_along + nrm * (setback + 0.1)
                    z = h(c[0], c[1])
                    wh = rng.uniform(0.9, 2.6)
                    P.add_box((c[0], c[1], z - 0.5 + (wh + 0.5) / 2), (w / 2, 0.1, (wh + 0.5) / 2),
                              float(np.arctan2(u[1], u[0])), reflectivity=rng.uniform(0.2, 0.6))
                    scene.unmapped_footprints.append((c.copy(), np.array([w / 2, 0.1]),
                                                      float(np.arctan2(u[1], u[0]))))
                else:               # hedge (porous)
                    c = centre_along + nrm * (setback + 0.6)
                    z = h(c[0], c[1])
                    hh = rng.uniform(0.6, 1.5)
                    P.add_box((c[0], c[1], z - 0.3 + (hh + 0.3) / 2), (w / 2, 0.6, (hh + 0.3) / 2),
                              float(np.arctan2(u[1], u[0])), reflectivity=0.25, porosity=0.3)
                    scene.unmapped_footprints.append((c.copy(), np.array([w / 2, 0.6]),
                                                      float(np.arctan2(u[1], u[0]))))
                s += w + float(rng.choice([0.0, rng.uniform(2.0, 12.0)], p=[0.55, 0.45]))

    def sidewalk_lines():
        """(start, dir, length, curb-side offset vector, road) per sidewalk strip near the area."""
        for ya, road in h_roads.items():
            for xa, xb in zip(xs[:-1], xs[1:]):
                x0, x1 = xa + v_roads[xa].half_width, xb - v_roads[xb].half_width
                for side in (-1, 1):
                    y = ya + side * road.half_carriageway
                    if in_bounds((x0 + x1) / 2, y, (x1 - x0) / 2):
                        yield np.array([x0, y]), np.array([1.0, 0.0]), x1 - x0, np.array([0.0, side]), road
        for xa, road in v_roads.items():
            for ya, yb in zip(ys[:-1], ys[1:]):
                y0, y1 = ya + h_roads[ya].half_width, yb - h_roads[yb].half_width
                for side in (-1, 1):
                    x = xa + side * road.half_carriageway
                    if in_bounds(x, (y0 + y1) / 2, (y1 - y0) / 2):
                        yield np.array([x, y0]), np.array([0.0, 1.0]), y1 - y0, np.array([side, 0.0]), road

    for p0, u, length, out, road in sidewalk_lines():
        yaw = float(np.arctan2(u[1], u[0]))
        s = rng.uniform(*cfg.tree_spacing_m) / 2
        while s < length - 2:          # trees: trunk + porous canopy of small boxes
            if rng.random() < 0.6:
                c = p0 + u * s + out * rng.uniform(0.6, 1.0)
                z = h(c[0], c[1])
                trunk_h = rng.uniform(2.0, 3.5)
                r_trunk = rng.uniform(0.12, 0.25)
                P.add_cylinder((c[0], c[1], z + trunk_h / 2 - 0.2), r_trunk, trunk_h / 2 + 0.2,
                               reflectivity=0.3)
                scene.obstacles.append((float(c[0]), float(c[1]), float(r_trunk)))
                rad = rng.uniform(1.4, 3.0)
                for _ in range(int(rng.integers(8, 16))):
                    off = rng.normal(size=3)
                    off = off / np.linalg.norm(off) * rad * rng.random() ** 0.5
                    half = rng.uniform(0.2, 0.55, size=3)
                    P.add_box((c[0] + off[0], c[1] + off[1], z + trunk_h + rad * 0.8 + off[2] * 0.7), half,
                              rng.uniform(0, np.pi), reflectivity=0.2, porosity=0.35)
            s += rng.uniform(*cfg.tree_spacing_m)
        s = rng.uniform(5, 30)
        while s < length - 2:          # street lights
            c = p0 + u * s + out * 0.35
            z = h(c[0], c[1])
            ph = rng.uniform(6.0, 9.0)
            r_pole = rng.uniform(0.08, 0.15)
            P.add_cylinder((c[0], c[1], z + ph / 2 - 0.1), r_pole, ph / 2 + 0.1, reflectivity=0.5)
            scene.obstacles.append((float(c[0]), float(c[1]), float(r_pole)))
            arm = -out * 1.2
            P.add_box((c[0] + arm[0], c[1] + arm[1], z + ph - 0.1),
                      (abs(arm[0]) + 0.08, abs(arm[1]) + 0.08, 0.08),
                      0.0, reflectivity=0.5)
            s += rng.uniform(25.0, 40.0)
        if rng.random() < 0.5:         # a sign (annotated) near the end of the strip
            c = p0 + u * (length - rng.uniform(2, 6)) + out * 0.4
            kind = 'STOP_SIGN' if rng.random() < 0.4 else 'SIGN'
            half_w = 0.38 if kind == 'STOP_SIGN' else 0.3
            parts = [_cyl(0, 0, 0.0, 2.2, 0.04, 0.5), _box(0, 0, 2.2, 2.2 + 2 * half_w, 0.03, half_w, 0.95)]
            static_agent(c[0], c[1], yaw + np.pi / 2, parts,
                         [(kind, np.array([0.12, 2 * half_w + 0.06, 2.26 + 2 * half_w]),
                           np.array([0.0, 0.0, 1.13 + half_w]))], 'sign')
        if rng.random() < 0.2:         # a parked bicycle against the building side of the strip
            c = p0 + u * rng.uniform(1, max(length - 1, 2)) + out * (road.sidewalk - 0.5)
            static_agent(c[0], c[1], yaw, [_box(0, 0, 0.05, 1.0, 0.82, 0.05, 0.4)],
                         [('BICYCLE', np.array([1.8, 0.5, 1.1]), np.array([0.0, 0.0, 0.55]))], 'bicycle')
        if rng.random() < 0.3:         # a row of bollards
            base = p0 + u * rng.uniform(0, max(length - 8, 1)) + out * 0.3
            for i in range(int(rng.integers(2, 6))):
                c = base + u * 1.5 * i
                bh = rng.uniform(0.8, 1.1)
                static_agent(c[0], c[1], yaw, [_cyl(0, 0, 0.0, bh, 0.1, 0.6)],
                             [('BOLLARD', np.array([0.26, 0.26, bh + 0.03]),
                               np.array([0, 0, (bh + 0.03) / 2]))],
                             'bollard')

        # parked vehicles in the parking lane next to this strip
        if road.parking > 0:
            s = rng.uniform(0, 8)
            while s < length - 5:
                if rng.random() < cfg.parked_density:
                    cat = 'REGULAR_VEHICLE' if rng.random() < 0.88 else 'BOX_TRUCK'
                    parts, dims = vehicle_body(rng, cat)
                    if s + dims[0] > length:
                        break
                    c = p0 + u * (s + dims[0] / 2) - out * (road.parking / 2 + rng.uniform(-0.15, 0.1))
                    # parked facing the traffic of the near side (right-hand traffic)
                    heading = yaw if out.dot(np.array([-u[1], u[0]])) < 0 else yaw + np.pi
                    static_agent(c[0], c[1], heading + rng.normal(0, 0.02), parts,
                                 [(cat, dims, np.array([0.0, 0.0, dims[2] / 2]))], 'parked')
                    s += dims[0] + rng.uniform(0.8, 3.0)
                else:
                    s += rng.uniform(3.0, 12.0)
            if rng.random() < 0.15:     # cones around a work zone in the parking lane
                base = p0 + u * rng.uniform(0, max(length - 10, 1)) - out * (road.parking - 0.4)
                for i in range(int(rng.integers(3, 7))):
                    c = base + u * 2.0 * i
                    if rng.random() < 0.7:
                        static_agent(c[0], c[1], yaw, [_cyl(0, 0, 0.0, 0.7, 0.15, 0.9)],
                                     [('CONSTRUCTION_CONE', np.array([0.36, 0.36, 0.74]),
                                       np.array([0, 0, 0.37]))],
                                     'cone')
                    else:
                        static_agent(c[0], c[1], yaw, [_cyl(0, 0, 0.0, 1.0, 0.29, 0.9)],
                                     [('CONSTRUCTION_BARREL', np.array([0.64, 0.64, 1.03]),
                                       np.array([0, 0, 0.515]))],
                                     'barrel')
    scene.next_instance = next_id[0]


def _build_agents(scene: Scene, rng, xs, ys, v_roads, h_roads, cfg: SceneConfig, in_bounds, ego_lane,
                  times, ex, ey) -> None:
    T = scene.duration
    next_id = [scene.next_instance]

    def new_agent(path, s0, profile, parts, tracks, kind):
        k = next_id[0]
        next_id[0] += 1
        trk = [Track(_track_uuid(scene.seed, k * 4 + j), c, dims, off)
               for j, (c, dims, off) in enumerate(tracks)]
        scene.agents.append(Agent(k, path, s0, profile, parts, trk, kind))

    def random_vehicle(mix=VEHICLE_MIX):
        names, probs = zip(*mix)
        cat = str(rng.choice(names, p=probs))
        parts, dims = vehicle_body(rng, cat)
        return cat, parts, dims

    def traffic_profile():
        r = rng.random()
        if r < 0.55:
            return SpeedProfile(rng.uniform(5, 15), [(0.0, rng.uniform(-0.5, 0.5))], v_max=17.0)
        if r < 0.7:     # waiting at a light for the whole sequence
            return SpeedProfile(0.0, [(0.0, 0.0)])
        if r < 0.85:    # braking to a stop
            a = rng.uniform(1.5, 3.5)
            v0 = rng.uniform(3, 12)
            return SpeedProfile(v0, [(0.0, 0.0), (rng.uniform(0, 0.5) * T, -a)])
        return SpeedProfile(0.0, [(0.0, 0.0), (rng.uniform(0, 0.6) * T, rng.uniform(1.2, 2.5))], v_max=14.0)

    def fast_profile():
        lo, hi = (8.0, 20.0) if scene.kind == 'arterial' else (10.0, 30.0)
        return SpeedProfile(rng.uniform(lo, hi), [(0.0, rng.uniform(-0.8, 0.8))], v_max=33.0)

    def platoon(path, s_first, profile, n, spacing_rng=(6.0, 25.0), direction=-1.0, mix=VEHICLE_MIX):
        """Place n vehicles at decreasing (direction -1, behind) arc lengths from s_first."""
        s = s_first
        for _ in range(n):
            cat, parts, dims = random_vehicle(mix)
            s_c = s + direction * dims[0] / 2
            new_agent(path, s_c, profile, parts, [(cat, dims, np.array([0.0, 0.0, dims[2] / 2]))], 'vehicle')
            s = s_c + direction * (dims[0] / 2 + rng.uniform(*spacing_rng))

    # ego lane: a car ahead and/or behind, sharing the ego's profile
    ego_len = 4.8
    if rng.random() < 0.55:
        platoon(scene.ego_path, scene.ego_s0 + 3.8 + rng.uniform(5.0, 25.0), scene.ego_profile,
                int(rng.integers(1, 3)), direction=1.0)
    if rng.random() < 0.5:
        platoon(scene.ego_path, scene.ego_s0 - (ego_len - 3.8) - rng.uniform(5.0, 20.0), scene.ego_profile,
                int(rng.integers(1, 3)), direction=-1.0)

    # other lanes of roads near the route
    near = scene.bounds
    for road in scene.roads:
        if road.axis == 0 and not (near[1] <= road.center <= near[3]):
            continue
        if road.axis == 1 and not (near[0] <= road.center <= near[2]):
            continue
        lo, hi = (near[0], near[2]) if road.axis == 0 else (near[1], near[3])
        for direction in (1.0, -1.0):
            for lane in range(road.lanes):
                if road.axis == 0 and road.center == 0.0 and direction > 0 and lane == ego_lane:
                    continue        # the ego's lane is handled above
                fast_road = scene.kind != 'urban' and road.axis == 0 and road.center == 0.0
                if rng.random() > (0.85 if fast_road else cfg.vehicle_lane_prob):
                    continue
                u = np.array([direction, 0.0]) if road.axis == 0 else np.array([0.0, direction])
                rgt = np.array([u[1], -u[0]])
                along0 = lo if direction > 0 else hi
                start = np.array([along0, road.center] if road.axis == 0 else [road.center, along0])
                start = start + rgt * _lane_offset(lane)
                length = hi - lo
                turns = []
                crossings = ys if road.axis == 1 else xs
                if lane == 0 and rng.random() < 0.3:
                    cand = [abs(c - along0) for c in crossings if 10 < abs(c - along0) < length - 10
                            and np.sign(c - along0) == direction]
                    if cand:
                        turns = [(float(rng.choice(cand)), int(rng.choice([-1, 1])))]
                if fast_road:       # straight through at speed, headways of ~1-2 s
                    path = build_route(start, u, length + 600.0, [], rng)
                    prof = fast_profile()
                    gap = (max(6.0, 0.8 * prof.v0), max(25.0, 2.0 * prof.v0))
                    platoon(path, rng.uniform(0.1, 0.9) * length, prof, int(rng.integers(1, 4)), gap,
                            mix=FAST_VEHICLE_MIX)
                    continue
                path = build_route(start, u, length + 200.0, turns, rng)
                prof = traffic_profile()
                s_first = rng.uniform(0.1, 0.9) * length
                platoon(path, s_first, prof, int(rng.integers(1, 4)))
        # cyclists near the right edge of the carriageway
        for direction in (1.0, -1.0):
            if rng.random() > cfg.cyclist_prob:
                continue
            u = np.array([direction, 0.0]) if road.axis == 0 else np.array([0.0, direction])
            rgt = np.array([u[1], -u[0]])
            along0 = lo if direction > 0 else hi
            start = (np.array([along0, road.center]) if road.axis == 0 else np.array([road.center, along0]))
            start = start + rgt * (road.half_carriageway - road.parking - 0.6)
            path = Path2D(np.array([start, start + u * (hi - lo + 200.0)]))
            parts, tracks = cyclist_body(rng)
            prof = SpeedProfile(rng.uniform(2.5, 7.0), [(0.0, rng.uniform(-0.3, 0.3))], v_max=9.0)
            new_agent(path, rng.uniform(0.1, 0.9) * (hi - lo), prof, parts, tracks, 'cyclist')
        # motorcyclists in the inner lane, at traffic speed
        for direction in (1.0, -1.0):
            if rng.random() > cfg.motorcyclist_prob:
                continue
            u = np.array([direction, 0.0]) if road.axis == 0 else np.array([0.0, direction])
            rgt = np.array([u[1], -u[0]])
            along0 = lo if direction > 0 else hi
            start = np.array([along0, road.center] if road.axis == 0 else [road.center, along0])
            start = start + rgt * _lane_offset(0)
            path = Path2D(np.array([start, start + u * (hi - lo + 200.0)]))
            parts, tracks = motorcyclist_body(rng)
            prof = SpeedProfile(rng.uniform(6.0, 15.0), [(0.0, rng.uniform(-0.8, 0.8))], v_max=17.0)
            new_agent(path, rng.uniform(0.1, 0.9) * (hi - lo), prof, parts, tracks, 'motorcyclist')

    # pedestrians on sidewalks (walking or standing) and a few crossing at intersections
    route = np.stack([ex, ey], axis=1)
    for road in scene.roads:
        lo, hi = (near[0], near[2]) if road.axis == 0 else (near[1], near[3])
        if road.axis == 0 and not (near[1] <= road.center <= near[3]):
            continue
        if road.axis == 1 and not (near[0] <= road.center <= near[2]):
            continue
        for side in (-1.0, 1.0):
            n = rng.poisson(cfg.pedestrians_per_100m * (hi - lo) / 100.0)
            for _ in range(n):
                off = road.half_carriageway + rng.uniform(0.5, road.sidewalk - 0.4)
                along = rng.uniform(lo, hi)
                xy = (np.array([along, road.center + side * off]) if road.axis == 0
                      else np.array([road.center + side * off, along]))
                if np.min(np.linalg.norm(route - xy, axis=1)) > 70.0:
                    continue
                u = np.array([1.0, 0.0] if road.axis == 0 else [0.0, 1.0]) * rng.choice([-1.0, 1.0])
                path = Path2D(np.array([xy - 100 * u, xy + 100 * u]))
                speed = 0.0 if rng.random() < 0.25 else rng.uniform(0.8, 1.7)
                prof = SpeedProfile(speed, [(0.0, 0.0)], v_max=2.0)
                parts, dims = pedestrian_body(rng)
                new_agent(path, 100.0, prof, parts, [('PEDESTRIAN', dims, np.array([0, 0, dims[2] / 2]))],
                          'pedestrian')
    for xa in xs:
        for ya in ys:
            if not in_bounds(xa, ya) or rng.random() > 0.35:
                continue
            if np.min(np.linalg.norm(route - np.array([xa, ya]), axis=1)) > 60.0:
                continue
            vr, hr = v_roads[xa], h_roads[ya]
            # a crosswalk over the vertical road, just north or south of the junction
            yc = ya + rng.choice([-1, 1]) * (hr.half_width + 1.5)
            scene.crosswalks.append(np.array([[xa - vr.half_carriageway, yc],
                                              [xa + vr.half_carriageway, yc]]))
            for _ in range(int(rng.integers(1, 4))):
                d = rng.choice([-1.0, 1.0])
                xy0 = np.array([xa - d * (vr.half_carriageway + 1.0), yc + rng.uniform(-1.2, 1.2)])
                path = Path2D(np.array([xy0, xy0 + d * np.array([2 * vr.half_carriageway + 40.0, 0.0])]))
                prof = SpeedProfile(rng.uniform(1.0, 1.8), [(0.0, 0.0)], v_max=2.5)
                parts, dims = pedestrian_body(rng)
                new_agent(path, rng.uniform(-6.0, 2 * vr.half_carriageway), prof, parts,
                          [('PEDESTRIAN', dims, np.array([0, 0, dims[2] / 2]))], 'pedestrian')


def _new_moving_agent(scene: Scene, path: Path2D, s0: float, profile: SpeedProfile, parts, tracks,
                      kind: str) -> None:
    k = scene.next_instance
    scene.next_instance += 1
    trk = [Track(_track_uuid(scene.seed, k * 4 + j), c, dims, off) for j, (c, dims, off) in enumerate(tracks)]
    scene.agents.append(Agent(k, path, s0, profile, parts, trk, kind))


def _add_cut_in(scene: Scene, rng: np.random.Generator, road: Road, ego_lane: int) -> None:
    """Add a vehicle from a neighbouring lane merging into the ego's lane a few metres ahead of it.

    The lane change (3.5 m sideways over 2-4 s, smoothstep) is under way at the first sweep; the
    vehicle drives at 85-110 % of the ego's speed with its rear 3-15 m ahead of the ego's nose.
    """
    lanes = [lane for lane in (ego_lane - 1, ego_lane + 1) if 0 <= lane < road.lanes]
    if not lanes:
        return
    src = int(rng.choice(lanes))
    cat = str(rng.choice([c for c, _ in FAST_VEHICLE_MIX], p=[p for _, p in FAST_VEHICLE_MIX]))
    parts, dims = vehicle_body(rng, cat)
    v = max(scene.ego_profile.v0 * rng.uniform(0.85, 1.1), 3.0)
    ex, _, _ = scene.ego_xy_yaw(np.array([0.0]))
    x_c = float(ex[0]) + EGO_LENGTH - EGO_REAR_OVERHANG + rng.uniform(3.0, 15.0) + dims[0] / 2
    L = v * rng.uniform(2.0, 4.0)
    x_a = x_c - rng.uniform(0.2, 0.7) * L              # where the lane change began
    xs = np.arange(x_c - 400.0, x_c + 900.0, 0.5)
    u = np.clip((xs - x_a) / L, 0.0, 1.0)
    y = -_lane_offset(src) + (_lane_offset(src) - _lane_offset(ego_lane)) * u * u * (3 - 2 * u)
    path = Path2D(np.stack([xs, y], 1))
    s0 = float(np.interp(x_c, xs, path.s))
    prof = SpeedProfile(v, [(0.0, rng.uniform(-0.5, 0.5))], v_max=33.0)
    _new_moving_agent(scene, path, s0, prof, parts, [(cat, dims, np.array([0.0, 0.0, dims[2] / 2]))],
                      'vehicle')


def _add_fast_turners(scene: Scene, rng: np.random.Generator, xs, v_roads, road: Road, in_bounds) -> None:
    """One or two vehicles turning right off a crossing road onto the fast road, mid-turn at t=0.

    Radius 15-35 m at a lateral acceleration of 3-5 m/s^2 (7-13 m/s): yaw rates up to ~0.9 rad/s.
    """
    ex, _, _ = scene.ego_xy_yaw(np.array([0.0]))
    near = [x for x in xs if in_bounds(x, 0.0) and abs(x - float(ex[0])) < 90.0]
    for _ in range(int(rng.integers(1, 3))):
        if not near:
            return
        xc = float(rng.choice(near))
        side = float(rng.choice([-1.0, 1.0]))           # come from the south (+1 north-bound) or north
        u = np.array([0.0, side])
        rgt = np.array([u[1], -u[0]])
        start = np.array([xc, -side * 150.0]) + rgt * _lane_offset(0)
        radius = rng.uniform(15.0, 35.0)
        dist = 150.0                                     # to the centre of the fast road
        path = build_route(start, u, 800.0, [(dist, -1, radius)], rng)
        v = float(np.sqrt(rng.uniform(3.0, 5.0) * radius))
        corner = dist - _lane_offset(0)
        s0 = corner - radius + rng.uniform(0.1, 0.8) * np.pi * radius / 2
        cat = str(rng.choice([c for c, _ in VEHICLE_MIX], p=[p for _, p in VEHICLE_MIX]))
        parts, dims = vehicle_body(rng, cat)
        prof = SpeedProfile(v, [(0.0, rng.uniform(-0.5, 0.5))], v_max=33.0)
        _new_moving_agent(scene, path, s0, prof, parts, [(cat, dims, np.array([0.0, 0.0, dims[2] / 2]))],
                          'vehicle')


def _add_median(scene: Scene, xs, v_roads, in_bounds) -> None:
    """Concrete median barrier (0.8 m, unannotated) along the highway between its crossings."""
    g = scene.ground
    for xa, xb in zip(xs[:-1], xs[1:]):
        x0, x1 = xa + v_roads[xa].half_width, xb - v_roads[xb].half_width
        if x1 - x0 < 5 or not in_bounds((x0 + x1) / 2, 0.0, (x1 - x0) / 2):
            continue
        for a in np.arange(x0, x1, 20.0):          # 20 m pieces follow the ground's grade
            b = min(a + 20.0, x1)
            c = (a + b) / 2
            z = float(g.height(np.array(c), np.array(0.0)))
            scene.static.add_box((c, 0.0, z - 0.2 + 0.5), ((b - a) / 2, 0.25, 0.5), 0.0, reflectivity=0.45)


def _add_clutter(scene: Scene, rng: np.random.Generator, xs, ys, v_roads, h_roads, in_bounds) -> None:
    """Street clutter and low vegetation just behind the sidewalks (unannotated static world).

    Bushes and grass verges are porous (rays pass with some probability), bins, benches and
    hydrants are solid. They stand behind the sidewalk's outer edge, off the pedestrians' paths.
    """
    g = scene.ground
    for road in scene.roads:
        cross = xs if road.axis == 0 else ys
        others = v_roads if road.axis == 0 else h_roads
        lo, hi = (scene.bounds[0], scene.bounds[2]) if road.axis == 0 else (scene.bounds[1], scene.bounds[3])
        for side in (-1.0, 1.0):
            along = lo + rng.uniform(0, 15)
            while along < hi:
                along += rng.uniform(6.0, 25.0)
                if any(abs(along - c) < others[c].half_width + 3.0 for c in cross):
                    continue
                off = road.center + side * (road.half_width + rng.uniform(0.3, 1.2))
                x, y = (along, off) if road.axis == 0 else (off, along)
                if not in_bounds(x, y):
                    continue
                z = float(g.height(np.array(x), np.array(y)))
                yaw = 0.0 if road.axis == 0 else np.pi / 2
                r = rng.random()
                if r < 0.35:        # bush
                    hh = rng.uniform(0.3, 0.8)
                    half = (rng.uniform(0.4, 1.2), rng.uniform(0.3, 0.7), hh)
                    scene.static.add_box((x, y, z + hh - 0.1), half, yaw, reflectivity=0.2, porosity=0.4)
                elif r < 0.55:      # grass / weeds strip
                    hh = rng.uniform(0.1, 0.25)
                    scene.static.add_box((x, y, z + hh - 0.05), (rng.uniform(1.5, 5.0), 0.4, hh), yaw,
                                         reflectivity=0.18, porosity=0.6)
                elif r < 0.75:      # bin
                    scene.static.add_box((x, y, z + 0.55), (0.3, 0.3, 0.55), yaw, reflectivity=0.3)
                elif r < 0.9:       # bench
                    scene.static.add_box((x, y, z + 0.4), (0.9, 0.25, 0.4), yaw, reflectivity=0.35)
                else:               # hydrant
                    scene.static.add_cylinder((x, y, z + 0.37), 0.12, 0.37, reflectivity=0.8)
