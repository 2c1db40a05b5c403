"""Submitted as a Ray job by tests/test_job_submit.py: prints where the job's driver and one of
its Ray workers import the project from (the uploaded working directory, or the installed copy)."""

import json
import os

import ray

import pipelines


@ray.remote(num_cpus=0)
def worker_import_path() -> str:
    import pipelines

    return pipelines.__file__


if __name__ == "__main__":
    ray.init()
    paths = {"cwd": os.getcwd(), "driver": pipelines.__file__, "worker": ray.get(worker_import_path.remote())}
    print("UNCLIP_PROBE " + json.dumps(paths))
