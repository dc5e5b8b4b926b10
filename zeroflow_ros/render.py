"""``zeroflow render``: bird's-eye-view pictures of scene flow (PNG per sweep, optional GIF).

::

    zeroflow render OUT_BAG --out DIR [--topic /zeroflow_node/output/flow] [--gt DATA_ROOT] [--gif]
    zeroflow render PRED_DIR --out DIR --gt DATA_ROOT [--gif]        # zeroflow predict / label output

INPUT is either

* a rosbag2 (``zeroflow replay --record``) holding the node's flow cloud (PointCloud2 with x, y, z,
  flow_x, flow_y, flow_z [, speed, is_dynamic]; residual flow), the topic found automatically, or
* a predictions / pseudo-labels folder in the AV2 layout (``<log_id>/<ts_ns>.feather`` with
  ``flow_t{x,y,z}_m`` [, ``is_dynamic``, ``is_valid``]); the points come from DATA_ROOT
  (``DATA_ROOT[/<split>]/<log_id>/sensors/lidar``) and the AV2 flow is turned into residual flow with
  the log's poses (``core/geometry.py``), so both inputs show the same thing: motion w.r.t. the world.

Picture: x forward is up, y left is left, the ego vehicle a box at the origin. Points are coloured
by flow direction (hue, the colour wheel in the corner) and speed (saturation and value: static
is grey, faster is brighter and more saturated, full at ``--max-speed``); arrows show every n-th
dynamic point (``--arrow-every``) scaled ``--arrow-scale`` times its per-sweep flow; a scale bar
sits bottom left. With ground truth (DATA_ROOT with ``scene_flow/<ts>.feather``, synthetic logs)
a second panel shows the ground truth and a third the end-point error.
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

log = logging.getLogger(__name__)

FLOW_FIELDS = ('flow_x', 'flow_y', 'flow_z')
AV2_FLOW_COLUMNS = ('flow_tx_m', 'flow_ty_m', 'flow_tz_m')
BACKGROUND = (0.08, 0.08, 0.10)
STATIC_VALUE = 0.45  # grey level of static points on the dark background
DYNAMIC_MIN_SAT = 0.4  # saturation of the slowest dynamic point
_LABEL_BOX = {'facecolor': BACKGROUND, 'edgecolor': 'none', 'alpha': 0.8, 'pad': 2}


class RenderError(ValueError):
    """An input cannot be rendered (names the file/topic and what was expected)."""


@dataclass
class RenderConfig:
    range_m: float = 40.0          # half width of the square view (m)
    px: int = 800                  # one panel is px x px pixels
    max_speed: float = 10.0        # m/s at full colour
    point_size: float = 1.5        # marker area (points^2)
    arrow_every: int = 20          # every n-th dynamic point gets an arrow
    max_arrows: int = 300          # then at most this many, evenly spread (a picture, not a hedgehog)
    arrow_scale: float = 5.0       # arrow = scale x per-sweep flow
    dynamic_threshold: float = 0.5  # m/s, for inputs without is_dynamic
    max_error: float = 0.5         # m, top of the error colour scale
    dpi: int = 100
    note: str = ''                 # drawn in orange on the prediction panel (e.g. 'UNTRAINED MODEL')

    def __post_init__(self) -> None:
        for name in ('range_m', 'max_speed', 'point_size', 'arrow_scale', 'max_error'):
            if not getattr(self, name) > 0:
                raise RenderError(f'{name}={getattr(self, name)}: expected > 0')
        if self.px < 64 or self.arrow_every < 1:
            raise RenderError(f'px={self.px} (>= 64), arrow_every={self.arrow_every} (>= 1) expected')

    def pixel_of(self, x: float, y: float, panel: int = 0) -> tuple[int, int]:
        """(row, col) in the saved image of ego-frame point (x, y) on ``panel`` (0 = prediction)."""
        r = self.range_m
        col = (-y + r) / (2 * r) * self.px + panel * self.px
        row = (r - x) / (2 * r) * self.px
        return int(row), int(col)


@dataclass
class FlowFrame:
    """What one picture shows: sweep t's points with residual flow (ego frame of sweep t)."""

    name: str
    stamp_ns: int
    points: np.ndarray                 # (N,3) float32
    flow: np.ndarray                   # (N,3) float32 residual flow
    speed: np.ndarray                  # (N,) m/s
    is_dynamic: np.ndarray             # (N,) bool
    valid: np.ndarray | None = None    # (N,) bool, points the method scored
    gt_flow: np.ndarray | None = None  # (N,3) residual
    gt_valid: np.ndarray | None = None
    gt_dynamic: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------- colours

