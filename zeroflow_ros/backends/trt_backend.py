"""TensorRT backend: engine build/cache from the ONNX file, dynamic point count, fp32/fp16.

The engine is cached next to the ONNX file as
``model.<onnx-sha8>.<fp16|fp32>.trt<version>.<gpu-name-slug>.engine``: everything it depends on is
in its name, so a new ONNX export, TensorRT upgrade or different GPU never loads a stale engine.
It is built to a temporary file and renamed into place (a crash mid-build leaves no half engine).
After loading, its I/O is checked against the manifest; on mismatch or corruption it is rebuilt
with one log line saying why.

Device buffers are allocated once at the profile's maximum point count (through torch's CUDA
allocator, so no pycuda/cuda-python dependency); each call copies the points in, sets the input
shapes and enqueues. Clouds with more in-range points than the maximum are clipped by the base class.
"""
from __future__ import annotations

import logging
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from zeroflow_ros.backends.base import Backend, BackendError, ModelSource
from zeroflow_ros.manifest import Manifest, ManifestError, PointRange

log = logging.getLogger(__name__)

DEFAULT_WORKSPACE_MB = 4096


class EngineMismatch(Exception):
    """A cached engine cannot be used as is (corrupt, other I/O, other profile): rebuild it."""


def gpu_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3' (safe in a file name)."""
    slug = re.sub(r'[^a-z0-9]+', '-', name.lower()).strip('-')
    return slug or 'unknown-gpu'


def engine_filename(onnx_sha256: str, precision: str, trt_version: str, gpu_name: str) -> str:
    if precision not in ('fp32', 'fp16'):
        raise BackendError(f"tensorrt: precision must be 'fp32' or 'fp16', got {precision!r}")
    if len(onnx_sha256) < 8:
        raise BackendError('tensorrt: the manifest has no onnx sha256; re-export with `zeroflow export onnx`')
    version = '.'.join(trt_version.split('.')[:3])
    return f'model.{onnx_sha256[:8]}.{precision}.trt{version}.{gpu_slug(gpu_name)}.engine'


def engine_path_for(manifest: Manifest, precision: str, trt_version: str, gpu_name: str,
                    cache_dir: str | os.PathLike | None = None) -> Path:
    """Beside the ONNX file if that folder is writable, else in the user cache (installed share dirs)."""
    name = engine_filename(manifest.onnx_sha256, precision, trt_version, gpu_name)
    if cache_dir is not None:
        return Path(cache_dir) / name
    folder = manifest.onnx_path.parent
    if os.access(folder, os.W_OK):
        return folder / name
    cache = Path(os.environ.get('XDG_CACHE_HOME', Path.home() / '.cache')) / 'zeroflow_ros' / 'engines'
    return cache / name


