"""PCD reading through pypcd4: layouts the PJLab sample does not have, corrupt blocks, writer compression.

The sample-based checks (reference LZF decoder, truncation messages, KITTI/pose files) are in test_bag.py.
"""
from __future__ import annotations

import numpy as np
import pytest

from zeroflow_ros.data import sweeps as zsw


def _literal_lzf(data: bytes) -> bytes:
    # Independent LZF encoder: literal runs of at most 32 bytes (control byte = length - 1).
    return b''.join(bytes([len(data[k:k + 32]) - 1]) + data[k:k + 32] for k in range(0, len(data), 32))


def _compressed_pcd(n: int, block: bytes, usize: int) -> bytes:
    head = ('VERSION 0.7\nFIELDS x y z _ normal ring\nSIZE 4 4 4 1 4 2\nTYPE F F F U F U\n'
            f'COUNT 1 1 1 3 2 1\nWIDTH {n}\nHEIGHT 1\nPOINTS {n}\nDATA binary_compressed\n')
    return head.encode() + np.array([len(block), usize], '<u4').tobytes() + block


def test_binary_compressed_with_counts_and_padding(tmp_path):
    # PCL's writeBinaryCompressed copies count * size bytes per point for each field in turn.
    rng = np.random.default_rng(1)
    n = 37
    xyz = rng.normal(size=(n, 3)).astype('<f4')
    normal = rng.normal(size=(n, 2)).astype('<f4')
    ring = rng.integers(0, 128, n).astype('<u2')
    # PCL's binary_compressed layout: each field's values for all points, field after field.
    plain = (xyz[:, 0].tobytes() + xyz[:, 1].tobytes() + xyz[:, 2].tobytes() + bytes(3 * n)
             + normal.tobytes() + ring.tobytes())
    (tmp_path / 'a.pcd').write_bytes(_compressed_pcd(n, _literal_lzf(plain), len(plain)))
    s = zsw.read_pcd(tmp_path / 'a.pcd')
    np.testing.assert_array_equal(s.points, xyz)
    np.testing.assert_array_equal(s.fields['normal'], normal)
    np.testing.assert_array_equal(s.fields['ring'], ring)
    assert sorted(s.fields) == ['normal', 'ring']     # the '_' padding is dropped


def test_corrupt_lzf_block_is_a_sweep_error(tmp_path):
    n = 4
    usize = n * (12 + 3 + 8 + 2)
    # A back-reference before the start of the output: liblzf rejects it.
    block = bytes([0x20, 0x05]) + bytes(20)
    (tmp_path / 'bad.pcd').write_bytes(_compressed_pcd(n, block, usize))
    with pytest.raises(zsw.SweepError, match=r'bad\.pcd: .*corrupt'):
        zsw.read_pcd(tmp_path / 'bad.pcd')


def test_writer_compresses_and_reads_back(tmp_path):
    pts = np.zeros((1000, 3), np.float32)
    pts[:, 0] = np.arange(1000) % 7
    zsw.write_pcd(tmp_path / 'c.pcd', pts, {'ring': (np.arange(1000) % 4).astype(np.uint16)},
                  data='binary_compressed')
    assert (tmp_path / 'c.pcd').stat().st_size < 1000 * 14 // 2   # liblzf shrinks repetitive data
    s = zsw.read_pcd(tmp_path / 'c.pcd')
    np.testing.assert_array_equal(s.points, pts)
    np.testing.assert_array_equal(s.fields['ring'], np.arange(1000) % 4)


def test_bad_headers_name_the_problem(tmp_path):
    head = 'VERSION 0.7\nFIELDS x y z\nSIZE 4 4 4\n'
    (tmp_path / 'a.pcd').write_text(head + 'TYPE F F Q\nPOINTS 0\nDATA ascii\n')
    with pytest.raises(zsw.SweepError, match=r"a\.pcd: unsupported TYPE/SIZE \('Q', '4'\)"):
        zsw.read_pcd(tmp_path / 'a.pcd')
    (tmp_path / 'b.pcd').write_text(head + 'TYPE F F F\nPOINTS 1\nDATA lzma\n')
    with pytest.raises(zsw.SweepError, match=r"b\.pcd: DATA 'lzma' not supported"):
        zsw.read_pcd(tmp_path / 'b.pcd')
    (tmp_path / 'c.pcd').write_text(head + 'TYPE F F F\nPOINTS 3\nDATA ascii\n1 2 3\n4 5 6\n')
    with pytest.raises(zsw.SweepError, match=r'c\.pcd: ascii data has 2 points, expected 3'):
        zsw.read_pcd(tmp_path / 'c.pcd')
