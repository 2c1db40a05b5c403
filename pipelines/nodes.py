"""Storage on a Ray cluster of several nodes: every node must see the folder the stages run in.

Stage work runs on any node (Ray Data read tasks, Ray Train workers, embed's writers) and reads and
writes the run's folder by path: the storage directory, or with `s3://` storage the driver's local
mirror of it (pipelines.object_store). On a node that does not see that folder a stage would fail
deep inside Ray Data or Ray Train, or leave its output on that node's own disk; so a run connected
to a cluster first checks, with a marker file and a task pinned to each node, and stops with the fix
(nodes an autoscaler adds later are not checked: give them the same mounts).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

from pipelines.config import ConfigError
from pipelines.object_store import MIRROR_ENV

ANSWER_TIMEOUT_S = 120  # a node busy starting workers answers in seconds; one that never does is reported


def check_storage_on_every_node(storage: Path, store_uri: str | None = None) -> None:
    """ConfigError naming the nodes of the connected Ray cluster that do not see `storage`."""
    import ray

    nodes = [n for n in ray.nodes() if n["Alive"]]
    if len(nodes) < 2:
        return
    marker = storage / "_pipeline" / f".seen-by-every-node-{uuid.uuid4().hex[:8]}"
    marker.write_text("a run checks that every Ray node sees its storage; this file is removed after the check\n")
    try:
        blind = nodes_without(marker, nodes)
    finally:
        marker.unlink(missing_ok=True)
    if blind:
        raise not_shared_error(storage, store_uri, blind, len(nodes))


def nodes_without(path: Path, nodes: list[dict[str, Any]]) -> list[str]:
    """Those of `nodes` (ray.nodes() entries) on which `path` does not exist, or that did not answer,
    as 'address (node id)'; asked with a zero-CPU task pinned to each."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    def sees(p: str) -> bool:
        return os.path.exists(p)

    check = ray.remote(num_cpus=0, max_retries=0)(sees)
    asked = {f"{n['NodeManagerAddress']} ({n['NodeID'][:8]})":
             check.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(str(path))
             for n in nodes}
    ready, _ = ray.wait(list(asked.values()), num_returns=len(asked), timeout=ANSWER_TIMEOUT_S)
    return [node for node, ref in asked.items() if ref not in ready or not ray.get(ref)]


def not_shared_error(storage: Path, store_uri: str | None, blind: list[str], total: int) -> ConfigError:
    where = f"the local mirror {storage} of {store_uri}" if store_uri else f"storage {storage}"
    shared = "a folder on a filesystem every node mounts at the same path (NFS, EFS, Filestore)"
    fix = f"set {MIRROR_ENV} to {shared}" if store_uri else f"pass {shared} with --storage"
    return ConfigError(f"{where} is not visible from {len(blind)} of the cluster's {total} Ray nodes "
                       f"({', '.join(blind)}), whose stage workers read and write it; {fix}")
