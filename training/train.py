r"""``zeroflow train``: distil NSFP pseudo-labels into the FastFlow3D student (ZeroFlow).

    zeroflow train --labels LABELS --data DATA_ROOT --config training/configs/cpu_small.yaml \\
        --out runs/cpu_small [--resume] [--device auto|cpu|cuda|cuda:N] [--val-split val]

Multi-GPU: ``torchrun --nproc_per_node=N -m zeroflow_training.train --labels ...`` (DDP is used
whenever ``WORLD_SIZE`` is set; each process gets ``batch_size`` pairs per step).

Run folder: ``last.pt`` (full state, rewritten every epoch and on SIGINT/SIGTERM; ``--resume``
continues from it to the exact same curve), ``model.pt`` (the same weights + configs without the
optimizer, written alongside: what ``zeroflow export`` and the backends load), ``best.pt``
(lowest validation EPE 3-way when a validation split exists), ``metrics.csv`` (one row per step and
per validation), ``config.yaml`` (the resolved configuration) and TensorBoard events when
``tensorboard`` is installed.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import logging
import math
import os
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent / 'configs'
AMP_MODES = ('none', 'bf16', 'fp16')
SCHEDULERS = ('constant', 'cosine')
METRIC_FIELDS = ('time', 'split', 'epoch', 'step', 'loss', 'epe', 'mean_weight', 'valid_points', 'lr',
                 'seconds', 'epe_3way', 'epe_fg_dynamic', 'epe_fg_static', 'epe_bg_static', 'dynamic_iou',
                 'pairs')


class TrainError(ValueError):
    """Bad training configuration, arguments or run folder (names the key/file and what was expected)."""


@dataclass
class TrainConfig:
    """Everything a run depends on; saved in every checkpoint (``train_config``) and in config.yaml."""

    model: str = 'cpu_small'                 # registered FastFlow3D config (zeroflow_ros.model.MODEL_CONFIGS)
    model_overrides: dict = field(default_factory=dict)
    loss: str = 'zeroflow_speed_scaled'      # zeroflow_training.losses.LOSSES
    # Loss of the first ``warmup_loss_epochs`` epochs ('' = none). See configs/cpu_small.yaml for why a
    # squared-error warm-up: the paper's norm loss alone can stall at "movers have zero flow".
    warmup_loss: str = ''
    warmup_loss_epochs: int = 0
    # checkpoint whose weights start the run (fine-tuning, e.g. the shipped model on your own drives);
    # '' = random initialisation. The optimiser, schedule and step count start fresh.
    init_from: str = ''
    # zeroflow_training.refine.RefineConfig keys ({} = train on the raw teacher labels, as ZeroFlow)
    label_refine: dict = field(default_factory=dict)
    frame_rate_hz: float = 10.0              # converts m/frame to m/s for the speed weight
    lr: float = 2e-6
    weight_decay: float = 0.0
    scheduler: str = 'constant'
    warmup_steps: int = 0
    epochs: int = 50
    batch_size: int = 16
    num_workers: int = 2
    grad_clip: float = 0.0                   # 0: off
    amp: str = 'none'                        # bf16 | fp16 autocast on CUDA; ignored on CPU
    seed: int = 0
    augment_yaw: bool = True
    augment_flip: bool = True
    val_max_pairs: int = 0                   # 0: the whole validation split
    val_every: int = 1                       # epochs
    preprocess: dict = field(default_factory=dict)   # zeroflow_ros.core.preprocess.PreprocessConfig keys

    def validate(self) -> None:
        from zeroflow_ros.model import MODEL_CONFIGS, ModelError, get_config
        from zeroflow_training.losses import LOSSES
        if self.model not in MODEL_CONFIGS:
            raise TrainError(f'config model: unknown {self.model!r}; valid: {sorted(MODEL_CONFIGS)}')
        try:
            get_config(self.model, **self.model_overrides)
        except (ModelError, TypeError) as exc:
            raise TrainError(f'config model_overrides: {exc}') from None
        if self.loss not in LOSSES:
            raise TrainError(f'config loss: unknown {self.loss!r}; valid: {sorted(LOSSES)}')
        if self.warmup_loss and self.warmup_loss not in LOSSES:
            raise TrainError(f'config warmup_loss: unknown {self.warmup_loss!r}; valid: {sorted(LOSSES)} '
                             "or '' for none")
        if int(self.warmup_loss_epochs) and not self.warmup_loss:
            raise TrainError(f'config warmup_loss_epochs: {self.warmup_loss_epochs} epochs of which loss? '
                             'set warmup_loss too')
        if self.amp not in AMP_MODES:
            raise TrainError(f'config amp: {self.amp!r} is not one of {AMP_MODES}')
        if self.scheduler not in SCHEDULERS:
            raise TrainError(f'config scheduler: {self.scheduler!r} is not one of {SCHEDULERS}')
        for name in ('epochs', 'batch_size', 'val_every'):
            if int(getattr(self, name)) < 1:
                raise TrainError(f'config {name}: must be >= 1, got {getattr(self, name)}')
        for name in ('num_workers', 'warmup_steps', 'val_max_pairs', 'warmup_loss_epochs'):
            if int(getattr(self, name)) < 0:
                raise TrainError(f'config {name}: must be >= 0, got {getattr(self, name)}')
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise TrainError(f'config lr: must be a positive number, got {self.lr}')
        if not self.frame_rate_hz > 0:
            raise TrainError(f'config frame_rate_hz: must be > 0, got {self.frame_rate_hz}')
        self.preprocess_config()
        self.refine_config()

    def refine_config(self):
        from zeroflow_training.refine import RefineConfig, RefineError
        try:
            return RefineConfig.from_dict(self.label_refine)
        except (RefineError, TypeError, ValueError) as exc:
            raise TrainError(f'config label_refine: {exc}') from None

    def preprocess_config(self):
        from zeroflow_ros.core.preprocess import PreprocessConfig, PreprocessError
        try:
            return PreprocessConfig.from_dict(self.preprocess)
        except (PreprocessError, TypeError) as exc:
            raise TrainError(f'config preprocess: {exc}') from None

    def model_config(self):
        from zeroflow_ros.model import get_config
        return get_config(self.model, **self.model_overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = 'config') -> 'TrainConfig':
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(valid))
        if unknown:
            raise TrainError(f'{where}: unknown keys {unknown}; valid: {valid}')
        try:
            cfg = cls(**d)
        except TypeError as exc:
            raise TrainError(f'{where}: {exc}') from None
        for f in dataclasses.fields(cls):
            v = getattr(cfg, f.name)
            want = {'int': int, 'float': float, 'bool': bool, 'str': str, 'dict': dict}.get(str(f.type))
            if want is float and isinstance(v, int) and not isinstance(v, bool):
                setattr(cfg, f.name, float(v))
            elif want is float and isinstance(v, str) and _is_number(v):
                # YAML 1.1 reads 1e-4 (no dot) as a string
                setattr(cfg, f.name, float(v))
            elif want is not None and not isinstance(v, want):
                raise TrainError(f'{where}: {f.name} must be {want.__name__}, got {v!r}')
        cfg.validate()
        return cfg

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> 'TrainConfig':
        import yaml
        p = resolve_config_path(path)
        try:
            d = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise TrainError(f'{p}: not valid YAML ({exc})') from None
        if not isinstance(d, dict):
            raise TrainError(f'{p}: expected a mapping of config keys, got {type(d).__name__}')
        return cls.from_dict(d, where=str(p))


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def resolve_config_path(path: str | os.PathLike) -> Path:
    """Resolve a config file path, or the name of a shipped one (``default``, ``cpu_small``)."""
    p = Path(path)
    if p.is_file():
        return p
    shipped = CONFIG_DIR / f'{p.name}.yaml' if p.suffix == '' else CONFIG_DIR / p.name
    if shipped.is_file():
        return shipped
    names = sorted(q.stem for q in CONFIG_DIR.glob('*.yaml'))
    raise TrainError(f'config {path}: no such file (shipped configs: {names})')


# --- distributed helpers ------------------------------------------------------------------------

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_arg: str) -> tuple[Dist, Any]:
    """Init DDP when launched by torchrun (``WORLD_SIZE`` set) and pick the device."""
    import torch
    import torch.distributed as td
    world = int(os.environ.get('WORLD_SIZE', '1'))
    dist = Dist()
    if world > 1:
        dist = Dist(int(os.environ.get('RANK', '0')), world, int(os.environ.get('LOCAL_RANK', '0')))
    want = device_arg
    if want == 'auto':
        want = 'cuda' if torch.cuda.is_available() else 'cpu'
    if want.startswith('cuda'):
        if not torch.cuda.is_available():
            raise TrainError(f'--device {device_arg}: CUDA is not available here (use --device cpu)')
        device = torch.device('cuda', dist.local_rank if want == 'cuda' else torch.device(want).index or 0)
        torch.cuda.set_device(device)
    elif want == 'cpu':
        device = torch.device('cpu')
    else:
        raise TrainError(f'--device: expected auto, cpu, cuda or cuda:N, got {device_arg!r}')
    if world > 1 and not td.is_initialized():
        import datetime
        td.init_process_group(backend='nccl' if device.type == 'cuda' else 'gloo',
                              timeout=datetime.timedelta(minutes=30))
    return dist, device


class StopFlag:
    """SIGINT/SIGTERM set a flag; the loop checkpoints at the next step boundary and exits."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> 'StopFlag':
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread (e.g. called from a test worker): no handlers
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:  # second signal: give up immediately
            raise KeyboardInterrupt
        self.signum = signum
        log.warning('%s received: saving a checkpoint after this step (again to abort)',
                    signal.Signals(signum).name)

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


