"""ament_python package that also installs with plain pip.

`training/` is installed as `zeroflow_training` so that `import training` never collides
with a user's own module of that name.
"""
from glob import glob
import os

from setuptools import find_packages, setup

PACKAGE = 'zeroflow_ros'


def tree(src):
    """data_files entries that install the folder `src` under share/<package>/src."""
    out = {}
    for path in glob(os.path.join(src, '**', '*'), recursive=True):
        if os.path.isfile(path):
            out.setdefault(os.path.join('share', PACKAGE, os.path.dirname(path)), []).append(path)
    return sorted(out.items())


runtime_packages = find_packages(include=['zeroflow_ros', 'zeroflow_ros.*'])
training_packages = ['zeroflow_training'] + [
    'zeroflow_training.' + p for p in find_packages(where='training')]

setup(
    name=PACKAGE,
    version='0.1.0',
    packages=runtime_packages + training_packages,
    package_dir={'zeroflow_training': 'training'},
    package_data={'zeroflow_ros': ['py.typed']},
    data_files=[
        ('share/ament_index/resource_index/packages', ['resource/' + PACKAGE]),
        ('share/' + PACKAGE, ['package.xml']),
    ] + tree('launch') + tree('config') + tree('rviz') + tree('models'),
    python_requires='>=3.10',
    # torch is deliberately unpinned here: install torch==2.13.0 (CPU) first, see README.
    install_requires=[
        'numpy>=1.24',
        'scipy>=1.10',
        'pyarrow>=14',
        'pandas>=2.0',
        'pyyaml>=6',
        'torch>=2.1',
        'onnx>=1.15',
        'onnxruntime>=1.17',
        'rosbags>=0.10',
        'mcap>=1.1',
        'matplotlib>=3.7',
        'tqdm>=4.60',
        'kiss-icp>=1.0',
        # clustering for the rigid-object teacher and label refinement
        'scikit-learn>=1.3',
        # maintained PCD reader (replaces the hand-written LZF decoder)
        'pypcd4>=1.5,<2',
        'python-neo-lzf>=0.3',
        'setuptools',
    ],
    extras_require={
        # ROS 2 Kilted as PyPI wheels, for machines without /opt/ros. With a system ROS
        # install, source it instead and skip this extra.
        'ros': [
            'ros-kilted-rclpy[fastrtps]',
            'ros-kilted-sensor-msgs',
            'ros-kilted-std-msgs',
            'ros-kilted-visualization-msgs',
            'ros-kilted-diagnostic-msgs',
            'ros-kilted-nav-msgs',
            'ros-kilted-geometry-msgs',
            'ros-kilted-rosgraph-msgs',
        ],
        'gpu': ['onnxruntime-gpu>=1.17', 'tensorrt>=10'],
        'ray': ['ray>=2.9'],
        'dev': [
            'pytest>=7',
            'pytest-timeout',
            'hypothesis>=6',
            'pytest-benchmark',
            'flake8>=6',
            'pydocstyle>=6',
            'import-linter>=2.0',
            'ray>=2.9',
            # official Argoverse 2 API, used as the independent reference in tests.
            'av2==0.3.6',
            'kornia==0.8.3',
        ],
    },
    zip_safe=True,
    maintainer='zeroflow_ros maintainers',
    maintainer_email='zeroflow-ros@example.org',
    description='ZeroFlow lidar scene flow for ROS 2',
    license='BSD-3-Clause',
    entry_points={
        'console_scripts': [
            'zeroflow = zeroflow_ros.cli:main',
            'zeroflow_node = zeroflow_ros.node:main',
        ],
    },
)
