"""Rigid transforms and the two flow conventions of this project.

Frames: ``ego0`` is the ego frame of sweep t, ``ego1`` that of sweep t+1.
``ego1_T_ego0`` (4x4) maps ego0 coordinates to ego1 coordinates, exactly the
``ego_1_SE3_ego_0`` of av2's ``SceneFlowDataloader`` (= inv(city_T_ego1) @ city_T_ego0).

Two flow conventions, for a point ``p`` of sweep t (ego0 coordinates) that is at ``q`` at t+1
(ego1 coordinates):

* **AV2 flow** (files of ``zeroflow predict``, pseudo-labels, AV2 ground truth):
  ``f_av2 = q - p``; it *includes* ego motion, so static scenery has ``T p - p``.
* **Residual flow** (model input/output, the ROS node's ``~/output/flow``):
  the point's own motion w.r.t. the static world, in ego0 coordinates:
  ``f_res = inv(T) q - p``; static scenery has 0, and ``T (p + f_res) = q``.
"""
from __future__ import annotations

import numpy as np


def transform_points(T: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a 4x4 rigid transform to (N,3) points; keeps the input float dtype."""
    T = np.asarray(T, dtype=np.float64)
    out = points @ T[:3, :3].T.astype(points.dtype, copy=False) + T[:3, 3].astype(points.dtype, copy=False)
    return out


def invert(T: np.ndarray) -> np.ndarray:
    """Inverse of a 4x4 rigid transform."""
    T = np.asarray(T, dtype=np.float64)
    R, t = T[:3, :3], T[:3, 3]
    out = np.eye(4)
    out[:3, :3] = R.T
    out[:3, 3] = -R.T @ t
    return out


def quat_to_matrix(qw, qx, qy, qz) -> np.ndarray:
    """Rotation matrix from a (w, x, y, z) quaternion (normalised here)."""
    q = np.array([qw, qx, qy, qz], dtype=np.float64)
    q = q / np.linalg.norm(q)
    w, x, y, z = q
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


def matrix_to_quat(R: np.ndarray) -> np.ndarray:
    """(w, x, y, z) unit quaternion of a rotation matrix, w >= 0."""
    R = np.asarray(R, dtype=np.float64)
    tr = np.trace(R)
    if tr > 0:
        s = 2.0 * np.sqrt(tr + 1.0)
        q = [0.25 * s, (R[2, 1] - R[1, 2]) / s, (R[0, 2] - R[2, 0]) / s, (R[1, 0] - R[0, 1]) / s]
    elif R[0, 0] > R[1, 1] and R[0, 0] > R[2, 2]:
        s = 2.0 * np.sqrt(1.0 + R[0, 0] - R[1, 1] - R[2, 2])
        q = [(R[2, 1] - R[1, 2]) / s, 0.25 * s, (R[0, 1] + R[1, 0]) / s, (R[0, 2] + R[2, 0]) / s]
    elif R[1, 1] > R[2, 2]:
        s = 2.0 * np.sqrt(1.0 + R[1, 1] - R[0, 0] - R[2, 2])
        q = [(R[0, 2] - R[2, 0]) / s, (R[0, 1] + R[1, 0]) / s, 0.25 * s, (R[1, 2] + R[2, 1]) / s]
    else:
        s = 2.0 * np.sqrt(1.0 + R[2, 2] - R[0, 0] - R[1, 1])
        q = [(R[1, 0] - R[0, 1]) / s, (R[0, 2] + R[2, 0]) / s, (R[1, 2] + R[2, 1]) / s, 0.25 * s]
    q = np.array(q)
    q /= np.linalg.norm(q)
    return q if q[0] >= 0 else -q


def make_transform(R: np.ndarray, t) -> np.ndarray:
    T = np.eye(4)
    T[:3, :3] = R
    T[:3, 3] = t
    return T


def rpy_matrix(roll: float, pitch: float, yaw: float) -> np.ndarray:
    """Rotation ``Rz(yaw) Ry(pitch) Rx(roll)`` (fixed-axis roll, pitch, yaw, as ROS/tf2)."""
    cr, sr, cp, sp = np.cos(roll), np.sin(roll), np.cos(pitch), np.sin(pitch)
    cy, sy = np.cos(yaw), np.sin(yaw)
    rz = np.array([[cy, -sy, 0], [sy, cy, 0], [0, 0, 1.0]])
    ry = np.array([[cp, 0, sp], [0, 1.0, 0], [-sp, 0, cp]])
    rx = np.array([[1.0, 0, 0], [0, cr, -sr], [0, sr, cr]])
    return rz @ ry @ rx


def yaw_transform(yaw: float, t=(0.0, 0.0, 0.0)) -> np.ndarray:
    c, s = np.cos(yaw), np.sin(yaw)
    return make_transform(np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]]), t)


def ego_flow(points0: np.ndarray, ego1_T_ego0: np.ndarray) -> np.ndarray:
    """AV2 flow of static scenery: ``T p - p`` (float32)."""
    p = points0.astype(np.float64)
    return (transform_points(ego1_T_ego0, p) - p).astype(np.float32)


def residual_to_av2(points0: np.ndarray, residual: np.ndarray, ego1_T_ego0: np.ndarray) -> np.ndarray:
    """``f_av2 = T (p + f_res) - p`` (float32)."""
    p = points0.astype(np.float64)
    return (transform_points(ego1_T_ego0, p + residual.astype(np.float64)) - p).astype(np.float32)


def av2_to_residual(points0: np.ndarray, flow_av2: np.ndarray, ego1_T_ego0: np.ndarray) -> np.ndarray:
    """``f_res = inv(T) (p + f_av2) - p`` (float32)."""
    p = points0.astype(np.float64)
    return (transform_points(invert(ego1_T_ego0), p + flow_av2.astype(np.float64)) - p).astype(np.float32)
