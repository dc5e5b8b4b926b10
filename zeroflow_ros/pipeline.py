"""ROS-free per-frame logic of the scene-flow node.

The node (``zeroflow_ros.node``) only decodes messages, calls :meth:`Pipeline.step` and encodes
the result; everything that can be tested without DDS lives here:

* pairing of consecutive sweeps (previous sweep kept; a gap above ``max_sweep_gap_s``, a time
  jump backwards or a change of ``frame_id`` starts a new pair instead of producing flow),
* ego motion: poses from odometry (:class:`PoseBuffer`, interpolated at the cloud stamps with
  slerp + lerp), built-in lidar odometry (KISS-ICP, ``core/odometry.py``) or none,
* pre-processing (range + ground removal, ``core/preprocess.py``) once per sweep,
* the backend call (``zeroflow_ros.backends``) and the scatter back to every input point.

Output convention: **residual flow** (``core/geometry.py``), in the frame of sweep t, for every
input point of sweep t in input order; points the model does not score (ground, out of range,
non-finite) get zero flow, ``valid`` False and ``is_dynamic`` False.
"""
from __future__ import annotations

import bisect
import dataclasses
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from zeroflow_ros.core import geometry

log = logging.getLogger(__name__)

EGO_MOTION_SOURCES = ('odometry', 'lidar', 'none')
GROUND_MODES = ('geometric', 'none')
PRECISIONS = ('fp32', 'fp16', 'int8')
BACKENDS = ('auto', 'tensorrt', 'onnxruntime', 'torch')
DEVICES = ('auto', 'cpu', 'cuda')


