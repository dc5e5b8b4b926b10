"""ROS-free numpy core: cloud I/O, geometry, preprocessing, voxelisation."""
