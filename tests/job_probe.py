"""Submitted as a Ray job by tests/test_job_submit.py: prints where the job's driver and a Ray worker on
each node import the project from (the uploaded working directory, or the installed copy); each worker
also prints its node's id, which reaches the job's logs from that node."""

import json
import os

os.environ["RAY_DEDUP_LOGS"] = "0"  # before ray is imported: the two workers' lines differ only in an id

import ray  # noqa: E402
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy  # noqa: E402

import pipelines  # noqa: E402


@ray.remote(num_cpus=0)
def worker_import_path() -> str:
    import pipelines

    print(f"UNCLIP_WORKER_ON {ray.get_runtime_context().get_node_id()}", flush=True)
    return pipelines.__file__


if __name__ == "__main__":
    ray.init()
    on_each_node = [worker_import_path.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote()
                    for n in ray.nodes() if n["Alive"]]
    paths = {"cwd": os.getcwd(), "driver": pipelines.__file__, "workers": ray.get(on_each_node)}
    print("UNCLIP_PROBE " + json.dumps(paths))
