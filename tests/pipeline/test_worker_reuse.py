"""Worker processes kept for a run (pipeline.workers.reusing): a stage run once per chunk starts
its workers once, hands on only a pool that answered everything, and leaves no process behind."""

from __future__ import annotations

import time

import psutil
import pyarrow.parquet as pq
import pytest

from pipeline import workers
from pipeline.config import SFTConfig
from pipeline.quality import quality_stage
from tests.pipeline.quality.test_workers import write_conversations

# any function of sftkit's pipeline that takes one item and answers it
TASK = (None, "pipeline.schema:messages_for_template", (), 2)
ITEMS = [[{"role": "user", "content": f"q{i}", "name": None, "tool_calls": None, "train": None}] for i in range(6)]


@pytest.fixture
def pools_started(monkeypatch) -> list[int]:
    """The size of every WorkerPool started during the test, in order."""
    sizes: list[int] = []
    start_pool = workers.WorkerPool.__init__

    def counting(self, *args, **kwargs):
        sizes.append(args[3])
        start_pool(self, *args, **kwargs)

    monkeypatch.setattr(workers.WorkerPool, "__init__", counting)
    return sizes


def started_children(marker: str, count: int, other_than: tuple[int, ...] | list[int] = ()) -> list[int]:
    """This process's children whose command line holds ``marker``, once ``count`` of them show it.

    A worker ``workers.start`` just launched shows its command line only once its exec has set it
    up, after ``Popen`` has returned: on a busy machine a look straight away can miss it."""
    deadline = time.monotonic() + 60
    while True:
        found = []
        for child in psutil.Process().children():
            try:
                if child.pid not in other_than and marker in child.cmdline():
                    found.append(child.pid)
            except psutil.Error:  # gone meanwhile
                continue
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.01)


def exited(pids: list[int]) -> bool:
    return all(not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE for pid in pids)


def test_inside_reusing_a_pool_that_answered_everything_serves_the_next_block():
    with workers.reusing():
        with workers.pool(*TASK) as pool:
            first = pool.pids
            assert len(list(pool.map(ITEMS))) == 6
            # what a worker runs is on its command line, for ps and the benchmarks' CPU by process
            assert psutil.Process(first[0]).cmdline()[-2:] == ["pipeline.workers", "pipeline.schema:messages_for_template"]
        assert not exited(first)  # idle, kept for the next caller
        with workers.pool(*TASK) as pool:
            assert pool.pids == first
            assert [m[0]["content"] for m in pool.map(ITEMS)] == [f"q{i}" for i in range(6)]
        with workers.pool(None, TASK[1], (), 1) as other:  # other arguments: a pool of its own
            assert set(other.pids).isdisjoint(first)
            list(other.map(ITEMS))
        second = other.pids
    assert exited(first) and exited(second)  # the block's end closes what it kept


def test_a_kept_pool_whose_worker_died_while_it_waited_is_replaced_not_handed_on():
    with workers.reusing():
        with workers.pool(*TASK) as pool:
            first = pool.pids
            list(pool.map(ITEMS))
        victim = psutil.Process(first[0])
        victim.kill()  # the out-of-memory killer, say, between two chunks
        victim.wait(timeout=10)
        with workers.pool(*TASK) as pool:
            assert set(pool.pids).isdisjoint(first)
            assert [m[0]["content"] for m in pool.map(ITEMS)] == [f"q{i}" for i in range(6)]
        assert exited(first)


def test_outside_reusing_each_block_has_its_own_workers_and_closes_them():
    with workers.pool(*TASK) as pool:
        first = pool.pids
        list(pool.map(ITEMS))
    assert exited(first)
    with workers.pool(*TASK) as pool:
        assert set(pool.pids).isdisjoint(first)
        list(pool.map(ITEMS))


