"""Ablate the false motion the node reports on real lidar (issue #14 item 2); prints one table.

::

    python bench/ablate_real_motion.py [--only NAME ...] [--ego] [--evidence KEY=VALUE ...]
    python bench/ablate_real_motion.py --synthetic DATA_ROOT [--split val] [--out DIR]

Every variant runs the node's per-frame logic (:class:`zeroflow_ros.pipeline.Pipeline`, onnxruntime
on the CPU, ``models/default``) over the bundled real sweeps and reports the percentage of *all*
points of sweep t flagged dynamic, per KITTI pair, and over the PJLab pairs (static scene: truth 0).
KITTI is taken at 1.73 m (``sensor_in_base_xyz`` as ``zeroflow demo`` sets), PJLab at 2.05 m.
``false`` is the part flagged outside the vehicles that really move (``KITTI_MOVERS``, found by
tracking, confirmed by registering the bus alone: 0.40-0.49 m per sweep) and ``recall`` the share of
mover points flagged.

A variant changes one thing: the input sweeps (subsample, near returns dropped, de-skewed), the ego
motion (independent point-to-plane ICP fed as odometry poses; a sweep paired with itself, still or
moved by the ego motion), the mounting height, the dynamic threshold, or a post-network correction
(rigid residual of the static world; the motion-evidence test of
:mod:`zeroflow_ros.core.static_residual` set as ``Pipeline.flow_correction``). ``--ego`` adds the
per-pair KISS-ICP vs ICP motion; ``--synthetic`` scores the Pipeline with and without the evidence
hook on a synthetic split with exact ground truth.
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from zeroflow_ros.core import geometry
from zeroflow_ros.data import sweeps as sweep_io
from zeroflow_ros.pipeline import FlowFrame, Pipeline, PipelineConfig

ROOT = Path(__file__).resolve().parent.parent
KITTI = ROOT / 'data' / 'samples' / 'kitti_raw_sfnd_seq'
PJLAB = ROOT / 'data' / 'samples' / 'pjlab_lidar2imu_seq' / 'top_center_lidar'
HEIGHTS = {'kitti': 1.73, 'pjlab': 2.05}

# The vehicles that really move in the KITTI sweeps, found by tracking occupied 0.5 m bins of the
# non-ground points along world x (poses: the independent ICP below, world = sweep 0) over the 10
# sweeps: a static object stays in its bins, these advance steadily. Box at sweep 0 in the world
# frame (x0, x1, y0, y1) and its speed along world x in metres per sweep; points above 0.33 m.
KITTI_MOVERS = {
    # a bus/truck 15+ m long passing on the right, rear edge -2.5 -> +1.5 m over 9 sweeps
    'bus_right': ((-2.6, 45.0, -3.7, -1.9), 0.44),
    'follower_right': ((-18.3, -13.8, -5.4, -2.2), 0.55),   # behind, right lane
    'follower_lane': ((-20.5, -13.8, -1.4, 1.1), 0.50),     # behind, our lane
    'car_ahead': ((7.3, 11.8, -1.4, 1.1), 0.17),            # slow (1.7 m/s), ahead in our lane
    'cross_street': ((-40.0, 5.0, 18.5, 22.5), -1.0),       # crossing traffic 20 m to the left
}


@dataclass
class Seq:
    name: str
    points: list[np.ndarray]
    stamps: list[int]
    height: float
    poses: list[np.ndarray] | None = None      # world_T_sensor, fed as odometry when set
    # denominator of the percentage per sweep (points dropped by a variant count as static)
    n_points: list[int] | None = None
    # indices of the kept points into the original sweeps (None: all, in order)
    index: list[np.ndarray] | None = None


@dataclass
class Variant:
    name: str
    what: str
    prepare: Callable[[Seq], Seq] = lambda s: s
    config: dict = field(default_factory=dict)
    post: Callable[[FlowFrame, Seq, int], np.ndarray] | None = None   # -> is_dynamic
    # sets Pipeline.flow_correction (the hook the node will use): built per sequence
    hook: Callable[[Seq], Callable] | None = None
    # '' normal pairs; 'same': sweep t paired with itself; 'moved': with itself moved by the ego motion
    self_pair: str = ''


def load(name: str) -> Seq:
    folder = KITTI if name == 'kitti' else PJLAB
    ss = list(sweep_io.iter_sweeps(folder))
    return Seq(name, [s.points for s in ss], [int(s.stamp_ns) for s in ss], HEIGHTS[name])


def mover_masks(seq: Seq) -> list[np.ndarray]:
    """(N,) bool per KITTI sweep: the points inside the ``KITTI_MOVERS`` boxes."""
    from zeroflow_ros.core.ground import geometric_ground
    poses = icp_poses(seq)
    out = []
    for k, p in enumerate(seq.points):
        w = geometry.transform_points(poses[k], p.astype(np.float64))
        m = np.zeros(len(p), bool)
        for (x0, x1, y0, y1), vx in KITTI_MOVERS.values():
            m |= (w[:, 0] >= x0 + vx * k) & (w[:, 0] < x1 + vx * k) & (w[:, 1] >= y0) & (w[:, 1] < y1)
        out.append(m & (p[:, 2] > 0.33 - seq.height) & ~geometric_ground(p.astype(np.float64)))
    return out


def run_variant(v: Variant, seq: Seq, backend) -> list[tuple[float, np.ndarray, FlowFrame]]:
    """Return (percent dynamic of all points, is_dynamic over the original points, frame) per pair."""
    s = v.prepare(seq)
    # the node's own motion-evidence check off: the variants that want it add it as the hook
    cfg = dict(model='models/default', backend='onnxruntime', device='cpu', motion_evidence=False,
               sensor_in_base_xyz=(0.0, 0.0, s.height), ego_motion='odometry' if s.poses else 'lidar')
    if v.self_pair:
        cfg['ego_motion'] = 'odometry'
    cfg.update(v.config)
    frames = []
    if v.self_pair:
        motions = kiss_motions(s) if v.self_pair == 'moved' else [np.eye(4)] * (len(s.points) - 1)
        for k, M in enumerate(motions):
            # sweep t paired with itself (moved by the ego motion, exactly known): same sampling,
            # so any flow is the network's own
            pipe = Pipeline(PipelineConfig(**cfg), backend=backend)
            pipe.step(s.points[k], s.stamps[k], np.eye(4))
            moved = geometry.transform_points(M, s.points[k].astype(np.float64)).astype(np.float32)
            frames.append(pipe.step(moved, s.stamps[k] + 100_000_000, geometry.invert(M)))
    else:
        pipe = Pipeline(PipelineConfig(**cfg), backend=backend)
        if v.hook is not None:
            pipe.flow_correction = v.hook(s)
        for k, (p, st) in enumerate(zip(s.points, s.stamps)):
            fr = pipe.step(p, st, s.poses[k] if s.poses else None)
            if fr is not None:
                frames.append(fr)
    out = []
    for k, fr in enumerate(frames):
        dyn = v.post(fr, s, k) if v.post else fr.is_dynamic
        n = s.n_points[k] if s.n_points else len(dyn)
        if s.index is not None:
            full = np.zeros(len(seq.points[k]), bool)
            full[s.index[k]] = dyn
            dyn = full
        out.append((100.0 * float(dyn.sum()) / n, dyn, fr))
    return out


# ------------------------------------------------------------------------------------------------
# Independent ego motion: point-to-plane ICP on non-ground points (scipy), no KISS-ICP involved
# ------------------------------------------------------------------------------------------------

def _voxel_down(p: np.ndarray, voxel: float) -> np.ndarray:
    key = np.floor(p / voxel).astype(np.int64)
    _, first = np.unique(key, axis=0, return_index=True)
    return p[np.sort(first)]


def _normals(tree, pts: np.ndarray, k: int = 12) -> tuple[np.ndarray, np.ndarray]:
    _, nn = tree.query(pts, k=k)
    nb = pts[nn] - pts[nn].mean(axis=1, keepdims=True)
    w, vec = np.linalg.eigh(np.einsum('nki,nkj->nij', nb, nb))
    planar = w[:, 0] < 0.1 * w[:, 1]       # keep well-defined planes only
    return vec[:, :, 0], planar


def point_to_plane(src: np.ndarray, dst: np.ndarray, init: np.ndarray, iters: int = 30) -> np.ndarray:
    """``dst_T_src`` aligning ``src`` onto the planes of ``dst`` (Gauss-Newton, Huber weights)."""
    from scipy.spatial import cKDTree
    tree = cKDTree(dst)
    nrm, planar = _normals(tree, dst)
    T = np.array(init, float)
    for it in range(iters):
        p = src @ T[:3, :3].T + T[:3, 3]
        d, j = tree.query(p, distance_upper_bound=1.0 if it < 10 else 0.5)
        ok = np.isfinite(d)
        ok[ok] &= planar[j[ok]]
        n, q, pp = nrm[j[ok]], dst[j[ok]], p[ok]
        r = np.einsum('ni,ni->n', pp - q, n)
        w = np.minimum(1.0, 0.05 / np.maximum(np.abs(r), 1e-9))
        J = np.hstack([np.cross(pp, n), n])
        dx = np.linalg.solve((J * w[:, None]).T @ J + 1e-9 * np.eye(6), -(J * w[:, None]).T @ r)
        dT = geometry.make_transform(_rotvec(dx[:3]), dx[3:])
        T = dT @ T
        if np.linalg.norm(dx) < 1e-6:
            break
    return T


def _rotvec(w: np.ndarray) -> np.ndarray:
    from scipy.spatial.transform import Rotation
    return Rotation.from_rotvec(w).as_matrix()


def icp_poses(seq: Seq, min_range: float = 3.0, max_range: float = 60.0) -> list[np.ndarray]:
    """``world_T_sensor`` chained from pairwise point-to-plane ICP (world = first sweep)."""
    from zeroflow_ros.core.ground import geometric_ground
    clouds = []
    for p in seq.points:
        p = p[np.isfinite(p).all(axis=1)].astype(np.float64)
        r = np.linalg.norm(p[:, :2], axis=1)
        keep = ~geometric_ground(p) & (r > min_range) & (r < max_range)
        clouds.append(_voxel_down(p[keep], 0.2))
    poses = [np.eye(4)]
    prev = np.eye(4)
    for a, b in zip(clouds[:-1], clouds[1:]):
        # sweep t+1 onto sweep t: ego0_T_ego1, started from the previous motion (constant velocity)
        T = point_to_plane(b, a, prev)
        prev = T
        poses.append(poses[-1] @ T)
    return poses


# ------------------------------------------------------------------------------------------------
# Input variants
# ------------------------------------------------------------------------------------------------

def deskew(seq: Seq) -> Seq:
    """Undo the rolling shutter of a spinning lidar with the constant motion of the ICP poses.

    No per-point time in KITTI .bin: a Velodyne spins clockwise seen from above, so the time of a
    return is taken from its azimuth (sweep starting and ending behind the car, middle = forward).
    """
    from scipy.spatial.transform import Rotation
    poses = icp_poses(seq)
    out = []
    for k, p in enumerate(seq.points):
        j = min(k, len(poses) - 2)
        M = geometry.invert(poses[j]) @ poses[j + 1]          # ego_t_T_ego_t+1 over one period
        az = np.arctan2(p[:, 1], p[:, 0])
        frac = np.mod(math.pi - az, 2 * math.pi) / (2 * math.pi) - 0.5
        rv = Rotation.from_matrix(M[:3, :3]).as_rotvec()
        R = Rotation.from_rotvec(frac[:, None] * rv[None]).as_matrix()
        t = frac[:, None] * M[:3, 3][None]
        out.append((np.einsum('nij,nj->ni', R, p) + t).astype(np.float32))
    return replace(seq, points=out)


def subsample(fraction: float) -> Callable[[Seq], Seq]:
    def f(seq: Seq) -> Seq:
        rng = np.random.default_rng(0)
        index = [np.sort(rng.choice(len(p), int(fraction * len(p)), replace=False)) for p in seq.points]
        return replace(seq, points=[p[i] for p, i in zip(seq.points, index)], index=index)
    return f


def drop_near(r_min: float) -> Callable[[Seq], Seq]:
    def f(seq: Seq) -> Seq:
        index = [np.flatnonzero(np.linalg.norm(p[:, :2], axis=1) >= r_min) for p in seq.points]
        return replace(seq, points=[p[i] for p, i in zip(seq.points, index)], index=index,
                       n_points=[len(p) for p in seq.points])
    return f


def kiss_motions(seq: Seq) -> list[np.ndarray]:
    """``ego1_T_ego0`` of consecutive sweeps from the node's KISS-ICP wrapper."""
    from zeroflow_ros.core.odometry import ego_motion_sequence
    return list(ego_motion_sequence(zip(seq.points, seq.stamps))[1])


