"""train_decoder, train_upsampler and train_clip on real Ray Train (2 workers), real MLflow, real
shards and a real embedded table; and the loop's data parallelism against one worker."""

import json

import mlflow
import pytest
import torch

from models import checkpoint
from tasks import train_clip, train_decoder, train_upsampler
from tests.train_helpers import metric_history, run_stage, train_inputs  # noqa: F401  (fixture)

FAST = dict(workers=2, warmup_steps=5, log_every=5, val_fraction=0.2)


def _falls(uri, run_id, factor=0.9):
    losses = [v for _, v in metric_history(uri, run_id, "loss")]
    first, last = sum(losses[:2]) / 2, sum(losses[-2:]) / 2
    assert last < factor * first, losses


def _sample_artifacts(uri, run_id):
    return [a.path for a in mlflow.MlflowClient(uri).list_artifacts(run_id, "samples")]


@pytest.mark.parametrize("module, cfg, name, kind", [
    (train_decoder, train_decoder.TrainDecoderConfig(steps=30, batch_size=8, lr=1e-3, checkpoint_every=15,
                                                     sample_steps=3, grid_rows=4, **FAST), "train_decoder", "Decoder"),
    (train_upsampler, train_upsampler.TrainUpsamplerConfig(steps=30, batch_size=8, lr=1e-3, checkpoint_every=15,
                                                           sample_steps=3, grid_rows=4, **FAST), "train_upsampler", "Upsampler"),
    (train_clip, train_clip.TrainClipConfig(steps=30, batch_size=16, lr=1e-3, checkpoint_every=15, **FAST),
     "train_clip", "ClipModel"),
])
def test_stage_trains_logs_and_exports(module, cfg, name, kind, train_inputs, tmp_path):
    counts, run_id, uri = run_stage(module, cfg, train_inputs, tmp_path, name)
    assert counts["steps"] == 30 and counts["skipped_steps"] == 0
    _falls(uri, run_id)
    assert metric_history(uri, run_id, "val_loss") and metric_history(uri, run_id, "samples_per_s")
    if name != "train_clip":
        assert any(p.endswith(".png") for p in _sample_artifacts(uri, run_id))
    for export in ("ema", "network", "best"):
        assert type(checkpoint.load(tmp_path / name / export)).__name__ == kind
    if name == "train_decoder":
        assert counts["rows_without_image"] == 0
    if name == "train_clip":  # what embed loads with clip_from: train_clip
        from models.clip import load_clip

        exported = tmp_path / name / "clip"
        encoder = load_clip(None, str(exported / "clip.safetensors"), arch=str(exported / "arch.json"))
        ema = checkpoint.load(tmp_path / name / "ema")
        tokens = encoder.tokenize(["a small red circle"])
        torch.testing.assert_close(encoder.encode_text(tokens), ema.encoder().encode_text(tokens))


def test_step_budget_plans_the_steps_that_fit_from_the_time_taken(monkeypatch):
    from tasks import training

    clock = [100.0]
    monkeypatch.setattr(training.time, "perf_counter", lambda: clock[0])
    budget = training.StepBudget(minutes=1, step=0, end=1000, spent=0.0)
    clock[0] += 10  # 10 steps at 1 s: 50 s left, 50 more steps
    assert budget.plan(10) == 60
    clock[0] += 40  # slower: 40 s for 10 steps (50 s for 20), 10 s left at 2.5 s a step
    assert budget.plan(20) == 24
    clock[0] += 100  # over the budget: stop here
    assert budget.plan(30) == 30
    resumed = training.StepBudget(minutes=1, step=500, end=1000, spent=30.0)  # 30 s spent before a resume
    clock[0] += 10
    assert resumed.plan(510) == 530
    assert training.StepBudget(minutes=60, step=0, end=1000).plan(0) == 1000
    assert training.StepBudget(minutes=None, step=0, end=1000).plan(10) == 1000


