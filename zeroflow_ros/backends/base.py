"""The backend protocol shared by torch, onnxruntime and TensorRT, and model-path resolution.

Every backend does the same three steps per call, timed separately:

1. *preprocess* (numpy, shared): :func:`zeroflow_ros.core.voxelize.pillarize` on both sweeps;
2. *inference*: the dense network on ``(pc0, idx0, pc1, idx1)`` -> residual flow of the kept points;
3. *postprocess* (numpy, shared): scatter back to every input point; out-of-range -> flow 0, valid False.

Only step 2 differs between backends, which is why they agree on which point lands in which pillar.
"""
from __future__ import annotations

import abc
import dataclasses
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from zeroflow_ros.core.voxelize import PillarGrid, as_grid, pillarize
from zeroflow_ros.manifest import MANIFEST_NAME, Manifest, ManifestError, load_manifest

log = logging.getLogger(__name__)

BACKEND_NAMES: tuple[str, ...] = ('tensorrt', 'onnxruntime', 'torch')
DEVICES: tuple[str, ...] = ('auto', 'cpu', 'cuda')
PRECISIONS: tuple[str, ...] = ('fp32', 'fp16', 'int8')
# Network tensor names; the exporter writes them and every backend feeds them.
INPUT_NAMES: tuple[str, ...] = ('pc0', 'idx0', 'pc1', 'idx1')
OUTPUT_NAMES: tuple[str, ...] = ('flow',)


class BackendError(ValueError):
    """A backend cannot be created or cannot run the given input (names what was expected)."""


