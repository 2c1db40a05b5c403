"""A Ray worker node joined to a running head on this machine, bound to 127.0.0.1, until killed:
`python tests/ray_node.py <gcs address> <temp dir> <num cpus>`.

`ray start --address` refuses a second node while RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps Ray on
127.0.0.1 (and with it unset, Ray binds every interface); Ray's own multi-node tests
(ray.cluster_utils) start nodes this way instead. Run under `unshare -m` it becomes a node that
does not see part of this machine's files (tests/test_job_submit.py).
"""

import signal
import sys
import time

import ray._private.node
import ray._private.parameter

if __name__ == "__main__":
    gcs_address, temp_dir, num_cpus = sys.argv[1], sys.argv[2], int(sys.argv[3])
    params = ray._private.parameter.RayParams(
        gcs_address=gcs_address, node_ip_address="127.0.0.1", temp_dir=temp_dir, num_cpus=num_cpus, num_gpus=0,
        object_store_memory=128 * 2**20, min_worker_port=0, max_worker_port=0, node_manager_port=0)
    params.dashboard_agent_listen_port = None  # a free port, not the head's agent's
    node = ray._private.node.Node(params, head=False, shutdown_at_exit=True, spawn_reaper=False)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # exit through shutdown_at_exit: stops the node's processes
    print(f"node {node.node_id} joined {gcs_address}", flush=True)
    while True:
        time.sleep(3600)