# --- training ------------------------------------------------------------------------------------

def rng_state() -> dict[str, Any]:
    import torch
    st = {'torch': torch.get_rng_state(), 'python': list(random.getstate()[1]),
          'numpy': np.random.get_state()[1].tolist()}
    if torch.cuda.is_available():
        st['cuda'] = torch.cuda.get_rng_state_all()
    return st


def epoch_order(n: int, seed: int, epoch: int, dist: Dist) -> list[int]:
    """Shuffled indices of one epoch for this rank (DistributedSampler's rule: pad, then stride)."""
    import torch
    g = torch.Generator()
    g.manual_seed(seed * 100003 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    if dist.world > 1:
        total = math.ceil(n / dist.world) * dist.world
        order = (order + order[:total - n])[dist.rank:total:dist.world]
    return order


def make_scheduler(opt, cfg: TrainConfig, total_steps: int):
    import torch

    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
        if cfg.scheduler == 'cosine':
            return warm * 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / max(1, total_steps)))
        return warm
    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


class MetricsWriter:
    def __init__(self, run_dir: Path, enabled: bool):
        self.enabled = enabled
        self.path = run_dir / 'metrics.csv'
        self.tb = None
        if not enabled:
            return
        new = not self.path.exists()
        self._f = open(self.path, 'a', newline='')
        self._w = csv.DictWriter(self._f, fieldnames=METRIC_FIELDS, extrasaction='ignore')
        if new:
            self._w.writeheader()
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(run_dir / 'tb'))
        except Exception:  # tensorboard is optional
            self.tb = None

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._w.writerow({'time': f'{time.time():.3f}', **{k: _fmt(v) for k, v in row.items()}})
        self._f.flush()
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k not in ('epoch', 'step'):
                    self.tb.add_scalar(f'{row["split"]}/{k}', v, row['step'])

    def close(self) -> None:
        if self.enabled:
            self._f.close()
            if self.tb is not None:
                self.tb.close()


