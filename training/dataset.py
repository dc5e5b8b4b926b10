"""Training pairs: AV2-layout sweeps + pseudo-label files -> the student's inputs and targets.

One item is one sweep pair (t, t+1) of ``DATA_ROOT/<split>/<log_id>`` with its label file
``LABELS/<log_id>/<ts_ns of t>.feather`` (``flow_tx_m, flow_ty_m, flow_tz_m`` float32 in the AV2
convention, i.e. including ego motion, and bool ``is_valid``; one row per point of sweep t in
lidar-file order, as ``zeroflow label`` writes them). With ``labels_root=None`` the ground truth
``scene_flow/<ts>.feather`` of synthetic logs is used instead (supervised training / sanity checks).

The pipeline is the one the node runs, so the student trains on what it will see:
:func:`zeroflow_ros.core.preprocess.prepare_pair` (range box, ground removal, sweep t+1 brought
into ego0), optional augmentation, then :func:`zeroflow_ros.core.voxelize.pillarize`. Labels are
converted to *residual* flow (:func:`zeroflow_ros.core.geometry.av2_to_residual`) with the pair's
ego motion, because that is what the network predicts.

Augmentation (seeded by ``(seed, epoch, index)``, so it does not depend on workers or resumes):
a random yaw rotation about the ego z axis and a random mirror ``y -> -y``, applied to both sweeps
and to the flow vectors alike. Both are exact symmetries of residual flow in the ego0 frame.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from zeroflow_ros.core.geometry import av2_to_residual
from zeroflow_ros.core.preprocess import PreprocessConfig, prepare_pair
from zeroflow_ros.core.voxelize import as_grid, pillarize
from zeroflow_ros.data.av2 import AV2Log, DataError, list_logs, read_feather
from zeroflow_training.refine import RefineConfig, refine_labels

log = logging.getLogger(__name__)

FLOW_COLUMNS = ('flow_tx_m', 'flow_ty_m', 'flow_tz_m')


class DatasetError(ValueError):
    """Training data is missing or not what the layout promises (names the file/field)."""


@dataclass(frozen=True)
class AugmentConfig:
    yaw: bool = True          # uniform yaw in [-pi, pi)
    flip: bool = True         # mirror y -> -y with probability 1/2

    @property
    def enabled(self) -> bool:
        return self.yaw or self.flip


@dataclass(frozen=True)
class PairRef:
    log_dir: str
    log_id: str
    ts0: int
    ts1: int


def label_path(labels_root: Path, log_id: str, ts0: int) -> Path:
    return Path(labels_root) / log_id / f'{int(ts0)}.feather'


def list_pairs(data_root: Path, split: str, labels_root: Path | None = None) -> list[PairRef]:
    """Consecutive sweep pairs of a split that have a label file (or GT when ``labels_root`` is None).

    Pairs without labels are left out with one warning that counts them (a partly labelled
    dataset is normal while ``zeroflow label`` runs); no labelled pair at all is an error.
    """
    try:
        logs = list_logs(Path(data_root), split)
    except DataError as exc:
        raise DatasetError(str(exc)) from None
    pairs: list[PairRef] = []
    missing = 0
    example = None
    for lg in logs:
        ts = lg.timestamps
        for t0, t1 in zip(ts[:-1], ts[1:]):
            if labels_root is None:
                path = lg.log_dir / 'scene_flow' / f'{int(t0)}.feather'
            else:
                path = label_path(labels_root, lg.log_id, int(t0))
            if path.is_file():
                pairs.append(PairRef(str(lg.log_dir), lg.log_id, int(t0), int(t1)))
            else:
                missing += 1
                example = example or path
    where = f'{labels_root}' if labels_root is not None else f'{Path(data_root) / split}/*/scene_flow'
    if not pairs:
        raise DatasetError(f'{Path(data_root) / split}: no sweep pair has a label file under {where} '
                           f'({len(logs)} logs, {missing} pairs without labels, e.g. {example}); '
                           'run `zeroflow label` first or check --labels/--data')
    if missing:
        log.warning('%d of %d pairs of %s have no label file under %s (e.g. %s); training on the %d others',
                    missing, missing + len(pairs), Path(data_root) / split, where, example, len(pairs))
    return pairs


def read_labels(path: Path, n_points: int) -> tuple[np.ndarray, np.ndarray]:
    """(flow (N,3) float32 AV2 convention, is_valid (N,) bool) of a label/GT file, validated."""
    tab = read_feather(path)
    names = tab.column_names
    need = list(FLOW_COLUMNS) + ['is_valid']
    missing = [c for c in need if c not in names]
    if missing:
        raise DatasetError(f'{path}: missing columns {missing} (has {names}); expected {need}')
    if tab.num_rows != n_points:
        raise DatasetError(f'{path}: {tab.num_rows} rows, but the lidar sweep has {n_points} points '
                           '(labels must have one row per point, in lidar-file order)')
    flow = np.stack([tab.column(c).to_numpy(zero_copy_only=False).astype(np.float32) for c in FLOW_COLUMNS],
                    axis=1)
    valid_col = tab.column('is_valid').to_numpy(zero_copy_only=False)
    if valid_col.dtype != bool:
        raise DatasetError(f'{path}: column is_valid must be bool, got {valid_col.dtype}')
    valid = valid_col & np.isfinite(flow).all(axis=1)
    return flow, valid


def yaw_flip_matrix(yaw: float, flip: bool) -> np.ndarray:
    """3x3 linear map: mirror y (if ``flip``) then rotate by ``yaw`` about z."""
    c, s = np.cos(yaw), np.sin(yaw)
    R = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    if flip:
        R = R @ np.diag([1.0, -1.0, 1.0])
    return R


class PairDataset:
    """Map-style dataset (torch ``Dataset`` protocol) of student inputs and residual targets."""

    def __init__(self, data_root: Path, split: str, labels_root: Path | None, model_cfg: Any,
                 preprocess: PreprocessConfig | None = None, augment: AugmentConfig | None = None,
                 seed: int = 0, pairs: list[PairRef] | None = None, refine: RefineConfig | None = None):
        self.data_root = Path(data_root)
        self.split = split
        self.labels_root = None if labels_root is None else Path(labels_root)
        self.grid = as_grid(model_cfg)
        self.preprocess = preprocess or PreprocessConfig()
        self.augment = augment or AugmentConfig(yaw=False, flip=False)
        self.seed = int(seed)
        self.refine = refine
        self.epoch = 0
        self.pairs = pairs if pairs is not None else list_pairs(self.data_root, split, self.labels_root)
        self._logs: dict[str, AV2Log] = {}

    def __len__(self) -> int:
        return len(self.pairs)

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draw of ``epoch`` (call before iterating, as with DistributedSampler)."""
        self.epoch = int(epoch)

    def _log(self, ref: PairRef) -> AV2Log:
        if ref.log_dir not in self._logs:
            self._logs[ref.log_dir] = AV2Log(Path(ref.log_dir))
        return self._logs[ref.log_dir]

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.load(i, self.epoch)

    def load(self, i: int, epoch: int = 0) -> dict[str, Any]:
        ref = self.pairs[i]
        lg = self._log(ref)
        try:
            pair = lg.pair(ref.ts0, ref.ts1, with_gt=False)
        except DataError as exc:
            raise DatasetError(str(exc)) from None
        if self.labels_root is None:
            path = lg.log_dir / 'scene_flow' / f'{ref.ts0}.feather'
        else:
            path = label_path(self.labels_root, ref.log_id, ref.ts0)
        flow_av2, valid = read_labels(path, len(pair.points0))
        prep = prepare_pair(pair.points0, pair.points1, pair.ego1_T_ego0, self.preprocess,
                            is_ground0=pair.is_ground0, is_ground1=pair.is_ground1)
        pc0, pc1 = prep.pc0.astype(np.float64), prep.pc1.astype(np.float64)
        target = av2_to_residual(prep.pc0, flow_av2[prep.mask0], pair.ego1_T_ego0).astype(np.float64)
        valid0 = valid[prep.mask0]
        if self.refine is not None:
            # before augmentation: the clusters and the speed threshold live in the ego frame
            target = refine_labels(prep.pc0, target, valid0 & np.isfinite(target).all(axis=1),
                                   self.refine).astype(np.float64)
        if self.augment.enabled:
            rng = np.random.default_rng([self.seed, int(epoch), int(i)])
            yaw = rng.uniform(-np.pi, np.pi) if self.augment.yaw else 0.0
            flip = bool(rng.random() < 0.5) if self.augment.flip else False
            R = yaw_flip_matrix(yaw, flip)
            pc0, pc1, target = pc0 @ R.T, pc1 @ R.T, target @ R.T
        keep0, p0, idx0 = pillarize(pc0.astype(np.float32), self.grid)
        keep1, p1, idx1 = pillarize(pc1.astype(np.float32), self.grid)
        tgt = target[keep0].astype(np.float32)
        v = valid0[keep0] & np.isfinite(tgt).all(axis=1)
        tgt[~v] = 0.0
        # rows of the lidar files that the student sees (to scatter predictions back)
        index0 = np.flatnonzero(prep.mask0)[keep0]
        index1 = np.flatnonzero(prep.mask1)[keep1]
        return {'pc0': p0, 'idx0': idx0, 'pc1': p1, 'idx1': idx1, 'target': tgt, 'valid': v,
                'index0': index0, 'index1': index1, 'log_id': ref.log_id, 'ts0': ref.ts0}


def collate(items: list[dict[str, Any]], num_pillars: int) -> dict[str, Any]:
    """Concatenate pairs into one batch: pillar indices of pair ``b`` offset by ``b * num_pillars``."""
    import torch
    out: dict[str, Any] = {}
    for key in ('pc0', 'pc1', 'target'):
        out[key] = torch.from_numpy(np.concatenate([it[key] for it in items]).astype(np.float32))
    for key in ('idx0', 'idx1'):
        out[key] = torch.from_numpy(np.concatenate([it[key] + b * num_pillars for b, it in enumerate(items)]))
    out['valid'] = torch.from_numpy(np.concatenate([it['valid'] for it in items]))
    out['batch_index'] = torch.from_numpy(
        np.concatenate([np.full(len(it['pc0']), b, dtype=np.int64) for b, it in enumerate(items)]))
    out['batch_size'] = len(items)
    out['keys'] = [(it['log_id'], it['ts0']) for it in items]
    return out


class Collate:
    """Picklable collate_fn for DataLoader workers."""

    def __init__(self, num_pillars: int):
        self.num_pillars = int(num_pillars)

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        return collate(items, self.num_pillars)
