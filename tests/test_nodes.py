"""pipelines/nodes.py: a run on a cluster checks that every node sees its storage. The node-side
check on the real local node; a two-node cluster with a node that does not see the storage, as a
submitted job: tests/test_job_submit.py."""

import pytest

from pipelines.config import ConfigError
from pipelines.nodes import NodeMirrors, check_storage_on_every_node, node_label, nodes_without, not_shared_error


def test_a_task_pinned_to_the_node_reports_whether_the_node_sees_the_path(ray_local, tmp_path):
    nodes = [n for n in ray_local.nodes() if n["Alive"]]
    assert len(nodes) == 1
    (tmp_path / "seen").write_text("x")
    assert nodes_without(tmp_path / "seen", nodes) == []
    assert nodes_without(tmp_path / "not-there", nodes) == nodes
    assert node_label(nodes[0]) == f"{nodes[0]['NodeManagerAddress']} ({nodes[0]['NodeID'][:8]})"


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


def local_node_mirrors(ray, storage, uri="s3://bucket/run") -> NodeMirrors:
    """The one local node, taken for a node that keeps its own mirror at `storage`."""
    node = next(n for n in ray.nodes() if n["Alive"])
    return NodeMirrors(storage, uri, {node["NodeID"]: node_label(node)}, node["NodeID"])


def test_a_node_that_cannot_make_its_mirror_is_named_with_the_fix(ray_local, tmp_path):
    (tmp_path / "a-file").write_text("x")
    mirrors = local_node_mirrors(ray_local, tmp_path / "a-file" / "mirror")
    with pytest.raises(ConfigError) as error:
        mirrors.prepare()
    message = str(error.value)
    assert message.startswith("making the local mirror failed on 1 of the Ray nodes that keep their own copy of s3://bucket/run")
    assert next(iter(mirrors.nodes.values())) in message and "NotADirectoryError" in message
    assert "set UNCLIP_LOCAL_MIRROR to a folder every node may write" in message and "AWS_ACCESS_KEY_ID" in message


def test_copying_a_file_outside_the_mirror_asks_every_node_to_have_it(ray_local, tmp_path):
    mirrors = local_node_mirrors(ray_local, tmp_path / "mirror")
    (tmp_path / "weights.pt").write_bytes(b"w")
    mirrors.copy(tmp_path / "weights.pt")  # the node has it: nothing to copy
    with pytest.raises(ConfigError, match=r"not-there.pt is not on 1 of the cluster's Ray nodes \(.*\), whose workers read it"):
        mirrors.copy(tmp_path / "not-there.pt")


def test_a_run_whose_training_logs_from_nodes_without_storage_needs_a_tracking_server(tmp_path, monkeypatch):
    from pipelines.config import validate
    from pipelines.dag import plan
    from pipelines.runner import check_tracking_reaches_nodes

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = validate({"name": "t", "storage": "s3://bucket/run", "stages": ["synth", "ingest", "embed", "pca", "train_prior"]})
    mirrors = NodeMirrors(tmp_path, "s3://bucket/run", {"ab12cd34ef": "10.0.0.7 (ab12cd34)"}, "driver")
    with pytest.raises(ConfigError) as error:
        check_tracking_reaches_nodes(cfg, plan(cfg), mirrors)
    assert "train_prior log to it from workers on other nodes (10.0.0.7 (ab12cd34))" in str(error.value)
    assert "set MLFLOW_TRACKING_URI (or mlflow.tracking_uri) to a tracking server" in str(error.value)
    check_tracking_reaches_nodes(cfg, plan(cfg, until="pca"), mirrors)  # nothing logs from a worker
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    check_tracking_reaches_nodes(cfg, plan(cfg), mirrors)