def _fmt(v: Any) -> Any:
    # repr keeps every bit of a float: the resume test compares curves exactly
    return repr(float(v)) if isinstance(v, float) else v


def batches(dataset, order: list[int], batch_size: int, start: int, num_workers: int, pin: bool,
            collate_fn) -> Iterator[dict[str, Any]]:
    """Batches ``start, start+1, ...`` of a fixed order (resume skips without loading)."""
    import torch
    chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)][start:]
    if not chunks:
        return iter(())
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=chunks, num_workers=num_workers,
                                         collate_fn=collate_fn, pin_memory=pin,
                                         persistent_workers=False,
                                         worker_init_fn=_ignore_stop_signals if num_workers else None)
    return iter(loader)


def _ignore_stop_signals(worker_id: int) -> None:
    # Ctrl-C reaches the whole process group: workers must not die before the main process has
    # written its checkpoint (it shuts them down itself)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _init_weights(model, model_cfg, path: str) -> str:
    """Load the weights of checkpoint ``path`` into ``model`` (same architecture required)."""
    from zeroflow_ros.model import FastFlow3DConfig, ModelError, read_checkpoint
    try:
        ck = read_checkpoint(path, map_location='cpu')
    except ModelError as exc:
        raise TrainError(f'config init_from: {exc}') from None
    if FastFlow3DConfig.from_dict(ck['model_config']) != model_cfg:
        raise TrainError(f'config init_from: {path} holds model {ck["model_config"]}, but this run trains '
                         f'{model_cfg.to_dict()}; choose the same model config (or --set model=...)')
    model.load_state_dict(ck['state_dict'])
    return f'initialised from {path} (epoch {ck.get("epoch")}, step {ck.get("step")})'