def ego_table(seq: Seq) -> list[str]:
    """KISS-ICP vs the independent ICP, per pair: forward motion and their difference."""
    from zeroflow_ros.core.odometry import pose_error
    icp = icp_poses(seq)
    rows = []
    for k, M in enumerate(kiss_motions(seq)):
        M_icp = geometry.invert(icp[k + 1]) @ icp[k]
        dt, dr = pose_error(M, M_icp)
        rows.append(f'{seq.name} K{k}: KISS t {np.round(-M[:3, 3], 3)} ICP t {np.round(-M_icp[:3, 3], 3)} '
                    f'diff {100 * dt:.1f} cm {dr:.3f} deg')
    return rows


def with_icp_poses(seq: Seq) -> Seq:
    return replace(seq, poses=icp_poses(seq))


def height(h: float) -> Callable[[Seq], Seq]:
    return lambda seq: replace(seq, height=h)


# ------------------------------------------------------------------------------------------------
# Post-network corrections (applied to the Pipeline output)
# ------------------------------------------------------------------------------------------------

def _dynamic(fr: FlowFrame, flow: np.ndarray, threshold_mps: float = 0.5) -> np.ndarray:
    return fr.valid & (np.linalg.norm(flow, axis=1) / fr.dt_s >= threshold_mps)


