"""The refresh flow on the real Prefect engine, deployments and their schedules, scale-out runners."""

from __future__ import annotations

import json
import threading

import pytest

from pipeline.manifest import read_manifest
from tests.support.inputs import make_inputs, shard_bytes, shard_rows

pytestmark = pytest.mark.prefect

CONFIG = {"shards": {"val_fraction": 0.2}}


def _task_names(state) -> list[str]:
    """The names of a flow run's task runs, without their suffixes, sorted (one per run)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    flow_run = FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
    with get_client(sync_client=True) as client:
        return sorted(run.name.rsplit("-", 1)[0] for run in client.read_task_runs(flow_run_filter=flow_run))


def _config():
    from pipeline.config import SFTConfig

    return SFTConfig.model_validate(CONFIG).model_dump(mode="json")


def test_refresh_flow_runs_incrementally_on_real_engine(prefect_harness, tmp_path, bpe_tokenizer_path):
    from flows.refresh import refresh_flow

    inputs = make_inputs(tmp_path / "in")
    out = tmp_path / "data"
    first = refresh_flow(inputs=[str(inputs[0])], tokenizer=str(bpe_tokenizer_path), out=str(out), config=_config())
    assert first["version"] == 1
    before = shard_bytes(out)
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()}

    # Unchanged inputs: no work, no new shard, same manifest version.
    again = refresh_flow(inputs=[str(inputs[0])], tokenizer=str(bpe_tokenizer_path), out=str(out), config=_config())
    assert again["version"] == 1
    assert {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()} == mtimes

    # One new file: only it is read; old shards stay byte-identical.
    third = refresh_flow(inputs=[str(p) for p in inputs], tokenizer=str(bpe_tokenizer_path), out=str(out), config=_config())
    assert third["version"] == 2
    assert third["history"][-1]["read"] == 9
    after = shard_bytes(out)
    assert all(after[name] == data for name, data in before.items())

    # ... and the result equals a full build of both files at once, through the flow too.
    full = tmp_path / "full"
    refresh_flow(inputs=[str(p) for p in inputs], tokenizer=str(bpe_tokenizer_path), out=str(full), config=_config())
    assert shard_rows(out) == shard_rows(full)


def test_a_refresh_publishes_its_summary_and_stage_table(prefect_harness, tmp_path, bpe_tokenizer_path):
    """A flow run leaves its stage table and summary on the server, where the Prefect UI shows them."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from flows.refresh import refresh_flow

    inputs = [str(p) for p in make_inputs(tmp_path / "in")]
    state = refresh_flow(inputs=inputs, tokenizer=str(bpe_tokenizer_path), out=str(tmp_path / "data"), config=_config(), return_state=True)
    assert state.is_completed()
    manifest = read_manifest(tmp_path / "data")
    with get_client(sync_client=True) as client:
        found = ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id]))
        artifacts = {artifact.key: artifact for artifact in client.read_artifacts(artifact_filter=found)}
    assert set(artifacts) == {"sftkit-stages", "sftkit-summary"}
    assert f"rows kept in shards: **{manifest['counts']['kept']}**" in artifacts["sftkit-summary"].data
    assert "New inputs processed: **2**" in artifacts["sftkit-summary"].data
    assert {row["stage"] for row in json.loads(artifacts["sftkit-stages"].data)} >= {"ingest", "tokenize"}


def test_a_refresh_sends_heartbeats_and_ends_without_waiting_for_their_thread(prefect_harness, tmp_path, bpe_tokenizer_path, monkeypatch):
    """The run's heartbeats still go out (crash detection on the server relies on them), but its
    end does not join their thread, which sleeps in one-second steps: Prefect's sync engine
    waited up to a second at the end of every run for it. The thread ends by itself, sending
    nothing after the run."""
    from prefect.flow_engine import FlowRunEngine

    from flows.refresh import refresh_flow

    sent: list[threading.Thread] = []
    joined: list[threading.Thread] = []
    emit = FlowRunEngine._emit_flow_run_heartbeat

    def recording(engine, *args, **kwargs):
        thread = threading.current_thread()
        if thread not in sent:  # the heartbeat thread: note whoever joins it
            join = thread.join

            def noting_join(*join_args, **join_kwargs):
                joined.append(thread)
                return join(*join_args, **join_kwargs)

            thread.join = noting_join
        sent.append(thread)
        return emit(engine, *args, **kwargs)

    monkeypatch.setattr(FlowRunEngine, "_emit_flow_run_heartbeat", recording)
    inputs = [str(p) for p in make_inputs(tmp_path / "in")]
    manifest = refresh_flow(inputs=inputs, tokenizer=str(bpe_tokenizer_path), out=str(tmp_path / "data"), config=_config())
    assert manifest["version"] == 1
    assert sent, "no heartbeat was sent"
    [thread] = set(sent)
    assert joined == []
    at_end = len(sent)
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert len(sent) == at_end