def flow_colors(flow: np.ndarray, speed: np.ndarray, max_speed: float,
                dynamic: np.ndarray | None = None) -> np.ndarray:
    """(N,3) RGB: hue = BEV direction of motion on screen, saturation/value = speed / max_speed.

    With ``dynamic``, points not dynamic are grey and dynamic ones at least ``DYNAMIC_MIN_SAT``
    saturated, so a slow mover (0.5-2 m/s, a pedestrian, a braking truck) still stands out.
    """
    fx, fy = np.asarray(flow, np.float64)[:, 0], np.asarray(flow, np.float64)[:, 1]
    # Screen axes: right = -y, up = +x; hue 0 (red) = moving right on screen, counter-clockwise.
    ang = np.arctan2(fx, -fy)
    hue = np.mod(ang / (2 * np.pi), 1.0)
    s = np.clip(np.asarray(speed, np.float64) / max_speed, 0.0, 1.0)
    if dynamic is not None:
        s = np.where(np.asarray(dynamic, bool), DYNAMIC_MIN_SAT + (1.0 - DYNAMIC_MIN_SAT) * s, 0.0)
    v = STATIC_VALUE + (1.0 - STATIC_VALUE) * s
    return _hsv_to_rgb(hue, s, v)


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    from matplotlib.colors import hsv_to_rgb
    return hsv_to_rgb(np.stack([h, s, v], axis=-1).reshape(-1, 3)).reshape(np.shape(h) + (3,))


def wheel_image(size: int = 101) -> np.ndarray:
    """RGBA colour wheel: angle = direction on screen, radius = speed (centre static, rim max)."""
    c = (size - 1) / 2
    yy, xx = np.mgrid[0:size, 0:size]
    dx, dy = (xx - c) / c, (c - yy) / c  # screen right, screen up
    r = np.hypot(dx, dy)
    hue = np.mod(np.arctan2(dy, dx) / (2 * np.pi), 1.0)
    # The grey centre is "static"; moving points start at DYNAMIC_MIN_SAT, as flow_colors draws them.
    s = np.where(r < 0.1, 0.0, DYNAMIC_MIN_SAT + (1 - DYNAMIC_MIN_SAT) * np.clip(r, 0, 1))
    rgb = _hsv_to_rgb(hue, s, STATIC_VALUE + (1 - STATIC_VALUE) * s)
    alpha = (r <= 1.0).astype(np.float64)
    return np.concatenate([rgb, alpha[..., None]], axis=-1)


# ------------------------------------------------------------------------------------ inputs

def _is_bag(path: Path) -> bool:
    return (path.is_file() and path.suffix in ('.mcap', '.db3')) or (path / 'metadata.yaml').is_file() \
        or (path.is_dir() and any(path.glob('*.mcap')))