def post_rigid_residual(fr: FlowFrame, seq: Seq, k: int) -> np.ndarray:
    """Subtract the rigid motion of the static world fitted robustly to the flow itself."""
    from zeroflow_ros.core.static_residual import fit_rigid_residual
    T = fit_rigid_residual(fr.points, fr.flow, fr.valid)
    p = fr.points.astype(np.float64)
    flow = fr.flow - (p @ T[:3, :3].T + T[:3, 3] - p)
    return _dynamic(fr, flow)


EVIDENCE_MS: list[float] = []


def hook_evidence(**overrides) -> Callable[[Seq], Callable]:
    """Pipeline.flow_correction = core.static_residual.make_flow_correction (timed)."""
    from zeroflow_ros.core.static_residual import EvidenceConfig, make_flow_correction

    def build(seq: Seq) -> Callable:
        T = PipelineConfig(sensor_in_base_xyz=(0.0, 0.0, seq.height)).base_T_sensor
        correct = make_flow_correction(EvidenceConfig(**overrides), base_T_sensor=T)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            out = correct(*args, **kwargs)
            EVIDENCE_MS.append(1e3 * (time.perf_counter() - t0))
            return out
        return timed
    return build


def threshold(mps: float) -> Callable[[FlowFrame, np.ndarray], np.ndarray]:
    return lambda fr, seq, k: _dynamic(fr, fr.flow, mps)


