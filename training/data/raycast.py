"""Vectorised spinning-lidar ray casting against analytic primitives (numpy only).

Everything is cast in the **city frame**: the scene primitives are upright there (boxes rotate
about z only, cylinders are vertical), so the culling of a primitive to the rays that can reach
it is exact in azimuth/elevation measured along the city axes, whatever the ego's pitch/roll.

Primitives
  * ground: a smooth height field ``z = h(x, y)`` (plane + gentle undulation), intersected by
    Newton iterations started from the plane solution;
  * draped slabs: rectangles whose top follows the ground at a fixed offset (sidewalks, with
    their curb faces);
  * oriented boxes (yaw only) and vertical capped cylinders.
A primitive can be porous (vegetation): each ray that hits it passes through with a fixed
probability, drawn from the sweep's random generator, so results stay deterministic.

The nearest hit along each ray wins, which gives occlusion between all primitives for free.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# Velodyne VLP-32C vertical angles (deg): the lidar AV2 uses, dense around the horizon.
VLP32C_ELEVATIONS_DEG: tuple[float, ...] = (
    -25.0, -15.639, -11.31, -8.843, -7.254, -6.148, -5.333, -4.667, -4.0, -3.667, -3.333, -3.0,
    -2.667, -2.333, -2.0, -1.667, -1.333, -1.0, -0.667, -0.333, 0.0, 0.333, 0.667, 1.0, 1.333,
    1.667, 2.333, 3.333, 4.667, 7.0, 10.333, 15.0)

_EPS_T = 1e-6


class SynthError(ValueError):
    """Bad simulator settings or output location (names the setting/path and what was expected).

    One type for the whole simulator (raycast, scene, synth, cli_synth).
    """


def default_elevations(beams: int) -> np.ndarray:
    """``beams`` vertical angles (deg, ascending) with the VLP-32C's density profile."""
    if beams < 1:
        raise SynthError(f'lidar beams: expected >= 1, got {beams}')
    table = np.asarray(VLP32C_ELEVATIONS_DEG)
    if beams == len(table):
        return table.copy()
    return np.interp(np.linspace(0, len(table) - 1, beams), np.arange(len(table)), table)