def test_a_pool_left_with_items_in_flight_or_an_error_is_closed_not_handed_on():
    with workers.reusing():
        with workers.pool(*TASK) as pool:
            abandoned = pool.pids
            answers = pool.map(ITEMS)
            next(answers)  # two more items are with the workers when the block ends
            answers.close()
        assert exited(abandoned)
        with pytest.raises(RuntimeError, match="stop"):
            with workers.pool(*TASK) as pool:
                failed = pool.pids
                list(pool.map(ITEMS))
                raise RuntimeError("stop")
        assert exited(failed)
        with workers.pool(*TASK) as pool:
            assert set(pool.pids).isdisjoint(abandoned + failed)
            assert [m[0]["content"] for m in pool.map(ITEMS)] == [f"q{i}" for i in range(6)]


def test_quality_steps_inside_reusing_share_their_workers_and_write_the_same_files(tmp_path):
    config = SFTConfig()
    config.quality.num_proc = 2
    sources = [write_conversations(tmp_path / f"in{i}.parquet", count=600, seed=i) for i in range(2)]

    def run(tag: str) -> list[bytes]:
        out = []
        for i, source in enumerate(sources):
            kept, rejected = tmp_path / f"{tag}-kept{i}.parquet", tmp_path / f"{tag}-rejected{i}.parquet"
            quality_stage(source, kept, rejected, config, batch_size=100)  # 6 batches: workers start
            out += [kept.read_bytes(), rejected.read_bytes()]
            seen.append({p.pid for p in psutil.Process().children() if "pipeline.quality:_in_worker" in p.cmdline()})
        return out

    seen: list[set[int]] = []
    alone = run("alone")
    assert seen == [set(), set()]  # each step closed its workers
    seen.clear()
    with workers.reusing():
        shared = run("shared")
        assert len(seen[0]) == 2 and seen[1] == seen[0]  # the second chunk met the first one's workers
    assert exited(list(seen[0]))
    assert shared == alone
    assert pq.read_table(tmp_path / "shared-kept1.parquet").num_rows > 0


def test_workers_started_ahead_serve_the_first_block_and_are_closed_unused_at_the_end():
    workers.start(*TASK)  # outside reusing(): nothing to keep them for
    assert not [p for p in psutil.Process().children() if "pipeline.schema:messages_for_template" in p.cmdline()]
    with workers.reusing():
        workers.start(*TASK)
        started = started_children("pipeline.schema:messages_for_template", 2)
        assert len(started) == 2
        workers.start(*TASK)  # one idle pool of these is enough
        with workers.pool(*TASK) as pool:
            assert sorted(pool.pids) == sorted(started)
            assert [m[0]["content"] for m in pool.map(ITEMS)] == [f"q{i}" for i in range(6)]
        workers.start(None, TASK[1], (), 1)  # never used
        unused = started_children("pipeline.workers", 1, other_than=started)
        assert len(unused) == 1
    assert exited(started) and exited(unused)


def test_quality_workers_started_before_dedup_filter_the_first_chunk(tmp_path):
    from pipeline.quality import start_workers

    config = SFTConfig()
    config.quality.num_proc = 2
    source = write_conversations(tmp_path / "in.parquet", count=600, seed=3)
    quality_stage(source, tmp_path / "alone.parquet", tmp_path / "alone-rejected.parquet", config, batch_size=100)

    def filtering() -> set[int]:
        return {p.pid for p in psutil.Process().children() if "pipeline.quality:_in_worker" in p.cmdline()}

    with workers.reusing():
        start_workers(config, None, 600, batch_size=100)
        started = set(started_children("pipeline.quality:_in_worker", 2))
        assert len(started) == 2
        quality_stage(source, tmp_path / "kept.parquet", tmp_path / "rejected.parquet", config, batch_size=100)
        assert filtering() == started  # the stage filtered in them, and left them for the next chunk
        start_workers(config, None, 150, batch_size=100)  # two batches: the stage filters in its own process
        assert filtering() == started
    assert exited(list(started))
    assert (tmp_path / "kept.parquet").read_bytes() == (tmp_path / "alone.parquet").read_bytes()