def test_step_budget_ends_by_the_deadline_or_the_minutes_whichever_comes_first(monkeypatch):
    from tasks import training

    clock = [1000.0]
    monkeypatch.setattr(training.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(training.time, "time", lambda: clock[0])
    by_deadline = training.StepBudget(minutes=None, step=0, end=1000, deadline=clock[0] + 60)
    by_both = training.StepBudget(minutes=10, step=0, end=1000, deadline=clock[0] + 60)
    by_minutes = training.StepBudget(minutes=1, step=0, end=1000, deadline=clock[0] + 3600)
    clock[0] += 10  # 10 steps at 1 s
    assert by_deadline.plan(10) == by_both.plan(10) == by_minutes.plan(10) == 60
    resumed = training.StepBudget(minutes=10, step=500, end=1000, spent=590.0, deadline=clock[0] + 600)
    clock[0] += 5  # 5 steps at 1 s: the 10 minutes end 5 s on, long before the deadline
    assert resumed.plan(505) == 510


def test_a_plan_that_ends_now_leaves_the_lr_at_the_cosine_end():
    """A deadline already past at the first plan (slow worker start-up) ends training at once:
    the LR the optimizer holds, and logs, is the cosine's end, not the warm-up's peak."""
    import time

    from models.training_state import warmup_cosine
    from tasks import training

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    schedule = warmup_cosine(optimizer, warmup_steps=1, total_steps=100_000, min_lr_ratio=0.1)
    for _ in range(5):
        optimizer.step()
        schedule.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)
    budget = training.StepBudget(minutes=None, step=0, end=100_000, deadline=time.time() - 1)
    end = training._replan(budget, 5, 100_000, schedule, training.TrainConfig(), 0, None, "cpu")
    assert end == 5 and optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)


# The deadline counts worker start-up (15-40 s here, more on a slow CI host): one that has passed by the
# first plan (step log_every) ends training there, which the assertions below still hold for.
@pytest.mark.parametrize("limit", [{"max_minutes": 0.2}, {"finish_by_minute": 0.75}])
def test_a_time_budget_ends_training_where_it_runs_out_with_the_lr_cosine_finished(limit, train_inputs, tmp_path):
    cfg = train_clip.TrainClipConfig(steps=100_000, batch_size=16, lr=1e-3, checkpoint_every=10_000,
                                     **{**FAST, "warmup_steps": 1}, **limit)
    counts, run_id, uri = run_stage(train_clip, cfg, train_inputs, tmp_path, "train_clip")
    assert FAST["log_every"] <= counts["steps"] < cfg.steps
    assert json.loads((tmp_path / "train_clip" / "training.json").read_text())["step"] == counts["steps"]
    last_step, last_lr = metric_history(uri, run_id, "lr")[-1]
    assert last_step == counts["steps"] and last_lr == pytest.approx(cfg.lr * cfg.min_lr_ratio)


def test_two_workers_take_the_same_first_step_as_one_worker_with_twice_the_batch(ray_local, tmp_path):
    """The same 2b rows (randomness carried in the rows) as 2 workers × b and as 1 worker × 2b:
    the exported raw network after one AdamW step must agree."""
    import ray

    from models import sizes
    from tasks import training
    from tasks.context import StageContext

    config = sizes.config_for("prior", "tiny")
    g = torch.Generator().manual_seed(0)
    b, d, L = 4, config.embed_dim, 5
    rows = [{
        "image_emb": torch.randn(d, generator=g).numpy(), "text_emb": torch.randn(d, generator=g).numpy(),
        "text_states": torch.randn(L, config.text_dim, generator=g).numpy(), "noise": torch.randn(d, generator=g).numpy(),
        "t": int(torch.randint(0, 1000, (1,), generator=g)), "drop_text": bool(i % 3 == 0),
    } for i in range(2 * b)]
    init = tmp_path / "init"
    torch.manual_seed(1)
    checkpoint.save(sizes.build("prior", "tiny"), init)
    results = {}
    for workers, batch in ((2, b), (1, 2 * b)):
        out = tmp_path / f"w{workers}"
        out.mkdir()
        # A large AdamW eps makes the first step ≈ lr·g (its default turns every gradient element,
        # however tiny, into ±lr, which would compare round-off, not gradients).
        cfg = training.TrainConfig(steps=1, batch_size=batch, workers=workers, warmup_steps=0, lr=10.0, adam_eps=1.0,
                                   weight_decay=0.0, checkpoint_every=1, val_fraction=0.0, init_from=str(init),
                                   grad_clip=None)
        ctx = StageContext("ddp", tmp_path, out, {}, seed=0, show_progress=False)
        spec = training.TrainSpec(kind="prior", batches=training.ToDevice)
        training.fit(spec, cfg, ctx, __import__("dataclasses").asdict(config), ray.data.from_items(rows), None)
        results[workers] = checkpoint.load(out / "network").state_dict()
    before = checkpoint.load(init).state_dict()
    moved = [k for k in before if not torch.equal(before[k], results[1][k])]
    assert moved, "the step changed nothing"
    for key in before:
        torch.testing.assert_close(results[2][key], results[1][key], atol=1e-5, rtol=1e-4, msg=key)


