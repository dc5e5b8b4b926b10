"""onnxruntime backend (CPU, or CUDA with the onnxruntime-gpu wheel).

One ``InferenceSession`` per backend, created at load time; each call only feeds arrays.
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np

from zeroflow_ros.backends.base import Backend, BackendError, ModelSource, default_threads
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
                 optimization: str = 'all') -> None:
        """Open ``source.onnx``; ``spin`` lets idle worker threads busy-wait between ops.

        ``optimization``: onnxruntime graph optimisation level, one of ``OPTIMIZATION_LEVELS``.

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

    def _run(self, pc0: np.ndarray, idx0: np.ndarray, pc1: np.ndarray, idx1: np.ndarray) -> np.ndarray:
        feeds = dict(zip(self._in_names, (pc0, idx0, pc1, idx1)))
        (flow,) = self.session.run([self._out_name], feeds)
        return np.asarray(flow, dtype=np.float32)

    def _extra_description(self) -> dict[str, Any]:
        return {'providers': self.providers, 'onnx': str(self.onnx_file), 'onnxruntime': self._version,
                'spin': self.spin, 'optimization': self.optimization}
