"""Launch zeroflow_node (and optionally rviz2) with the shipped parameters and Fast DDS profile.

    ros2 launch zeroflow_ros zeroflow.launch.py input_topic:=/lidar/points
    ros2 launch zeroflow_ros zeroflow.launch.py params_file:=/path/my.param.yaml rviz:=true fixed_frame:=lidar

FASTDDS_DEFAULT_PROFILES_FILE is set to config/fastdds_large_data.xml for the processes started
here (64 MB shared-memory segment: large clouds arrive whole, best-effort included). The lidar
driver is another process: start it with the same variable (see the README).
"""
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction, SetEnvironmentVariable
from launch.conditions import IfCondition
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue
from launch_ros.substitutions import FindPackageShare

PACKAGE = 'zeroflow_ros'

ARGUMENTS = (
    ('params_file', PathJoinSubstitution([FindPackageShare(PACKAGE), 'config', 'zeroflow.param.yaml']),
     'ROS parameter file of zeroflow_node'),
    ('input_topic', '~/input/pointcloud', 'PointCloud2 input topic'),
    ('odometry_topic', '~/input/odometry', 'nav_msgs/Odometry input topic (with ego_motion: odometry)'),
    ('use_sim_time', 'false', 'use /clock (bag replay)'),
    ('namespace', '', 'namespace of the node'),
    ('node_name', 'zeroflow_node', 'name of the node'),
    ('log_level', 'info', 'log level of the node (debug, info, warn, error)'),
    ('fastdds_profile', PathJoinSubstitution([FindPackageShare(PACKAGE), 'config', 'fastdds_large_data.xml']),
     'Fast DDS XML profile for large clouds (set for the node and rviz2)'),
    ('rviz', 'false', 'also start rviz2 with rviz/zeroflow.rviz'),
    ('fixed_frame', 'lidar', 'rviz fixed frame (the cloud frame_id when there is no TF tree)'),
)


def _rviz(context, *args, **kwargs):
    """rviz2 with the shipped config, its topics remapped to this node's namespace and name."""
    ns = LaunchConfiguration('namespace').perform(context).strip('/')
    name = LaunchConfiguration('node_name').perform(context)
    prefix = '/' + '/'.join(p for p in (ns, name) if p)
    remaps = [(f'/zeroflow_node/{t}', f'{prefix}/{t}')
              for t in ('output/flow', 'output/flow_markers', 'input/pointcloud')]
    return [Node(
        package='rviz2', executable='rviz2', name='zeroflow_rviz', output='screen',
        arguments=['-d', PathJoinSubstitution([FindPackageShare(PACKAGE), 'rviz', 'zeroflow.rviz']),
                   '-f', LaunchConfiguration('fixed_frame')],
        parameters=[{'use_sim_time': ParameterValue(LaunchConfiguration('use_sim_time'), value_type=bool)}],
        remappings=remaps,
        condition=IfCondition(LaunchConfiguration('rviz')),
    )]


def generate_launch_description() -> LaunchDescription:
    declared = [DeclareLaunchArgument(name, default_value=default, description=desc)
                for name, default, desc in ARGUMENTS]
    node = Node(
        package=PACKAGE,
        executable='zeroflow_node',
        name=LaunchConfiguration('node_name'),
        namespace=LaunchConfiguration('namespace'),
        output='screen',
        emulate_tty=True,
        parameters=[
            LaunchConfiguration('params_file'),
            {
                'use_sim_time': ParameterValue(LaunchConfiguration('use_sim_time'), value_type=bool),
                'input_topic': LaunchConfiguration('input_topic'),
                'odometry_topic': LaunchConfiguration('odometry_topic'),
            },
        ],
        arguments=['--ros-args', '--log-level', LaunchConfiguration('log_level')],
    )
    return LaunchDescription(declared + [
        SetEnvironmentVariable('FASTDDS_DEFAULT_PROFILES_FILE', LaunchConfiguration('fastdds_profile')),
        node,
        OpaqueFunction(function=_rviz),
    ])
