"""Helpers for tests that talk real DDS (also handy in launch tests and notebooks).

Importing this module never imports rclpy; the ROS helpers import it when called.

Typical use::

    from zeroflow_ros.testing import ros_context, wait_for_matched, spin_until

    with ros_context() as ctx:                       # own context, own domain, localhost only
        node = rclpy.create_node('probe', context=ctx)
        pub = node.create_publisher(PointCloud2, 'in', 1)
        sub = node.create_subscription(PointCloud2, 'in', got.append, 1)
        wait_for_matched(pub)                         # instead of sleeping for discovery
        pub.publish(msg)
        spin_until(node, lambda: got, timeout=10)
"""
from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator

__all__ = ['unique_domain_id', 'configure_ros_env', 'ros_context', 'wait_for', 'wait_for_matched',
           'spin_until']

#: rmw ports stay valid for domain ids 0..101 with the default participant limits on Linux.
MAX_DOMAIN_ID = 101


def unique_domain_id() -> int:
    """``ROS_DOMAIN_ID`` if the environment sets it, else one derived from the process id (1..100).

    Concurrent test processes on one machine then rarely share a domain, so they do not
    see each other's topics.
    """
    env = os.environ.get('ROS_DOMAIN_ID', '').strip()
    if env:
        value = int(env)
        if not 0 <= value <= MAX_DOMAIN_ID:
            raise ValueError(f'ROS_DOMAIN_ID={env}: expected an integer in 0..{MAX_DOMAIN_ID}')
        return value
    return os.getpid() % 100 + 1


def configure_ros_env(domain_id: int | None = None) -> int:
    """Restrict discovery to this host and set ``ROS_DOMAIN_ID``; returns the domain id.

    Call before ``rclpy.init`` (the rmw reads both at context/node creation).
    """
    domain = unique_domain_id() if domain_id is None else int(domain_id)
    os.environ['ROS_AUTOMATIC_DISCOVERY_RANGE'] = 'LOCALHOST'
    os.environ['ROS_DOMAIN_ID'] = str(domain)
    return domain


@contextlib.contextmanager
def ros_context(domain_id: int | None = None) -> Iterator[Any]:
    """Yield a fresh, initialised ``rclpy`` Context on a local-only, per-process domain; shut down on exit."""
    import rclpy
    from rclpy.context import Context

    domain = configure_ros_env(domain_id)
    context = Context()
    rclpy.init(context=context, domain_id=domain)
    try:
        yield context
    finally:
        with contextlib.suppress(Exception):  # already shut down by the code under test
            rclpy.shutdown(context=context)


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.01) -> bool:
    """Poll ``predicate`` until it is truthy (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def wait_for_matched(pub_or_sub: Any, n: int = 1, timeout: float = 15.0) -> int:
    """Wait until a publisher has ``n`` matched subscriptions (or a subscription ``n`` publishers).

    DDS discovery runs in the middleware's own threads, so no spinning is needed. Returns the
    matched count; raises ``TimeoutError`` naming the topic otherwise.
    """
    if hasattr(pub_or_sub, 'get_subscription_count'):
        count, what = pub_or_sub.get_subscription_count, 'subscriptions'
    elif hasattr(pub_or_sub, 'get_publisher_count'):
        count, what = pub_or_sub.get_publisher_count, 'publishers'
    else:
        raise TypeError(f'{type(pub_or_sub).__name__}: expected an rclpy Publisher or Subscription')
    if not wait_for(lambda: count() >= n, timeout):
        topic = getattr(pub_or_sub, 'topic_name', '?')
        raise TimeoutError(f'{topic}: {count()} of {n} {what} matched after {timeout:.1f} s '
                           f"(ROS_DOMAIN_ID={os.environ.get('ROS_DOMAIN_ID', 'unset')})")
    return count()


def spin_until(node_or_executor: Any, predicate: Callable[[], Any], timeout: float = 10.0,
               step: float = 0.05) -> bool:
    """Spin a node (or executor) until ``predicate()`` is truthy; ``TimeoutError`` after ``timeout`` s.

    A bare node gets a private executor on the node's own context: rclpy's global executor is
    bound to the default context and cannot wait on nodes of another one.
    """
    deadline = time.monotonic() + timeout
    owned = None
    executor = node_or_executor
    if not hasattr(node_or_executor, 'spin_once'):
        from rclpy.executors import SingleThreadedExecutor

        owned = executor = SingleThreadedExecutor(context=node_or_executor.context)
        executor.add_node(node_or_executor)
    try:
        while not predicate():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f'condition not met after spinning {timeout:.1f} s')
            executor.spin_once(timeout_sec=min(step, remaining))
    finally:
        if owned is not None:
            owned.remove_node(node_or_executor)
            owned.shutdown()
    return True


def make_tiny_model(path: Path) -> Path:
    """Save a randomly initialised FastFlow3D small enough for CPU tests (output depends on both sweeps)."""
    import torch

    from zeroflow_ros.model import build_model, get_config, save_checkpoint
    torch.manual_seed(0)
    cfg = get_config('cpu_small', pillar_size=0.8, embed_channels=8, stage_channels=(8, 16),
                     stage_blocks=(1, 1), head_hidden=8)
    model = build_model(cfg)
    # Non-trivial BN statistics so eval-mode output is not a near-constant.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return save_checkpoint(path, model)