@dataclass(frozen=True)
class GroundSurface:
    """``h(x, y) = z0 + gx x + gy y + amp sin(kx x + px) cos(ky y + py)`` (city frame, metres)."""

    z0: float = 0.0
    gx: float = 0.0
    gy: float = 0.0
    amp: float = 0.0
    kx: float = 0.1
    ky: float = 0.1
    px: float = 0.0
    py: float = 0.0

    def height(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return (self.z0 + self.gx * x + self.gy * y
                + self.amp * np.sin(self.kx * x + self.px) * np.cos(self.ky * y + self.py))

    def gradient(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        sx, cx = np.sin(self.kx * x + self.px), np.cos(self.kx * x + self.px)
        sy, cy = np.sin(self.ky * y + self.py), np.cos(self.ky * y + self.py)
        return self.gx + self.amp * self.kx * cx * cy, self.gy - self.amp * self.ky * sx * sy

    def _f_and_slope(self, o, d, t, offset):
        """f(t) = z_ray - h - offset and df/dt, sharing the trigonometry."""
        x, y = o[0] + t * d[:, 0], o[1] + t * d[:, 1]
        ax, ay = self.kx * x + self.px, self.ky * y + self.py
        sx, cx, sy, cy = np.sin(ax), np.cos(ax), np.sin(ay), np.cos(ay)
        f = o[2] + t * d[:, 2] - (self.z0 + self.gx * x + self.gy * y + self.amp * sx * cy) - offset
        hx = self.gx + self.amp * self.kx * cx * cy
        hy = self.gy - self.amp * self.ky * sx * sy
        return f, d[:, 2] - hx * d[:, 0] - hy * d[:, 1]

    def intersect(self, origin: np.ndarray, dirs: np.ndarray, offset: float = 0.0,
                  iterations: int = 4) -> np.ndarray:
        """Ray parameter of the first crossing of ``z = h + offset`` (inf where none ahead)."""
        o = origin
        denom = self.gx * dirs[:, 0] + self.gy * dirs[:, 1] - dirs[:, 2]
        num = o[2] - self.z0 - offset - self.gx * o[0] - self.gy * o[1]
        with np.errstate(divide='ignore', invalid='ignore'):
            t = np.where(denom > 1e-9, num / denom, np.inf)
        ok = np.isfinite(t) & (t > 0)
        out = np.full(len(dirs), np.inf)
        if not ok.any():
            return out
        tt, d = t[ok], dirs[ok]
        if self.amp == 0.0:
            out[ok] = tt
            return out
        for _ in range(iterations):
            f, fp = self._f_and_slope(o, d, tt, offset)
            tt = tt - f / np.where(np.abs(fp) < 1e-9, -1e-9, fp)
        x, y = o[0] + tt * d[:, 0], o[1] + tt * d[:, 1]
        resid = np.abs(o[2] + tt * d[:, 2] - self.height(x, y) - offset)
        # Grazing rays far away can fail to converge: drop them rather than invent a point.
        out[ok] = np.where((resid < 1e-4) & (tt > 0), tt, np.inf)
        return out


@dataclass
class Primitives:
    """Flat arrays of the primitives of one sweep (city frame). Build with the ``add_*`` methods."""

    box_center: list = field(default_factory=list)     # (3,)
    box_half: list = field(default_factory=list)       # (3,)
    box_yaw: list = field(default_factory=list)
    box_rot: list = field(default_factory=list)        # (3,3) box -> city; yaw only unless tilted
    slab_center: list = field(default_factory=list)    # (2,) xy
    slab_half: list = field(default_factory=list)      # (2,)
    slab_yaw: list = field(default_factory=list)
    slab_offset: list = field(default_factory=list)
    cyl_center: list = field(default_factory=list)     # (3,) centre of the axis
    cyl_radius: list = field(default_factory=list)
    cyl_half_h: list = field(default_factory=list)
    # per primitive, in the order boxes, slabs, cylinders once frozen
    instance: list = field(default_factory=list)
    ground: list = field(default_factory=list)
    reflectivity: list = field(default_factory=list)
    porosity: list = field(default_factory=list)
    _kinds: list = field(default_factory=list)

    def add_box(self, center, half, yaw: float, instance: int = -1, reflectivity: float = 0.4,
                porosity: float = 0.0, ground: bool = False, rotation: np.ndarray | None = None) -> None:
        """Add a box; ``rotation`` (3x3, box -> city) tilts it, ``yaw`` must then be its heading."""
        self.box_center.append(np.asarray(center, float))
        self.box_half.append(np.asarray(half, float))
        self.box_yaw.append(float(yaw))
        self.box_rot.append(yaw_matrix(yaw) if rotation is None else np.asarray(rotation, float))
        self._meta('box', instance, ground, reflectivity, porosity)

    def add_slab(self, center_xy, half_xy, yaw: float, offset: float, instance: int = -1,
                 reflectivity: float = 0.3) -> None:
        self.slab_center.append(np.asarray(center_xy, float))
        self.slab_half.append(np.asarray(half_xy, float))
        self.slab_yaw.append(float(yaw))
        self.slab_offset.append(float(offset))
        self._meta('slab', instance, True, reflectivity, 0.0)

    def add_cylinder(self, center, radius: float, half_height: float, instance: int = -1,
                     reflectivity: float = 0.4, porosity: float = 0.0) -> None:
        self.cyl_center.append(np.asarray(center, float))
        self.cyl_radius.append(float(radius))
        self.cyl_half_h.append(float(half_height))
        self._meta('cyl', instance, False, reflectivity, porosity)

    def _meta(self, kind: str, instance: int, ground: bool, refl: float, por: float) -> None:
        self._kinds.append(kind)
        self.instance.append(int(instance))
        self.ground.append(bool(ground))
        self.reflectivity.append(float(refl))
        self.porosity.append(float(por))

    def table(self) -> dict[str, np.ndarray]:
        """Per-primitive metadata, indexed like the ``prim`` output of :func:`cast`.

        Index 0 is the ground surface, then boxes, slabs and cylinders in insertion order.
        """
        order = ([i for i, k in enumerate(self._kinds) if k == 'box']
                 + [i for i, k in enumerate(self._kinds) if k == 'slab']
                 + [i for i, k in enumerate(self._kinds) if k == 'cyl'])
        inst = np.array([-1] + [self.instance[i] for i in order], dtype=np.int32)
        grd = np.array([True] + [self.ground[i] for i in order], dtype=bool)
        refl = np.array([0.15] + [self.reflectivity[i] for i in order], dtype=np.float64)
        por = np.array([0.0] + [self.porosity[i] for i in order], dtype=np.float64)
        return {'instance': inst, 'ground': grd, 'reflectivity': refl, 'porosity': por}


def yaw_matrix(yaw: float) -> np.ndarray:
    c, s = np.cos(yaw), np.sin(yaw)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _wrap(a: np.ndarray | float) -> np.ndarray | float:
    return (a + np.pi) % (2 * np.pi) - np.pi


class _RaySet:
    """Rays of one sweep sorted by city-axes azimuth, for fast culling by angular interval."""

    def __init__(self, origin: np.ndarray, dirs: np.ndarray):
        self.o = origin
        self.d = dirs
        az = np.arctan2(dirs[:, 1], dirs[:, 0])
        self.order = np.argsort(az, kind='stable')
        self.az_sorted = az[self.order]
        self.el = np.arcsin(np.clip(dirs[:, 2], -1, 1))

    def candidates(self, az_lo: float, az_hi: float, el_lo: float, el_hi: float) -> np.ndarray:
        """Return the rays with azimuth in [az_lo, az_hi] (wrapping) and elevation in [el_lo, el_hi]."""
        if az_hi - az_lo >= 2 * np.pi:
            idx = self.order
        else:
            lo, hi = _wrap(az_lo), _wrap(az_lo) + (az_hi - az_lo)
            if hi <= np.pi:
                a, b = np.searchsorted(self.az_sorted, [lo, hi])
                idx = self.order[a:b]
            else:
                a = np.searchsorted(self.az_sorted, lo)
                b = np.searchsorted(self.az_sorted, hi - 2 * np.pi, side='right')
                idx = np.concatenate([self.order[a:], self.order[:b]])
        if el_lo > -np.pi / 2 or el_hi < np.pi / 2:
            e = self.el[idx]
            idx = idx[(e >= el_lo) & (e <= el_hi)]
        return idx


def _footprint_cull(o: np.ndarray, cxy: np.ndarray, hxy: np.ndarray, yaw: np.ndarray,
                    z_lo: np.ndarray, z_hi: np.ndarray, max_range: float):
    """Angular bounds of every ray that can reach each upright box (vectorised over K boxes).

    Returns (keep, az_lo, az_hi, el_lo, el_hi). Azimuth bounds are exact (corner azimuths of the
    footprint, which does not contain the sensor); elevation bounds use the nearest/farthest
    horizontal distance of the footprint. A footprint containing the sensor gets all azimuths.
    """
    c, s = np.cos(yaw), np.sin(yaw)
    rel = cxy - o[:2]                                          # (K,2) centre relative to sensor
    lx = -(c * rel[:, 0] + s * rel[:, 1])                      # sensor in box frame
    ly = -(-s * rel[:, 0] + c * rel[:, 1])
    dx = np.maximum(np.abs(lx) - hxy[:, 0], 0.0)
    dy = np.maximum(np.abs(ly) - hxy[:, 1], 0.0)
    d_min = np.hypot(dx, dy)
    keep = d_min <= max_range
    signs = np.array([[1, 1], [1, -1], [-1, 1], [-1, -1]], float)
    cx = signs[None, :, 0] * hxy[:, None, 0]
    cy = signs[None, :, 1] * hxy[:, None, 1]
    wx = c[:, None] * cx - s[:, None] * cy + rel[:, None, 0]   # (K,4) corners relative to sensor
    wy = s[:, None] * cx + c[:, None] * cy + rel[:, None, 1]
    d_max = np.hypot(wx, wy).max(axis=1)
    az_c = np.arctan2(rel[:, 1], rel[:, 0])
    a = _wrap(np.arctan2(wy, wx) - az_c[:, None])
    inside = d_min <= 1e-3
    az_lo = np.where(inside, -np.pi, az_c + a.min(axis=1) - 1e-6)
    az_hi = np.where(inside, np.pi + 1e-9, az_c + a.max(axis=1) + 1e-6)
    d_min = np.maximum(d_min, 1e-3)
    zl, zh = z_lo - o[2], z_hi - o[2]
    el_hi = np.arctan2(zh, np.where(zh > 0, d_min, d_max)) + 1e-6
    el_lo = np.arctan2(zl, np.where(zl < 0, d_min, d_max)) - 1e-6
    return keep, az_lo, az_hi, el_lo, el_hi


def _box_hits(o, d, center, half, rot):
    """Slab test; ``rot`` is the box -> city rotation (3x3) or a yaw angle."""
    R = yaw_matrix(rot) if np.ndim(rot) == 0 else np.asarray(rot)
    ox, oy, oz = (o - center) @ R
    dl = d @ R
    dx, dy, dz = dl[:, 0], dl[:, 1], dl[:, 2]
    t_near = np.full(len(d), -np.inf)
    t_far = np.full(len(d), np.inf)
    for oc, dc, h in ((ox, dx, half[0]), (oy, dy, half[1]), (oz, dz, half[2])):
        dc = np.where(np.abs(dc) < 1e-12, 1e-12, dc)
        t1, t2 = (-h - oc) / dc, (h - oc) / dc
        t_near = np.maximum(t_near, np.minimum(t1, t2))
        t_far = np.minimum(t_far, np.maximum(t1, t2))
    return np.where((t_near <= t_far) & (t_near > _EPS_T), t_near, np.inf)


def _cylinder_hits(o, d, center, radius, half_h):
    ro = o - center
    a = d[:, 0] ** 2 + d[:, 1] ** 2
    b = 2 * (ro[0] * d[:, 0] + ro[1] * d[:, 1])
    cc = ro[0] ** 2 + ro[1] ** 2 - radius ** 2
    out = np.full(len(d), np.inf)
    if cc <= 0 and abs(ro[2]) <= half_h:
        return out   # sensor inside: not a surface it can see
    disc = b * b - 4 * a * cc
    with np.errstate(invalid='ignore', divide='ignore'):
        t_side = (-b - np.sqrt(disc)) / (2 * a)
    z = ro[2] + t_side * d[:, 2]
    side_ok = (disc >= 0) & (a > 1e-12) & (t_side > _EPS_T) & (np.abs(z) <= half_h)
    out = np.where(side_ok, t_side, out)
    for cap, sign in ((half_h, -1.0), (-half_h, 1.0)):   # top seen from above, bottom from below
        dz = d[:, 2]
        going = (sign * dz) > 1e-12
        with np.errstate(divide='ignore', invalid='ignore'):
            t_cap = np.where(going, (cap - ro[2]) / np.where(going, dz, 1.0), np.inf)
        x, y = ro[0] + t_cap * d[:, 0], ro[1] + t_cap * d[:, 1]
        cap_ok = going & (t_cap > _EPS_T) & (x * x + y * y <= radius * radius)
        out = np.where(cap_ok & (t_cap < out), t_cap, out)
    return np.where(np.isnan(out), np.inf, out)


def _slab_hits(o, d, ground: GroundSurface, center, half, yaw, offset):
    """Draped slab: top at ``h + offset`` over a rectangle, vertical faces down to the ground."""
    c, s = np.cos(yaw), np.sin(yaw)
    ro = o[:2] - center
    ox, oy = c * ro[0] + s * ro[1], -s * ro[0] + c * ro[1]
    dx = c * d[:, 0] + s * d[:, 1]
    dy = -s * d[:, 0] + c * d[:, 1]
    t_in = np.full(len(d), -np.inf)
    t_out = np.full(len(d), np.inf)
    for oc, dc, h in ((ox, dx, half[0]), (oy, dy, half[1])):
        dc = np.where(np.abs(dc) < 1e-12, 1e-12, dc)
        t1, t2 = (-h - oc) / dc, (h - oc) / dc
        t_in = np.maximum(t_in, np.minimum(t1, t2))
        t_out = np.minimum(t_out, np.maximum(t1, t2))
    inside = (t_in <= t_out) & (t_out > _EPS_T)
    out = np.full(len(d), np.inf)
    if not inside.any():
        return out
    # curb face: where the ray enters the prism below the top and above the ground
    te = np.maximum(t_in, _EPS_T)
    px, py, pz = o[0] + te * d[:, 0], o[1] + te * d[:, 1], o[2] + te * d[:, 2]
    h = ground.height(px, py)
    face = inside & (t_in > _EPS_T) & (pz >= h) & (pz <= h + offset)
    out = np.where(face, t_in, out)
    t_top = ground.intersect(o, d, offset)
    top = inside & ~face & (t_top >= t_in) & (t_top <= t_out)
    return np.where(top, t_top, out)


@dataclass(frozen=True)
class CastResult:
    t: np.ndarray        # (R,) range along each unit ray (inf = no return)
    prim: np.ndarray     # (R,) int32: -1 none, 0 ground surface, k >= 1 primitive k (see Primitives.table)


def cast(origin: np.ndarray, dirs: np.ndarray, ground: GroundSurface, prims: Primitives,
         max_range: float, rng: np.random.Generator) -> CastResult:
    """Nearest hit of each unit ray ``origin + t dirs`` (city frame) within ``max_range``."""
    o = np.asarray(origin, float)
    rays = _RaySet(o, dirs)
    best = ground.intersect(o, dirs)
    best = np.where(best <= max_range, best, np.inf)
    prim = np.where(np.isfinite(best), 0, -1).astype(np.int32)
    porosity = prims.table()['porosity']

    def update(idx, t, k):
        if porosity[k] > 0:
            t = np.where(rng.random(len(t)) < porosity[k], np.inf, t)
        closer = t < best[idx]
        sel = idx[closer]
        best[sel] = t[closer]
        prim[sel] = k

    nb, ns, nc = len(prims.box_center), len(prims.slab_center), len(prims.cyl_center)
    if nb:
        C, H, Y = np.array(prims.box_center), np.array(prims.box_half), np.array(prims.box_yaw)
        R = np.array(prims.box_rot)
        # half extents of each (possibly tilted) box along its heading frame: exact for upright
        # boxes, a bounding box for tilted ones, so the culling stays conservative
        tilt = np.einsum('kji,kjl->kil', np.stack([yaw_matrix(y) for y in Y]), R)    # yaw^T R
        E = np.einsum('kij,kj->ki', np.abs(tilt), H)
        keep, a0, a1, e0, e1 = _footprint_cull(o, C[:, :2], E[:, :2], Y, C[:, 2] - E[:, 2], C[:, 2] + E[:, 2],
                                               max_range)
        for i in np.flatnonzero(keep):
            idx = rays.candidates(a0[i], a1[i], e0[i], e1[i])
            if len(idx):
                update(idx, _box_hits(o, dirs[idx], C[i], H[i], R[i]), 1 + i)
    if ns:
        C, H = np.array(prims.slab_center), np.array(prims.slab_half)
        Y, OFF = np.array(prims.slab_yaw), np.array(prims.slab_offset)
        cs, sn = np.cos(Y), np.sin(Y)
        signs = np.array([[1, 1], [1, -1], [-1, 1], [-1, -1]], float)
        lx, ly = signs[:, 0] * H[:, None, 0], signs[:, 1] * H[:, None, 1]      # (K,4) local corners
        cx = C[:, None, 0] + cs[:, None] * lx - sn[:, None] * ly
        cy = C[:, None, 1] + sn[:, None] * lx + cs[:, None] * ly
        hz = ground.height(cx, cy)
        # the plane part of h is extreme at the corners; the undulation moves h by at most 2|amp|
        z_amp = 2 * abs(ground.amp) + 0.01
        keep, a0, a1, e0, e1 = _footprint_cull(o, C, H, Y, hz.min(axis=1) - z_amp,
                                               hz.max(axis=1) + OFF + z_amp,
                                               max_range)
        for i in np.flatnonzero(keep):
            idx = rays.candidates(a0[i], a1[i], e0[i], e1[i])
            if len(idx):
                update(idx, _slab_hits(o, dirs[idx], ground, C[i], H[i], Y[i], OFF[i]), 1 + nb + i)
    if nc:
        C, Rr, HH = np.array(prims.cyl_center), np.array(prims.cyl_radius), np.array(prims.cyl_half_h)
        rel = C[:, :2] - o[:2]
        dist = np.hypot(rel[:, 0], rel[:, 1])
        keep = dist - Rr <= max_range
        inside = dist <= Rr + 1e-3
        half_ang = np.arcsin(np.clip(Rr / np.maximum(dist, 1e-9), 0, 1))
        az_c = np.arctan2(rel[:, 1], rel[:, 0])
        a0 = np.where(inside, -np.pi, az_c - half_ang - 1e-6)
        a1 = np.where(inside, np.pi + 1e-9, az_c + half_ang + 1e-6)
        d_min = np.maximum(dist - Rr, 1e-3)
        d_max = dist + Rr
        zl, zh = C[:, 2] - HH - o[2], C[:, 2] + HH - o[2]
        e1 = np.arctan2(zh, np.where(zh > 0, d_min, d_max)) + 1e-6
        e0 = np.arctan2(zl, np.where(zl < 0, d_min, d_max)) - 1e-6
        for i in np.flatnonzero(keep):
            idx = rays.candidates(a0[i], a1[i], e0[i], e1[i])
            if len(idx):
                update(idx, _cylinder_hits(o, dirs[idx], C[i], Rr[i], HH[i]), 1 + nb + ns + i)
    best = np.where(best <= max_range, best, np.inf)
    prim = np.where(np.isfinite(best), prim, -1).astype(np.int32)
    return CastResult(best, prim)
