"""pipelines/nodes.py: a run on a cluster checks that every node sees its storage. The node-side
check on the real local node; a two-node cluster with a node that does not see the storage, as a
submitted job: tests/test_job_submit.py."""

from pipelines.config import ConfigError
from pipelines.nodes import check_storage_on_every_node, nodes_without, not_shared_error


def test_a_task_pinned_to_the_node_reports_whether_the_node_sees_the_path(ray_local, tmp_path):
    nodes = [n for n in ray_local.nodes() if n["Alive"]]
    assert len(nodes) == 1
    (tmp_path / "seen").write_text("x")
    assert nodes_without(tmp_path / "seen", nodes) == []
    blind = nodes_without(tmp_path / "not-there", nodes)
    assert blind == [f"{nodes[0]['NodeManagerAddress']} ({nodes[0]['NodeID'][:8]})"]


def test_one_node_needs_no_check_and_leaves_no_marker(ray_local, tmp_path):
    (tmp_path / "_pipeline").mkdir()
    check_storage_on_every_node(tmp_path)
    assert list((tmp_path / "_pipeline").iterdir()) == []


def test_the_error_names_the_folder_the_nodes_and_the_fix(tmp_path):
    local = not_shared_error(tmp_path, None, ["10.0.0.7 (ab12cd34)"], 3)
    assert isinstance(local, ConfigError)
    assert str(local).startswith(f"storage {tmp_path} is not visible from 1 of the cluster's 3 Ray nodes (10.0.0.7 (ab12cd34))")
    assert "mounts at the same path" in str(local) and "--storage" in str(local)
    mirrored = str(not_shared_error(tmp_path, "s3://bucket/run", ["10.0.0.7 (ab12cd34)", "10.0.0.8 (ef56ab78)"], 3))
    assert mirrored.startswith(f"the local mirror {tmp_path} of s3://bucket/run is not visible from 2 of the cluster's 3")
    assert "set UNCLIP_LOCAL_MIRROR to a folder on a filesystem every node mounts" in mirrored