def iter_bag_frames(bag: Path, topic: str | None = None, gt_root: Path | None = None) -> Iterator[FlowFrame]:
    """Frames of a recorded flow bag (topic auto-detected: a PointCloud2 topic ending in /output/flow)."""
    from zeroflow_ros.core import pointcloud2 as pc2
    from zeroflow_ros.data.bag import BagError, _messages, _open_source
    from zeroflow_ros.replay import resolve_bag
    try:
        src = _open_source(resolve_bag(bag))
    except BagError as exc:
        raise RenderError(str(exc)) from None
    info = src.info
    try:
        if topic is None:
            cands = [t.name for t in info.topics.values()
                     if t.msgtype == 'sensor_msgs/msg/PointCloud2' and t.name.endswith('/output/flow')]
            if len(cands) != 1:
                raise RenderError(f'{bag}: cannot pick the flow topic ({len(cands)} PointCloud2 topics end '
                                  f'in /output/flow); pass --topic; the bag has {info.describe_topics()}')
            topic = cands[0]
        gt_index = _gt_index(gt_root) if gt_root else {}
        try:
            for k, (_, msg) in enumerate(_messages(src, topic, 'sensor_msgs/msg/PointCloud2')):
                try:
                    names = {f.name for f in msg.fields}
                    missing = [f for f in FLOW_FIELDS if f not in names]
                    if missing:
                        raise RenderError(f'{bag}: message {k} of {topic} lacks fields {missing} '
                                          f'(has {sorted(names)}); expected the node\'s flow cloud')
                    extra = [f for f in FLOW_FIELDS + ('speed', 'is_dynamic') if f in names]
                    cloud = pc2.decode(msg, extra_fields=extra, copy=True)
                except pc2.CloudError as exc:
                    raise RenderError(f'{bag}: message {k} of {topic}: {exc}') from None
                flow = np.stack([cloud.extra[f].astype(np.float32) for f in FLOW_FIELDS], axis=1)
                speed = cloud.extra['speed'].astype(np.float64) if 'speed' in cloud.extra else \
                    np.linalg.norm(flow, axis=1) * 10.0
                dyn = cloud.extra['is_dynamic'].astype(bool) if 'is_dynamic' in cloud.extra else \
                    speed >= 0.5
                stamp = int(msg.header.stamp.sec) * 1_000_000_000 + int(msg.header.stamp.nanosec)
                fr = FlowFrame(f'{Path(bag).stem}_{stamp}', stamp, cloud.xyz, flow, speed, dyn,
                               meta={'source': str(bag), 'topic': topic})
                if stamp in gt_index and cloud.n_input == len(cloud.xyz):
                    _attach_gt(fr, *gt_index[stamp])
                yield fr
        except Exception as exc:
            if isinstance(exc, RenderError):
                raise
            from zeroflow_ros.data.bag import BagError as _BE
            if isinstance(exc, _BE):
                raise RenderError(str(exc)) from None
            raise
    finally:
        src.close()


def _gt_index(root: Path) -> dict[int, tuple[Any, int, int]]:
    """Map stamp -> (AV2Log, ts0, ts1) for the sweeps of DATA_ROOT with a scene_flow file and a successor."""
    from zeroflow_ros.data.av2 import AV2Log
    out = {}
    for sf in sorted(Path(root).glob('**/scene_flow')):
        log_ = AV2Log(sf.parent)
        ts = log_.timestamps
        for t0, t1 in zip(ts[:-1], ts[1:]):
            if (sf / f'{int(t0)}.feather').is_file():
                out[int(t0)] = (log_, int(t0), int(t1))
    return out


def _attach_gt(fr: FlowFrame, log_: Any, ts0: int, ts1: int) -> None:
    from zeroflow_ros.core.geometry import av2_to_residual
    gt = log_.gt_flow(ts0, ts1)
    if gt is None or len(gt.flow) != len(fr.points):
        log.warning('%s: ground truth of %d has %s rows for %d points; not shown', log_.log_dir, ts0,
                    None if gt is None else len(gt.flow), len(fr.points))
        return
    T = log_.ego1_T_ego0(ts0, ts1)
    fr.gt_flow = av2_to_residual(fr.points, gt.flow, T)
    valid = gt.is_valid.copy()
    if gt.is_ground is not None:
        valid &= ~gt.is_ground
    fr.gt_valid = valid
    fr.gt_dynamic = gt.is_dynamic


