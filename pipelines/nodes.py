"""Storage on a Ray cluster of several nodes.

Stage work runs on any node (Ray Data read tasks, Ray Train workers, embed's encoders, evaluate's
actors) and reads the run's folder by path: the storage directory, or with `s3://` storage the
driver's local mirror of it (pipelines.object_store). A run connected to a cluster first asks each
node, with a marker file and a task pinned to it, whether it sees that folder:
- every node does (a shared filesystem): nothing more to do;
- with object-store storage, the nodes that do not keep their own mirror at the same path
  (NodeMirrors): before a stage runs, each pulls the stage's finished inputs from the store; what a
  stage makes mid-way for its workers (embed's CLIP weights, a warm start) is copied to them; and
  output is written on the driver's node only (ingest downloads there, embed's writers run there),
  from where the runner publishes it to the store as on one machine;
- with a storage directory, a node that does not see it stops the run, with the fix.
Nodes an autoscaler adds later are not checked: give them the same mounts.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.config import ConfigError
from pipelines.object_store import CREDENTIALS_FIX, MIRROR_ENV, ObjectStore, ObjectStoreError
from tasks.context import one_line

ANSWER_TIMEOUT_S = 120  # a node busy starting workers answers in seconds; one that never does is reported


def check_storage_on_every_node(storage: Path, store: ObjectStore | None = None) -> NodeMirrors | None:
    """None when every node of the connected Ray cluster sees `storage`; with object-store storage,
    the NodeMirrors of those that do not; else a ConfigError naming them."""
    import ray

    nodes = [n for n in ray.nodes() if n["Alive"]]
    if len(nodes) < 2:
        return None
    marker = storage / "_pipeline" / f".seen-by-every-node-{uuid.uuid4().hex[:8]}"
    marker.write_text("a run checks that every Ray node sees its storage; this file is removed after the check\n")
    try:
        blind = nodes_without(marker, nodes)
    finally:
        marker.unlink(missing_ok=True)
    if not blind:
        return None
    driver = ray.get_runtime_context().get_node_id()
    if store is None or driver in {n["NodeID"] for n in blind}:  # a Ray Client driver: its mirror is on no node
        raise not_shared_error(storage, store.uri if store else None, [node_label(n) for n in blind], len(nodes))
    mirrors = NodeMirrors(storage, store.uri, {n["NodeID"]: node_label(n) for n in blind}, driver)
    mirrors.prepare()
    return mirrors


def node_label(node: dict[str, Any]) -> str:
    return f"{node['NodeManagerAddress']} ({node['NodeID'][:8]})"


def nodes_without(path: Path, nodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Those of `nodes` (ray.nodes() entries) on which `path` does not exist, or that did not answer;
    asked with a zero-CPU task pinned to each."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    def sees(p: str) -> bool:
        return os.path.exists(p)

    check = ray.remote(num_cpus=0, max_retries=0)(sees)
    asked = [(n, check.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(str(path)))
             for n in nodes]
    ready, _ = ray.wait([ref for _, ref in asked], num_returns=len(asked), timeout=ANSWER_TIMEOUT_S)
    return [node for node, ref in asked if ref not in ready or not ray.get(ref)]


@dataclass(frozen=True)
class NodeMirrors:
    """The cluster nodes that keep their own copy of the store's mirror, at the driver's mirror path."""

    storage: Path  # the driver's mirror
    uri: str  # the store
    nodes: dict[str, str]  # node id -> node_label
    driver_node_id: str

    def prepare(self) -> None:
        """Each node makes its mirror folder and opens the store with its own environment's credentials."""
        self._on_each(_prepare_mirror, str(self.storage), self.uri, doing="making the local mirror", timeout=ANSWER_TIMEOUT_S,
                      error=ConfigError, fix=f"set {MIRROR_ENV} to a folder every node may write, and give every node "
                      f"the store's credentials ({CREDENTIALS_FIX})")

    def pull(self, stages: list[str]) -> None:
        """Each node's mirror gets the finished output of `stages` from the store (unless it has it)."""
        if stages:
            self._on_each(_pull_stages, self.uri, str(self.storage), list(stages), doing=f"downloading {', '.join(stages)}")

    def copy(self, path: Path) -> None:
        """Copy a file or folder under the driver's mirror to the same path on each node. A path outside
        the mirror (an external input) is not copied: each node must have it."""
        import ray

        path = Path(path).absolute()
        if not path.is_relative_to(self.storage):
            missing = nodes_without(path, [{"NodeID": i, "NodeManagerAddress": label} for i, label in self.nodes.items()])
            if missing:
                raise ConfigError(f"{path} is not on {len(missing)} of the cluster's Ray nodes "
                                  f"({', '.join(self.nodes[n['NodeID']] for n in missing)}), whose workers read it; "
                                  "put it at that path on every node, or under the run's storage")
            return
        files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file())
        contents = ray.put({str(f.relative_to(self.storage)): f.read_bytes() for f in files})
        self._on_each(_write_files, str(self.storage), contents, doing=f"copying {path.relative_to(self.storage)}")

    def _on_each(self, fn, *args, doing: str, timeout: float | None = None, error: type[Exception] = ObjectStoreError,
                 fix: str = "") -> None:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        task = ray.remote(num_cpus=0, max_retries=0)(fn)
        asked = {node: task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(*args)
                 for node in self.nodes}
        ready, _ = ray.wait(list(asked.values()), num_returns=len(asked), timeout=timeout)
        failed = []
        for node, ref in asked.items():
            if ref not in ready:
                ray.cancel(ref, force=True)
                failed.append(f"{self.nodes[node]}: no answer in {timeout:.0f} s")
                continue
            try:
                ray.get(ref)
            except Exception as e:  # the node's own error, not Ray's wrapper
                failed.append(f"{self.nodes[node]}: {one_line(getattr(e, 'cause', None) or e)}")
        if failed:
            raise error(f"{doing} failed on {len(failed)} of the Ray nodes that keep their own copy of {self.uri} at "
                        f"{self.storage}: {'; '.join(failed)}" + (f"; {fix}" if fix else ""))


def _prepare_mirror(storage: str, uri: str) -> None:
    Path(storage).mkdir(parents=True, exist_ok=True)
    ObjectStore.connect(uri)


def _pull_stages(uri: str, storage: str, stages: list[str]) -> None:
    store = ObjectStore.connect(uri)
    for stage in stages:
        store.pull(stage, Path(storage) / stage)


def _write_files(storage: str, files: dict[str, bytes]) -> None:
    for relpath, data in files.items():
        target = Path(storage) / relpath
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.copy")  # never a half-written file under the real name
        tmp.write_bytes(data)
        os.replace(tmp, target)


def not_shared_error(storage: Path, store_uri: str | None, blind: list[str], total: int) -> ConfigError:
    where = f"the local mirror {storage} of {store_uri}" if store_uri else f"storage {storage}"
    shared = "a folder on a filesystem every node mounts at the same path (NFS, EFS, Filestore)"
    fix = f"set {MIRROR_ENV} to {shared}" if store_uri else f"pass {shared} with --storage"
    return ConfigError(f"{where} is not visible from {len(blind)} of the cluster's {total} Ray nodes "
                       f"({', '.join(blind)}), whose stage workers read and write it; {fix}")