def default_threads() -> int:
    """All cores this process may run on (cgroup/affinity aware where the OS says)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


@dataclasses.dataclass(frozen=True)
class Timing:
    """Wall time of the last :meth:`Backend.infer` call, in milliseconds."""

    preprocess_ms: float = 0.0
    inference_ms: float = 0.0
    postprocess_ms: float = 0.0
    points0: int = 0
    in_range0: int = 0
    in_range1: int = 0

    @property
    def total_ms(self) -> float:
        return self.preprocess_ms + self.inference_ms + self.postprocess_ms

    def as_dict(self) -> dict[str, float]:
        d = dataclasses.asdict(self)
        d['total_ms'] = self.total_ms
        return d


@dataclasses.dataclass
class ModelSource:
    """What a model path offers: ONNX (+ manifest), a checkpoint, an engine, and the grid."""

    path: Path
    manifest: Manifest | None = None
    onnx: Path | None = None
    checkpoint: Path | None = None
    engine: Path | None = None

    def grid(self) -> PillarGrid:
        if self.manifest is not None:
            try:
                return as_grid(self.manifest.grid)
            except ValueError as exc:
                raise BackendError(f'{self.manifest.path}: grid: {exc}') from None
        raise BackendError(f'{self.path}: no manifest to read the grid from; the torch backend '
                           'reads it from the checkpoint instead')

    def offers(self) -> dict[str, str | None]:
        """Backend name -> None if this source can feed it, else why not."""
        why_onnx = None if self.onnx is not None else f'no ONNX model with {MANIFEST_NAME} at {self.path}'
        why_trt = why_onnx if self.engine is None else None
        why_torch = None if self.checkpoint is not None else f'no checkpoint (model.pt) at {self.path}'
        if self.engine is not None and self.path.suffix == '.engine':
            why_onnx = why_torch = f'{self.path} is a TensorRT engine'
        return {'tensorrt': why_trt, 'onnxruntime': why_onnx, 'torch': why_torch}


def grid_from_config(model_config: dict[str, Any], where: str) -> PillarGrid:
    """Return the pillar grid inside a manifest's or checkpoint's ``model_config``."""
    try:
        if 'grid' in model_config:
            return as_grid(model_config['grid'])
        return as_grid(model_config)
    except ValueError as exc:
        raise BackendError(f'{where}: model_config has no usable grid: {exc}') from None


def resolve_model(model: str | os.PathLike) -> ModelSource:
    """Find what a model path offers. Accepts a folder with a manifest, ``.onnx``, ``.pt`` or ``.engine``."""
    path = Path(model).expanduser()
    if not path.exists():
        raise BackendError(f'model {path}: no such file or folder (expected a folder with '
                           f'{MANIFEST_NAME}, a .onnx, a .pt checkpoint or a .engine)')
    src = ModelSource(path=path)
    folder = path if path.is_dir() else path.parent
    if path.is_dir():
        if (path / MANIFEST_NAME).is_file():
            _attach_manifest(src, path / MANIFEST_NAME)
        if src.checkpoint is None and (path / 'model.pt').is_file():
            src.checkpoint = path / 'model.pt'
        if src.manifest is None and src.checkpoint is None:
            raise BackendError(f'model folder {path}: found neither {MANIFEST_NAME} nor model.pt')
    elif path.suffix == '.onnx':
        if not (folder / MANIFEST_NAME).is_file():
            raise BackendError(f'{path}: no {MANIFEST_NAME} beside it; the manifest holds the grid '
                               'and tensor names (re-export with `zeroflow export onnx`)')
        _attach_manifest(src, folder / MANIFEST_NAME)
        if src.onnx is not None and src.onnx.resolve() != path.resolve():
            log.warning('%s: manifest names %s; using the given %s', folder / MANIFEST_NAME, src.onnx, path)
        src.onnx = path
    elif path.suffix in ('.pt', '.pth', '.ckpt'):
        src.checkpoint = path
        if (folder / MANIFEST_NAME).is_file():
            try:
                m = load_manifest(folder / MANIFEST_NAME)
            except ManifestError as exc:
                log.warning('ignoring %s beside %s: %s', MANIFEST_NAME, path, exc)
            else:
                ckpt = m.checkpoint_path
                if ckpt is not None and ckpt.resolve() == path.resolve():
                    _attach_manifest(src, folder / MANIFEST_NAME, keep_checkpoint=True)
    elif path.suffix == '.engine':
        if not (folder / MANIFEST_NAME).is_file():
            raise BackendError(f'{path}: no {MANIFEST_NAME} beside it to check the engine against')
        _attach_manifest(src, folder / MANIFEST_NAME)
        src.engine = path
    else:
        raise BackendError(f'model {path}: unknown kind {path.suffix!r}; expected a folder with '
                           f'{MANIFEST_NAME}, .onnx, .pt/.pth/.ckpt or .engine')
    return src


def _attach_manifest(src: ModelSource, path: Path, keep_checkpoint: bool = False) -> None:
    try:
        m = load_manifest(path)
    except ManifestError as exc:
        raise BackendError(str(exc)) from None
    src.manifest = m
    src.onnx = m.onnx_path
    if not keep_checkpoint:
        ckpt = m.checkpoint_path
        if ckpt is not None and ckpt.is_file():
            src.checkpoint = ckpt


@dataclasses.dataclass(frozen=True)
class Pillars:
    """One cloud after the shared pillar pre-step (:meth:`Backend.pillarize`)."""

    n: int               # points given
    keep: np.ndarray     # (n,) bool, in the grid box and finite
    points: np.ndarray   # (K,3) float32, the kept points in input order
    idx: np.ndarray      # (K,) int64 flat pillar index
    # the network's sweep-t-only part already run on these pillars (Backend.encode_sweep), or None
    encoded: tuple | None = None


def check_points(points: Any, name: str) -> np.ndarray:
    """(N,3) float32 C-contiguous view/copy of ``points`` or a BackendError naming ``name``."""
    arr = np.asarray(points)
    if arr.ndim != 2 or arr.shape[1] != 3:
        raise BackendError(f'{name}: expected an (N,3) float32 array of xyz, got shape {arr.shape}')
    if not np.issubdtype(arr.dtype, np.floating):
        raise BackendError(f'{name}: expected float32 xyz, got dtype {arr.dtype}')
    return np.ascontiguousarray(arr, dtype=np.float32)


def _subsample(k: int, limit: int) -> np.ndarray:
    """Evenly spread indices so that a clipped cloud keeps its spatial coverage."""
    return np.linspace(0, k - 1, limit).round().astype(np.int64)


class Backend(abc.ABC):
    """One loaded network. Subclasses implement :meth:`_run` (and set name/device/precision)."""

    name: str = ''

    def __init__(self, source: ModelSource, grid: PillarGrid, device: str, precision: str,
                 threads: int | None = None, max_points: int | None = None) -> None:
        self.source = source
        self.grid = grid
        self.device = device
        self.precision = precision
        self.threads = threads or default_threads()
        # Engines have a fixed maximum; clouds above it are clipped (and reported), never crash.
        self.max_points = max_points
        self.last_timing = Timing()
        self.calls = 0
        self.clipped_calls = 0
        self._last_clip_log = -1e9
        # engines own one set of device buffers: concurrent calls (multi-threaded executors) queue
        self.lock = threading.Lock()

    # -- the one method a backend must provide ---------------------------------------------
    @abc.abstractmethod
    def _run(self, pc0: np.ndarray, idx0: np.ndarray, pc1: np.ndarray, idx1: np.ndarray) -> np.ndarray:
        """Network only: (K0,3) f32, (K0,) i64, (K1,3) f32, (K1,) i64 -> (K0,3) f32 residual flow."""

    def _extra_description(self) -> dict[str, Any]:
        return {}

    # -- shared ----------------------------------------------------------------------------
    def infer(self, points0: np.ndarray, points1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Residual flow of ``points0`` (sweep t) towards ``points1`` (t+1, already in ego0).

        Returns ``flow`` (N,3) float32 and ``valid`` (N,) bool; points outside the grid (or not
        finite) get flow 0 and valid False.
        """
        with self.lock:
            return self._infer_host(points0, points1)

    # Host pillarisation split from the network call, so a caller that sees each sweep twice
    # (t+1 of one pair, t of the next) can pillarise sweep t once, when it arrives.
    host_pillars: bool = True

    def pillarize(self, points: np.ndarray, name: str = 'points') -> Pillars:
        """Pillar pre-step of one cloud (the same numpy step as :meth:`infer`), for :meth:`infer_pillars`."""
        p = check_points(points, name)
        keep, pc, idx = pillarize(p, self.grid)
        return Pillars(len(p), keep, pc, np.ascontiguousarray(idx))

    def encode_sweep(self, pil: Pillars) -> Pillars:
        """Run the part of the network that needs this sweep alone (as sweep t), where the backend can.

        The default does nothing: :meth:`infer_pillars` then runs the whole network.
        """
        return pil

    def _run_encoded(self, encoded: tuple, pc0: np.ndarray, idx0: np.ndarray, pc1: np.ndarray,
                     idx1: np.ndarray) -> np.ndarray:
        raise NotImplementedError(f'{self.name}: encode_sweep is not split')

    def infer_pillars(self, pil0: Pillars, pil1: Pillars) -> tuple[np.ndarray, np.ndarray]:
        """Return what ``infer(points0, points1)`` returns, from clouds pillarised by :meth:`pillarize`."""
        with self.lock:
            return self._infer_pillars(pil0, pil1, 0.0)

    def _infer_host(self, points0: np.ndarray, points1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        t0 = time.perf_counter()
        pil0 = self.pillarize(points0, 'points0')
        pil1 = self.pillarize(points1, 'points1')
        return self._infer_pillars(pil0, pil1, (time.perf_counter() - t0) * 1e3)

    def _infer_pillars(self, pil0: Pillars, pil1: Pillars, pre_ms: float) -> tuple[np.ndarray, np.ndarray]:
        t0 = time.perf_counter()
        keep0, pc0, idx0 = pil0.keep, pil0.points, pil0.idx
        pc1, idx1 = pil1.points, pil1.idx
        k0, k1 = len(pc0), len(pc1)
        sel0 = None
        if self.max_points is not None and (k0 > self.max_points or k1 > self.max_points):
            sel0 = self._clip(k0, k1)
            if k0 > self.max_points:
                pc0, idx0 = pc0[sel0], idx0[sel0]
            if k1 > self.max_points:
                sel1 = _subsample(k1, self.max_points)
                pc1, idx1 = pc1[sel1], idx1[sel1]
            if k0 <= self.max_points:
                sel0 = None
        t1 = time.perf_counter()
        if len(pc0) == 0 or len(pc1) == 0:
            # Nothing to match against (or nothing to move): no flow is a claim we cannot make.
            flow_k = None
        elif pil0.encoded is not None and sel0 is None:
            flow_k = self._run_encoded(pil0.encoded, pc0, idx0, pc1, np.ascontiguousarray(idx1))
        else:
            flow_k = self._run(pc0, np.ascontiguousarray(idx0), pc1, np.ascontiguousarray(idx1))
        t2 = time.perf_counter()
        n = pil0.n
        flow = np.zeros((n, 3), dtype=np.float32)
        valid = np.zeros(n, dtype=bool)
        if flow_k is not None:
            if flow_k.shape != (len(pc0), 3):
                raise BackendError(f'{self.name}: network returned shape {flow_k.shape}, '
                                   f'expected ({len(pc0)}, 3)')
            if sel0 is None and np.isfinite(flow_k).all():
                # common case: a boolean-mask copy is ~5x faster than index arithmetic at 100k points
                flow[keep0] = flow_k
                valid = keep0.copy()
            else:
                rows = np.flatnonzero(keep0)
                if sel0 is not None:
                    rows = rows[sel0]
                ok = np.isfinite(flow_k).all(axis=1)
                flow[rows[ok]] = flow_k[ok]
                valid[rows[ok]] = True
        t3 = time.perf_counter()
        self.calls += 1
        self.last_timing = Timing(pre_ms + (t1 - t0) * 1e3, (t2 - t1) * 1e3, (t3 - t2) * 1e3, n, k0, k1)
        return flow, valid

    def _clip(self, k0: int, k1: int) -> np.ndarray:
        self.clipped_calls += 1
        now = time.monotonic()
        if now - self._last_clip_log > 10.0:
            self._last_clip_log = now
            log.warning('%s: %d / %d in-range points exceed the engine maximum %d; keeping an even '
                        'subset (dropped points get valid=False); %d call(s) clipped so far',
                        self.name, k0, k1, self.max_points, self.clipped_calls)
        return _subsample(k0, self.max_points) if k0 > self.max_points else np.arange(k0)

    def warmup(self, iterations: int = 3, points: int = 20_000, seed: int = 0) -> None:
        """Run a few calls on random in-range points so lazy initialisation happens now."""
        rng = np.random.default_rng(seed)
        g = self.grid
        lo = np.array([g.x_min, g.y_min, g.z_min], dtype=np.float32)
        hi = np.array([g.x_max, g.y_max, g.z_max], dtype=np.float32)
        p0 = (lo + (hi - lo) * rng.random((points, 3), dtype=np.float32)).astype(np.float32)
        p1 = p0 + rng.normal(0, 0.05, p0.shape).astype(np.float32)
        for _ in range(iterations):
            self.infer(p0, p1)
        if iterations:  # the node's path too: sweep part when a sweep arrives, pair part per pair
            self.infer_pillars(self.encode_sweep(self.pillarize(p0)), self.pillarize(p1))

    def describe(self) -> dict[str, Any]:
        """Facts for the start-up log line, diagnostics and bench JSON."""
        m = self.source.manifest
        d: dict[str, Any] = {
            'backend': self.name,
            'device': self.device,
            'precision': self.precision,
            'model': str(self.source.path),
            'grid': {'shape': list(self.grid.shape), 'pillar_size': self.grid.pillar_size,
                     'x': [self.grid.x_min, self.grid.x_max], 'y': [self.grid.y_min, self.grid.y_max],
                     'z': [self.grid.z_min, self.grid.z_max]},
            'threads': self.threads,
            'max_points': self.max_points,
        }
        if m is not None:
            d['config_name'] = m.model_config.get('name')
            d['onnx_sha256'] = m.onnx_sha256
            d['manifest'] = str(m.path)
        d.update(self._extra_description())
        return d

    def __repr__(self) -> str:
        return f'<{type(self).__name__} {self.name}/{self.device}/{self.precision} {self.source.path}>'