def train(cfg: TrainConfig, data_root: Path, labels: Path | None, run_dir: Path, resume: bool = False,
          device: str = 'auto', val_split: str | None = 'val', train_split: str = 'train',
          max_steps: int = 0, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) training; returns a summary. ``max_steps`` > 0 stops early with a checkpoint."""
    import torch

    from zeroflow_ros.model import (BatchedFastFlow3D, FastFlow3D, FastFlow3DConfig, read_checkpoint,
                                    save_checkpoint)
    from zeroflow_training.dataset import AugmentConfig, Collate, PairDataset
    from zeroflow_training.losses import get_loss

    cfg.validate()
    run_dir = Path(run_dir)
    dist, dev = setup_distributed(device)
    last = run_dir / 'last.pt'
    if resume and not last.is_file():
        raise TrainError(f'--resume: {last} not found (nothing to resume in {run_dir})')
    if not resume and last.is_file():
        raise TrainError(f'{run_dir} already holds a run ({last}); pass --resume to continue it '
                         'or choose another --out')
    if dist.main:
        run_dir.mkdir(parents=True, exist_ok=True)

    model_cfg = cfg.model_config()
    pre_cfg = cfg.preprocess_config()
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    train_set = PairDataset(data_root, train_split, labels, model_cfg, pre_cfg,
                            AugmentConfig(cfg.augment_yaw, cfg.augment_flip), seed=cfg.seed,
                            refine=cfg.refine_config() if labels is not None else None)
    val_ok = val_split is not None and (Path(data_root) / val_split).is_dir()
    if val_split and not val_ok and dist.main:
        log.warning('no validation split %s: training without validation', Path(data_root) / val_split)

    if dev.type == 'cuda':
        # the pseudo-image has a fixed size per config, so cuDNN's autotuned kernels are reused
        torch.backends.cudnn.benchmark = True
    model = FastFlow3D(model_cfg).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(math.ceil(len(train_set) / dist.world) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    sched = make_scheduler(opt, cfg, total_steps)
    use_amp = dev.type == 'cuda' and cfg.amp != 'none'
    amp_dtype = torch.bfloat16 if cfg.amp == 'bf16' else torch.float16
    scaler = torch.amp.GradScaler('cuda', enabled=use_amp and cfg.amp == 'fp16')

    step = 0
    best = math.inf
    init_note = None
    if resume:
        ck = read_checkpoint(last, map_location='cpu')
        if FastFlow3DConfig.from_dict(ck['model_config']) != model_cfg:  # (the description may differ)
            raise TrainError(f'{last}: model_config {ck["model_config"]} differs from the config '
                             f'{model_cfg.to_dict()}; resume with the config of the run '
                             f'({run_dir / "config.yaml"})')
        model.load_state_dict(ck['state_dict'])
        opt.load_state_dict(ck['optimizer'])
        sched.load_state_dict(ck['scheduler'])
        if ck.get('scaler'):
            scaler.load_state_dict(ck['scaler'])
        step = int(ck['step'])
        best = float(ck['extra'].get('best_val', math.inf))
        old = ck.get('train_config') or {}
        changed = sorted(k for k, v in cfg.to_dict().items() if k in old and old[k] != v)
        if changed and dist.main:
            # allowed (e.g. more epochs to extend a run) but the curve is then not the planned one
            log.warning('resuming with changed settings: %s',
                        ', '.join(f'{k} {old[k]!r} -> {getattr(cfg, k)!r}' for k in changed))
        rs = ck.get('rng_state') or {}
        if 'torch' in rs:
            torch.set_rng_state(rs['torch'])
        if dist.main:
            log.info('resumed %s at epoch %d, step %d', last, step // steps_per_epoch, step)
    elif cfg.init_from:
        init_note = _init_weights(model, model_cfg, cfg.init_from)
    if not resume and dist.main:
        import yaml
        (run_dir / 'config.yaml').write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))

    if init_note and dist.main:
        log.info('%s', init_note)
    net: torch.nn.Module = BatchedFastFlow3D(model)
    if dist.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[dev.index] if dev.type == 'cuda' else None)
    main_loss = get_loss(cfg.loss, frame_rate_hz=cfg.frame_rate_hz)
    warm_loss = get_loss(cfg.warmup_loss, frame_rate_hz=cfg.frame_rate_hz) if cfg.warmup_loss else main_loss
    metrics = MetricsWriter(run_dir, dist.main)
    collate_fn = Collate(model_cfg.grid.num_pillars)
    pin = dev.type == 'cuda'
    train_cfg_dict = {**cfg.to_dict(), 'data_root': str(data_root), 'labels': str(labels) if labels else None,
                      'train_split': train_split, 'val_split': val_split if val_ok else None,
                      'preprocess_resolved': pre_cfg.to_dict()}

    def save(path: Path, epoch: int, full: bool = True, extra: dict | None = None) -> None:
        if dist.main:
            save_checkpoint(path, model, train_config=train_cfg_dict, epoch=epoch, step=step,
                            optimizer=opt if full else None, scheduler=sched if full else None,
                            scaler=scaler if full and scaler.is_enabled() else None,
                            rng_state=rng_state() if full else None,
                            extra={'best_val': best, **(extra or {})})

    if dist.main:
        log.info('training %s (%s params, grid %dx%d) on %s: %d pairs, %d steps/epoch x %d epochs, '
                 'batch %d x %d process(es), amp %s', model_cfg.name, f'{model.num_parameters():,}',
                 *model_cfg.grid.shape, dev, len(train_set), steps_per_epoch, cfg.epochs, cfg.batch_size,
                 dist.world, cfg.amp if use_amp else 'off')
    stopped = None
    skipped = 0
    epoch_times: list[float] = []
    last_val: dict[str, float] = {}
    with StopFlag() as stop:
        start_epoch = step // steps_per_epoch
        for epoch in range(start_epoch, cfg.epochs):
            train_set.set_epoch(epoch)
            # chosen by epoch number alone, so a resumed run switches at the same step
            loss_fn = warm_loss if epoch < cfg.warmup_loss_epochs else main_loss
            order = epoch_order(len(train_set), cfg.seed, epoch, dist)
            start = step - epoch * steps_per_epoch
            it = batches(train_set, order, cfg.batch_size, start, cfg.num_workers, pin, collate_fn)
            bar = None
            if progress and dist.main:
                from tqdm import tqdm
                bar = tqdm(total=steps_per_epoch, initial=start, desc=f'epoch {epoch + 1}/{cfg.epochs}',
                           dynamic_ncols=True, leave=False)
            model.train()
            t_epoch = time.perf_counter()
            for batch in it:
                t0 = time.perf_counter()
                b = batch['batch_size']
                tens = {k: batch[k].to(dev, non_blocking=pin) for k in
                        ('pc0', 'idx0', 'pc1', 'idx1', 'target', 'valid', 'batch_index')}
                if _all_ranks_any(len(tens['pc0']) < 2 or len(tens['pc1']) < 2, dist, dev):
                    # BatchNorm cannot normalise a batch without points; every rank skips together
                    skipped += 1
                    log.warning('step skipped: a batch without points in range (pairs %s)', batch['keys'])
                    continue
                ctx = torch.autocast(dev.type, dtype=amp_dtype) if use_amp else contextlib.nullcontext()
                with ctx:
                    flow = net(tens['pc0'], tens['idx0'], tens['pc1'], tens['idx1'], b)
                out = loss_fn(flow.float(), tens['target'], tens['valid'], tens['batch_index'], b)
                opt.zero_grad(set_to_none=True)
                scaler.scale(out.loss).backward()
                if cfg.grad_clip > 0:
                    scaler.unscale_(opt)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                scaler.step(opt)
                scaler.update()
                lr = opt.param_groups[0]['lr']
                sched.step()
                step += 1
                if not math.isfinite(out.logs['loss']):
                    save(run_dir / 'nonfinite.pt', epoch)
                    raise TrainError(f'loss became {out.logs["loss"]} at step {step} '
                                     f'(pairs {batch["keys"]}); state saved to {run_dir / "nonfinite.pt"}; '
                                     'lower lr or set grad_clip')
                logs = _mean_over_ranks(out.logs, dist, dev)
                metrics.write({'split': 'train', 'epoch': epoch, 'step': step, 'lr': lr,
                               'seconds': time.perf_counter() - t0, **logs})
                if bar is not None:
                    bar.set_postfix(loss=f'{logs["loss"]:.4f}', epe=f'{logs["epe"]:.3f}')
                    bar.update(1)
                if stop.signum is not None or (max_steps and step >= max_steps):
                    stopped = signal.Signals(stop.signum).name if stop.signum else 'max_steps'
                    break
            if bar is not None:
                bar.close()
            if stopped:
                save(last, epoch)
                save(run_dir / 'model.pt', epoch, full=False, extra={'val': last_val, 'stopped': stopped})
                if dist.main:
                    log.info('stopped (%s) at step %d: checkpoint %s; continue with --resume',
                             stopped, step, last)
                break
            epoch_times.append(time.perf_counter() - t_epoch)
            if val_ok and ((epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs):
                if dist.world > 1:
                    # BatchNorm running stats drift per rank after the last step (DDP re-syncs them
                    # only at the next forward): validate every rank with rank 0's, the saved ones
                    import torch.distributed as td
                    for buf in model.buffers():
                        td.broadcast(buf, 0)
                last_val = validate(model, data_root, val_split, pre_cfg, cfg.val_max_pairs, dist)
                metrics.write({'split': 'val', 'epoch': epoch, 'step': step, **last_val})
                if dist.main:
                    log.info('epoch %d: val EPE 3-way %.4f (FD %.4f, FS %.4f, BS %.4f), dynamic IoU %.3f',
                             epoch + 1, last_val['epe_3way'], last_val['epe_fg_dynamic'],
                             last_val['epe_fg_static'], last_val['epe_bg_static'], last_val['dynamic_iou'])
                v = last_val['epe_3way']
                if math.isfinite(v) and v < best:
                    best = v
                    save(run_dir / 'best.pt', epoch + 1, full=False, extra={'val': last_val})
            save(last, epoch + 1)
            # the latest weights alone, always loadable by export/backends even if the run is cut later
            save(run_dir / 'model.pt', epoch + 1, full=False, extra={'val': last_val})
            if dist.main:
                log.info('epoch %d/%d done in %.1f s (step %d)', epoch + 1, cfg.epochs, epoch_times[-1], step)
    metrics.close()
    if dist.world > 1:
        import torch.distributed as td
        td.barrier()
        td.destroy_process_group()
    return {'step': step, 'stopped': stopped, 'epoch_seconds': epoch_times, 'val': last_val,
            'run_dir': str(run_dir), 'skipped_batches': skipped}


def _all_ranks_any(flag: bool, dist: Dist, dev) -> bool:
    if dist.world == 1:
        return flag
    import torch
    import torch.distributed as td
    t = torch.tensor([1.0 if flag else 0.0], device=dev)
    td.all_reduce(t, op=td.ReduceOp.MAX)
    return bool(t.item() > 0)


def _mean_over_ranks(logs: dict[str, float], dist: Dist, dev) -> dict[str, float]:
    """Average the step's figures over the processes (the curve then describes the global batch)."""
    if dist.world == 1:
        return logs
    import torch
    import torch.distributed as td
    keys = ('loss', 'epe', 'mean_weight', 'valid_points')
    t = torch.tensor([float(logs.get(k, 0.0)) for k in keys], device=dev, dtype=torch.float64)
    td.all_reduce(t)
    out = dict(logs)
    for k, v in zip(keys, (t / dist.world).tolist()):
        out[k] = v
    out['valid_points'] = int(round(out['valid_points'] * dist.world))
    return out


