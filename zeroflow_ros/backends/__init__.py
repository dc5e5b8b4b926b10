"""Inference backends behind one interface: :func:`create_backend`.

``auto`` tries, in order, TensorRT -> onnxruntime-CUDA -> torch-CUDA -> onnxruntime-CPU -> torch-CPU,
skipping what the model path cannot feed or what is not installed, and falls back with a warning
when a backend fails to load (missing library, corrupt engine/ONNX, version mismatch). It logs the
choice and why the earlier ones were passed over. An explicit backend never falls back: it raises.

torch, onnxruntime and tensorrt are imported only when their backend is tried.
"""
from __future__ import annotations

import logging
import os
from typing import Any

from zeroflow_ros.backends.base import (BACKEND_NAMES, DEVICES, PRECISIONS, Backend, BackendError,
                                        ModelSource, Pillars, Timing, default_threads, resolve_model)

__all__ = ['create_backend', 'Backend', 'BackendError', 'Pillars', 'Timing', 'ModelSource', 'resolve_model',
           'BACKEND_NAMES', 'DEVICES', 'PRECISIONS', 'AUTO_ORDER', 'default_threads']

log = logging.getLogger(__name__)

# (backend, device), most to least preferred
AUTO_ORDER: tuple[tuple[str, str], ...] = (
    ('tensorrt', 'cuda'), ('onnxruntime', 'cuda'), ('torch', 'cuda'),
    ('onnxruntime', 'cpu'), ('torch', 'cpu'),
)


def _construct(name: str, source: ModelSource, device: str, precision: str, threads: int | None,
               options: dict[str, Any]) -> Backend:
    if name == 'onnxruntime':
        from zeroflow_ros.backends.ort_backend import OrtBackend
        return OrtBackend(source, device, precision, threads, **options)
    if name == 'torch':
        from zeroflow_ros.backends.torch_backend import TorchBackend
        return TorchBackend(source, device, precision, threads, **options)
    if name == 'tensorrt':
        from zeroflow_ros.backends.trt_backend import TrtBackend
        return TrtBackend(source, device, precision, threads, **options)
    raise BackendError(f'unknown backend {name!r}; valid: auto, {", ".join(BACKEND_NAMES)}')


def _construct_int8_or_fp32(name: str, source: ModelSource, device: str, precision: str,
                            threads: int | None, options: dict[str, Any]) -> Backend:
    """Under 'auto', a missing or stale int8 file runs the same backend in fp32 (one warning)."""
    if precision != 'int8':
        return _construct(name, source, device, precision, threads, options)
    try:
        return _construct(name, source, device, precision, threads, options)
    except BackendError as exc:
        log.warning('%s', exc)
        log.warning('%s-%s: no usable int8 model; running fp32', name, device)
        return _construct(name, source, device, 'fp32', threads, options)


def _cuda_absent(name: str) -> str | None:
    """Cheap reasons to skip a CUDA candidate without loading anything heavy; None = worth trying."""
    if name == 'tensorrt':
        try:
            import tensorrt  # noqa: F401
        except ImportError:
            return 'tensorrt not installed'
        return None
    if name == 'onnxruntime':
        try:
            import onnxruntime as ort
        except ImportError:
            return 'onnxruntime not installed'
        if 'CUDAExecutionProvider' not in ort.get_available_providers():
            return 'no CUDAExecutionProvider (CPU-only onnxruntime wheel)'
        return None
    if name == 'torch':
        try:
            import torch
        except ImportError:
            return 'torch not installed'
        if not torch.cuda.is_available():
            return f'no CUDA device (torch {torch.__version__})'
    return None


def create_backend(model: str | os.PathLike, backend: str = 'auto', device: str = 'auto',
                   precision: str = 'fp32', threads: int | None = None,
                   options: dict[str, dict[str, Any]] | None = None) -> Backend:
    """Open ``model`` (folder with manifest.yaml | .onnx | .pt | .engine) with a backend.

    Args:
        backend: 'auto' or one of ``BACKEND_NAMES``.
        device: 'auto' (CUDA when available), 'cpu' or 'cuda'.
        precision: 'fp32', 'fp16' or 'int8' (fp16: TensorRT and torch-CUDA; int8: onnxruntime-CPU
            with the model's ``model.int8.onnx``; under 'auto' other candidates, or a missing/stale
            int8 file, run fp32 with a warning).
        threads: CPU threads for onnxruntime/torch (default: all cores of this process).
        options: per-backend keyword arguments, e.g. ``{'tensorrt': {'workspace_mb': 2048}}``.

    Returns an object with ``infer(points0, points1) -> (flow, valid)``, ``name``, ``device``,
    ``precision``, ``describe()``, ``warmup()`` and ``last_timing``.
    """
    if backend not in ('auto',) + BACKEND_NAMES:
        raise BackendError(f'unknown backend {backend!r}; valid: auto, {", ".join(BACKEND_NAMES)}')
    if device not in DEVICES:
        raise BackendError(f'unknown device {device!r}; valid: {", ".join(DEVICES)}')
    if precision not in PRECISIONS:
        raise BackendError(f'unknown precision {precision!r}; valid: {", ".join(PRECISIONS)}')
    if threads is not None and int(threads) < 1:
        raise BackendError(f'threads must be >= 1, got {threads}')
    options = options or {}
    unknown = sorted(set(options) - set(BACKEND_NAMES))
    if unknown:
        raise BackendError(f'options for unknown backend(s) {unknown}; valid: {", ".join(BACKEND_NAMES)}')
    source = resolve_model(model)
    offers = source.offers()

    if backend != 'auto':
        if offers[backend] is not None:
            raise BackendError(f'{backend}: {offers[backend]}')
        if device == 'auto':
            device = 'cuda' if backend == 'tensorrt' or _cuda_absent(backend) is None else 'cpu'
        b = _construct(backend, source, device, precision, threads, options.get(backend, {}))
        log.info('backend %s/%s/%s for %s', b.name, b.device, b.precision, source.path)
        return b

    passed: list[str] = []
    for name, dev in AUTO_ORDER:
        label = f'{name}-{dev}'
        if device != 'auto' and dev != device:
            continue
        if offers[name] is not None:
            passed.append(f'{label}: {offers[name]}')
            continue
        if dev == 'cuda':
            why = _cuda_absent(name)
            if why is not None:
                passed.append(f'{label}: {why}')
                continue
        prec = precision
        if prec == 'fp16' and dev == 'cpu':
            log.warning('%s: fp16 is not supported on CPU; running fp32', label)
            prec = 'fp32'
        if prec == 'int8' and label != 'onnxruntime-cpu':
            log.warning('%s: int8 is onnxruntime-CPU only; running fp32', label)
            prec = 'fp32'
        try:
            b = _construct_int8_or_fp32(name, source, dev, prec, threads, options.get(name, {}))
        except Exception as exc:  # any load failure (API drift in a new TensorRT too) falls back
            why = str(exc) if isinstance(exc, BackendError) else f'{type(exc).__name__}: {exc}'
            log.warning('backend %s failed to load, falling back: %s', label, why)
            passed.append(f'{label}: failed ({why})')
            continue
        log.info('backend auto -> %s/%s/%s for %s%s', b.name, b.device, b.precision, source.path,
                 (' (passed over: ' + '; '.join(passed) + ')') if passed else '')
        return b
    raise BackendError(f'no backend could open {source.path} on device {device}: ' + '; '.join(passed))