def test_refresh_flow_on_local_dask_cluster(prefect_harness, tmp_path, bpe_tokenizer_path, monkeypatch):
    pytest.importorskip("prefect_dask")
    import pipeline.steps as steps
    from flows.refresh import refresh_flow
    from flows.runner import make_task_runner

    inputs = make_inputs(tmp_path / "in")
    threads_out, dask_out = tmp_path / "threads", tmp_path / "dask"
    refresh_flow(inputs=[str(p) for p in inputs], tokenizer=str(bpe_tokenizer_path), out=str(threads_out), config=_config())
    # On a cluster the signatures and band partitions are tasks of their own (as if the inputs were big)
    monkeypatch.setattr(steps, "_BYTES_FOR_WORKERS", 0)
    flow = refresh_flow.with_options(task_runner=make_task_runner("dask", max_workers=2))
    state = flow(inputs=[str(p) for p in inputs], tokenizer=str(bpe_tokenizer_path), out=str(dask_out), config=_config(), return_state=True)
    manifest = state.result()
    assert {"dedup-signatures", "dedup-partition", "dedup-resolve"} <= set(_task_names(state))
    assert manifest["counts"] == read_manifest(threads_out)["counts"]
    assert shard_bytes(dask_out) == shard_bytes(threads_out)


def test_deployment_carries_cron_schedule_and_parameters(tmp_path, bpe_tokenizer_path):
    from flows.deploy import build_deployment

    inputs = make_inputs(tmp_path / "in")
    deployment = build_deployment([str(inputs[0])], "0 3 * * *", str(bpe_tokenizer_path), tmp_path / "data", name="nightly")
    assert deployment.name == "nightly"
    assert deployment.flow_name == "sftkit-refresh"
    crons = [s.schedule.cron for s in deployment.schedules]
    assert crons == ["0 3 * * *"]
    assert deployment.parameters["out"] == str((tmp_path / "data").absolute())
    assert deployment.parameters["inputs"] == [str(inputs[0].absolute())]
    assert deployment.parameters["config"]["dedup"]["threshold"] == 0.8


def test_deploy_without_server_explains_what_to_start(tmp_path, bpe_tokenizer_path, monkeypatch):
    from flows.deploy import serve_refresh

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with pytest.raises(ValueError, match="prefect server start"):
        serve_refresh(["x.jsonl"], "0 3 * * *", str(bpe_tokenizer_path), tmp_path / "data")


def test_unknown_task_runner_is_a_clear_error():
    from flows.runner import make_task_runner

    with pytest.raises(ValueError, match="unknown task runner"):
        make_task_runner("spark")


def test_pipeline_never_imports_prefect(repo_root):
    offenders = [
        str(path.relative_to(repo_root))
        for path in (repo_root / "pipeline").rglob("*.py")
        if "import prefect" in path.read_text() or "from prefect" in path.read_text()
    ]
    assert offenders == []


def test_deployment_registered_on_server_has_its_schedule(prefect_harness, tmp_path, bpe_tokenizer_path):
    from prefect.client.orchestration import get_client

    from flows.deploy import build_deployment

    inputs = make_inputs(tmp_path / "in")
    deployment = build_deployment([str(inputs[0])], "0 3 * * *", str(bpe_tokenizer_path), tmp_path / "data", name="nightly-test")
    deployment_id = deployment.apply()
    with get_client(sync_client=True) as client:
        stored = client.read_deployment(deployment_id)
    assert stored.name == "nightly-test"
    assert [s.schedule.cron for s in stored.schedules] == ["0 3 * * *"]
    assert all(s.active for s in stored.schedules)
    assert stored.parameters["tokenizer"] == str(bpe_tokenizer_path.absolute())


