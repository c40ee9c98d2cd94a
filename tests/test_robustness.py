"""Interrupted stages and an unreachable or failing MLflow: outputs stay whole, the next run recovers.

`kill -9` cannot be caught, so a stage is only safe if every output appears by a rename of a complete
temporary sibling (`smearnet.io.atomic_directory`, `write_text`; `generate_cohort` stages its own
folder). These tests kill the real stage scripts mid-run, and also at every rename they make, then check
that the output is absent or its complete previous version, and that the next run succeeds and deletes
the temporary folders the killed run left behind.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest

from bad_inputs import snapshot
from conftest import colour_cells
from smearnet.errors import SmearnetError, run_cli
from smearnet.io import atomic_directory, atomic_file, remove_stale_siblings
from test_cli_errors import (PIPELINE, assert_clean_failure, make_params, run_stage, small_split, stage_env,
                             write_smear_cells, write_split)


# --------------------------------------------------------------------------- helpers


def fake_previous_output(folder: Path) -> dict[str, str]:
    """A complete 'previous version' of an output folder; returns its snapshot."""
    (folder / "images").mkdir(parents=True)
    (folder / "manifest.csv").write_text("path,label\nimages/old.jpg,normal\n")
    (folder / "images" / "old.jpg").write_bytes(b"previous run")
    return snapshot(folder)


def temporary_siblings(final: Path) -> list[Path]:
    return sorted(final.parent.glob(f".{final.name}.*"))


def wait_for(condition: Callable[[], bool], process: subprocess.Popen, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"the stage ended (exit {process.returncode}) before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def kill_9(process: subprocess.Popen) -> None:
    """SIGKILL the stage and its worker processes (its own session), as a job scheduler or `kill -9 -<pgid>` does."""
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, "the stage was not running any more when it was killed"


def start_stage(script: str, cwd: Path, log: Path) -> subprocess.Popen:
    with open(log, "w") as handle:
        return subprocess.Popen([sys.executable, str(PIPELINE / script)], cwd=cwd, env=stage_env(), stdout=handle,
                                stderr=subprocess.STDOUT, start_new_session=True)


def has_jpeg(folder: Path) -> bool:
    return any(True for _ in folder.rglob("*.jpg"))


def assert_recovered(result: subprocess.CompletedProcess, final: Path, stale: list[Path]) -> None:
    """The re-run succeeded, said it removed the killed run's temporary folders, and left none."""
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert f"removed {len(stale)} temporary folder(s) left by an interrupted run" in result.stderr
    assert temporary_siblings(final) == []


# --------------------------------------------------------------------------- kill -9 mid-run


def test_kill_9_mid_upsample_keeps_the_previous_output_and_the_rerun_recovers(tmp_path: Path) -> None:
    make_params(tmp_path, ["augment.per_class=150", "augment.workers=2"])
    write_split(tmp_path, small_split({"normal": 6, "classic_rl": 3, "covid_rl": 2}))
    final = tmp_path / "data" / "upsampled"
    previous = fake_previous_output(final)
    inputs = {name: snapshot(tmp_path / "data" / name) for name in ("split", "images")}

    process = start_stage("upsample.py", tmp_path, tmp_path / "killed.log")
    wait_for(lambda: any(has_jpeg(d) for d in temporary_siblings(final)), process, "augmented images to appear")
    kill_9(process)

    assert snapshot(final) == previous
    stale = temporary_siblings(final)
    assert [p.name.split("-")[0] for p in stale] == [".upsampled.partial"]
    assert not (tmp_path / "metrics" / "upsample.json").exists()

    assert_recovered(run_stage("upsample.py", tmp_path), final, stale)
    upsampled = pd.read_csv(final / "manifest.csv", keep_default_na=False)
    assert upsampled["label"].value_counts().to_dict() == {"normal": 150, "classic_rl": 150, "covid_rl": 150}
    assert sum(1 for _ in (final / "images").rglob("*.jpg")) == 150 * 3 - 11
    assert {name: snapshot(tmp_path / "data" / name) for name in inputs} == inputs


