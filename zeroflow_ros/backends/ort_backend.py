"""onnxruntime backend (CPU, or CUDA with the onnxruntime-gpu wheel).

One ``InferenceSession`` per backend, created at load time; each call only feeds arrays.
"""
from __future__ import annotations

import logging
import dataclasses
import threading
from typing import Any

import numpy as np

from zeroflow_ros.backends.base import Backend, BackendError, ModelSource, Pillars, default_threads
from zeroflow_ros.manifest import Manifest, ManifestError

log = logging.getLogger(__name__)

# onnxruntime's type strings -> numpy dtype names used in the manifest
#: graph optimisation levels by name (``optimization`` option); 'all' is the default and what
#: bench/bench_quant.py measured as the fastest at the same EPE
OPTIMIZATION_LEVELS = ('disable', 'basic', 'extended', 'all')

_ORT_TYPES = {'tensor(float)': 'float32', 'tensor(float16)': 'float16', 'tensor(int64)': 'int64',
              'tensor(int32)': 'int32', 'tensor(bool)': 'bool'}


def check_io_against_manifest(kind: str, actual: dict[str, str], expected: list, where: str) -> None:
    """Raise BackendError when tensor names or dtypes differ from the manifest's."""
    want = {t.name: t.dtype for t in expected}
    if actual != want:
        raise BackendError(f'{where}: {kind} {actual} do not match the manifest {want}')


