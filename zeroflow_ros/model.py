"""FastFlow3D, the ZeroFlow student, in plain torch; checkpoints that carry their own config.

Architecture (Jund et al., RA-L 2021, as implemented by ZeroFlow, kylevedder/zeroflow
``models/fast_flow_3d.py``):

1. Pillar encoder, shared by both sweeps: per point a 9-d feature
   ``[xyz, xyz - mean of its pillar, xyz - centre of its pillar]`` -> Linear (no bias) + BatchNorm
   + ReLU -> scatter-*mean* into a ``(C, H, W)`` pseudo-image (ZeroFlow: DynamicPillarFeatureNet,
   ``mode='avg'``).
2. UNet over the two pseudo-images: the same encoder stages run on each sweep, the features of
   both sweeps are concatenated per scale and the decoder up-samples bilinearly with skips.
3. Per-point head: UNet output at the point's pillar + the point's own embedding + its offset to
   the pillar centre -> MLP -> 3-d flow.

Interface shared with the export/backends (engineer G): every backend runs
:func:`zeroflow_ros.core.voxelize.pillarize` on both sweeps, then
``model(pc0 (K0,3), idx0 (K0,), pc1 (K1,3), idx1 (K1,)) -> flow (K0,3)``. Everything else is in
the graph and uses ``Tensor.scatter_add`` (never ``index_add``: the TorchScript ONNX exporter
lowers it to a ScatterND that keeps one of duplicate indices). The output is *residual* flow
(ego motion removed, see :mod:`zeroflow_ros.core.geometry`).
"""
from __future__ import annotations

import logging
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from zeroflow_ros.core.voxelize import PillarGrid, VoxelizeError

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT_VERSION = 1
SUPPORTED_CHECKPOINT_VERSIONS = (1,)


class ModelError(ValueError):
    """A model config or checkpoint is invalid (names the field/file and what was expected)."""


@dataclass(frozen=True)
class FastFlow3DConfig:
    """Hyper-parameters of FastFlow3D; saved in every checkpoint and copied into the export manifest.

    ``point_cloud_range`` is ``(x_min, y_min, z_min, x_max, y_max, z_max)`` in metres (mmdet3d order,
    as ZeroFlow's config). ``stage_channels``/``stage_blocks`` define the UNet encoder: stage ``i``
    starts with a stride-2 conv to ``stage_channels[i]`` followed by ``stage_blocks[i] - 1`` convs.
    """

    name: str = 'paper'
    point_cloud_range: tuple[float, float, float, float, float, float] = (-51.2, -51.2, -3.0, 51.2, 51.2, 3.0)
    pillar_size: float = 0.2
    embed_channels: int = 32
    stage_channels: tuple[int, ...] = (64, 128, 256)
    stage_blocks: tuple[int, ...] = (4, 6, 6)
    head_hidden: int = 32
    description: str = field(default='', compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, 'point_cloud_range', tuple(float(v) for v in self.point_cloud_range))
        object.__setattr__(self, 'stage_channels', tuple(int(v) for v in self.stage_channels))
        object.__setattr__(self, 'stage_blocks', tuple(int(v) for v in self.stage_blocks))
        if len(self.point_cloud_range) != 6:
            raise ModelError(f'FastFlow3DConfig.point_cloud_range: expected 6 numbers '
                             f'(x_min, y_min, z_min, x_max, y_max, z_max), got {self.point_cloud_range}')
        if not self.stage_channels or len(self.stage_channels) != len(self.stage_blocks):
            raise ModelError(f'FastFlow3DConfig: stage_channels {self.stage_channels} and stage_blocks '
                             f'{self.stage_blocks} must be non-empty and of equal length')
        for name in ('embed_channels', 'head_hidden'):
            if int(getattr(self, name)) < 1:
                raise ModelError(f'FastFlow3DConfig.{name}: must be >= 1, got {getattr(self, name)}')
        if min(self.stage_channels) < 1 or min(self.stage_blocks) < 1:
            raise ModelError(f'FastFlow3DConfig: stage channels/blocks must be >= 1, got '
                             f'{self.stage_channels} / {self.stage_blocks}')
        try:
            self.grid  # noqa: B018  (validates divisibility now, not at the first forward)
        except VoxelizeError as exc:
            raise ModelError(f'FastFlow3DConfig {self.name!r}: {exc}') from None

    @property
    def grid(self) -> PillarGrid:
        x0, y0, z0, x1, y1, z1 = self.point_cloud_range
        return PillarGrid(x0, x1, y0, y1, z0, z1, float(self.pillar_size), 2 ** len(self.stage_channels))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ('point_cloud_range', 'stage_channels', 'stage_blocks'):
            d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> 'FastFlow3DConfig':
        known = {f.name for f in fields(cls)}
        extra = sorted(set(d) - known)
        if extra:
            raise ModelError(f'FastFlow3DConfig: unknown keys {extra}; known: {sorted(known)}')
        try:
            return cls(**dict(d))
        except TypeError as exc:
            raise ModelError(f'FastFlow3DConfig: bad values {dict(d)} ({exc})') from None