def _raw_manifest(project: Path, n_images: int) -> Path:
    """raw/manifest.csv of `n_images` distinct coloured cells, paths relative to the CSV."""
    labels = ["normal", "classic_rl", "covid_rl"] * (n_images // 3)
    rows = colour_cells(project / "raw" / "images", labels, [f"P{i // 4:03d}" for i in range(len(labels))])
    rows["path"] = [os.path.relpath(path, project / "raw") for path in rows["path"]]
    rows.to_csv(project / "raw" / "manifest.csv", index=False)
    return project / "raw" / "manifest.csv"


def test_kill_9_mid_ingest_keeps_the_previous_output_and_the_rerun_recovers(tmp_path: Path) -> None:
    make_params(tmp_path, ["data=manifest", "data.manifest=raw/manifest.csv", "ingest.workers=2"])
    _raw_manifest(tmp_path, 300)
    final = tmp_path / "data" / "ingested"
    previous = fake_previous_output(final)
    inputs = snapshot(tmp_path / "raw")

    log = tmp_path / "killed.log"
    process = start_stage("ingest.py", tmp_path, log)
    wait_for(lambda: bool(temporary_siblings(final)) and "Validating images" in log.read_text(), process,
             "validation to start")
    kill_9(process)

    assert snapshot(final) == previous
    stale = temporary_siblings(final)
    assert [p.name.split("-")[0] for p in stale] == [".ingested.partial"]

    assert_recovered(run_stage("ingest.py", tmp_path), final, stale)
    assert sorted(os.listdir(final)) == ["manifest.csv", "quarantine.csv", "validation.json", "validation.md"]
    assert len(pd.read_csv(final / "manifest.csv")) == 300
    assert json.loads((final / "validation.json").read_text())["manifest"] == "raw/manifest.csv"  # not absolute
    assert snapshot(tmp_path / "raw") == inputs


def test_kill_9_mid_generate_keeps_the_previous_output_and_the_rerun_recovers(tmp_path: Path) -> None:
    make_params(tmp_path, ["data.synthetic.scale=0.02", "data.synthetic.image_size=128", "data.synthetic.workers=2"])
    final = tmp_path / "data" / "synthetic"
    previous = fake_previous_output(final)

    process = start_stage("generate.py", tmp_path, tmp_path / "killed.log")
    wait_for(lambda: any(has_jpeg(d) for d in temporary_siblings(final)), process, "rendered cells to appear")
    kill_9(process)

    assert snapshot(final) == previous
    stale = temporary_siblings(final)
    assert [p.name.split("-")[0] for p in stale] == [".synthetic.partial"]

    assert_recovered(run_stage("generate.py", tmp_path), final, stale)
    manifest = pd.read_csv(final / "manifest.csv")
    assert len(manifest) > 100 and all((final / path).is_file() for path in manifest["path"])


# --------------------------------------------------------------------------- kill -9 at every rename

# Runs a stage script with os.replace patched to SIGKILL the process on its k-th call: the worst moments
# for a kill, reproducibly (the first renames move files into the staging folder, the last ones swap it).
KILL_AT_RENAME = textwrap.dedent("""
    import os, runpy, signal, sys
    target, script = int(sys.argv[1]), sys.argv[2]
    calls, real_replace = [0], os.replace
    def replace(*args, **kwargs):
        calls[0] += 1
        if calls[0] == target:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_replace(*args, **kwargs)
    os.replace = replace
    sys.argv = [script]
    runpy.run_path(script, run_name="__main__")
""")
INGEST_RENAMES = 7  # 4 files into the staging folder, old folder aside, new folder in, metrics/ingest.json


def test_kill_9_at_every_rename_of_ingest_leaves_whole_outputs(tmp_path: Path) -> None:
    make_params(tmp_path, ["data=manifest", "data.manifest=raw/manifest.csv", "ingest.workers=1"])
    _raw_manifest(tmp_path, 6)
    final = tmp_path / "data" / "ingested"
    first = run_stage("ingest.py", tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    previous = snapshot(final)
    previous_files = {name: (final / name).read_bytes() for name in os.listdir(final)}
    (tmp_path / "raw" / "manifest.csv").write_text(  # the next run's outputs differ: one row fewer
        "\n".join((tmp_path / "raw" / "manifest.csv").read_text().splitlines()[:-1]) + "\n")

    left_behind: list[Path] = []
    for k in range(1, INGEST_RENAMES + 1):
        killed = subprocess.run([sys.executable, "-c", KILL_AT_RENAME, str(k), str(PIPELINE / "ingest.py")],
                                cwd=tmp_path, env=stage_env(), capture_output=True, text=True, timeout=600)
        assert killed.returncode == -signal.SIGKILL, f"rename {k}: {killed.stderr[-2000:]}"
        assert not any(p.exists() for p in left_behind), "a run removes what the killed run before it left"
        if k < INGEST_RENAMES - 1:  # before the swap: the previous version, untouched
            assert snapshot(final) == previous, f"killed at rename {k}"
        elif k == INGEST_RENAMES - 1:  # between the two swap renames: absent, previous version set aside whole
            assert not final.exists()
            [retired] = final.parent.glob(".ingested.old-*")
            assert {p.name: p.read_bytes() for p in (retired / "ingested").iterdir()} == previous_files
            os.replace(retired / "ingested", final)  # back to the previous version for the last case
        else:  # the new version is in place; only metrics/ingest.json is stale (and dvc.lock, so DVC re-runs)
            assert len(pd.read_csv(final / "manifest.csv")) == 5
        left_behind = temporary_siblings(final)
        assert left_behind or k == INGEST_RENAMES, f"killed at rename {k}: no staging folder was left to clean"

    rerun = run_stage("ingest.py", tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert temporary_siblings(final) == [] and len(pd.read_csv(final / "manifest.csv")) == 5


# --------------------------------------------------------------------------- atomic_directory


def test_atomic_file_replaces_only_on_success_and_leaves_no_partial(tmp_path: Path) -> None:
    final = tmp_path / "cache" / "model.onnx"
    with pytest.raises(RuntimeError):
        with atomic_file(final) as partial:
            partial.write_bytes(b"half")
            raise RuntimeError("exporter failed")
    assert not final.exists() and list(final.parent.iterdir()) == []
    with atomic_file(final) as partial:
        partial.write_bytes(b"whole")
    assert final.read_bytes() == b"whole" and list(final.parent.iterdir()) == [final]


def test_atomic_directory_keeps_the_previous_version_when_the_block_fails(tmp_path: Path) -> None:
    final = tmp_path / "out"
    previous = fake_previous_output(final)
    with pytest.raises(SmearnetError):
        with atomic_directory(final) as staging:
            (staging / "manifest.csv").write_text("half")
            raise SmearnetError("failed mid-way")
    assert snapshot(final) == previous and temporary_siblings(final) == []

    with atomic_directory(final) as staging:
        (staging / "manifest.csv").write_text("new")
    assert os.listdir(final) == ["manifest.csv"] and (final / "manifest.csv").read_text() == "new"
    assert temporary_siblings(final) == []
    assert final.stat().st_mode & 0o777 == 0o777 & ~_umask_of_this_process()  # not mkdtemp's 0o700


def test_only_temporary_folders_of_dead_processes_are_removed(tmp_path: Path) -> None:
    final = tmp_path / "upsampled"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = [tmp_path / f".upsampled.partial-{dead_pid}-0123abcd", tmp_path / f".upsampled.old-{dead_pid}-89abcdef"]
    live = tmp_path / f".upsampled.partial-{os.getppid()}-0123abcd"  # the parent of pytest is alive
    unrelated = [tmp_path / ".upsampled.partial-notapid-0123abcd", tmp_path / f".other.partial-{dead_pid}-0123abcd",
                 tmp_path / "upsampled.partial"]
    for folder in [*stale, live, *unrelated]:
        (folder / "images").mkdir(parents=True)

    assert remove_stale_siblings(final) == sorted(stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in [live, *unrelated])


def _umask_of_this_process() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# --------------------------------------------------------------------------- MLflow


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_unreachable_tracking_server_stops_a_logging_stage_fast_naming_the_uri(tmp_path: Path) -> None:
    uri = f"http://127.0.0.1:{_closed_port()}"
    make_params(tmp_path, ["smear.bootstrap_resamples=50"])
    rows = ([(f"pt-pos{i}", "covid_rl", "covid_rl", 0.9) for i in range(2)]
            + [(f"pt-neg{i}", "normal", "normal", 0.1) for i in range(2)])
    cells = write_smear_cells(tmp_path, rows)
    before = cells.read_bytes()

    started = time.monotonic()
    result = run_stage("smear.py", tmp_path, env=stage_env(uri))
    elapsed = time.monotonic() - started

    assert_clean_failure(result, f"The MLflow tracking server at {uri} is unreachable", "MLFLOW_TRACKING_URI")
    assert elapsed < 90, f"{elapsed:.0f} s: the stage retried instead of failing fast"  # imports included
    assert cells.read_bytes() == before


@pytest.mark.parametrize("server", ["closed_port", "silent_server"])
def test_setup_mlflow_fails_within_seconds_naming_the_uri(server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow  # noqa: F401 - imported before timing

    from smearnet.tracking.runs import setup_mlflow

    with socket.socket() as listener:
        if server == "silent_server":  # accepts the connection, never answers (a hung or firewalled server)
            listener.bind(("127.0.0.1", 0))
            listener.listen(1)
            port = listener.getsockname()[1]
        else:
            port = _closed_port()
        uri = f"http://127.0.0.1:{port}"
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        started = time.monotonic()
        with pytest.raises(SmearnetError, match=f"tracking server at {uri} is unreachable"):
            setup_mlflow({"tracking_uri": "sqlite:///unused.db", "experiment": "robustness"})
        assert time.monotonic() - started < 10


@pytest.mark.parametrize("exception, exit_code", [(SmearnetError("bad input", "fix it"), 2),
                                                  (KeyboardInterrupt(), 130), (RuntimeError("a bug"), None)])
def test_a_stage_failing_inside_its_run_leaves_it_failed_not_running(mlflow_uri: str, exception: BaseException,
                                                                      exit_code: int | None) -> None:
    import mlflow

    from smearnet.tracking.runs import setup_mlflow

    run_ids = []

    def stage() -> None:
        setup_mlflow({"tracking_uri": mlflow_uri, "experiment": "robustness"})
        with mlflow.start_run(run_name=f"failing-{type(exception).__name__}") as run:
            run_ids.append(run.info.run_id)
            mlflow.log_metric("progress", 0.5)
            raise exception

    if exit_code is None:
        with pytest.raises(RuntimeError):
            run_cli(stage)
    else:
        with pytest.raises(SystemExit) as stopped:
            run_cli(stage)
        assert stopped.value.code == exit_code
    assert mlflow.active_run() is None
    assert mlflow.MlflowClient().get_run(run_ids[0]).info.status == "FAILED"