def iter_prediction_frames(pred_dir: Path, data_root: Path | None,
                           dynamic_threshold: float = 0.5) -> Iterator[FlowFrame]:
    """Frames of a ``zeroflow predict`` / ``zeroflow label`` folder; points and poses from DATA_ROOT."""
    from zeroflow_ros.core.geometry import av2_to_residual
    from zeroflow_ros.data.av2 import AV2Log, DataError, read_feather
    files = sorted(Path(pred_dir).glob('*/*.feather'))
    if not files:
        raise RenderError(f'{pred_dir}: no <log_id>/<ts_ns>.feather files (expected a zeroflow predict or '
                          'label output folder) and not a bag')
    if data_root is None:
        raise RenderError(f'{pred_dir}: a predictions folder needs --gt DATA_ROOT for the points and poses')
    logs: dict[str, AV2Log] = {}
    for d in [Path(data_root)] + sorted(p for p in Path(data_root).iterdir() if p.is_dir()):
        for c in [d] + sorted(p for p in d.iterdir() if p.is_dir()):
            if (c / 'sensors' / 'lidar').is_dir():
                logs.setdefault(c.name, AV2Log(c))
    for f in files:
        log_id = f.parent.name
        if log_id not in logs:
            raise RenderError(f'{f}: log {log_id!r} not found under {data_root} '
                              f'(has {sorted(logs)[:5]})')
        lg = logs[log_id]
        try:
            ts0 = int(f.stem)
        except ValueError:
            raise RenderError(f'{f}: file name is not a nanosecond timestamp') from None
        ts = lg.timestamps
        i = int(np.searchsorted(ts, ts0))
        if i >= len(ts) - 1 or ts[i] != ts0:
            raise RenderError(f'{f}: sweep {ts0} has no successor in {lg.log_dir} (flow needs sweep t+1)')
        ts1 = int(ts[i + 1])
        try:
            tab = read_feather(f)
            pts = lg.points(ts0)
            T = lg.ego1_T_ego0(ts0, ts1)
        except DataError as exc:
            raise RenderError(str(exc)) from None
        missing = [c for c in AV2_FLOW_COLUMNS if c not in tab.column_names]
        if missing:
            raise RenderError(f'{f}: missing columns {missing} (has {tab.column_names})')
        if tab.num_rows != len(pts):
            raise RenderError(f'{f}: {tab.num_rows} rows but sweep {ts0} has {len(pts)} points')
        flow_av2 = np.stack([tab.column(c).to_numpy().astype(np.float32) for c in AV2_FLOW_COLUMNS], axis=1)
        flow = av2_to_residual(pts, np.nan_to_num(flow_av2), T)
        dt = (ts1 - ts0) / 1e9
        speed = np.linalg.norm(flow.astype(np.float64), axis=1) / dt
        dyn = tab.column('is_dynamic').to_numpy().astype(bool) if 'is_dynamic' in tab.column_names else \
            speed >= dynamic_threshold
        valid = tab.column('is_valid').to_numpy().astype(bool) if 'is_valid' in tab.column_names else None
        fr = FlowFrame(f'{log_id}_{ts0}', ts0, pts, flow, speed, dyn, valid,
                       meta={'source': str(f), 'dt': dt})
        if (lg.log_dir / 'scene_flow' / f'{ts0}.feather').is_file():
            _attach_gt(fr, lg, ts0, ts1)
        yield fr


def iter_frames(inp: Path, topic: str | None = None, gt_root: Path | None = None,
                dynamic_threshold: float = 0.5) -> Iterator[FlowFrame]:
    inp = Path(inp)
    from zeroflow_ros.replay import resolve_bag
    if _is_bag(resolve_bag(inp)):
        yield from iter_bag_frames(inp, topic, gt_root)
    elif inp.is_dir():
        yield from iter_prediction_frames(inp, gt_root, dynamic_threshold)
    else:
        raise RenderError(f'{inp}: neither a rosbag2 (folder with metadata.yaml / .mcap / .db3) nor a '
                          'predictions folder')


# ----------------------------------------------------------------------------------- drawing