def test_rows_whose_image_is_missing_are_counted_and_skipped(train_inputs, tmp_path):
    """The decoder's image join skips table rows whose image is gone from the shard, and the
    stage's count (rows_without_image) says how many."""
    import io
    import shutil
    import tarfile

    from tasks.dataset import embedding_dataset, rows_without_image

    ingest = tmp_path / "ingest"
    shutil.copytree(train_inputs.ingest, ingest)
    first = sorted(ingest.glob("*.tar"))[0]
    with tarfile.open(first) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    dropped = {m.name.split(".")[0] for m, _ in members if m.name.endswith(".jpg")}
    dropped = set(sorted(dropped)[:5])
    with tarfile.open(first, "w") as tar:
        for member, data in members:
            if not (member.name.endswith(".jpg") and member.name.split(".")[0] in dropped):
                tar.addfile(member, io.BytesIO(data))
    assert rows_without_image(train_inputs.embed, ingest) == 5
    rows = embedding_dataset(train_inputs.embed, split="all", ingest_dir=ingest, columns=["key"]).take_all()
    all_rows = embedding_dataset(train_inputs.embed, split="all", columns=["key"]).take_all()
    assert len(rows) == len(all_rows) - 5
    assert not dropped & {r["key"] for r in rows}


def test_validation_batches_are_read_once_and_the_same_at_every_checkpoint(ray_local):
    from tasks import training

    reads = []

    class CountedShard:  # a real dataset; counts the reads the training loop asks for
        def iter_torch_batches(self, **kwargs):
            reads.append(kwargs)
            return ray_local.data.range(100).iter_torch_batches(**kwargs)

    batches = training.ValidationBatches(CountedShard(), training.TrainConfig(batch_size=8, val_batches=3))
    first, again = ([b["id"].tolist() for b in batches] for _ in range(2))
    assert [len(b) for b in first] == [8, 8, 8] and again == first
    assert reads == [{"batch_size": 8}]


def test_workers_share_the_data_cpu_only_when_the_data_is_cached():
    from tasks import training

    cluster = {"CPU": 2.0}
    cached = training.TrainConfig(workers=1)
    resources = training.worker_resources(cached, cluster)
    assert resources["CPU"] == 1.0  # one CPU stays free for Ray Data's reads
    assert training.torch_threads(cached, resources, cluster) == 2
    streamed = training.TrainConfig(workers=1, cache_data=False)
    assert training.torch_threads(streamed, training.worker_resources(streamed, cluster), cluster) == 1
    two = training.TrainConfig(workers=2)
    assert training.torch_threads(two, training.worker_resources(two, {"CPU": 8.0}), {"CPU": 8.0}) == 4
    pinned = training.TrainConfig(workers=1, cpus_per_worker=1.0)
    assert training.torch_threads(pinned, training.worker_resources(pinned, {"CPU": 8.0}), {"CPU": 8.0}) == 1
    chosen = training.TrainConfig(workers=1, torch_threads=3)
    assert training.torch_threads(chosen, training.worker_resources(chosen, cluster), cluster) == 3


def test_a_worker_borrows_idle_cpus_only_while_no_other_stage_holds_them(ray_local):
    """SharedThreads (stages side by side): a worker with 1 of 2 CPUs trains on 2 threads while the
    other CPU is idle, on 1 while another stage's worker holds it, and on 2 again once it is free."""
    import time

    from tasks import training

    assert training.borrows_idle_cpus(training.TrainConfig(workers=1))
    assert not training.borrows_idle_cpus(training.TrainConfig(workers=1, torch_threads=1))
    assert not training.borrows_idle_cpus(training.TrainConfig(workers=1, cache_data=False))

    @ray_local.remote(num_cpus=1)
    class Worker:
        def threads_after_check(self):
            import torch

            shared = training.SharedThreads(own_cpus=1.0, most=2, workers=1, every_s=0.0)
            shared.follow_idle_cpus()
            return torch.get_num_threads()

    @ray_local.remote(num_cpus=1)
    class OtherStage:
        def ready(self):
            return True

    def settled(expected):  # the cluster's view of free CPUs lags an actor's start by up to a second
        for _ in range(20):
            if ray_local.get(worker.threads_after_check.remote()) == expected:
                return True
            time.sleep(0.25)
        return False

    worker = Worker.remote()
    assert settled(2)
    other = OtherStage.remote()
    ray_local.get(other.ready.remote())
    assert settled(1)
    ray_local.kill(other)
    assert settled(2)
    ray_local.kill(worker)
    assert training.shared_thread_count(0.5, 0.5, 1, 1) == 1 and training.shared_thread_count(1.0, 6.0, 2, 4) == 4
