"""Races between real processes: manifest creation, and readers of "latest" against a saving, pruning writer."""

import json

import pytest

pytestmark = pytest.mark.slow


def test_eight_processes_race_to_create_the_manifest(tmp_path, forkserver):
    import crash_jobs

    barrier = forkserver.Barrier(8)
    outs = [str(tmp_path / f"out{i}.json") for i in range(8)]
    procs = [
        forkserver.Process(target=crash_jobs.manifest_racer, args=(str(tmp_path / "run"), barrier, i, outs[i]))
        for i in range(8)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    results = [json.load(open(o)) for o in outs]
    winners = [i for i, r in enumerate(results) if r["won"]]
    assert len(winners) == 1
    content = json.loads((tmp_path / "run" / "model_architecture.json").read_text())
    assert content["writer"] == winners[0]
    full = len((tmp_path / "run" / "model_architecture.json").read_bytes())
    assert all(r["seen_writer"] == winners[0] and r["seen_len"] == full for r in results)  # nobody saw a partial file
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["model_architecture.json"]  # no temporaries left


def test_reader_of_latest_never_errs_while_writer_saves_and_prunes(tmp_path, forkserver):
    import crash_jobs

    run = str(tmp_path / "run")
    done = forkserver.Event()
    writer = forkserver.Process(target=crash_jobs.saver_pruner, args=(run, 150, done))
    readers = [
        forkserver.Process(target=crash_jobs.latest_reader, args=(run, done, str(tmp_path / f"r{i}.json")))
        for i in range(2)
    ]
    for p in (writer, *readers):
        p.start()
    for p in (writer, *readers):
        p.join(timeout=300)
        assert p.exitcode == 0
    for i in range(2):
        result = json.load(open(tmp_path / f"r{i}.json"))
        assert result["errors"] == []
        assert result["loads"] > 10
