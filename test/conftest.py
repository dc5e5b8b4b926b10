"""Shared pytest fixtures. Reusable helpers live in :mod:`zeroflow_ros.testing` (importable from tests)."""
from __future__ import annotations

import pytest

from zeroflow_ros.testing import configure_ros_env, ros_context, unique_domain_id


@pytest.fixture
def ros_domain(monkeypatch: pytest.MonkeyPatch) -> int:
    """Local-only discovery and a per-process ROS_DOMAIN_ID for this test; returns the id.

    The environment is restored after the test (monkeypatch), so tests do not leak settings.
    """
    domain = unique_domain_id()
    # setenv first so monkeypatch records the old values and restores them afterwards.
    monkeypatch.setenv('ROS_AUTOMATIC_DISCOVERY_RANGE', 'LOCALHOST')
    monkeypatch.setenv('ROS_DOMAIN_ID', str(domain))
    return configure_ros_env(domain)


@pytest.fixture
def rclpy_context(ros_domain: int):
    """A fresh initialised rclpy Context on the test's domain, shut down afterwards.

    Create nodes with ``rclpy.create_node(name, context=rclpy_context)``.
    """
    pytest.importorskip('rclpy', reason='needs rclpy (pip install .[ros] or source /opt/ros)')
    with ros_context(ros_domain) as context:
        yield context
