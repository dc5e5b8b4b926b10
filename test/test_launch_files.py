"""Launch file, parameter file, rviz config and Fast DDS profile agree with the node and setup.py.

ros2 launch / launch_ros / rviz2 are not installable on a pip-only machine: the launch file is then
checked by parsing it (ast); with launch and launch_ros installed it is also imported and built.
The node's declared parameters are introspected from a real node started in-process.
"""
from __future__ import annotations

import ast
import importlib.util
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / 'launch' / 'zeroflow.launch.py'
PARAMS = ROOT / 'config' / 'zeroflow.param.yaml'
RVIZ = ROOT / 'rviz' / 'zeroflow.rviz'
PROFILE = ROOT / 'config' / 'fastdds_large_data.xml'
REQUIRED_LAUNCH_ARGS = {'params_file', 'input_topic', 'odometry_topic', 'use_sim_time', 'namespace',
                        'node_name',
                        'log_level', 'rviz', 'fixed_frame'}
AUTO_PARAMS = {'use_sim_time', 'start_type_description_service'}  # declared by rclpy itself


def console_scripts() -> dict[str, str]:
    tree = ast.parse((ROOT / 'setup.py').read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            for k, v in zip(node.keys, node.values):
                if isinstance(k, ast.Constant) and k.value == 'console_scripts':
                    entries = [ast.literal_eval(e) for e in v.elts]
                    return dict((s.strip() for s in e.split('=', 1)) for e in entries)
    raise AssertionError('setup.py has no console_scripts')


@pytest.fixture(scope='module')
def declared(tmp_path_factory):
    """{name: (value, descriptor)} of a real node with default parameters."""
    pytest.importorskip('rclpy')
    import torch

    from zeroflow_ros.backends import create_backend
    from zeroflow_ros.model import build_model, get_config, save_checkpoint
    from zeroflow_ros.node import ZeroFlowNode
    from zeroflow_ros.testing import ros_context
    torch.manual_seed(0)
    path = save_checkpoint(tmp_path_factory.mktemp('m') / 'model.pt', build_model(get_config(
        'cpu_small', pillar_size=1.6, embed_channels=4, stage_channels=(4,), stage_blocks=(1,),
        head_hidden=4)))
    backend = create_backend(str(path), backend='torch', device='cpu', threads=1)
    with ros_context() as ctx:
        node = ZeroFlowNode(context=ctx, backend=backend)
        try:
            names = node.list_parameters([], 0).names
            out = {n: (node.get_parameter(n).value, node.describe_parameter(n)) for n in names}
            pubs = {name for name, _ in node.get_publisher_names_and_types_by_node(
                node.get_name(), node.get_namespace())}
            out['__publishers__'] = (pubs, None)
            out['__input__'] = (node.input_topic, None)
        finally:
            node.destroy_node()
    return out


def launch_tree():
    return ast.parse(LAUNCH.read_text())


def calls(tree, name):
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, 'id', None) == name]


def test_launch_file_refers_to_real_executable_files_and_params(declared):
    tree = launch_tree()
    module_consts = {t.id: ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
                     for t in n.targets if isinstance(t, ast.Name) and isinstance(n.value, ast.Constant)}
    scripts = console_scripts()
    nodes = calls(tree, 'Node')
    ours = []
    for n in nodes:
        kw = {k.arg: k.value for k in n.keywords}
        pkg = (kw['package'].value if isinstance(kw['package'], ast.Constant)
               else module_consts[kw['package'].id])
        exe = ast.literal_eval(kw['executable'])
        if pkg == 'zeroflow_ros':
            assert exe in scripts, f'launch starts {exe!r}; setup.py console_scripts: {sorted(scripts)}'
            assert scripts[exe] == 'zeroflow_ros.node:main'
            ours.append(kw)
        else:
            assert (pkg, exe) == ('rviz2', 'rviz2')
    assert len(ours) == 1
    # parameters: the params file + a dict whose keys must be declared by the node
    param_dicts = [e for e in ours[0]['parameters'].elts if isinstance(e, ast.Dict)]
    keys = {ast.literal_eval(k) for d in param_dicts for k in d.keys}
    assert keys and keys <= set(declared), keys - set(declared)
    # every package file the launch file names exists and is installed by setup.py
    setup_src = (ROOT / 'setup.py').read_text()
    files = []
    for c in calls(tree, 'PathJoinSubstitution'):
        parts = c.args[0].elts
        assert getattr(parts[0].func, 'id', None) == 'FindPackageShare'
        rel = Path(*[ast.literal_eval(p) for p in parts[1:]])
        assert (ROOT / rel).is_file(), rel
        assert f"tree('{rel.parts[0]}')" in setup_src, f'setup.py does not install {rel.parts[0]}/'
        files.append(rel.as_posix())
    assert {'config/zeroflow.param.yaml', 'config/fastdds_large_data.xml', 'rviz/zeroflow.rviz'} <= set(files)
    # launch arguments: the required ones are declared, and only declared ones are used
    arg_table = next(n.value for n in tree.body
                     if isinstance(n, ast.Assign) and n.targets[0].id == 'ARGUMENTS')
    declared_args = {ast.literal_eval(t.elts[0]) for t in arg_table.elts}
    used = {ast.literal_eval(c.args[0]) for c in calls(tree, 'LaunchConfiguration')}
    assert REQUIRED_LAUNCH_ARGS <= declared_args, REQUIRED_LAUNCH_ARGS - declared_args
    assert used <= declared_args, used - declared_args
    # the Fast DDS profile is exported to the processes it starts
    env = [c for c in calls(tree, 'SetEnvironmentVariable')]
    assert [ast.literal_eval(c.args[0]) for c in env] == ['FASTDDS_DEFAULT_PROFILES_FILE']