# --- validation ------------------------------------------------------------------------------------

def validate(model, data_root: Path, split: str, pre_cfg, max_pairs: int = 0,
             dist: Dist | None = None) -> dict[str, float]:
    """AV2 three-way metrics of the student on a split with ground truth (official eval rules).

    The student scores the points ``prepare_pair`` keeps and that fall in its grid; every other
    point gets the static-world flow, as ``zeroflow predict`` writes it. Under DDP each process
    scores every ``world``-th pair and the per-pair rows are gathered, so every rank returns the
    same figures and none waits idle on a collective while one rank validates alone.
    """
    import torch

    from zeroflow_ros.core.geometry import residual_to_av2
    from zeroflow_ros.core.preprocess import prepare_pair
    from zeroflow_ros.eval.metrics import (ThreeWayAccumulator, close_mask, compute_example, eval_point_mask,
                                           official_gt_flow)
    from zeroflow_ros.model import predict_flow
    from zeroflow_ros.data.av2 import AV2Log
    from zeroflow_training.dataset import list_pairs

    was_training = model.training
    model.eval()
    dist = dist or Dist()
    pairs = list_pairs(Path(data_root), split, None)
    if max_pairs:
        pairs = pairs[:: max(1, len(pairs) // max_pairs)][:max_pairs]
    logs: dict[str, AV2Log] = {}
    rows = []
    for ref in pairs[dist.rank::dist.world]:
        lg = logs.setdefault(ref.log_dir, AV2Log(Path(ref.log_dir)))
        pair = lg.pair(ref.ts0, ref.ts1, with_gt=True)
        gt = pair.gt
        if gt is None:
            continue
        prep = prepare_pair(pair.points0, pair.points1, pair.ego1_T_ego0, pre_cfg,
                            is_ground0=pair.is_ground0, is_ground1=pair.is_ground1)
        with torch.no_grad():
            res_kept, _ = predict_flow(model, prep.pc0, prep.pc1)
        residual = np.zeros_like(pair.points0)
        residual[prep.mask0] = res_kept
        flow = residual_to_av2(pair.points0, residual, pair.ego1_T_ego0)
        ground = pair.is_ground0
        if ground is None:
            ground = _gt_ground(lg, ref.ts0, len(pair.points0))
        m = eval_point_mask(pair.points0, ground)
        dyn = np.linalg.norm(residual, axis=1) >= 0.05
        rows.append(compute_example(flow[m], dyn[m], official_gt_flow(gt.flow[m]), gt.category_indices[m],
                                    gt.is_dynamic[m], close_mask(pair.points0[m]), gt.is_valid[m]))
    model.train(was_training)
    if dist.world > 1:
        import torch.distributed as td
        gathered: list[Any] = [None] * dist.world
        td.all_gather_object(gathered, rows)
        rows = [r for part in gathered for r in part]
    acc = ThreeWayAccumulator()
    for r in rows:
        acc.add(r)
    if acc.num_examples == 0:
        raise TrainError(f'{Path(data_root) / split}: no pair with ground truth to validate on')
    r = acc.results()
    return {'epe_3way': r['EPE 3-Way Average'], 'epe_fg_dynamic': r['EPE/Foreground/Dynamic'],
            'epe_fg_static': r['EPE/Foreground/Static'], 'epe_bg_static': r['EPE/Background/Static'],
            'dynamic_iou': r['Dynamic IoU'], 'pairs': acc.num_examples}


def _gt_ground(lg, ts0: int, n: int) -> np.ndarray:
    from zeroflow_ros.data.av2 import read_feather
    path = lg.log_dir / 'scene_flow' / f'{int(ts0)}.feather'
    tab = read_feather(path)
    if 'is_ground' not in tab.column_names:
        raise TrainError(f'{path}: no map ground raster and no is_ground column: cannot build the eval mask')
    g = tab.column('is_ground').to_numpy(zero_copy_only=False).astype(bool)
    if g.shape != (n,):
        raise TrainError(f'{path}: is_ground has {len(g)} rows, the sweep {n}')
    return g


# --- CLI -------------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--labels', required=True, help='pseudo-label folder LABELS/<log_id>/<ts>.feather '
                        '(`zeroflow label`); "gt" trains on the synthetic ground truth instead')
    parser.add_argument('--data', required=True,
                        help='dataset root with DATA_ROOT/<split>/<log_id>/ (AV2 layout)')
    parser.add_argument('--config', default='cpu_small',
                        help='YAML config file or a shipped name (default, cpu_small); default: cpu_small')
    parser.add_argument('--out', default=None, help='run folder (default: runs/<config name>)')
    parser.add_argument('--resume', action='store_true', help='continue the run in --out from last.pt')
    parser.add_argument('--init', default=None, metavar='CKPT',
                        help='start from the weights of this checkpoint (fine-tuning; same model config), '
                        'e.g. models/default/model.pt')
    parser.add_argument('--device', default='auto', help='auto (cuda if available), cpu, cuda, cuda:N')
    parser.add_argument('--train-split', default='train', help='split folder to train on (default: train)')
    parser.add_argument('--val-split', default='val',
                        help='split with ground truth to validate on each epoch '
                        '(default: val; "none" to skip)')
    parser.add_argument('--max-steps', type=int, default=0,
                        help='stop after this many steps in total with a resumable checkpoint (0: no limit)')
    parser.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                        help='override a config key (YAML value), e.g. --set epochs=5 --set lr=1e-4')
    parser.add_argument('--no-progress', action='store_true', help='no tqdm bar (logs only)')


