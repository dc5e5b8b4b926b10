"""Official AV2 scene-flow mask archives (``make_mask_files.py``), read lazily.

An archive holds one feather file per evaluated sweep, ``<log_id>/<timestamp_ns>.feather``, with a
single bool column (``mask``) over the points of that sweep: True = scored (non-ground, inside the
100 m x 100 m box). The val and test archives cover every 5th pair of the split. Masks are read one
at a time, since a whole archive decoded is hundreds of MB.
"""
from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np


class MaskError(ValueError):
    """A mask archive or one of its entries is missing or malformed (names the archive and entry)."""


def mask_names(mask_zip: Path) -> list[str]:
    """Sorted ``<log_id>/<ts>.feather`` entries of a mask archive."""
    mask_zip = Path(mask_zip)
    try:
        with zipfile.ZipFile(mask_zip) as zf:
            names = sorted(n for n in zf.namelist() if n.endswith('.feather'))
    except FileNotFoundError:
        raise MaskError(f'{mask_zip}: mask archive not found') from None
    except (zipfile.BadZipFile, IsADirectoryError) as exc:
        raise MaskError(f'{mask_zip}: not a zip archive ({exc})') from None
    if not names:
        raise MaskError(f'{mask_zip}: no <log_id>/<ts>.feather mask files inside')
    for n in names:
        parse_name(n)
    return names


def parse_name(name: str) -> tuple[str, int]:
    """``'<log_id>/<ts>.feather'`` -> (log_id, ts)."""
    log_id, _, fname = name.rpartition('/')
    try:
        return log_id, int(Path(fname).stem)
    except ValueError:
        raise MaskError(f'mask archive entry {name!r}: expected <log_id>/<timestamp_ns>.feather') from None


def read_mask(zf: zipfile.ZipFile, name: str) -> np.ndarray:
    """One (N,) bool mask from an open archive."""
    import pyarrow.feather as feather
    try:
        tab = feather.read_table(io.BytesIO(zf.read(name)))
    except KeyError:
        raise MaskError(f'{zf.filename}: no entry {name}') from None
    except Exception as exc:  # pyarrow raises many types for corrupt files
        raise MaskError(f'{zf.filename}:{name}: cannot read as feather ({exc})') from None
    if tab.num_columns != 1:
        raise MaskError(f'{zf.filename}:{name}: expected one bool mask column, got {tab.column_names}')
    return tab.column(0).to_numpy(zero_copy_only=False).astype(bool)
