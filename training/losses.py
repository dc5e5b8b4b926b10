"""ZeroFlow distillation loss: the student regresses the teacher's pseudo-labels.

Per point, the loss is the end-point error (Euclidean norm, not squared, as ZeroFlow's
``FastFlow3DDistillationLoss``) between the predicted and the pseudo-label *residual* flow, times
a weight that depends on the pseudo-label's speed ("scale by speed", Vedder et al., ZeroFlow,
ICLR 2024, Sec. 4 / eq. 4):

    s = |pseudo-label flow| [m/frame] * frame_rate [Hz]   (10 Hz for Argoverse 2: m/s = 10 m/frame)
    w(s) = 0.1                for s <= 0.5 m/s
         = 1.8 s - 0.8        for 0.5 m/s < s < 1.0 m/s   (linear ramp from 0.1 to 1.0)
         = 1.0                for s >= 1.0 m/s

i.e. ``w = clip(1.8 s - 0.8, 0.1, 1.0)``. The paper's text prints the lower breakpoint as 0.4 m/s,
but with the printed middle piece ``1.8 s - 0.8`` that is discontinuous (-0.08 at 0.4 m/s); the
author's own plotted formula (code comment "max(0.1, min(1, 1.8x - 0.8))") is the continuous ramp
above, whose lower breakpoint is 0.5 m/s. We implement that intended ramp. The upstream code swaps
``min`` and ``max`` (``min(0.1, max(1.8 s - 0.8, 1))``), which is 0.1 for every point: a constant
weight that only rescales the loss. :func:`upstream_speed_weight` reproduces it for reference.

Points whose pseudo-label is invalid (``is_valid`` False, e.g. points the teacher never saw) are
excluded. Each pair's loss is the mean over its valid points (as upstream); a batch averages the
pairs, so the loss scale does not depend on the batch size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

FRAME_RATE_HZ = 10.0
SPEED_LOW_MPS = 0.5
SPEED_HIGH_MPS = 1.0
WEIGHT_LOW = 0.1
WEIGHT_HIGH = 1.0


class LossError(ValueError):
    """Bad inputs or an unknown loss name (names the argument and what was expected)."""


def speed_weight(target: torch.Tensor, frame_rate_hz: float = FRAME_RATE_HZ) -> torch.Tensor:
    """(N,) weight of each point from its pseudo-label flow (N,3) in m/frame; see the module docstring."""
    speed = torch.linalg.vector_norm(target.float(), dim=-1) * frame_rate_hz
    slope = (WEIGHT_HIGH - WEIGHT_LOW) / (SPEED_HIGH_MPS - SPEED_LOW_MPS)  # 1.8 per m/s
    return (WEIGHT_LOW + slope * (speed - SPEED_LOW_MPS)).clamp(WEIGHT_LOW, WEIGHT_HIGH)


def upstream_speed_weight(target: torch.Tensor, frame_rate_hz: float = FRAME_RATE_HZ) -> torch.Tensor:
    """Compute the weight kylevedder/zeroflow actually uses (min/max swapped): 0.1 everywhere."""
    speed = torch.linalg.vector_norm(target.float(), dim=-1) * frame_rate_hz
    return torch.minimum(torch.full_like(speed, 0.1),
                         torch.maximum(1.8 * speed - 0.8, torch.ones_like(speed)))


@dataclass
class LossOutput:
    loss: torch.Tensor                 # scalar, differentiable
    logs: dict[str, float]             # detached figures for the progress bar / metrics.csv


def _check(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None,
           batch_index: torch.Tensor | None) -> None:
    if pred.ndim != 2 or pred.shape[1] != 3:
        raise LossError(f'pred: expected (N,3) flow, got shape {tuple(pred.shape)}')
    if target.shape != pred.shape:
        raise LossError(f'target: expected shape {tuple(pred.shape)} like pred, got {tuple(target.shape)}')
    if valid is not None and (valid.shape != pred.shape[:1] or valid.dtype != torch.bool):
        raise LossError(f'valid: expected a ({pred.shape[0]},) bool mask, '
                        f'got {tuple(valid.shape)} {valid.dtype}')
    if batch_index is not None and batch_index.shape != pred.shape[:1]:
        raise LossError(f'batch_index: expected shape ({pred.shape[0]},), got {tuple(batch_index.shape)}')


class DistillationLoss:
    """Speed-weighted end-point error to the pseudo-labels (ZeroFlow); ``speed_scaling=False``: plain EPE."""

    def __init__(self, speed_scaling: bool = True, frame_rate_hz: float = FRAME_RATE_HZ, error: str = 'norm'):
        if not frame_rate_hz > 0:
            raise LossError(f'frame_rate_hz: must be > 0, got {frame_rate_hz}')
        if error not in ERRORS:
            raise LossError(f'error: unknown {error!r}; valid: {sorted(ERRORS)}')
        self.speed_scaling = bool(speed_scaling)
        self.frame_rate_hz = float(frame_rate_hz)
        self.error = error

    def __call__(self, pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None,
                 batch_index: torch.Tensor | None = None, batch_size: int = 1) -> LossOutput:
        """``pred``/``target`` (N,3) residual flow; ``batch_index`` (N,) pair of each row (None: one pair)."""
        _check(pred, target, valid, batch_index)
        target = target.to(torch.float32)
        err = torch.linalg.vector_norm(pred.float() - target, dim=-1)
        per = ERRORS[self.error](err)
        w = speed_weight(target, self.frame_rate_hz) if self.speed_scaling else torch.ones_like(err)
        keep = torch.ones_like(err, dtype=torch.bool) if valid is None else valid
        if batch_index is None:
            batch_index = torch.zeros_like(err, dtype=torch.long)
        keepf = keep.to(err.dtype)
        # where() rather than indexing keeps the graph shape static (cheap under DDP/compile)
        per_point = torch.where(keep, per * w, torch.zeros_like(err))
        zeros = torch.zeros(batch_size, device=err.device, dtype=err.dtype)
        sums = zeros.scatter_add(0, batch_index, per_point)
        counts = zeros.scatter_add(0, batch_index, keepf)
        has = counts > 0
        if not bool(has.any()):
            # no valid label in the whole batch: a zero that still back-propagates (DDP needs a graph)
            return LossOutput(pred.sum() * 0.0, {'loss': 0.0, 'epe': float('nan'), 'valid_points': 0})
        loss = (sums[has] / counts[has]).mean()
        with torch.no_grad():
            n = keepf.sum()
            logs = {'loss': float(loss.detach()), 'epe': float((err * keepf).sum() / n),
                    'mean_weight': float((w * keepf).sum() / n), 'valid_points': int(n)}
        return LossOutput(loss, logs)


ERRORS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    'norm': lambda e: e,
    'squared': lambda e: e * e,
}


# Explicit registry: unknown names raise and list the valid ones.
LOSSES: dict[str, Callable[..., Any]] = {
    'zeroflow_speed_scaled': lambda **kw: DistillationLoss(speed_scaling=True, **kw),
    'zeroflow_speed_scaled_sq': lambda **kw: DistillationLoss(speed_scaling=True, error='squared', **kw),
    'epe': lambda **kw: DistillationLoss(speed_scaling=False, **kw),
}


def get_loss(name: str, **kwargs: Any) -> DistillationLoss:
    if name not in LOSSES:
        raise LossError(f'unknown loss {name!r}; valid: {sorted(LOSSES)}')
    return LOSSES[name](**kwargs)
