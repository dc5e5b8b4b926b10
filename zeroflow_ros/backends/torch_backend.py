"""PyTorch eager backend: the reference the other backends are compared against.

Loads a checkpoint with :func:`zeroflow_ros.model.load_checkpoint` (the checkpoint carries its
own model config). fp16 runs under CUDA autocast; CPU runs fp32 only.

On CUDA the pillar pre-step and the scatter-back run on the GPU by default
(``device_preprocess``): on the H200 run the numpy pre/post steps took 17 of 27 ms per pair at
60k points against 10 ms of network. :func:`pillarize_torch` is the float64 twin of
:func:`zeroflow_ros.core.voxelize.pillarize` (same comparisons, same IEEE-rounded subtract/divide/
floor), so both give the same pillar for every point; the tests check equality on real lidar and
on points placed at pillar borders.
"""
from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from zeroflow_ros.backends.base import (Backend, BackendError, ModelSource, Timing, check_points,
                                        default_threads, grid_from_config)
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


def pillarize_torch(points: Any, grid: PillarGrid) -> tuple[Any, Any, Any]:
    """Torch twin of ``pillarize`` for points already on the device: (keep, pts, pillar_idx)."""
    import torch

    p64 = points.double()
    x, y, z = p64[:, 0], p64[:, 1], p64[:, 2]
    # NaN compares False, as in the numpy step, so non-finite points drop out here too
    keep = (x >= grid.x_min) & (x < grid.x_max) & (y >= grid.y_min) & (y < grid.y_max) \
        & (z >= grid.z_min) & (z < grid.z_max)
    pts = points[keep].contiguous()
    origin = torch.tensor([grid.x_min, grid.y_min], dtype=torch.float64, device=points.device)
    cell = torch.floor((p64[keep, :2] - origin) / grid.pillar_size).to(torch.int64)
    ix = cell[:, 0].clamp(0, grid.nx - 1)
    iy = cell[:, 1].clamp(0, grid.ny - 1)
    return keep, pts, iy * grid.nx + ix


class TorchBackend(Backend):
    name = 'torch'

    def __init__(self, source: ModelSource, device: str = 'cpu', precision: str = 'fp32',
                 threads: int | None = None, device_preprocess: bool | None = None) -> None:
        """Load the checkpoint; ``device_preprocess`` (default: on for CUDA) runs pre/post in torch."""
        if source.checkpoint is None:
            raise BackendError(f'torch: {source.path} has no checkpoint (model.pt) to load')
        if device not in ('cpu', 'cuda'):
            raise BackendError(f"torch: device must be 'cpu' or 'cuda', got {device!r}")
        if precision == 'int8':
            raise BackendError('torch: int8 is not supported (onnxruntime on cpu runs model.int8.onnx)')
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
        self.device_preprocess = (device == 'cuda') if device_preprocess is None else bool(device_preprocess)
        # pillars made on the host would bypass the device pre-step: callers then use infer()
        self.host_pillars = not self.device_preprocess

    def infer(self, points0: np.ndarray, points1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if not self.device_preprocess:
            return super().infer(points0, points1)
        with self.lock:
            return self._infer_device(points0, points1)

    def _infer_device(self, points0: np.ndarray, points1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        torch = self._torch
        dev = self._dev
        sync = torch.cuda.synchronize if dev.type == 'cuda' else (lambda: None)
        t0 = time.perf_counter()
        p0 = check_points(points0, 'points0')
        p1 = check_points(points1, 'points1')
        with torch.inference_mode():
            x0 = torch.from_numpy(p0).to(dev)
            x1 = torch.from_numpy(p1).to(dev)
            keep0, pc0, idx0 = pillarize_torch(x0, self.grid)
            _, pc1, idx1 = pillarize_torch(x1, self.grid)
            k0, k1 = int(pc0.shape[0]), int(pc1.shape[0])
            sync()
            t1 = time.perf_counter()
            flow_k = None if k0 == 0 or k1 == 0 else self._forward(pc0, idx0, pc1, idx1)
            sync()
            t2 = time.perf_counter()
            n = len(p0)
            flow = torch.zeros((n, 3), dtype=torch.float32, device=dev)
            valid = torch.zeros(n, dtype=torch.bool, device=dev)
            if flow_k is not None:
                ok = torch.isfinite(flow_k).all(dim=1)
                rows = torch.nonzero(keep0).squeeze(1)[ok]
                flow[rows] = flow_k[ok]
                valid[rows] = True
            flow_np, valid_np = flow.cpu().numpy(), valid.cpu().numpy()
        t3 = time.perf_counter()
        self.calls += 1
        self.last_timing = Timing((t1 - t0) * 1e3, (t2 - t1) * 1e3, (t3 - t2) * 1e3, n, k0, k1)
        return flow_np, valid_np

    def _forward(self, *args: Any) -> Any:
        """Network on device tensors -> (K0,3) float32 device tensor."""
        if self.precision == 'fp16':
            with self._torch.autocast(device_type='cuda', dtype=self._torch.float16):
                return self.model(*args).float()
        return self.model(*args).float()

    def _run(self, pc0: np.ndarray, idx0: np.ndarray, pc1: np.ndarray, idx1: np.ndarray) -> np.ndarray:
        torch = self._torch
        dev = self._dev
        with torch.inference_mode():
            args = [torch.from_numpy(a).to(dev, non_blocking=True) for a in (pc0, idx0, pc1, idx1)]
            # .cpu() synchronises, so the inference time includes the GPU work
            return self._forward(*args).cpu().numpy()

    def _extra_description(self) -> dict[str, Any]:
        d: dict[str, Any] = {'checkpoint': str(self.source.checkpoint), 'torch': self._torch.__version__,
                             'params': self.num_params, 'device_preprocess': self.device_preprocess}
        if self.device == 'cuda':
            d['gpu'] = self._torch.cuda.get_device_name(self._dev)
        return d