@pytest.mark.parametrize(("num_proc", "first_chunk_rows", "started_workers"), [(2, 600, 2), (5, 400, 4)])
def test_dedups_keep_policy_asks_the_quality_workers_started_beside_it(
    tmp_path, monkeypatch, pools_started, num_proc, first_chunk_rows, started_workers
):
    """On duplicate-heavy data dedup's one global step asks the quality filters about thousands of
    records (Verdict.many). Inside a run it asks the quality workers started beside it (of
    whatever size the first chunk gave them), rather than starting a second set of its own, and
    hands them on, still running, to the quality stage: one set imports and builds the filters."""
    import pipeline.quality as quality

    monkeypatch.setattr(quality, "_VERDICT_BATCH_ROWS", 64)
    monkeypatch.setattr(quality, "_VERDICT_ROWS_FOR_WORKERS", 100)
    config = SFTConfig()
    config.quality.num_proc = num_proc
    source = write_conversations(tmp_path / "in.parquet", count=600, seed=5)
    table = pq.read_table(source)
    verdict = quality.Verdict(config, None)
    one_by_one = [verdict(record) for record in table.to_pylist()]

    def quality_workers() -> set[int]:
        return {p.pid for p in psutil.Process().children() if "pipeline.quality:_in_worker" in p.cmdline()}

    with workers.reusing():
        quality.start_workers(config, None, first_chunk_rows, batch_size=100)
        started = set(started_children("pipeline.quality:_in_worker", started_workers))
        assert len(started) == started_workers
        assert verdict.many(iter([table]), table.num_rows).tolist() == one_by_one
        assert quality_workers() == started  # asked in them; no other set started
        assert len(pools_started) == 1
        quality_stage(source, tmp_path / "kept.parquet", tmp_path / "rejected.parquet", config, batch_size=100)
        assert started <= quality_workers()  # handed on, still running
    assert exited(list(started))
    kept = pq.read_table(tmp_path / "kept.parquet")
    assert kept.num_rows == sum(one_by_one)  # the stage's verdicts agree with the keep policy's


def test_a_smaller_chunk_filters_in_the_workers_started_for_the_first(tmp_path, pools_started):
    """A run's quality workers are started for its first chunk. A chunk with fewer batches (dedup
    took rows out of it; a run's last chunk) would start fewer workers of its own: it takes the
    started ones, which are enough, instead of starting a second set beside them."""
    config = SFTConfig()
    config.quality.num_proc = 5
    first = write_conversations(tmp_path / "first.parquet", count=600, seed=6)  # 6 batches of 100: 5 workers
    second = write_conversations(tmp_path / "second.parquet", count=400, seed=7)  # 4 batches: 4 workers would do
    alone = tmp_path / "alone.parquet"
    quality_stage(second, alone, tmp_path / "alone-rejected.parquet", config, batch_size=100)
    pools_started.clear()  # (that run's own pool)
    with workers.reusing():
        from pipeline.quality import start_workers

        start_workers(config, None, 600, batch_size=100)
        quality_stage(first, tmp_path / "kept1.parquet", tmp_path / "rejected1.parquet", config, batch_size=100)
        quality_stage(second, tmp_path / "kept2.parquet", tmp_path / "rejected2.parquet", config, batch_size=100)
    assert pools_started == [5]
    assert (tmp_path / "kept2.parquet").read_bytes() == alone.read_bytes()  # the same rows, whatever the workers


def _signature_arguments(config: SFTConfig, num_proc: int) -> tuple:
    return ("pipeline.dedup.lsh:_init_worker", "pipeline.dedup.lsh:_signatures_in_worker", (config.dedup.model_dump_json(),), num_proc)


def test_a_switched_pool_applies_its_new_task_in_the_same_processes(tmp_path):
    """WorkerPool.switch: the running workers initialise again and answer with the new task; an
    initializer that raises is raised in the caller at the next map."""
    from pipeline.quality import _JUDGE, _pool_arguments

    config = SFTConfig()
    batch = pq.read_table(write_conversations(tmp_path / "in.parquet", count=300, seed=8)).to_batches()[0]
    with workers.WorkerPool(*_pool_arguments(config, None, 1)) as fresh:
        [(verdicts, changed, _)] = fresh.map([(_JUDGE, batch)])  # (and the filters' timings)
    with workers.WorkerPool(*TASK) as pool:
        assert list(pool.map(ITEMS)) == [workers._resolve(TASK[1])(item) for item in ITEMS]
        pids = pool.pids
        pool.switch(*_pool_arguments(config, None, 1)[:3])
        assert [answer[:2] for answer in pool.map([(_JUDGE, batch), (_JUDGE, batch)])] == [(verdicts, changed)] * 2
        assert pool.pids == pids and pool.idle
        pool.switch("pipeline.quality:_init_worker", "pipeline.quality:_in_worker", ("{not json", None))
        with pytest.raises(Exception, match="JSON|json"):
            list(pool.map([(_JUDGE, batch)]))
        assert not exited(pids) and not pool.idle  # running, but never to be handed on