def _draw_bev(ax: Any, cfg: RenderConfig, points: np.ndarray, colors: np.ndarray, order: np.ndarray,
              arrows: tuple[np.ndarray, np.ndarray] | None) -> None:
    from matplotlib.patches import Rectangle
    r = cfg.range_m
    ax.set_facecolor(BACKGROUND)
    ax.set_xlim(-r, r)
    ax.set_ylim(-r, r)
    ax.set_aspect('equal')
    ax.set_axis_off()
    u, v = -points[:, 1], points[:, 0]
    ax.scatter(u[order], v[order], c=colors[order], s=cfg.point_size, marker='s', linewidths=0)
    if arrows is not None and len(arrows[0]):
        p, f = arrows
        ax.quiver(-p[:, 1], p[:, 0], -f[:, 1] * cfg.arrow_scale, f[:, 0] * cfg.arrow_scale, angles='xy',
                  scale_units='xy', scale=1.0, color='white', width=0.0018, headwidth=4, alpha=0.85)
    # Ego vehicle: a 4.5 m x 1.9 m box, lidar at its centre, forward up.
    ax.add_patch(Rectangle((-0.95, -2.25), 1.9, 4.5, fill=False, edgecolor='white', linewidth=1.2))
    ax.plot([0, 0], [1.2, 2.25], color='white', linewidth=1.2)
    # Scale bar: 10 m (or a fifth of the view) bottom left.
    bar = 10.0 if r >= 20 else max(1.0, round(r / 5))
    x0, y0 = -r * 0.92, -r * 0.92
    ax.plot([x0, x0 + bar], [y0, y0], color='white', linewidth=2)
    ax.text(x0 + bar / 2, y0 + r * 0.025, f'{bar:g} m', color='white', ha='center', va='bottom', fontsize=9)
    if arrows is not None:
        ax.text(x0, y0 - r * 0.035, f'arrows: {cfg.arrow_scale:g} x flow per sweep', color='white', ha='left',
                va='top', fontsize=7, bbox=_LABEL_BOX)


def _order(speed: np.ndarray) -> np.ndarray:
    """Draw order: slow first so moving points stay on top."""
    return np.argsort(speed, kind='stable')


