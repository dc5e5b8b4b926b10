"""PyTorch eager backend: the reference the other backends are compared against.

Loads a checkpoint with :func:`zeroflow_ros.model.load_checkpoint` (the checkpoint carries its
own model config). fp16 runs under CUDA autocast; CPU runs fp32 only.
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np

from zeroflow_ros.backends.base import Backend, BackendError, ModelSource, default_threads, grid_from_config
from zeroflow_ros.core.voxelize import PillarGrid, as_grid

log = logging.getLogger(__name__)


def _model_grid(model: Any, meta: dict[str, Any], where: str) -> PillarGrid:
    for attr in ('config', 'cfg'):
        cfg = getattr(model, attr, None)
        if cfg is not None:
            try:
                return as_grid(cfg)
            except ValueError:
                pass
    cfg = meta.get('model_config') if isinstance(meta, dict) else None
    if not isinstance(cfg, dict):
        raise BackendError(f'torch: {where}: checkpoint has no model_config to read the grid from')
    return grid_from_config(cfg, where)


class TorchBackend(Backend):
    name = 'torch'

    def __init__(self, source: ModelSource, device: str = 'cpu', precision: str = 'fp32',
                 threads: int | None = None) -> None:
        if source.checkpoint is None:
            raise BackendError(f'torch: {source.path} has no checkpoint (model.pt) to load')
        if device not in ('cpu', 'cuda'):
            raise BackendError(f"torch: device must be 'cpu' or 'cuda', got {device!r}")
        if precision == 'fp16' and device != 'cuda':
            raise BackendError('torch: fp16 needs device=cuda '
                               '(CPU half-precision convs are slower, not faster)')
        try:
            import torch
        except ImportError as exc:
            raise BackendError(f'torch: not installed ({exc})') from None
        if device == 'cuda' and not torch.cuda.is_available():
            raise BackendError('torch: CUDA requested but torch.cuda.is_available() is False '
                               f'(torch {torch.__version__})')
        from zeroflow_ros.model import load_checkpoint

        threads = threads or default_threads()
        if device == 'cpu':
            # process-wide in torch; the backend owns the process's inference threads
            torch.set_num_threads(threads)
        try:
            model, meta = load_checkpoint(str(source.checkpoint), map_location='cpu')
        except BackendError:
            raise
        except Exception as exc:  # torch.load raises many types for a corrupt file
            raise BackendError(f'torch: cannot load checkpoint {source.checkpoint}: '
                               f'{type(exc).__name__}: {exc}') from None
        grid = _model_grid(model, meta, str(source.checkpoint))
        if source.manifest is not None:
            m_grid = source.grid()
            if m_grid != grid:
                raise BackendError(f'torch: grid of checkpoint {source.checkpoint} ({grid}) differs from '
                                   f'{source.manifest.path} ({m_grid}); re-export the ONNX model')
        super().__init__(source, grid, device, precision, threads)
        self._torch = torch
        self._dev = torch.device(device)
        if device == 'cuda':
            # the grid is static, so conv shapes never change: let cuDNN pick its fastest kernels once
            torch.backends.cudnn.benchmark = True
        self.model = model.eval().to(self._dev)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.meta = meta
        self.num_params = int(sum(p.numel() for p in self.model.parameters()))

    def _run(self, pc0: np.ndarray, idx0: np.ndarray, pc1: np.ndarray, idx1: np.ndarray) -> np.ndarray:
        torch = self._torch
        dev = self._dev
        with torch.inference_mode():
            args = [torch.from_numpy(a).to(dev, non_blocking=True) for a in (pc0, idx0, pc1, idx1)]
            if self.precision == 'fp16':
                with torch.autocast(device_type='cuda', dtype=torch.float16):
                    out = self.model(*args)
            else:
                out = self.model(*args)
            # .cpu() synchronises, so the inference time includes the GPU work
            return out.float().cpu().numpy()

    def _extra_description(self) -> dict[str, Any]:
        d: dict[str, Any] = {'checkpoint': str(self.source.checkpoint), 'torch': self._torch.__version__,
                             'params': self.num_params}
        if self.device == 'cuda':
            d['gpu'] = self._torch.cuda.get_device_name(self._dev)
        return d