def test_train_flow_trains_on_a_mixture_of_two_folders_on_real_engine(prefect_harness, tmp_path, bpe_tokenizer_path):
    from flows.train import train_flow
    from pipeline.config import SFTConfig
    from pipeline.steps import prepare

    inputs = make_inputs(tmp_path / "in")  # alpaca.json and chat.jsonl
    for name, source in (("team-a", inputs[0]), ("team-b", inputs[1])):
        prepare([str(source)], str(bpe_tokenizer_path), tmp_path / "data" / name, SFTConfig.model_validate(CONFIG))
    spec = tmp_path / "mix.yaml"
    spec.write_text(
        "datasets: [data/team-a, data/team-b]\n"
        "groups:\n  - {name: a, sources: ['*alpaca*'], weight: 0.5}\n  - {name: b, sources: ['*chat*'], weight: 0.5}\n",
        encoding="utf-8",
    )
    options = {"model": "tiny", "max_steps": 2, "batch_tokens": 1024, "lr": 1e-3, "device": "cpu", "progress": False}
    metrics = train_flow(mixture=str(spec), out=str(tmp_path / "run"), options=options)
    assert metrics["steps"] == 2 and metrics["final_dir"]
    plan = __import__("json").loads((tmp_path / "run" / "plan.json").read_text())
    assert [g["name"] for g in plan["groups"]] == ["a", "b"] and all(g["delivered_rows"] for g in plan["groups"])

    with pytest.raises(ValueError, match="`data` .* or `mixture` .*, exactly one"):
        train_flow.fn(data=str(tmp_path / "data" / "team-a"), mixture=str(spec), out=str(tmp_path / "other"))
    with pytest.raises(ValueError, match="expected_version names the version of `data`"):
        train_flow.fn(mixture=str(spec), out=str(tmp_path / "other"), expected_version=1)


def test_big_inputs_sign_in_the_ingest_workers_and_a_run_missing_a_signature_file_resumes(
    prefect_harness, tmp_path, bpe_tokenizer_path, monkeypatch
):
    import pipeline.steps as steps
    from flows.refresh import refresh_flow

    inputs = [str(p) for p in make_inputs(tmp_path / "in")]

    def task_names(out, inputs=inputs):
        state = refresh_flow(inputs=inputs, tokenizer=str(bpe_tokenizer_path), out=str(out), config=_config(), return_state=True)
        assert state.is_completed()
        return _task_names(state)

    small = task_names(tmp_path / "small")  # the resolve task makes signatures and candidates itself
    monkeypatch.setattr(steps, "_BYTES_FOR_WORKERS", 0)  # as if every input were big
    big = task_names(tmp_path / "big")
    assert "dedup-signatures" not in small and "dedup-partition" not in small
    # On this machine's threads the ingest steps' workers sign the chunks and the resolve task
    # makes the band partitions (a thread per core): neither has tasks of its own.
    assert "dedup-resolve" in big and "dedup-signatures" not in big and "dedup-partition" not in big
    assert shard_bytes(tmp_path / "big") == shard_bytes(tmp_path / "small")
    assert read_manifest(tmp_path / "big")["counts"] == read_manifest(tmp_path / "small")["counts"]

    # A run stopped after its ingest steps, one of whose signature files is gone (as when killed
    # between a chunk's ingest mark and its signatures): the rerun makes it again (in the ingest
    # task, or a signatures task of its own where Prefect's cache answered for the ingest) and
    # ends with the same dataset.
    resumed = tmp_path / "resumed"
    with_fingerprints = steps.with_fingerprints

    def stopped(plan):
        raise RuntimeError("stopped here")

    monkeypatch.setattr(steps, "with_fingerprints", stopped)
    state = refresh_flow(inputs=inputs, tokenizer=str(bpe_tokenizer_path), out=str(resumed), config=_config(), return_state=True)
    assert state.is_failed()
    monkeypatch.setattr(steps, "with_fingerprints", with_fingerprints)
    signatures = sorted((resumed / ".work" / "dedup-signatures").glob("*.arrow"))
    assert len(signatures) == len(inputs)
    signatures[0].unlink()
    task_names(resumed)
    assert shard_bytes(resumed) == shard_bytes(tmp_path / "small")
    assert read_manifest(resumed)["counts"] == read_manifest(tmp_path / "small")["counts"]

    # One input on two or more cores: its signatures are made while ingest writes the chunk
    # (pipeline.dedup.lsh.signing_alongside), to the same dataset.
    task_names(tmp_path / "one-big", inputs[:1])
    monkeypatch.setattr(steps, "_BYTES_FOR_WORKERS", 1 << 60)
    task_names(tmp_path / "one-small", inputs[:1])
    assert shard_bytes(tmp_path / "one-big") == shard_bytes(tmp_path / "one-small")
    assert read_manifest(tmp_path / "one-big")["counts"] == read_manifest(tmp_path / "one-small")["counts"]