def _arrows(cfg: RenderConfig, points: np.ndarray, flow: np.ndarray,
            dyn: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    r = cfg.range_m
    inside = (np.abs(points[:, 0]) < r) & (np.abs(points[:, 1]) < r)
    idx = np.flatnonzero(dyn & inside)[::cfg.arrow_every]
    # One arrow per 1/40-of-the-view cell: dense near returns would otherwise bury the ego car.
    cell = np.floor(points[idx, :2] / (cfg.range_m / 20.0)).astype(np.int64)
    _, first = np.unique(cell, axis=0, return_index=True)
    idx = idx[np.sort(first)]
    if len(idx) > cfg.max_arrows:
        idx = idx[np.linspace(0, len(idx) - 1, cfg.max_arrows).astype(np.int64)]
    return points[idx], flow[idx]


def _wheel(fig: Any, rect: tuple[float, float, float, float], max_speed: float) -> None:
    ax = fig.add_axes(rect)
    ax.imshow(wheel_image(101), extent=(-1, 1, -1, 1))
    ax.set_axis_off()
    ax.text(0, -1.12, f'direction, speed 0-{max_speed:g} m/s', color='white', ha='center', va='top',
            fontsize=7)


def render_frame(fr: FlowFrame, out_png: Path, cfg: RenderConfig) -> Path:
    """Write one PNG: prediction panel [+ ground truth + end-point error panels]; returns the path."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    has_gt = fr.gt_flow is not None
    panels = 3 if has_gt else 1
    fig = plt.figure(figsize=(cfg.px * panels / cfg.dpi, cfg.px / cfg.dpi), dpi=cfg.dpi, facecolor=BACKGROUND)
    try:
        pts = np.asarray(fr.points, np.float32)
        shown = fr.valid if fr.valid is not None else np.ones(len(pts), bool)
        speed = np.where(shown, fr.speed, 0.0)
        ax = fig.add_axes((0, 0, 1 / panels, 1))
        colors = flow_colors(fr.flow, speed, cfg.max_speed, fr.is_dynamic & shown)
        _draw_bev(ax, cfg, pts, colors, _order(np.where(fr.is_dynamic & shown, speed + 1e6, speed)),
                  _arrows(cfg, pts, fr.flow, fr.is_dynamic & shown))
        n_dyn = int(np.count_nonzero(fr.is_dynamic & shown))
        ax.text(0.02, 0.98, f'prediction  {fr.name}\n{len(pts)} points, {n_dyn} dynamic',
                transform=ax.transAxes, color='white', va='top', fontsize=9, bbox=_LABEL_BOX)
        if cfg.note:
            ax.text(0.98, 0.02, cfg.note, transform=ax.transAxes, color=(1.0, 0.55, 0.0), ha='right',
                    va='bottom', fontsize=10, fontweight='bold', bbox=_LABEL_BOX)
        _wheel(fig, (0.80 / panels, 0.80, 0.18 / panels, 0.18), cfg.max_speed)
        if has_gt:
            dt = float(fr.meta.get('dt', 0.1))
            gt_speed = np.linalg.norm(fr.gt_flow.astype(np.float64), axis=1) / dt
            gvalid = fr.gt_valid if fr.gt_valid is not None else np.ones(len(pts), bool)
            gt_speed = np.where(gvalid, gt_speed, 0.0)
            gdyn = fr.gt_dynamic if fr.gt_dynamic is not None else gt_speed >= cfg.dynamic_threshold
            gdyn = gdyn & gvalid
            ax2 = fig.add_axes((1 / 3, 0, 1 / 3, 1))
            _draw_bev(ax2, cfg, pts, flow_colors(fr.gt_flow, gt_speed, cfg.max_speed, gdyn), _order(gt_speed),
                      _arrows(cfg, pts, fr.gt_flow, gdyn))
            ax2.text(0.02, 0.98, f'ground truth\n{int(gdyn.sum())} dynamic', transform=ax2.transAxes,
                     color='white', va='top', fontsize=9, bbox=_LABEL_BOX)
            err = np.linalg.norm(fr.flow.astype(np.float64) - fr.gt_flow, axis=1)
            cmap = plt.get_cmap('inferno')
            ecol = cmap(np.clip(err / cfg.max_error, 0, 1))[:, :3]
            ecol[~gvalid] = (0.3, 0.3, 0.3)
            ax3 = fig.add_axes((2 / 3, 0, 1 / 3, 1))
            order = np.argsort(np.where(gvalid, err, -1.0), kind='stable')
            _draw_bev(ax3, cfg, pts, ecol, order, None)
            epe = float(err[gvalid].mean()) if gvalid.any() else float('nan')
            ax3.text(0.02, 0.98, f'end-point error (0-{cfg.max_error:g} m)\nmean EPE {epe:.3f} m '
                     'on valid non-ground', transform=ax3.transAxes, color='white', va='top', fontsize=9,
                     bbox=_LABEL_BOX)
            fr.meta['epe'] = epe
        out_png = Path(out_png)
        out_png.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out_png, dpi=cfg.dpi, facecolor=BACKGROUND)
    finally:
        plt.close(fig)
    return out_png


def write_gif(pngs: list[Path], out_gif: Path, scale: float = 0.5, fps: float = 5.0) -> Path:
    """Animated GIF of the PNGs (Pillow, which matplotlib depends on), downscaled by ``scale``."""
    from PIL import Image
    if not pngs:
        raise RenderError('no frames to put in a GIF')
    frames = []
    for p in pngs:
        im = Image.open(p).convert('RGB')
        if scale != 1.0:
            im = im.resize((max(1, int(im.width * scale)), max(1, int(im.height * scale))), Image.LANCZOS)
        frames.append(im.quantize(colors=128, method=Image.Quantize.MEDIANCUT))
    out_gif = Path(out_gif)
    out_gif.parent.mkdir(parents=True, exist_ok=True)
    frames[0].save(out_gif, save_all=True, append_images=frames[1:], duration=int(1000 / fps), loop=0,
                   optimize=True)
    return out_gif


def render(inp: Path, out_dir: Path, cfg: RenderConfig | None = None, *, topic: str | None = None,
           gt_root: Path | None = None, gif: bool = False, every: int = 1,
           max_frames: int | None = None) -> dict[str, Any]:
    """Render every ``every``-th frame of INPUT into OUT_DIR; returns {'pngs', 'gif', 'epe'}."""
    cfg = cfg or RenderConfig()
    out_dir = Path(out_dir)
    pngs: list[Path] = []
    epes: list[float] = []
    prev_stamp = None
    for k, fr in enumerate(iter_frames(inp, topic, gt_root, cfg.dynamic_threshold)):
        if prev_stamp is not None and fr.stamp_ns > prev_stamp:
            fr.meta.setdefault('dt', (fr.stamp_ns - prev_stamp) / 1e9)
        prev_stamp = fr.stamp_ns
        if k % every:
            continue
        pngs.append(render_frame(fr, out_dir / f'{fr.name}.png', cfg))
        if 'epe' in fr.meta:
            epes.append(fr.meta['epe'])
        if max_frames is not None and len(pngs) >= max_frames:
            break
    if not pngs:
        raise RenderError(f'{inp}: no frames to render')
    out = {'pngs': pngs, 'gif': None, 'epe': float(np.mean(epes)) if epes else None}
    if gif:
        out['gif'] = write_gif(pngs, out_dir / 'flow.gif')
    return out


# ---------------------------------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = __doc__
    parser.add_argument('input', type=Path, metavar='INPUT', help='recorded flow bag, or predictions folder')
    parser.add_argument('--out', type=Path, required=True, help='output folder for the PNGs (and GIF)')
    parser.add_argument('--gt', type=Path, default=None, metavar='DATA_ROOT',
                        help='AV2-layout data root: points of a predictions folder, ground truth when '
                             'present')
    parser.add_argument('--topic', default=None,
                        help='flow topic of the bag (default: the one ending in /output/flow)')
    parser.add_argument('--gif', action='store_true', help='also write DIR/flow.gif')
    parser.add_argument('--range', type=float, default=40.0, dest='range_m',
                        help='half width of the view (m)')
    parser.add_argument('--px', type=int, default=800, help='pixels per panel side (default 800)')
    parser.add_argument('--max-speed', type=float, default=10.0, help='speed at full colour (m/s)')
    parser.add_argument('--arrow-every', type=int, default=20, help='arrow for every n-th dynamic point')
    parser.add_argument('--arrow-scale', type=float, default=5.0,
                        help='arrow length = scale x per-sweep flow')
    parser.add_argument('--max-arrows', type=int, default=300, help='at most this many arrows per panel')
    parser.add_argument('--every', type=int, default=1, help='render every n-th frame')


def run(args: argparse.Namespace) -> int:
    cfg = RenderConfig(range_m=args.range_m, px=args.px, max_speed=args.max_speed,
                       arrow_every=args.arrow_every, arrow_scale=args.arrow_scale, max_arrows=args.max_arrows)
    try:
        res = render(args.input, args.out, cfg, topic=args.topic, gt_root=args.gt, gif=args.gif,
                     every=max(1, args.every))
    except RenderError as exc:
        print(f'zeroflow render: {exc}')
        return 2
    print(f'wrote {len(res["pngs"])} PNGs to {args.out}' + (f', GIF {res["gif"]}' if res['gif'] else '')
          + (f'; mean EPE vs ground truth {res["epe"]:.4f} m' if res['epe'] is not None else ''))
    return 0


__all__ = ['RenderConfig', 'RenderError', 'FlowFrame', 'render', 'render_frame', 'flow_colors', 'wheel_image',
           'iter_frames', 'write_gif']
