"""Dataset readers/writers: AV2 layout (real or synthetic), rosbag2, KITTI/PCD sweeps."""