class PipelineError(ValueError):
    """Bad input or state for one sweep; ``kind`` is a short counter key for diagnostics."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class PipelineConfig:
    """Everything the per-frame logic needs, frozen from the node's parameters."""

    model: str = 'models/default'
    backend: str = 'auto'
    device: str = 'auto'
    precision: str = 'fp32'
    ego_motion: str = 'lidar'
    ground_removal: str = 'geometric'
    # (x_min, y_min, z_min, x_max, y_max, z_max) in the sensor frame: the points that are scored
    point_range_m: tuple[float, ...] = (-51.2, -51.2, -3.0, 51.2, 51.2, 3.0)
    max_sweep_gap_s: float = 0.35
    dynamic_threshold_mps: float = 0.5
    max_points: int = 200_000
    # CPU threads of each inference session; 0: half the cores. The node runs the network's
    # sweep part and pair part on two workers at once, so each gets half; on 2 cores one thread
    # per session also took ~16 % less CPU per call than two (no thread hand-offs), measured.
    inference_threads: int = 0
    # Zero the flow of objects whose motion sweep t+1 does not support better than zero flow
    # (core/static_residual.py): a moving lidar re-samples static surfaces, which a network reads as
    # motion (measured on the bundled KITTI sweeps: false flags 14.7 % -> 1.2 % of points, every
    # mover point kept; synthetic EPE unchanged). Costs about half the network's CPU time per pair.
    motion_evidence: bool = True
    # The cloud frame in the vehicle base frame. The model gets both clouds in the base frame (the
    # frame it was trained in: ground at z ~ 0) and its flow is rotated back into the cloud frame.
    sensor_in_base_xyz: tuple[float, ...] = (0.0, 0.0, 0.0)
    sensor_in_base_rpy: tuple[float, ...] = (0.0, 0.0, 0.0)

    def __post_init__(self) -> None:
        for name, allowed in (('ego_motion', EGO_MOTION_SOURCES), ('ground_removal', GROUND_MODES),
                              ('precision', PRECISIONS), ('backend', BACKENDS), ('device', DEVICES)):
            value = getattr(self, name)
            if value not in allowed:
                raise PipelineError('config', f'PipelineConfig.{name}={value!r}; expected one of {allowed}')
        object.__setattr__(self, 'point_range_m', tuple(float(v) for v in self.point_range_m))
        for name in ('sensor_in_base_xyz', 'sensor_in_base_rpy'):
            v = tuple(float(x) for x in getattr(self, name))
            if len(v) != 3 or not all(math.isfinite(x) for x in v):
                raise PipelineError('config', f'PipelineConfig.{name}={getattr(self, name)!r}; '
                                    'expected 3 finite numbers')
            object.__setattr__(self, name, v)
        r = self.point_range_m
        checks = (
            ('point_range_m', len(r) == 6 and r[0] < r[3] and r[1] < r[4] and r[2] < r[5],
             '6 numbers (x_min, y_min, z_min, x_max, y_max, z_max) with min < max'),
            ('max_sweep_gap_s', self.max_sweep_gap_s > 0, '> 0'),
            ('dynamic_threshold_mps', self.dynamic_threshold_mps >= 0, '>= 0'),
            ('max_points', self.max_points >= 1, '>= 1'),
            ('inference_threads', self.inference_threads >= 0, '>= 0 (0: half the cores)'),
        )
        for name, ok, expected in checks:
            if not ok:
                raise PipelineError('config',
                                    f'PipelineConfig.{name}={getattr(self, name)!r}; expected {expected}')

    @property
    def base_T_sensor(self) -> np.ndarray:
        return geometry.make_transform(geometry.rpy_matrix(*self.sensor_in_base_rpy), self.sensor_in_base_xyz)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> 'PipelineConfig':
        """Build from a (parameter) dict, ignoring keys that are not pipeline settings."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


@dataclass
class FlowFrame:
    """Flow of sweep t, computed when sweep t+1 arrived."""

    stamp_ns: int                 # stamp of sweep t (the output's stamp)
    next_stamp_ns: int            # stamp of sweep t+1
    points: np.ndarray            # (N,3) float32, sweep t as given (its own frame)
    flow: np.ndarray              # (N,3) float32 residual flow, metres over dt
    valid: np.ndarray             # (N,) bool, scored by the model
    speed: np.ndarray             # (N,) float32, |flow| / dt in m/s
    is_dynamic: np.ndarray        # (N,) bool
    ego1_T_ego0: np.ndarray       # (4,4) float64
    timings_ms: dict[str, float]  # preprocess, inference, postprocess, total
    tag: Any = None               # whatever the caller passed with sweep t (the node: its header)
    # finer split of the same work (ms): check, ground, odometry, sweep_pillars, sweep_encoder (sweep
    # t+1's own work; the encoder pass is the network's sweep-only part), pair_points, network, scatter
    stages_ms: dict[str, float] = field(default_factory=dict)

    @property
    def dt_s(self) -> float:
        return (self.next_stamp_ns - self.stamp_ns) * 1e-9


# --------------------------------------------------------------------------------------------
# Poses
# --------------------------------------------------------------------------------------------

def pose_matrix(position, quaternion_wxyz) -> np.ndarray:
    """4x4 pose from a position and a (w, x, y, z) quaternion."""
    return geometry.make_transform(geometry.quat_to_matrix(*quaternion_wxyz), np.asarray(position, float))


def slerp(q0: np.ndarray, q1: np.ndarray, a: float) -> np.ndarray:
    """Spherical interpolation of unit quaternions (w, x, y, z), shortest path."""
    q0 = np.asarray(q0, float) / np.linalg.norm(q0)
    q1 = np.asarray(q1, float) / np.linalg.norm(q1)
    dot = float(np.dot(q0, q1))
    if dot < 0.0:
        q1, dot = -q1, -dot
    if dot > 0.9995:
        # Nearly identical: lerp avoids dividing by sin(~0).
        q = q0 + a * (q1 - q0)
        return q / np.linalg.norm(q)
    theta = math.acos(min(1.0, dot))
    s = math.sin(theta)
    return (math.sin((1 - a) * theta) / s) * q0 + (math.sin(a * theta) / s) * q1


class PoseBuffer:
    """Time-ordered odometry poses, interpolated at arbitrary stamps (thread-safe).

    Poses are ``world_T_base`` (e.g. nav_msgs/Odometry: header.frame_id <- child_frame_id);
    ``base_T_sensor`` (the cloud frame in the odometry child frame) turns them into
    ``world_T_sensor`` so ego motion is expressed in the cloud's frame.
    """

    def __init__(self, max_age_s: float = 10.0, base_T_sensor: np.ndarray | None = None):
        self._stamps: list[int] = []
        self._pos: list[np.ndarray] = []
        self._quat: list[np.ndarray] = []
        self._max_age_ns = int(max_age_s * 1e9)
        self._base_T_sensor = np.eye(4) if base_T_sensor is None else np.asarray(base_T_sensor, float)
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)

    def __len__(self) -> int:
        with self._lock:
            return len(self._stamps)

    def clear(self) -> None:
        with self._lock:
            self._stamps.clear()
            self._pos.clear()
            self._quat.clear()

    def add(self, stamp_ns: int, position, quaternion_wxyz) -> None:
        """Insert one pose; a stamp earlier than the newest one (bag loop) clears the buffer."""
        q = np.asarray(quaternion_wxyz, float)
        n = np.linalg.norm(q)
        p = np.asarray(position, float)
        if not (np.isfinite(n) and n > 1e-9 and np.all(np.isfinite(p))):
            raise PipelineError('odometry',
                                f'odometry pose at {stamp_ns} ns is not finite / has a zero quaternion')
        with self._cond:
            if self._stamps and stamp_ns < self._stamps[-1]:
                self._stamps.clear()
                self._pos.clear()
                self._quat.clear()
            if self._stamps and stamp_ns == self._stamps[-1]:
                self._pos[-1], self._quat[-1] = p, q / n
            else:
                self._stamps.append(int(stamp_ns))
                self._pos.append(p)
                self._quat.append(q / n)
            cut = bisect.bisect_left(self._stamps, self._stamps[-1] - self._max_age_ns)
            if cut:
                del self._stamps[:cut], self._pos[:cut], self._quat[:cut]
            self._cond.notify_all()

    def interpolate(self, stamp_ns: int) -> np.ndarray | None:
        """``world_T_sensor`` at ``stamp_ns``, or None when the stamp is outside the buffer."""
        with self._lock:
            return self._interpolate_locked(stamp_ns)

    def wait_for(self, stamp_ns: int, timeout_s: float) -> np.ndarray | None:
        """Like :meth:`interpolate`, waiting up to ``timeout_s`` for odometry to cover the stamp."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                pose = self._interpolate_locked(stamp_ns)
                left = deadline - time.monotonic()
                if pose is not None or left <= 0:
                    return pose
                if self._stamps and self._stamps[0] > stamp_ns:
                    return None  # too old: newer odometry will not help
                self._cond.wait(left)

    def _interpolate_locked(self, stamp_ns: int) -> np.ndarray | None:
        st = self._stamps
        if not st or stamp_ns < st[0] or stamp_ns > st[-1]:
            return None
        i = bisect.bisect_left(st, stamp_ns)
        if st[i] == stamp_ns:
            pos, quat = self._pos[i], self._quat[i]
        else:
            a = (stamp_ns - st[i - 1]) / (st[i] - st[i - 1])
            pos = (1 - a) * self._pos[i - 1] + a * self._pos[i]
            quat = slerp(self._quat[i - 1], self._quat[i], a)
        return pose_matrix(pos, quat) @ self._base_T_sensor


