"""Submitted as a Ray job by tests/test_job_submit.py: prints where the job's driver and one of
a Ray worker on each node import the project from (the uploaded working directory, or the installed copy)."""

import json
import os

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

import pipelines


@ray.remote(num_cpus=0)
def worker_import_path() -> str:
    import pipelines

    return pipelines.__file__


if __name__ == "__main__":
    ray.init()
    on_each_node = [worker_import_path.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote()
                    for n in ray.nodes() if n["Alive"]]
    paths = {"cwd": os.getcwd(), "driver": pipelines.__file__, "workers": ray.get(on_each_node)}
    print("UNCLIP_PROBE " + json.dumps(paths))
