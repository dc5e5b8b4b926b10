"""``manifest.yaml``: what an exported model fixes, written beside ``model.onnx``.

The manifest is the contract between the exporter and every backend: the model configuration
(range, pillar size, grid) that the shared numpy pre-step must use, the network's tensor names,
dtypes and shapes, the ONNX opset and the ONNX file's sha256 (engines are named after it).
It is plain YAML so that a user can read it, and so that the onnxruntime backend needs no torch.

Example::

    format_version: 1
    model_config: {name: cpu_small, point_cloud_range: [...], pillar_size: 0.4, ...}
    grid: {x_min: -51.2, x_max: 51.2, ..., pillar_size: 0.4, divisor: 8}
    inputs:  [{name: pc0, dtype: float32, shape: [K0, 3]}, ...]
    outputs: [{name: flow, dtype: float32, shape: [K0, 3]}]
    onnx: {file: model.onnx, sha256: ..., bytes: ..., opset: 17}
    points: {min: 1, opt: 60000, max: 200000}
    source_checkpoint: {path: ..., sha256: ...}
    exported_at: '2026-11-28T06:30:00Z'
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Any

MANIFEST_NAME = 'manifest.yaml'
FORMAT_VERSION = 1
SUPPORTED_VERSIONS: tuple[int, ...] = (1,)
# numpy dtype names allowed for network I/O; anything else is a corrupt or foreign manifest.
_DTYPES = ('float32', 'float16', 'int64', 'int32', 'bool')


class ManifestError(ValueError):
    """A manifest file is missing, unreadable, of an unknown version or inconsistent."""


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One network input or output. ``shape`` holds ints for static and strings for dynamic dims."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {'name': self.name, 'dtype': self.dtype, 'shape': list(self.shape)}


@dataclasses.dataclass(frozen=True)
class PointRange:
    """Number of in-range points per sweep that an engine's optimisation profile covers.

    ``min`` is 1 because padding a small cloud up to a minimum would change the pillar means.
    """

    min: int = 1
    opt: int = 60_000
    max: int = 200_000


@dataclasses.dataclass
class Manifest:
    """Parsed ``manifest.yaml``; ``path`` is where it was read from (None before saving)."""

    model_config: dict[str, Any]
    grid: dict[str, Any]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    onnx_file: str = 'model.onnx'
    onnx_sha256: str = ''
    onnx_bytes: int = 0
    opset: int = 17
    points: PointRange = dataclasses.field(default_factory=PointRange)
    source_checkpoint: str | None = None
    source_sha256: str | None = None
    exported_at: str = ''
    producer: dict[str, str] = dataclasses.field(default_factory=dict)
    verification: dict[str, Any] = dataclasses.field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    path: Path | None = None

    @property
    def directory(self) -> Path:
        if self.path is None:
            raise ManifestError('manifest has no path yet: save() or load it first')
        return self.path.parent

    @property
    def onnx_path(self) -> Path:
        return self.directory / self.onnx_file

    @property
    def checkpoint_path(self) -> Path | None:
        """The source checkpoint: beside the manifest if there, else the recorded path."""
        if self.source_checkpoint is None:
            return None
        recorded = Path(self.source_checkpoint)
        beside = self.directory / recorded.name
        if beside.is_file():
            return beside
        return recorded if recorded.is_absolute() else self.directory / recorded

    def to_dict(self) -> dict[str, Any]:
        return {
            'format_version': self.format_version,
            'model_config': dict(self.model_config),
            'grid': dict(self.grid),
            'inputs': [t.to_dict() for t in self.inputs],
            'outputs': [t.to_dict() for t in self.outputs],
            'onnx': {'file': self.onnx_file, 'sha256': self.onnx_sha256,
                     'bytes': int(self.onnx_bytes), 'opset': int(self.opset)},
            'points': dataclasses.asdict(self.points),
            'source_checkpoint': None if self.source_checkpoint is None else {
                'path': self.source_checkpoint, 'sha256': self.source_sha256},
            'exported_at': self.exported_at,
            'producer': {str(k): str(v) for k, v in self.producer.items()},
            'verification': dict(self.verification),
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically (temp file + rename) so a reader never sees half a manifest."""
        import yaml

        path = Path(path)
        if path.is_dir():
            path = path / MANIFEST_NAME
        tmp = path.with_name(f'.{path.name}.{os.getpid()}.tmp')
        tmp.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None))
        os.replace(tmp, path)
        self.path = path
        return path

    def verify_onnx(self) -> None:
        """Raise if the ONNX file beside the manifest is missing or not the one exported."""
        onnx_path = self.onnx_path
        if not onnx_path.is_file():
            raise ManifestError(f'{self.path}: onnx.file {onnx_path} does not exist')
        if self.onnx_sha256 and sha256_file(onnx_path) != self.onnx_sha256:
            raise ManifestError(
                f'{onnx_path}: sha256 differs from {self.path} (onnx.sha256 {self.onnx_sha256[:12]}...): '
                'the file was changed or corrupted; re-export it with `zeroflow export onnx`')


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _require(d: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in d:
        raise ManifestError(f'{where}: missing field {key!r}')
    value = d[key]
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else ' or '.join(k.__name__ for k in kind)
        raise ManifestError(f'{where}: field {key!r} must be {names}, got {type(value).__name__}')
    return value


def _tensors(items: Any, where: str) -> list[TensorSpec]:
    if not isinstance(items, list) or not items:
        raise ManifestError(f'{where}: expected a non-empty list of tensors')
    out = []
    for i, item in enumerate(items):
        w = f'{where}[{i}]'
        if not isinstance(item, dict):
            raise ManifestError(f'{w}: expected a mapping with name, dtype, shape')
        name = _require(item, 'name', str, w)
        dtype = _require(item, 'dtype', str, w)
        if dtype not in _DTYPES:
            raise ManifestError(f'{w}: dtype {dtype!r} is not one of {", ".join(_DTYPES)}')
        shape = _require(item, 'shape', list, w)
        if not all(isinstance(s, (int, str)) for s in shape):
            raise ManifestError(f'{w}: shape entries must be ints or dim names, got {shape}')
        out.append(TensorSpec(name, dtype, tuple(shape)))
    return out


def parse_manifest(data: Any, where: str = 'manifest') -> Manifest:
    """Validate a loaded YAML mapping; errors name the file and the field."""
    if not isinstance(data, dict):
        raise ManifestError(f'{where}: expected a YAML mapping, got {type(data).__name__}')
    version = _require(data, 'format_version', int, where)
    if version not in SUPPORTED_VERSIONS:
        raise ManifestError(
            f'{where}: format_version {version} is not supported; this zeroflow_ros reads '
            f'version(s) {", ".join(map(str, SUPPORTED_VERSIONS))}. Re-export the model with '
            '`zeroflow export onnx` from this version, or upgrade zeroflow_ros.')
    model_config = _require(data, 'model_config', dict, where)
    grid = _require(data, 'grid', dict, where)
    onnx = _require(data, 'onnx', dict, where)
    points = data.get('points') or {}
    if not isinstance(points, dict):
        raise ManifestError(f'{where}: field points must be a mapping with min, opt, max')
    try:
        pr = PointRange(**{k: int(v) for k, v in points.items()})
    except TypeError as exc:
        raise ManifestError(f'{where}: points: {exc}') from None
    if not 0 < pr.min <= pr.opt <= pr.max:
        raise ManifestError(f'{where}: points must satisfy 0 < min <= opt <= max, got {pr}')
    src = data.get('source_checkpoint')
    if src is not None and not isinstance(src, dict):
        raise ManifestError(f'{where}: source_checkpoint must be a mapping with path, sha256')
    return Manifest(
        format_version=version,
        model_config=model_config,
        grid=grid,
        inputs=_tensors(data.get('inputs'), f'{where}: inputs'),
        outputs=_tensors(data.get('outputs'), f'{where}: outputs'),
        onnx_file=str(_require(onnx, 'file', str, f'{where}: onnx')),
        onnx_sha256=str(onnx.get('sha256', '')),
        onnx_bytes=int(onnx.get('bytes', 0)),
        opset=int(_require(onnx, 'opset', int, f'{where}: onnx')),
        points=pr,
        source_checkpoint=None if src is None else src.get('path'),
        source_sha256=None if src is None else src.get('sha256'),
        exported_at=str(data.get('exported_at', '')),
        producer={str(k): str(v) for k, v in (data.get('producer') or {}).items()},
        verification=dict(data.get('verification') or {}),
    )


def load_manifest(path: str | os.PathLike) -> Manifest:
    """Read ``path`` (a manifest.yaml or the folder holding one)."""
    import yaml

    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f'{path}: no such manifest (expected {MANIFEST_NAME} beside model.onnx; '
                            'create it with `zeroflow export onnx`)')
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ManifestError(f'{path}: not valid YAML: {exc}') from None
    manifest = parse_manifest(data, str(path))
    manifest.path = path
    return manifest