# --------------------------------------------------------------------------------------------
# Pipeline
# --------------------------------------------------------------------------------------------

@dataclass
class _Sweep:
    points: np.ndarray          # (N,3) float32 as given
    is_ground: np.ndarray       # (N,) bool, decided once per sweep in its own frame
    stamp_ns: int
    world_T_ego: np.ndarray     # (4,4)
    frame_id: str
    tag: Any = None
    # What the sweep needs as sweep t of the next pair, computed once when it arrives:
    mask0: np.ndarray | None = None    # (N,) bool, scored (finite, in range, not ground)
    model0: np.ndarray | None = None   # (K0,3) float32, points[mask0] in the model (base) frame
    pillars0: Any = None               # backend.pillarize(model0), when the backend pillarises on the host
    stages_ms: dict[str, float] = field(default_factory=dict)


@dataclass
class PairJob:
    """Two prepared sweeps whose flow is still to be computed by :meth:`Pipeline.run_pair`."""

    prev: _Sweep
    cur: _Sweep
    ego1_T_ego0: np.ndarray     # (4,4) float64, checked rigid


@dataclass
class _Counters:
    frames: int = 0
    resets: dict[str, int] = field(default_factory=dict)


class Pipeline:
    """Keeps the previous sweep and turns each new sweep into flow for the previous one.

    ``backend`` may be passed in (already created); otherwise it is created from the config with
    ``zeroflow_ros.backends.create_backend``. ``lidar_odometry_factory`` builds a fresh
    KISS-ICP wrapper on every reset (default: ``core.odometry.LidarOdometry``, one thread).

    The work is split in two so a caller can overlap sweeps: :meth:`prepare` does everything a
    sweep needs once (checks, ground, ego pose, its scored points and pillars as the next pair's
    sweep t) and keeps the pairing state; :meth:`run_pair` does what depends on the pair (sweep
    t+1 brought into ego0, the network, the scatter back) and touches no pairing state, so it may
    run in another thread while the next sweep is prepared. :meth:`step` is both in one call.
    """

    def __init__(self, config: PipelineConfig, backend: Any = None,
                 lidar_odometry_factory: Callable[[], Any] | None = None):
        self.config = config
        if backend is None:
            from zeroflow_ros.backends import create_backend
            backend = create_backend(resolve_model_path(config.model), backend=config.backend,
                                     device=config.device, precision=config.precision,
                                     threads=inference_threads(config))
        self.backend = backend
        T = config.base_T_sensor
        # None: the cloud frame is the base frame, no per-sweep work
        self._to_base = None if np.allclose(T, np.eye(4)) else (T[:3, :3].astype(np.float32),
                                                                T[:3, 3].astype(np.float32))
        self._preprocess_cfg = make_preprocess_config(config)
        self._odometry_factory = lidar_odometry_factory or _default_lidar_odometry
        self._odometry: Any = None
        self._prev: _Sweep | None = None
        self.last_reset_reason: str | None = None
        self.counters = _Counters()
        # The hook for a post-network correction of the pair's residual flow (e.g. a static
        # residual clean-up): fn(flow (K0,3), valid (K0,), pc0 (K0,3), pc1 (K1,3), ego1_T_ego0)
        # (, dt_s=pair time step) -> flow (K0,3), in the cloud frame of sweep t. None: no correction.
        self.flow_correction: Callable[..., np.ndarray] | None = None
        self.flow_correction = make_motion_evidence(config)

    # -- state -------------------------------------------------------------------------------
    def reset(self, reason: str = 'reset') -> None:
        """Forget the previous sweep (and the lidar odometry map)."""
        self._prev = None
        self._odometry = None
        self.last_reset_reason = reason
        self.counters.resets[reason] = self.counters.resets.get(reason, 0) + 1

    @property
    def has_previous(self) -> bool:
        return self._prev is not None

    def describe(self) -> dict[str, Any]:
        try:
            backend = dict(self.backend.describe())
        except Exception:  # describe() is informational only
            backend = {'name': getattr(self.backend, 'name', type(self.backend).__name__)}
        return {'backend': backend, 'ego_motion': self.config.ego_motion,
                'ground_removal': self.config.ground_removal, 'max_points': self.config.max_points}

    # -- per frame ---------------------------------------------------------------------------
    def step(self, points: np.ndarray, stamp_ns: int, pose: np.ndarray | None = None, *,
             frame_id: str = '', tag: Any = None, infer: bool = True) -> FlowFrame | None:
        """Add sweep t+1; return flow of sweep t, or None when there is no valid pair yet.

        ``pose`` is ``world_T_ego`` of this sweep (needed with ``ego_motion='odometry'``, ignored
        otherwise). A rejected sweep raises :class:`PipelineError` and leaves the previous
        sweep in place, so the next good sweep still pairs with it (if within the gap).
        ``infer=False`` only takes the sweep in (ego pose, ground), e.g. a predecessor the caller
        had skipped, and returns None.
        """
        job = self.prepare(points, stamp_ns, pose, frame_id=frame_id, tag=tag)
        if job is None or not infer:
            return None
        return self.run_pair(job)

    def prepare(self, points: np.ndarray, stamp_ns: int, pose: np.ndarray | None = None, *,
                frame_id: str = '', tag: Any = None, encode: bool = True) -> PairJob | None:
        """Take sweep t+1 in (all per-sweep work); return the pair it completes, or None.

        Raises :class:`PipelineError` on a rejected sweep, as :meth:`step`. Not thread-safe: one
        caller thread feeds sweeps in order. ``encode=False`` skips the network's sweep-only part
        for this sweep (a caller that knows it will not be sweep t of the next pair, e.g. under
        overload); if it is after all, its pair runs the whole network (same flow).
        """
        t0 = time.perf_counter()
        self.last_reset_reason = None
        pts = self._check_points(points)
        stamp_ns = int(stamp_ns)
        t1 = time.perf_counter()
        ground, scored = self._ground(pts)
        t2 = time.perf_counter()
        ego_T = self._ego_pose(pts, stamp_ns, pose, frame_id, ground)
        t3 = time.perf_counter()
        cur = _Sweep(pts, ground, stamp_ns, ego_T, frame_id, tag, mask0=scored)
        t4 = self._sweep_t_inputs(cur, encode)
        t5 = time.perf_counter()
        cur.stages_ms = {'check': (t1 - t0) * 1e3, 'ground': (t2 - t1) * 1e3, 'odometry': (t3 - t2) * 1e3,
                         'sweep_pillars': (t4 - t3) * 1e3, 'sweep_encoder': (t5 - t4) * 1e3}
        prev, self._prev = self._prev, cur
        if prev is None:
            return None
        from zeroflow_ros.core import preprocess
        try:
            T = preprocess.check_transform('ego1_T_ego0', geometry.invert(cur.world_T_ego) @ prev.world_T_ego)
        except preprocess.PreprocessError as exc:
            self.reset('bad_ego_motion')
            raise PipelineError('ego_motion', f'ego motion between sweeps rejected: {exc}') from exc
        return PairJob(prev, cur, T)

    def run_pair(self, job: PairJob) -> FlowFrame:
        """Flow of ``job.prev`` towards ``job.cur``: the per-pair work only (thread-safe w.r.t. prepare)."""
        t0 = time.perf_counter()
        prev, cur = job.prev, job.cur
        # The same selection as offline prediction (core.preprocess.prepare_pair): sweep t+1's
        # non-ground points brought into ego0 and kept when inside the range box there.
        cand = np.flatnonzero(~cur.is_ground)
        p1_in0 = geometry.transform_points(geometry.invert(job.ego1_T_ego0),
                                           cur.points[cand].astype(np.float64))
        pc1 = p1_in0[self._preprocess_cfg.in_range(p1_in0)].astype(np.float32)
        model1 = self._model_frame(pc1)
        t1 = time.perf_counter()
        net_ms = 0.0
        if len(prev.model0) == 0 or len(pc1) == 0:
            residual = np.zeros((len(prev.model0), 3), np.float32)
            valid_k = np.zeros(len(prev.model0), bool)
        elif self._host_pillars():
            pil0 = prev.pillars0 or self.backend.pillarize(prev.model0, 'points0')  # backend swapped since
            pil1 = self.backend.pillarize(model1, 'points1')
            t1 = time.perf_counter()
            residual, valid_k = self.backend.infer_pillars(pil0, pil1)
            net_ms = self.backend.last_timing.inference_ms
        else:
            residual, valid_k = self.backend.infer(prev.model0, model1)
        residual = np.asarray(residual, np.float32)
        if self._to_base is not None:
            # residual flow is a free vector: base -> cloud frame is the rotation only
            residual = residual @ self._to_base[0]
        valid_k = np.asarray(valid_k, bool)
        t2 = time.perf_counter()
        if self.flow_correction is not None:
            residual = np.asarray(self.flow_correction(residual, valid_k, prev.points[prev.mask0], pc1,
                                                       job.ego1_T_ego0,
                                                       dt_s=(cur.stamp_ns - prev.stamp_ns) * 1e-9),
                                  np.float32)
        frame = self._scatter(job, residual, valid_k)
        t3 = time.perf_counter()
        self.counters.frames += 1
        sweep_ms = sum(cur.stages_ms.values())
        frame.timings_ms = {'preprocess': sweep_ms + (t1 - t0) * 1e3, 'inference': (t2 - t1) * 1e3,
                            'postprocess': (t3 - t2) * 1e3, 'total': sweep_ms + (t3 - t0) * 1e3}
        frame.stages_ms = {**cur.stages_ms, 'pair_points': (t1 - t0) * 1e3,
                           'network': net_ms or (t2 - t1) * 1e3, 'scatter': (t3 - t2) * 1e3}
        return frame

    # -- helpers -----------------------------------------------------------------------------
    def _host_pillars(self) -> bool:
        # Real backends pillarise on the host (sweep t once); test doubles only offer infer().
        b = self.backend
        return bool(getattr(b, 'host_pillars', False)) and hasattr(b, 'pillarize')

    def _model_frame(self, pts: np.ndarray) -> np.ndarray:
        if self._to_base is None:
            return pts
        # both clouds are in sensor0 coordinates: one rigid map takes them to base0
        R, t = self._to_base
        return pts @ R.T + t

    def _sweep_t_inputs(self, sweep: _Sweep, encode: bool = True) -> float:
        """Prepare a sweep as sweep t of the next pair, once: scored points, pillars, encoder pass.

        Returns the time the pillars were done (the network's sweep-only part runs after it).
        """
        sweep.model0 = self._model_frame(sweep.points[sweep.mask0])
        if not (self._host_pillars() and len(sweep.model0)):
            return time.perf_counter()
        pillars = self.backend.pillarize(sweep.model0, 'points0')
        t = time.perf_counter()
        encoder = getattr(self.backend, 'encode_sweep', None) if encode else None
        sweep.pillars0 = encoder(pillars) if encoder is not None else pillars
        return t

    def _scatter(self, job: PairJob, residual: np.ndarray, valid_k: np.ndarray) -> FlowFrame:
        prev, cur = job.prev, job.cur
        n = len(prev.points)
        flow = np.zeros((n, 3), np.float32)
        valid = np.zeros(n, bool)
        flow[prev.mask0] = np.where(valid_k[:, None], residual, 0.0)
        valid[prev.mask0] = valid_k
        dt = (cur.stamp_ns - prev.stamp_ns) * 1e-9
        speed = (np.linalg.norm(flow, axis=1) / dt).astype(np.float32)
        is_dynamic = valid & (speed >= self.config.dynamic_threshold_mps)
        return FlowFrame(prev.stamp_ns, cur.stamp_ns, prev.points, flow, valid, speed, is_dynamic,
                         job.ego1_T_ego0, {}, prev.tag)

    def _check_points(self, points: np.ndarray) -> np.ndarray:
        pts = np.asarray(points)
        if pts.ndim != 2 or pts.shape[1] != 3:
            raise PipelineError('shape', f'points: expected an (N, 3) array, got shape {pts.shape}')
        if len(pts) == 0:
            raise PipelineError('empty', 'points: empty cloud (0 points); expected at least one finite point')
        if not np.issubdtype(pts.dtype, np.floating):
            pts = pts.astype(np.float32)
        if len(pts) > self.config.max_points:
            raise PipelineError('too_many_points', f'points: {len(pts)} points; expected at most max_points='
                                f'{self.config.max_points} (clip before calling step)')
        finite = np.isfinite(pts).all(axis=1)
        if not finite.any():
            raise PipelineError('all_nan',
                                f'points: all {len(pts)} points are NaN/inf; expected finite x, y, z')
        return np.ascontiguousarray(pts, dtype=np.float32)

    def _ego_pose(self, pts: np.ndarray, stamp_ns: int, pose: np.ndarray | None, frame_id: str,
                  ground: np.ndarray) -> np.ndarray:
        prev = self._prev
        if prev is not None:
            gap = (stamp_ns - prev.stamp_ns) * 1e-9
            if frame_id != prev.frame_id:
                log.debug('frame_id %r -> %r: new pair', prev.frame_id, frame_id)
                self.reset('frame_id_changed')
            elif gap <= 0:
                self.reset('stamp_backwards')
            elif gap > self.config.max_sweep_gap_s:
                self.reset('gap')
        src = self.config.ego_motion
        if src == 'none':
            return np.eye(4)
        if src == 'odometry':
            if pose is None:
                raise PipelineError('no_odometry', f'no odometry pose for the cloud at {stamp_ns} ns '
                                    '(ego_motion=odometry)')
            pose = np.asarray(pose, float)
            if pose.shape != (4, 4) or not np.all(np.isfinite(pose)):
                raise PipelineError('odometry', f'pose: expected a finite 4x4 matrix, got shape {pose.shape}')
            return pose
        if self._odometry is None:
            self._odometry = self._odometry_factory()
        sane = _sane(pts)
        # Reuse this sweep's ground mask (registration ignores ground); with ground_removal 'none'
        # the odometry decides ground itself.
        is_ground = ground[sane] if self.config.ground_removal != 'none' else None
        try:
            return np.asarray(self._odometry.register(pts[sane].astype(np.float64), stamp_ns,
                                                      is_ground=is_ground), float)
        except Exception as exc:  # a failed registration must not poison later pairs
            self.reset('odometry_failed')
            raise PipelineError('odometry', f'lidar odometry failed at {stamp_ns} ns: {exc}') from exc

    def _ground(self, pts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Ground mask and scored mask (in range, not ground) of one sweep in its own frame."""
        from zeroflow_ros.core import preprocess
        sane = _sane(pts)
        if sane.all():
            prep = preprocess.prepare_cloud(pts, self._preprocess_cfg)
            return np.asarray(prep.is_ground, bool), np.asarray(prep.mask, bool)
        # Absurd coordinates (corrupt driver output) overflow grid arithmetic: never scored anyway.
        ground = np.zeros(len(pts), bool)
        mask = np.zeros(len(pts), bool)
        if sane.any():
            prep = preprocess.prepare_cloud(pts[sane], self._preprocess_cfg)
            ground[sane], mask[sane] = prep.is_ground, prep.mask
        return ground, mask


#: Coordinates beyond this (metres) are treated like NaN: no lidar measures them, and they overflow
#: the integer grid arithmetic of ground removal and odometry.
SANE_COORDINATE_M = 1e5


def _sane(pts: np.ndarray) -> np.ndarray:
    with np.errstate(invalid='ignore'):
        return (np.abs(pts) < SANE_COORDINATE_M).all(axis=1)


def resolve_model_path(model: str) -> str:
    """Absolute path of a model given as absolute, cwd-relative or package-relative (``models/default``).

    Package-relative paths resolve in the installed share directory (ament index) first, then in
    the source tree, so the same parameter works after ``colcon build`` and in a pip checkout.
    """
    from pathlib import Path

    p = Path(model).expanduser()
    if p.is_absolute() or p.exists():
        return str(p.resolve())
    candidates = []
    try:
        from ament_index_python.packages import PackageNotFoundError, get_package_share_directory
        try:
            candidates.append(Path(get_package_share_directory('zeroflow_ros')) / p)
        except (PackageNotFoundError, OSError):  # OSError: no AMENT_PREFIX_PATH (pip install)
            pass
    except ImportError:
        pass
    candidates.append(Path(__file__).resolve().parent.parent / p)
    for c in candidates:
        if c.exists():
            return str(c)
    raise PipelineError('config', f'model {model!r}: not found as a path nor under ' +
                        ', '.join(str(c) for c in candidates))


def clip_indices(n: int, max_points: int) -> np.ndarray | None:
    """Evenly strided indices of at most ``max_points`` of ``n`` points, or None if no clipping is needed.

    A spinning lidar writes points in azimuth order, so a stride keeps the whole field of view
    (taking the first ``max_points`` would blank a sector). Indices are increasing: input order is kept.
    """
    if n <= max_points:
        return None
    return np.floor(np.arange(max_points) * (n / max_points)).astype(np.int64)


def inference_threads(config: PipelineConfig) -> int:
    """Threads per inference session: the configured number, or half the cores (at least 1)."""
    from zeroflow_ros.backends import default_threads
    return config.inference_threads or max(1, default_threads() // 2)


def limit_blas_threads(threads: int = 1) -> bool:
    """Cap numpy's BLAS pool (process-wide); True when applied.

    The node's numpy work is element-wise or (N,3)x(3,3) products: BLAS threads buy nothing there,
    and an OpenBLAS pool that busy-waits after each call takes a core from onnxruntime on a
    2-core machine. threadpoolctl comes with scikit-learn; without it nothing changes.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        log.debug('threadpoolctl not installed: BLAS threads left as they are')
        return False
    threadpool_limits(limits=int(threads), user_api='blas')
    return True


def _default_lidar_odometry() -> Any:
    from zeroflow_ros.core.odometry import LidarOdometry, OdometryConfig
    # One thread: KISS-ICP's TBB workers busy-wait after each parallel loop and take the cores
    # from onnxruntime; on 2 cores registration itself got faster too (32 -> 17 ms at 100k points).
    return LidarOdometry(OdometryConfig(max_num_threads=1))


def make_preprocess_config(config: PipelineConfig) -> Any:
    """Build the ``core.preprocess`` settings of the node: range box and ground mode from the config."""
    from zeroflow_ros.core import preprocess
    x0, y0, z0, x1, y1, z1 = config.point_range_m
    return preprocess.PreprocessConfig(x_min=x0, x_max=x1, y_min=y0, y_max=y1, z_min=z0, z_max=z1,
                                       ground=config.ground_removal)


def make_motion_evidence(config: PipelineConfig) -> Callable[..., np.ndarray] | None:
    """Return the post-network motion-evidence check of ``config``, or None when it is off.

    One home for the node and offline prediction; see
    :func:`zeroflow_ros.core.static_residual.make_flow_correction`.
    """
    if not config.motion_evidence:
        return None
    from zeroflow_ros.core.static_residual import EvidenceConfig, make_flow_correction
    return make_flow_correction(EvidenceConfig(min_speed_mps=config.dynamic_threshold_mps),
                                base_T_sensor=config.base_T_sensor)
