"""zeroflow_ros: real-time lidar scene flow (ZeroFlow) for ROS 2.

The runtime core (``zeroflow_ros.core``, ``zeroflow_ros.backends``, ``zeroflow_ros.model``)
imports without ROS, torch, onnxruntime or a GPU; only ``zeroflow_ros.node`` imports rclpy.
"""
__version__ = '0.1.0'