def test_inside_reusing_the_signature_workers_become_the_quality_workers(tmp_path, pools_started):
    """A run of one input signs it in worker processes while ingest writes it; the quality stage
    after dedup then filters in those same processes, switched to the filters, rather than
    starting and importing a second set: the same rows kept and rejected as new workers give."""
    from pipeline.dedup.lsh import _signature_table
    from pipeline.quality import start_workers

    config = SFTConfig()
    config.quality.num_proc = 2
    source = write_conversations(tmp_path / "in.parquet", count=600, seed=9)
    quality_stage(source, tmp_path / "alone.parquet", tmp_path / "alone-rejected.parquet", config, batch_size=100)
    table = pq.read_table(source)
    pools_started.clear()
    with workers.reusing():
        with workers.pool(*_signature_arguments(config, 2)) as signing:
            signed = list(signing.map([table.slice(0, 300), table.slice(300)]))
            signers = signing.pids
        assert signed[0].equals(_signature_table(table.slice(0, 300), config.dedup))
        start_workers(config, None, 600, batch_size=100)
        quality_stage(source, tmp_path / "kept.parquet", tmp_path / "rejected.parquet", config, batch_size=100)
        assert not exited(signers)
    assert pools_started == [2]  # the signature workers; none for the quality stage
    assert exited(signers)
    assert (tmp_path / "kept.parquet").read_bytes() == (tmp_path / "alone.parquet").read_bytes()
    assert (tmp_path / "rejected.parquet").read_bytes() == (tmp_path / "alone-rejected.parquet").read_bytes()


def test_a_pool_of_another_kind_is_switched_only_when_idle_and_only_inside_reusing(pools_started):
    with workers.reusing():
        with workers.pool(*TASK) as first:
            list(first.map(ITEMS))
            with workers.pool("pipeline.quality:_init_worker", "pipeline.quality:_in_worker", (SFTConfig().model_dump_json(), None), 2):
                pass  # the first pool is busy (in its block): a new one starts
        assert pools_started == [2, 2]
    pools_started.clear()
    with workers.pool(*TASK) as first:
        list(first.map(ITEMS))
    with workers.pool("pipeline.quality:_init_worker", "pipeline.quality:_in_worker", (SFTConfig().model_dump_json(), None), 2):
        pass
    assert pools_started == [2, 2]  # outside reusing nothing is kept, so nothing is switched


def test_a_pool_whose_switch_failed_in_a_worker_is_never_handed_on(pools_started):
    with workers.reusing():
        with pytest.raises(Exception, match="JSON|json"), workers.pool(*TASK) as pool:
            failed = pool.pids
            pool.switch("pipeline.quality:_init_worker", "pipeline.quality:_in_worker", ("{not json", None))
            list(pool.map(ITEMS))
        assert not pool.idle and exited(failed)
        with workers.pool(*TASK) as again:
            assert set(again.pids).isdisjoint(failed)


def test_close_idle_lets_one_kind_of_idle_pool_go_and_keeps_the_others():
    quality = ("pipeline.quality:_init_worker", "pipeline.quality:_in_worker", (SFTConfig().model_dump_json(), None), 1)
    with workers.reusing():
        with workers.pool(*TASK) as steps_like:
            kept = steps_like.pids
        with workers.pool(*quality) as other:
            other_pids = other.pids
        workers.close_idle(TASK[1])
        assert exited(kept) and not exited(other_pids)
        with workers.pool(*quality) as again:
            assert again.pids == other_pids