class OrtBackend(Backend):
    name = 'onnxruntime'

    def __init__(self, source: ModelSource, device: str = 'cpu', precision: str = 'fp32',
                 threads: int | None = None, verify_sha: bool = True, spin: bool = False,
                 optimization: str = 'all', split: bool = True) -> None:
        """Open ``source.onnx``; ``spin`` lets idle worker threads busy-wait between ops.

        ``optimization``: onnxruntime graph optimisation level, one of ``OPTIMIZATION_LEVELS``.
        ``split``: :meth:`encode_sweep` runs the sweep-t-only part of the graph (backends/split.py)
        in its own session, made on first use; False: it does nothing.

        Spinning is off by default: on a vehicle computer the cores are shared with the lidar
        driver and other nodes, and on a loaded 2-core machine spinning threads cost ~50 % more CPU
        per call and were slower, not faster (see bench/results).
        """
        if source.onnx is None or source.manifest is None:
            raise BackendError(f'onnxruntime: {source.path} has no ONNX model with a manifest')
        if device not in ('cpu', 'cuda'):
            raise BackendError(f"onnxruntime: device must be 'cpu' or 'cuda', got {device!r}")
        if precision not in ('fp32', 'int8') or (precision == 'int8' and device != 'cpu'):
            raise BackendError(f'onnxruntime: precision {precision!r} on {device}: supported are fp32, '
                               'and int8 on cpu (model.int8.onnx); use tensorrt for fp16')
        manifest: Manifest = source.manifest
        if optimization not in OPTIMIZATION_LEVELS:
            raise BackendError(f'onnxruntime: optimization={optimization!r}; expected one of '
                               f'{OPTIMIZATION_LEVELS}')
        if verify_sha:
            try:
                manifest.verify_onnx()
            except ManifestError as exc:
                raise BackendError(str(exc)) from None
        onnx_file = source.onnx
        if precision == 'int8':
            from zeroflow_ros.backends.int8 import int8_path
            onnx_file = int8_path(manifest)
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise BackendError(f'onnxruntime: not installed ({exc}); pip install onnxruntime') from None
        threads = threads or default_threads()
        super().__init__(source, source.grid(), device, precision, threads)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = {
            'disable': ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            'basic': ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            'extended': ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            'all': ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[optimization]
        opts.log_severity_level = 3
        opts.add_session_config_entry('session.intra_op.allow_spinning', '1' if spin else '0')
        opts.add_session_config_entry('session.inter_op.allow_spinning', '1' if spin else '0')
        if device == 'cuda':
            if 'CUDAExecutionProvider' not in ort.get_available_providers():
                raise BackendError('onnxruntime: CUDAExecutionProvider not available '
                                   f'(have {ort.get_available_providers()}); pip install onnxruntime-gpu')
            # conv shapes are fixed by the static grid, so an exhaustive cuDNN search pays once (warmup)
            providers: list[Any] = [('CUDAExecutionProvider', {'cudnn_conv_algo_search': 'EXHAUSTIVE'}),
                                    'CPUExecutionProvider']
        else:
            providers = ['CPUExecutionProvider']
        try:
            self.session = ort.InferenceSession(str(onnx_file), sess_options=opts, providers=providers)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
            raise BackendError(f'onnxruntime: cannot load {onnx_file}: '
                               f'{type(exc).__name__}: {exc}') from None
        self.providers = self.session.get_providers()
        if device == 'cuda' and 'CUDAExecutionProvider' not in self.providers:
            raise BackendError(f'onnxruntime: session fell back to {self.providers}; CUDA is unusable here')
        check_io_against_manifest(
            'inputs', {i.name: _ORT_TYPES.get(i.type, i.type) for i in self.session.get_inputs()},
            manifest.inputs, str(onnx_file))
        check_io_against_manifest(
            'outputs', {o.name: _ORT_TYPES.get(o.type, o.type) for o in self.session.get_outputs()},
            manifest.outputs, str(onnx_file))
        self.onnx_file = onnx_file
        self._in_names = [t.name for t in manifest.inputs]
        self._out_name = manifest.outputs[0].name
        self._version = ort.__version__
        self.spin = spin
        self.optimization = optimization
        self.split = bool(split)
        self._opts, self._providers = opts, providers
        self._split_lock = threading.Lock()
        self._split_parts: Any = None  # (sweep session, pair session, SplitGraph) | False: not splittable

    def _split_sessions(self) -> Any:
        with self._split_lock:
            if self._split_parts is None:
                self._split_parts = self._make_split()
            return self._split_parts or None

    def _make_split(self) -> Any:
        import onnxruntime as ort

        from zeroflow_ros.backends.split import split_sweep_part
        try:
            sp = split_sweep_part(self.onnx_file.read_bytes(), tuple(self._in_names[:2]))
            if sp is None:
                log.info('onnxruntime: %s has no sweep-only part; whole graph per pair', self.onnx_file)
                return False
            parts = tuple(ort.InferenceSession(b, sess_options=self._opts, providers=self._providers)
                          for b in (sp.sweep, sp.pair))
        except Exception as exc:  # an odd graph must not stop the node: the whole graph still runs
            log.warning('onnxruntime: cannot split %s into sweep and pair parts (%s: %s); '
                        'whole graph per pair', self.onnx_file, type(exc).__name__, exc)
            return False
        log.info('onnxruntime: %d of %d nodes run once per sweep (cut: %d tensors)', sp.sweep_nodes,
                 sp.sweep_nodes + sp.pair_nodes, len(sp.cut))
        return parts + (sp,)

    def encode_sweep(self, pil: Pillars) -> Pillars:
        """Run the sweep-t-only part (pillar encoder + UNet stages of sweep t) on these pillars."""
        parts = self._split_sessions() if self.split and len(pil.points) else None
        if parts is None:
            return pil
        session, _, sp = parts
        encoded = session.run(sp.cut, {self._in_names[0]: pil.points, self._in_names[1]: pil.idx})
        return dataclasses.replace(pil, encoded=tuple(encoded))

    def _run_encoded(self, encoded: tuple, pc0: np.ndarray, idx0: np.ndarray, pc1: np.ndarray,
                     idx1: np.ndarray) -> np.ndarray:
        _, session, sp = self._split_sessions()
        given = dict(zip(self._in_names, (pc0, idx0, pc1, idx1)))
        feeds = {**dict(zip(sp.cut, encoded)), **{k: given[k] for k in sp.pass_through},
                 **{k: given[k] for k in self._in_names[2:]}}
        (flow,) = session.run([self._out_name], feeds)
        return np.asarray(flow, dtype=np.float32)

    def _run(self, pc0: np.ndarray, idx0: np.ndarray, pc1: np.ndarray, idx1: np.ndarray) -> np.ndarray:
        feeds = dict(zip(self._in_names, (pc0, idx0, pc1, idx1)))
        (flow,) = self.session.run([self._out_name], feeds)
        return np.asarray(flow, dtype=np.float32)

    def _extra_description(self) -> dict[str, Any]:
        return {'providers': self.providers, 'onnx': str(self.onnx_file), 'onnxruntime': self._version,
                'spin': self.spin, 'optimization': self.optimization, 'split': self.split}