def load_or_build(path: Path, build: Callable[[Path], None], load: Callable[[bytes], Any],
                  check: Callable[[Any], None], rebuild: bool = False) -> tuple[Any, bool]:
    """Load a cached engine or (re)build it. Returns (engine, built_now).

    ``build(tmp_path)`` writes a serialized engine; ``load(bytes)`` deserializes it and raises
    :class:`EngineMismatch` on corruption; ``check(engine)`` raises :class:`EngineMismatch` when its
    I/O does not fit the manifest. The new engine is written to a temp file in the same folder and
    renamed, so concurrent readers see the old engine or the new one, never half of one.
    """
    if path.is_file() and not rebuild:
        try:
            engine = load(path.read_bytes())
            check(engine)
            return engine, False
        except EngineMismatch as exc:
            log.warning('rebuilding TensorRT engine %s: %s', path.name, exc)
    else:
        log.info('building TensorRT engine %s (first use; this takes a while)', path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        build(tmp)
        engine = load(tmp.read_bytes())
        check(engine)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; other users of the cache must read it
        os.replace(tmp, path)
    except EngineMismatch as exc:
        raise BackendError(f'tensorrt: freshly built engine {path.name} is unusable: {exc}') from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return engine, True


def _trt():
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BackendError(f'tensorrt: not installed ({exc}); pip install tensorrt (gpu extra)') from None
    return trt


def _init_plugins(trt: Any, logger: Any) -> None:
    # ScatterElements with reduction='add' (the pillar scatter-mean) is a TensorRT plugin, not a
    # core layer: the plugin registry must be filled before parsing and before deserializing.
    if hasattr(trt, 'init_libnvinfer_plugins'):
        trt.init_libnvinfer_plugins(logger, '')


def _trt_dtype_name(trt: Any, dtype: Any) -> str:
    table = {trt.float32: 'float32', trt.float16: 'float16', trt.int32: 'int32', trt.bool: 'bool'}
    if hasattr(trt, 'int64'):
        table[trt.int64] = 'int64'
    return table.get(dtype, str(dtype))


def build_engine(onnx_path: Path, out_path: Path, manifest: Manifest, precision: str,
                 workspace_mb: int = DEFAULT_WORKSPACE_MB, points: PointRange | None = None) -> float:
    """Build and serialize an engine with a dynamic point-count profile; returns build seconds."""
    trt = _trt()
    points = points or manifest.points
    t0 = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    _init_plugins(trt, logger)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode from TensorRT 10 on
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = '; '.join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BackendError(f'tensorrt: cannot parse {onnx_path}: {errors}')
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    if precision == 'fp16':
        flag = getattr(trt.BuilderFlag, 'FP16', None)
        if flag is None:
            raise BackendError(f'tensorrt {trt.__version__}: no BuilderFlag.FP16 (strongly typed only); '
                               'fp16 needs an fp16 ONNX export, use fp32')
        config.set_flag(flag)
    profile = builder.create_optimization_profile()
    for spec in manifest.inputs:
        # every dynamic dim of our inputs is a point count; static dims stay as in the manifest
        def dims(n: int, shape: tuple = spec.shape) -> tuple[int, ...]:
            return tuple(n if isinstance(d, str) else int(d) for d in shape)
        profile.set_shape(spec.name, dims(points.min), dims(points.opt), dims(points.max))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BackendError(f'tensorrt: building an engine from {onnx_path} failed (see TensorRT log above)')
    with open(out_path, 'wb') as f:
        f.write(serialized)
    return time.perf_counter() - t0


class TrtBackend(Backend):
    name = 'tensorrt'

    def __init__(self, source: ModelSource, device: str = 'cuda', precision: str = 'fp32',
                 threads: int | None = None, workspace_mb: int = DEFAULT_WORKSPACE_MB,
                 points: PointRange | None = None, rebuild: bool = False,
                 cache_dir: str | os.PathLike | None = None) -> None:
        if device != 'cuda':
            raise BackendError(f"tensorrt: runs on device 'cuda' only, got {device!r}")
        if source.manifest is None or (source.onnx is None and source.engine is None):
            raise BackendError(f'tensorrt: {source.path} has no ONNX model/engine with a manifest')
        if precision not in ('fp32', 'fp16'):
            raise BackendError(f"tensorrt: precision must be 'fp32' or 'fp16', got {precision!r}")
        trt = _trt()
        try:
            import torch
        except ImportError as exc:
            raise BackendError(f'tensorrt: the backend allocates GPU buffers with torch ({exc})') from None
        if not torch.cuda.is_available():
            raise BackendError('tensorrt: no CUDA device visible (torch.cuda.is_available() is False)')
        manifest = source.manifest
        self.points = points or manifest.points
        super().__init__(source, source.grid(), 'cuda', precision, threads, max_points=self.points.max)
        self._torch = torch
        self._trt = trt
        self.gpu_name = torch.cuda.get_device_name(0)
        if source.engine is not None:
            self.engine_path = source.engine
        else:
            self.engine_path = engine_path_for(manifest, precision, trt.__version__, self.gpu_name, cache_dir)
        self._logger = trt.Logger(trt.Logger.WARNING)
        _init_plugins(trt, self._logger)
        self._runtime = trt.Runtime(self._logger)

        def build(tmp: Path) -> None:
            if source.onnx is None or not source.onnx.is_file():
                raise BackendError(f'tensorrt: cannot rebuild {self.engine_path}: no ONNX file beside it')
            try:
                manifest.verify_onnx()
            except ManifestError as exc:
                raise BackendError(str(exc)) from None
            secs = build_engine(source.onnx, tmp, manifest, precision, workspace_mb, self.points)
            log.info('built TensorRT engine %s in %.1f s', self.engine_path.name, secs)

        self.engine, self.built_now = load_or_build(self.engine_path, build, self._deserialize,
                                                    self._check_engine, rebuild=rebuild)
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise BackendError(f'tensorrt: cannot create an execution context for {self.engine_path}')
        self._stream = torch.cuda.Stream()
        self._buffers: dict[str, Any] = {}
        torch_dtypes = {'float32': torch.float32, 'float16': torch.float16, 'int64': torch.int64,
                        'int32': torch.int32, 'bool': torch.bool}
        for spec in manifest.inputs + manifest.outputs:
            shape = tuple(self.points.max if isinstance(d, str) else int(d) for d in spec.shape)
            dtype = _trt_dtype_name(trt, self.engine.get_tensor_dtype(spec.name))
            buf = torch.empty(shape, dtype=torch_dtypes[dtype], device='cuda')
            self._buffers[spec.name] = buf
            self.context.set_tensor_address(spec.name, buf.data_ptr())
        self._in_names = [t.name for t in manifest.inputs]
        self._out_name = manifest.outputs[0].name

    def _deserialize(self, blob: bytes) -> Any:
        if not blob:
            raise EngineMismatch('empty file')
        try:
            engine = self._runtime.deserialize_cuda_engine(blob)
        except Exception as exc:  # some TensorRT versions raise instead of returning None
            raise EngineMismatch(f'cannot deserialize ({type(exc).__name__}: {exc})') from None
        if engine is None:
            raise EngineMismatch('cannot deserialize (corrupt, or built by another TensorRT version)')
        return engine

    def _check_engine(self, engine: Any) -> None:
        trt = self._trt
        manifest: Manifest = self.source.manifest  # type: ignore[assignment]
        actual = {}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            mode = 'in' if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else 'out'
            actual[name] = (mode, _trt_dtype_name(trt, engine.get_tensor_dtype(name)))
        want = {t.name: ('in', t.dtype) for t in manifest.inputs}
        want.update({t.name: ('out', t.dtype) for t in manifest.outputs})
        if actual != want:
            raise EngineMismatch(f'I/O {actual} differs from the manifest {want}')
        for spec in manifest.inputs:
            _, _, mx = engine.get_tensor_profile_shape(spec.name, 0)
            if int(mx[0]) != self.points.max:
                raise EngineMismatch(f'profile max {int(mx[0])} points for {spec.name}, '
                                     f'want {self.points.max}')

    def _run(self, pc0: np.ndarray, idx0: np.ndarray, pc1: np.ndarray, idx1: np.ndarray) -> np.ndarray:
        torch = self._torch
        k0, k1 = len(pc0), len(pc1)
        if k0 < self.points.min or k1 < self.points.min:
            # padding would change the pillar means, so a too-small cloud is an error, not a guess
            raise BackendError(f'tensorrt: {k0}/{k1} in-range points, below the engine profile minimum '
                               f'{self.points.min}; export with points.min: 1')
        with torch.cuda.stream(self._stream):
            for name, arr in zip(self._in_names, (pc0, idx0, pc1, idx1)):
                buf = self._buffers[name]
                buf[:len(arr)].copy_(torch.from_numpy(arr).to(buf.dtype), non_blocking=True)
                self.context.set_input_shape(name, (len(arr),) + tuple(buf.shape[1:]))
            if not self.context.execute_async_v3(self._stream.cuda_stream):
                raise BackendError(f'tensorrt: execute_async_v3 failed for {k0}/{k1} points')
            out = self._buffers[self._out_name][:len(pc0)].float().cpu()
        self._stream.synchronize()
        return out.numpy()

    def _extra_description(self) -> dict[str, Any]:
        return {'engine': str(self.engine_path), 'tensorrt': self._trt.__version__, 'gpu': self.gpu_name,
                'points_profile': [self.points.min, self.points.opt, self.points.max],
                'engine_built_now': self.built_now}