# Explicit registry. "paper" is ZeroFlow's Argoverse 2 configuration (configs/pseudoimage.py:
# +-51.2 m, 0.2 m pillars, 512x512, FEATURE_CHANNELS=32, FastFlowUNet): 6.8 M parameters,
# 171.5 G multiply-adds per pair in the dense UNet (about 2 s per pair in onnxruntime on 2 CPU cores).
# "cpu_small" is for CPU-only vehicles: 0.4 m pillars (256x256, 4x fewer cells), 12 point-embedding
# channels and a narrow, shallow UNet (24/48/96 channels, 2 convs per stage): 0.53 M parameters and
# 4.3 G multiply-adds, 40x less dense work than "paper". Measured single-thread CPU time per pair at
# 60k points (onnxruntime, pillarize included): 0.14 s vs 4.7 s for "paper". What it gives up:
# 0.4 m pillars blur small objects (pedestrians, cyclists) and the thin embedding has less room
# for fine motion, so expect a higher error on small fast movers than "paper".
MODEL_CONFIGS: dict[str, FastFlow3DConfig] = {
    'paper': FastFlow3DConfig(
        name='paper',
        description='ZeroFlow/FastFlow3D paper configuration: +-51.2 m, 0.2 m pillars (512x512)'),
    'cpu_small': FastFlow3DConfig(
        name='cpu_small', pillar_size=0.4, embed_channels=12, stage_channels=(24, 48, 96),
        stage_blocks=(2, 2, 2), head_hidden=32,
        description='CPU deployment: +-51.2 m, 0.4 m pillars (256x256), narrow shallow UNet (24/48/96)'),
}


def get_config(name: str, **overrides: Any) -> FastFlow3DConfig:
    """Return a registered config by name, optionally with fields overridden (e.g. ``pillar_size=0.8``)."""
    if name not in MODEL_CONFIGS:
        raise ModelError(f'unknown model config {name!r}; valid: {sorted(MODEL_CONFIGS)}')
    cfg = MODEL_CONFIGS[name]
    if overrides:
        bad = sorted(set(overrides) - {f.name for f in fields(FastFlow3DConfig)})
        if bad:
            raise ModelError(f'unknown FastFlow3DConfig fields {bad}')
        cfg = replace(cfg, **overrides)
    return cfg