VARIANTS = [
    Variant('base', 'network alone (motion_evidence off): KISS-ICP ego motion, 1.73 m / 2.05 m, 0.5 m/s'),
    Variant('self_pair', 'sweep t paired with itself, zero motion (exact): network alone', self_pair='same'),
    Variant('self_moved', 'sweep t paired with itself moved by the KISS ego motion, given exactly',
            self_pair='moved'),
    Variant('icp_ego', 'ego motion from independent point-to-plane ICP (3-60 m, non-ground)', with_icp_poses),
    Variant('rigid_resid', 'base, rigid motion of the static world fitted to the flow and removed',
            post=post_rigid_residual),
    Variant('sub50', 'every sweep randomly subsampled to 50 %', subsample(0.5)),
    Variant('sub25', 'every sweep randomly subsampled to 25 %', subsample(0.25)),
    Variant('near3', 'returns within 3 m (xy) dropped (counted static)', drop_near(3.0)),
    Variant('near6', 'returns within 6 m (xy) dropped (counted static)', drop_near(6.0)),
    Variant('h0', 'sensor_in_base_xyz z = 0 (clouds in the sensor frame)', height(0.0)),
    Variant('h1.4', 'mounting height 1.4 m', height(1.4)),
    Variant('h2.0', 'mounting height 2.0 m', height(2.0)),
    Variant('deskew', 'sweeps de-skewed (azimuth time, ICP constant velocity)', deskew),
    Variant('evidence', 'base + motion-evidence test as Pipeline.flow_correction (core.static_residual)',
            hook=hook_evidence()),
    Variant('deskew_evid', 'de-skewed sweeps and the evidence test', deskew, hook=hook_evidence()),
    Variant('evid_nofit', 'evidence test judging the network flow only (fit_iters=0)',
            hook=hook_evidence(fit_iters=0)),
    Variant('evid_p2p', 'evidence test with point-to-point misfit (patch_m ~ 0)',
            hook=hook_evidence(patch_m=1e-9)),
    Variant('thr1.0', 'dynamic threshold 1.0 m/s', post=threshold(1.0)),
    Variant('thr2.0', 'dynamic threshold 2.0 m/s', post=threshold(2.0)),
]