def _apply_overrides(cfg: TrainConfig, sets: list[str]) -> TrainConfig:
    import yaml
    d = cfg.to_dict()
    for s in sets:
        if '=' not in s:
            raise TrainError(f'--set {s!r}: expected KEY=VALUE')
        k, v = s.split('=', 1)
        d[k.strip()] = yaml.safe_load(v)
    return TrainConfig.from_dict(d, where='--set')


def run(args: argparse.Namespace) -> int:
    try:
        cfg = _apply_overrides(TrainConfig.from_yaml(args.config), args.set)
        if args.init:
            cfg = dataclasses.replace(cfg, init_from=str(args.init))
        cfg_name = resolve_config_path(args.config).stem
        out = Path(args.out) if args.out else Path('runs') / cfg_name
        labels = None if args.labels == 'gt' else Path(args.labels)
        if labels is not None and not labels.is_dir():
            raise TrainError(f'--labels {labels}: folder not found (expected LABELS/<log_id>/<ts>.feather)')
        val = None if args.val_split in ('', 'none') else args.val_split
        summary = train(cfg, Path(args.data), labels, out, resume=args.resume, device=args.device,
                        val_split=val, train_split=args.train_split, max_steps=args.max_steps,
                        progress=not args.no_progress)
    except ValueError as exc:  # our errors all derive from ValueError and name the file/key
        log.error('%s', exc)
        return 2
    if summary['stopped'] not in (None, 'max_steps'):
        return 130
    if int(os.environ.get('RANK', '0')) != 0:
        return 0
    ep = summary['epoch_seconds']
    print(f'run folder: {summary["run_dir"]}  steps: {summary["step"]}'
          + (f'  mean epoch: {np.mean(ep):.1f} s' if ep else ''))
    if summary['val']:
        print('validation: ' + ', '.join(f'{k} {v:.4f}' for k, v in summary['val'].items()))
    return 0


def main() -> int:
    """Entry for ``torchrun -m zeroflow_training.train``."""
    import sys
    parser = argparse.ArgumentParser(prog='zeroflow train', description=__doc__.split('\n')[0])
    add_arguments(parser)
    logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')
    return run(parser.parse_args(sys.argv[1:]))


if __name__ == '__main__':
    raise SystemExit(main())