def test_launch_file_builds_with_real_launch():
    try:  # (a bare `import launch` can find this repo's launch/ folder as a namespace package)
        import launch
        from launch import LaunchDescription  # noqa: F401
        import launch_ros  # noqa: F401
    except ImportError:
        pytest.skip('ros2 launch / launch_ros are not installed (pip-only ROS); the file was parsed above')
    spec = importlib.util.spec_from_file_location('zeroflow_launch', LAUNCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    ld = mod.generate_launch_description()
    assert isinstance(ld, launch.LaunchDescription)
    names = {a.name for a in ld.get_launch_arguments()}
    assert REQUIRED_LAUNCH_ARGS <= names


def test_params_file_matches_declared_parameters(declared):
    doc = yaml.safe_load(PARAMS.read_text())
    assert list(doc) == ['/**'] and list(doc['/**']) == ['ros__parameters']
    values = doc['/**']['ros__parameters']
    names = {n for n in declared if not n.startswith(('__', 'qos_overrides.'))} - AUTO_PARAMS
    assert any(n.startswith('qos_overrides./zeroflow_node/output/flow.publisher.') for n in declared)
    assert set(values) == names, (set(values) ^ names)
    for k, v in values.items():
        got = declared[k][0]
        if isinstance(v, list):
            assert np.allclose(v, got), k
        else:
            assert v == got and type(v) is type(got), (k, v, got)
        desc = declared[k][1]
        assert desc.description, f'{k} has no description'
    for k in ('model', 'backend', 'precision', 'point_range_m', 'input_topic', 'input_reliability',
              'ego_motion'):
        assert declared[k][1].read_only, f'{k} should be read-only'
    assert declared['max_points'][1].integer_range and declared['latency_budget_ms'][1].floating_point_range
    assert 'auto' in declared['input_reliability'][1].additional_constraints


def test_rviz_config_names_the_node_topics(declared):
    doc = yaml.safe_load(RVIZ.read_text())
    displays = {d['Name']: d for d in doc['Visualization Manager']['Displays']}
    pubs = declared['__publishers__'][0]
    clouds = [d for d in displays.values() if d['Class'] == 'rviz_default_plugins/PointCloud2']
    flow = next(d for d in clouds if d['Topic']['Value'].endswith('/output/flow'))
    assert flow['Topic']['Value'] in pubs and flow['Enabled']
    assert flow['Color Transformer'] == 'Intensity' and flow['Channel Name'] == 'speed'
    markers = next(d for d in displays.values() if d['Class'] == 'rviz_default_plugins/Marker')
    assert markers['Topic']['Value'] in pubs
    assert {d['Topic']['Value'] for d in clouds} - pubs == {declared['__input__'][0]}
    assert doc['Visualization Manager']['Global Options']['Fixed Frame']


def test_fastdds_profile_has_large_shared_memory_segment():
    ns = {'d': 'http://www.eprosima.com'}
    root = ET.parse(PROFILE).getroot()
    shm = [t for t in root.iterfind('.//d:transport_descriptor', ns)
           if t.findtext('d:type', namespaces=ns) == 'SHM']
    assert shm and int(shm[0].findtext('d:segment_size', namespaces=ns)) >= 64 * 1024 * 1024
    part = root.find('.//d:participant', ns)
    assert part.get('is_default_profile') == 'true'
    used = {e.text for e in part.iterfind('.//d:userTransports/d:transport_id', ns)}
    assert shm[0].findtext('d:transport_id', namespaces=ns) in used
    assert any(t.findtext('d:type', namespaces=ns) == 'UDPv4'
               and t.findtext('d:transport_id', namespaces=ns) in used
               for t in root.iterfind('.//d:transport_descriptor', ns))  # discovery, remote subscribers


def test_cli_passes_ros_args_through(monkeypatch):
    from zeroflow_ros import cli
    from zeroflow_ros import node as node_mod
    seen = []
    monkeypatch.setattr(node_mod, 'spin_node', lambda args: seen.append(args) or 0)
    argv = ['node', '--params-file', str(PARAMS),
            '--ros-args', '-r', '__node:=lidar_flow', '-p', 'backend:=torch']
    assert cli.main(argv) == 0
    assert seen == [['--ros-args', '--params-file', str(PARAMS), '--',
                     '--ros-args', '-r', '__node:=lidar_flow', '-p', 'backend:=torch']]
    assert cli.main(['node', '--ros-args', '-r', '__ns:=/car']) == 0
    assert seen[-1] == ['--ros-args', '-r', '__ns:=/car']