# ------------------------------------------------------------------------------------------------
# Synthetic check: the same Pipeline with and without the evidence test, scored with exact GT
# ------------------------------------------------------------------------------------------------

def synthetic_check(data_root: Path, split: str, out: Path, backend, evidence: dict) -> list[str]:
    """EPE of the Pipeline's output on a synthetic split, plain and with the motion-evidence hook."""
    from zeroflow_ros.core.static_residual import EvidenceConfig, make_flow_correction
    from zeroflow_ros.data.av2 import list_logs
    from zeroflow_ros.eval.evaluate import evaluate
    from zeroflow_ros.eval.predict import MethodOutput, flow_table, output_path, write_feather_atomic
    cfg = PipelineConfig(backend='onnxruntime', device='cpu', ego_motion='odometry', motion_evidence=False)
    rows = []
    for name in ('plain', 'evidence'):
        for log in list_logs(data_root, split):
            pipe = Pipeline(cfg, backend=backend)
            if name == 'evidence':
                pipe.flow_correction = make_flow_correction(EvidenceConfig(**evidence))
            ts = [int(t) for t in log.timestamps]
            for t0, t1 in zip([None] + ts[:-1], ts):
                fr = pipe.step(log.points(t1), t1, log.pose(t1))
                if fr is not None:
                    cols = flow_table(fr.points, fr.ego1_T_ego0, MethodOutput(fr.flow, fr.is_dynamic))
                    write_feather_atomic(output_path(out / name, log.log_id, t0), cols)
        t = evaluate(out / name, data_root, split).threeway
        rows.append(f"synthetic {split} {name:<9} EPE 3-way {t['EPE 3-Way Average']:.4f}  "
                    f"FG-dynamic {t['EPE/Foreground/Dynamic']:.4f}  "
                    f"FG-static {t['EPE/Foreground/Static']:.4f}  "
                    f"BG-static {t['EPE/Background/Static']:.4f}  dynamic IoU {t['Dynamic IoU']:.4f}")
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--model', default='models/default')
    ap.add_argument('--only', nargs='*', help='variant names (default: all)')
    ap.add_argument('--ego', action='store_true', help='also compare KISS-ICP with the independent ICP')
    ap.add_argument('--synthetic', type=Path, metavar='DATA_ROOT',
                    help='only score the Pipeline with/without the evidence test on this synthetic root')
    ap.add_argument('--split', default='val')
    ap.add_argument('--out', type=Path, default=Path('/tmp/ablate_real_motion'), help='synthetic predictions')
    ap.add_argument('--evidence', nargs='*', default=[], metavar='KEY=VALUE',
                    help='EvidenceConfig fields for the evidence variant and the synthetic check')
    args = ap.parse_args(argv)
    evidence = {k: float(v) for k, v in (kv.split('=', 1) for kv in args.evidence)}
    for v in VARIANTS:
        if v.name == 'evidence' and evidence:
            v.hook = hook_evidence(**evidence)
    logging.basicConfig(level=logging.WARNING)
    from zeroflow_ros.backends import create_backend
    from zeroflow_ros.pipeline import resolve_model_path
    backend = create_backend(resolve_model_path(args.model), backend='onnxruntime', device='cpu')
    if args.synthetic:
        print('\n'.join(synthetic_check(args.synthetic, args.split, args.out, backend, evidence)))
        return 0
    seqs = {n: load(n) for n in ('kitti', 'pjlab')}
    chosen = [v for v in VARIANTS if not args.only or v.name in args.only]
    movers = mover_masks(seqs['kitti'])[:-1]
    n_k = len(movers)
    head = f"{'variant':<12}" + ''.join(f'{"K" + str(k):>6}' for k in range(n_k)) + \
        f"{'K mean':>7}{'K max':>6}{'false':>6}{'recall':>7}{'PJ mean':>8}{'PJ max':>7}{'s':>5}"
    truth = [100.0 * float(m.mean()) for m in movers]
    rows = [f"{'movers':<12}" + ''.join(f'{x:6.1f}' for x in truth) +
            f'{np.mean(truth):7.1f}{max(truth):6.1f}']
    for v in chosen:
        t0 = time.perf_counter()
        res = {n: run_variant(v, s, backend) for n, s in seqs.items()}
        pct = {n: [x for x, _, _ in r] for n, r in res.items()}
        dyn = [d for _, d, _ in res['kitti']]
        false = np.mean([100.0 * float((d & ~m).mean()) for d, m in zip(dyn, movers)])
        hit = sum(int((d & m).sum()) for d, m in zip(dyn, movers))
        recall = 100.0 * hit / sum(int(m.sum()) for m in movers)
        rows.append(f'{v.name:<12}' + ''.join(f'{x:6.1f}' for x in pct['kitti']) +
                    f"{np.mean(pct['kitti']):7.1f}{max(pct['kitti']):6.1f}{false:6.1f}{recall:7.1f}"
                    f"{np.mean(pct['pjlab']):8.2f}{max(pct['pjlab']):7.2f}{time.perf_counter() - t0:5.0f}")
        print(rows[-1], file=sys.stderr, flush=True)
    print('percent of all points of sweep t flagged dynamic: KITTI pairs K0..K8, their mean and max; false: '
          'flagged outside the movers (mean % of all points); recall: % of mover points flagged; '
          'PJLab (static, truth 0): mean and max')
    print(head)
    for r in rows:
        print(r)
    print()
    for v in chosen:
        print(f'{v.name:<12} {v.what}')
    if EVIDENCE_MS:
        print(f'\nsupported_motion: median {np.median(EVIDENCE_MS):.0f} ms, max {max(EVIDENCE_MS):.0f} ms '
              f'per pair ({len(EVIDENCE_MS)} calls, all evidence variants, this machine, shared)')
    if args.ego:
        print()
        for n in ('kitti', 'pjlab'):
            print('\n'.join(ego_table(seqs[n])))
    return 0


if __name__ == '__main__':
    sys.exit(main())