class PillarEncoder(nn.Module):
    """Per-point 9-d features -> Linear+BN+ReLU -> scatter-mean into a pseudo-image."""

    def __init__(self, cfg: FastFlow3DConfig):
        super().__init__()
        g = cfg.grid
        self.H, self.W = g.shape
        self.x_min, self.y_min = g.x_min, g.y_min
        self.z_mid = 0.5 * (g.z_min + g.z_max)
        self.pillar_size = g.pillar_size
        self.channels = cfg.embed_channels
        self.linear = nn.Linear(9, cfg.embed_channels, bias=False)
        # mmdet3d PFNLayer defaults, as ZeroFlow's DynamicPillarFeatureNet
        self.norm = nn.BatchNorm1d(cfg.embed_channels, eps=1e-3, momentum=0.01)

    def pillar_centers(self, idx: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        local = torch.remainder(idx, self.H * self.W)
        ix = torch.remainder(local, self.W).to(dtype)
        iy = torch.div(local, self.W, rounding_mode='floor').to(dtype)
        cx = self.x_min + (ix + 0.5) * self.pillar_size
        cy = self.y_min + (iy + 0.5) * self.pillar_size
        cz = torch.full_like(cx, self.z_mid)
        return torch.stack([cx, cy, cz], dim=1)

    def forward(self, pts: torch.Tensor, idx: torch.Tensor, batch_size: int = 1
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (point embedding (K,C), offsets to pillar centre (K,3), pseudo-image (B,C,H,W))."""
        num = batch_size * self.H * self.W
        k = pts.shape[0]
        # counts and coordinate sums in one scatter: [1, x, y, z] per point
        acc = torch.zeros(num, 4, dtype=pts.dtype, device=pts.device).scatter_add(
            0, idx.unsqueeze(1).expand(k, 4), torch.cat([torch.ones_like(pts[:, :1]), pts], dim=1))
        denom = acc[:, :1].clamp(min=1.0)
        mean = torch.index_select(acc[:, 1:] / denom, 0, idx)
        offset = pts - self.pillar_centers(idx, pts.dtype)
        feats = torch.cat([pts, pts - mean, offset], dim=1)
        emb = F.relu(self.norm(self.linear(feats)))
        c = emb.shape[1]
        # sum in float32 even under bf16/fp16 autocast: a pillar can hold hundreds of points
        pillars = torch.zeros(num, c, dtype=pts.dtype, device=emb.device).scatter_add(
            0, idx.unsqueeze(1).expand(k, c), emb.to(pts.dtype))
        pillars = pillars / denom
        image = pillars.view(batch_size, self.H, self.W, c).permute(0, 3, 1, 2)
        return emb, offset, image


class ConvBNGELU(nn.Sequential):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__(nn.Conv2d(cin, cout, 3, stride, 1), nn.BatchNorm2d(cout), nn.GELU())


class UpsampleSkip(nn.Module):
    """ZeroFlow's decoder step.

    1x1 conv + bilinear x2 on the coarse input, 1x1 conv on the skip, concatenation, then two 3x3
    convs without norm or activation, as upstream.
    """

    def __init__(self, coarse_channels: int, latent_channels: int, out_channels: int):
        super().__init__()
        self.coarse = nn.Conv2d(coarse_channels, latent_channels, 1)
        self.skip = nn.Conv2d(latent_channels, latent_channels, 1)
        self.fuse = nn.Sequential(nn.Conv2d(2 * latent_channels, out_channels, 3, 1, 1),
                                  nn.Conv2d(out_channels, out_channels, 3, 1, 1))

    def forward(self, coarse: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(self.coarse(coarse), scale_factor=2.0, mode='bilinear', align_corners=False)
        return self.fuse(torch.cat([up, self.skip(skip)], dim=1))


class FlowUNet(nn.Module):
    """Siamese encoder, concatenation per scale, bilinear decoder (ZeroFlow FastFlowUNet, generalised)."""

    def __init__(self, cfg: FastFlow3DConfig):
        super().__init__()
        chans = [cfg.embed_channels, *cfg.stage_channels]
        self.stages = nn.ModuleList()
        for i, blocks in enumerate(cfg.stage_blocks):
            layers = [ConvBNGELU(chans[i], chans[i + 1], stride=2)]
            layers += [ConvBNGELU(chans[i + 1], chans[i + 1]) for _ in range(blocks - 1)]
            self.stages.append(nn.Sequential(*layers))
        self.decoders = nn.ModuleList()
        coarse = 2 * chans[-1]
        for level in range(len(chans) - 2, -1, -1):
            latent = 2 * chans[level]
            self.decoders.append(UpsampleSkip(coarse, latent, latent))
            coarse = latent
        self.final = nn.Conv2d(coarse, coarse, 3, 1, 1)
        self.out_channels = coarse

    def forward(self, image0: torch.Tensor, image1: torch.Tensor) -> torch.Tensor:
        f0, f1 = [image0], [image1]
        for stage in self.stages:
            f0.append(stage(f0[-1]))
            f1.append(stage(f1[-1]))
        joint = [torch.cat([a, b], dim=1) for a, b in zip(f0, f1)]
        x = joint[-1]
        for dec, skip in zip(self.decoders, reversed(joint[:-1])):
            x = dec(x, skip)
        return self.final(x)


class FastFlow3D(nn.Module):
    """``forward(pc0, idx0, pc1, idx1) -> residual flow of pc0``; see the module docstring."""

    def __init__(self, cfg: FastFlow3DConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = PillarEncoder(cfg)
        self.unet = FlowUNet(cfg)
        self.head = nn.Sequential(
            nn.Linear(self.unet.out_channels + cfg.embed_channels + 3, cfg.head_hidden), nn.GELU(),
            nn.Linear(cfg.head_hidden, 3))

    def forward(self, pc0: torch.Tensor, idx0: torch.Tensor, pc1: torch.Tensor, idx1: torch.Tensor
                ) -> torch.Tensor:
        """Flow (K0,3) of every pc0 point of one pair: exactly the four inputs of the exported graph."""
        return self.forward_batch(pc0, idx0, pc1, idx1, 1)

    def forward_batch(self, pc0: torch.Tensor, idx0: torch.Tensor, pc1: torch.Tensor, idx1: torch.Tensor,
                      batch_size: int) -> torch.Tensor:
        """Flow of several pairs at once.

        Concatenate the points of all pairs and add ``b * H * W`` to the pillar indices of pair ``b``
        (see :func:`collate_pillars`); the flow rows follow ``pc0``.
        """
        emb0, off0, image0 = self.encoder(pc0, idx0, batch_size)
        _, _, image1 = self.encoder(pc1, idx1, batch_size)
        grid = self.unet(image0, image1)
        c = grid.shape[1]
        per_pillar = grid.permute(0, 2, 3, 1).reshape(-1, c)
        pillar_feat = torch.index_select(per_pillar, 0, idx0)
        return self.head(torch.cat([pillar_feat, emb0.to(pillar_feat.dtype), off0.to(pillar_feat.dtype)],
                                   dim=1))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


class BatchedFastFlow3D(nn.Module):
    """Training wrapper whose ``forward`` takes ``batch_size``, so DDP (it hooks ``forward``) can wrap it."""

    def __init__(self, model: FastFlow3D):
        super().__init__()
        self.model = model

    def forward(self, pc0: torch.Tensor, idx0: torch.Tensor, pc1: torch.Tensor, idx1: torch.Tensor,
                batch_size: int) -> torch.Tensor:
        return self.model.forward_batch(pc0, idx0, pc1, idx1, batch_size)


def build_model(cfg: FastFlow3DConfig | str, **overrides: Any) -> FastFlow3D:
    if isinstance(cfg, str):
        cfg = get_config(cfg, **overrides)
    elif overrides:
        cfg = replace(cfg, **overrides)
    return FastFlow3D(cfg)


def collate_pillars(items: list[tuple[torch.Tensor, torch.Tensor]], cfg: FastFlow3DConfig
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate per-pair (pts, idx) into one batch with pillar indices offset by ``b * H * W``."""
    n = cfg.grid.num_pillars
    pts = torch.cat([p for p, _ in items], dim=0)
    idx = torch.cat([i + b * n for b, (_, i) in enumerate(items)], dim=0)
    return pts, idx


@torch.no_grad()
def predict_flow(model: FastFlow3D, points0, points1) -> tuple[Any, Any]:
    """Numpy in, numpy out, the whole step for one pair on the model's device.

    Returns ``(flow (N,3) float32, valid (N,) bool)`` for every input point of ``points0``; out-of-range
    points get flow 0 and valid False (the backend contract of ``docs/architecture.md``).
    """
    import numpy as np

    from zeroflow_ros.core.voxelize import pillarize
    device = next(model.parameters()).device
    keep0, p0, i0 = pillarize(points0, model.cfg)
    _, p1, i1 = pillarize(points1, model.cfg)
    flow = np.zeros((len(keep0), 3), dtype=np.float32)
    if len(p0) == 0:
        return flow, keep0
    out = model(torch.from_numpy(p0).to(device), torch.from_numpy(i0).to(device),
                torch.from_numpy(p1).to(device), torch.from_numpy(i1).to(device))
    flow[keep0] = out.float().cpu().numpy()
    return flow, keep0


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------

def unwrap(model: nn.Module) -> nn.Module:
    """Return the FastFlow3D inside DDP / :class:`BatchedFastFlow3D` / torch.compile wrappers."""
    for _ in range(4):
        if isinstance(model, FastFlow3D):
            break
        inner = (getattr(model, 'module', None) or getattr(model, 'model', None)
                 or getattr(model, '_orig_mod', None))
        if inner is None:
            break
        model = inner
    return model


def save_checkpoint(path: str | os.PathLike, model: nn.Module, *,
                    train_config: Mapping[str, Any] | None = None,
                    epoch: int = 0, step: int = 0, optimizer: Any = None, scheduler: Any = None,
                    scaler: Any = None, rng_state: Mapping[str, Any] | None = None,
                    extra: Mapping[str, Any] | None = None) -> Path:
    """Write a self-describing checkpoint atomically (temp file + rename: a crash never leaves half a file).

    The file loads with ``torch.load(weights_only=True)``: only tensors and plain containers.
    """
    core = unwrap(model)
    if not isinstance(core, FastFlow3D):
        raise ModelError(f'save_checkpoint: expected a FastFlow3D, got {type(core).__name__}')
    ckpt: dict[str, Any] = {
        'format_version': CHECKPOINT_FORMAT_VERSION,
        'model_config': core.cfg.to_dict(),
        'train_config': dict(train_config or {}),
        'state_dict': {k: v.detach().cpu() for k, v in core.state_dict().items()},
        'epoch': int(epoch),
        'step': int(step),
        'optimizer': optimizer.state_dict() if optimizer is not None else None,
        'scheduler': scheduler.state_dict() if scheduler is not None else None,
        'scaler': scaler.state_dict() if scaler is not None else None,
        'rng_state': dict(rng_state or {}),
        'extra': dict(extra or {}),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + '.', suffix='.tmp', dir=path.parent)
    os.close(fd)
    try:
        torch.save(ckpt, tmp)
        # mkstemp makes the file private (0600); a model is meant to be shared like any other file
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_checkpoint(path: str | os.PathLike, map_location: Any = 'cpu') -> dict[str, Any]:
    """Read the raw checkpoint dict and validate it (format version, required keys)."""
    path = Path(path)
    if path.is_dir():
        path = path / 'model.pt'
    if not path.is_file():
        raise ModelError(f'{path}: checkpoint not found')
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises pickle/zip/runtime errors for foreign files
        raise ModelError(f'{path}: not a zeroflow checkpoint ({type(exc).__name__}: {exc})') from None
    if not isinstance(ckpt, dict) or 'format_version' not in ckpt:
        raise ModelError(f'{path}: not a zeroflow checkpoint (no format_version key)')
    if ckpt['format_version'] not in SUPPORTED_CHECKPOINT_VERSIONS:
        raise ModelError(f'{path}: checkpoint format_version {ckpt["format_version"]!r} is not supported; '
                         f'supported: {list(SUPPORTED_CHECKPOINT_VERSIONS)}')
    for key in ('model_config', 'state_dict'):
        if key not in ckpt:
            raise ModelError(f'{path}: checkpoint lacks {key!r}')
    return ckpt


def load_checkpoint(path: str | os.PathLike, map_location: Any = 'cpu'
                    ) -> tuple[FastFlow3D, dict[str, Any]]:
    """Build the model from the checkpoint alone; returns ``(model in eval mode, meta)``.

    ``meta`` is the checkpoint without ``state_dict`` (config, epoch, step, optimizer state ...).
    """
    ckpt = read_checkpoint(path, map_location)
    try:
        cfg = FastFlow3DConfig.from_dict(ckpt['model_config'])
    except ModelError as exc:
        raise ModelError(f'{path}: model_config: {exc}') from None
    model = FastFlow3D(cfg)
    state = {k[len('module.'):] if k.startswith('module.') else k: v
             for k, v in ckpt['state_dict'].items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ModelError(f'{path}: state_dict does not match config {cfg.name!r}: {exc}') from None
    if map_location is not None and not callable(map_location):
        model.to(map_location)
    model.eval()
    meta = {k: v for k, v in ckpt.items() if k != 'state_dict'}
    return model, meta


def dense_macs(cfg: FastFlow3DConfig) -> float:
    """Count the multiply-accumulates of the convolutions (UNet) per pair: the cost that dominates on CPU."""
    h, w = cfg.grid.shape
    chans = [cfg.embed_channels, *cfg.stage_channels]
    macs = 0.0
    for i, blocks in enumerate(cfg.stage_blocks):
        h, w = h // 2, w // 2
        macs += 2 * (9 * chans[i] * chans[i + 1] + (blocks - 1) * 9 * chans[i + 1] ** 2) * h * w
    for level in range(len(chans) - 2, -1, -1):
        hh, ww = cfg.grid.shape[0] // 2 ** level, cfg.grid.shape[1] // 2 ** level
        latent = 2 * chans[level]
        coarse = 2 * chans[level + 1]
        macs += (coarse * latent) * (hh * ww / 4) + latent * latent * hh * ww
        macs += 9 * (2 * latent * latent + latent * latent) * hh * ww
    macs += 9 * (2 * chans[0]) ** 2 * math.prod(cfg.grid.shape)
    return macs
