"""Reliability, round two (issue 19), the fast cases: config values refused at load,
manifests of the wrong shape or edited, damaged lock and failure records, run-directory
ownership and the sweep of a killed run's temporaries, data-file digests, checked cache
entries, network calls that never hang, and the files at fault named."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from recoup.orchestrator import rundir, store
from recoup.orchestrator.cli import main
from recoup.orchestrator.config import ConfigError, load_config
from recoup.orchestrator.lock import LOCK_NAME, RunLock, boot_id, process_start
from recoup.orchestrator.runconfig import RunConfig
from recoup.orchestrator.runner import plan_run
from recoup.stages.scoring.cache import read_checked, write_checked
from tests.conftest import tiny_config

# --------------------------------------------------------------------------- config at load


def _load(tmp_path: Path, sections: dict[str, Any], overrides: tuple[str, ...] = (),
          text: str | None = None) -> RunConfig:
    data: dict[str, Any] = {"run": {"dir": str(tmp_path / "run")},
                            "prepare": {"source": "tiny-llama"}}
    for k, v in sections.items():
        data[k] = {**data.get(k, {}), **v}
    path = tmp_path / "c.yaml"
    path.write_text(text if text is not None else yaml.safe_dump(data))
    return load_config(RunConfig, path, overrides)


FULL = ["prepare", "degrade", "data", "train"]
BAD_CONFIG = [
    ("nonfinite lr", {"train": {"engine": {"lr": float("inf")}}}, (), "train.engine.lr"),
    ("nonfinite alpha", {"train": {"lora": {"alpha": float("-inf")}}}, (), "train.lora.alpha"),
    ("nan sparsity override", {}, ("degrade.sparsity=nan",), "override 'degrade.sparsity=nan'"),
    ("inf lr override", {}, ("train.engine.lr=.inf",), "override 'train.engine.lr=.inf'"),
    ("bool steps", {"train": {"engine": {"steps": True}}}, (), "steps: true is a boolean"),
    ("bool windows", {"evaluate": {"max_windows": True}}, (), "max_windows: true is a boolean"),
    ("bool samples override", {"data": {"source": {"source": "alpaca", "path": "a.jsonl"}}},
     ("data.source.num_samples=true",), "num_samples: true is a boolean"),
    ("empty run dir", {"run": {"dir": ""}}, (), "run.dir: is empty"),
    ("device banana", {"run": {"device": "banana"}}, (), "'banana' is not a torch device"),
    ("unknown stage", {"run": {"pipeline": ["prepare", "bogus"]}}, (), "unknown stage 'bogus'"),
    ("stage twice", {"run": {"pipeline": ["prepare", "prepare"]}}, (), "more than once"),
    ("degrade method unknown", {"degrade": {"method": "nope"}}, (), "'nope' is unknown"),
    ("group size 0", {"degrade": {"method": "rtn", "group_size": 0}}, (), "degrade.group_size"),
    ("kv heads do not divide", {"prepare": {"tiny": {"heads": 4, "kv_heads": 3}}}, (),
     "kv_heads=3 does not divide heads=4"),
    ("hidden not multiple of heads", {"prepare": {"tiny": {"hidden": 60, "heads": 8,
                                                          "kv_heads": 2}}}, (),
     "hidden=60 is not a multiple"),
    ("lora layer out of range", {"run": {"pipeline": FULL},
                                 "train": {"method": "lora", "lora": {"layers": [0, 5]}}}, (),
     "[5] out of range: the model has 2 layers"),
    ("lora auto layers over depth", {"run": {"pipeline": FULL},
                                     "train": {"method": "lora", "lora": {"auto_layers": 3}}},
     (), "auto_layers=3 exceeds"),
    ("override through a tagged union", {"data": {"source": {"source": "alpaca",
                                                             "path": "a.jsonl"}}},
     ("data.source.num_samples=0",), "override 'data.source.num_samples=0'"),
]


@pytest.mark.parametrize(("sections", "overrides", "message"),
                         [c[1:] for c in BAD_CONFIG], ids=[c[0] for c in BAD_CONFIG])
def test_bad_config_value_is_refused_at_load(tmp_path: Path, sections: dict[str, Any],
                                             overrides: tuple[str, ...], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        _load(tmp_path, sections, overrides)
    assert message in str(e.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("text", "key", "line"), [
    ("run:\n  dir: r\nprepare:\n  source: tiny-llama\nrun:\n  device: cpu\n", "run", 5),
    ("run:\n  dir: r\n  dir: s\nprepare:\n  source: tiny-llama\n", "dir", 3),
], ids=["duplicate section", "duplicate key"])
def test_duplicate_yaml_key_is_refused_naming_key_and_line(tmp_path: Path, text: str, key: str,
                                                          line: int) -> None:
    with pytest.raises(ConfigError, match=f"duplicate key '{key}' at line {line}"):
        _load(tmp_path, {}, text=text)


def test_binary_config_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(ConfigError, match="c.yaml is not a text file"):
        load_config(RunConfig, tmp_path / "c.yaml")


@pytest.mark.parametrize("flags", [["--gpu-memory", "0"], ["--gpu-memory", "-5"],
                                   ["--gpu-memory", "nan"], ["--headroom", "1.5"],
                                   ["--gpus-per-node", "0"]],
                         ids=["gpu memory 0", "gpu memory negative", "gpu memory nan",
                              "headroom over 1", "gpus per node 0"])
def test_plan_refuses_bad_flags(tmp_path: Path, flags: list[str],
                                capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"run": {"dir": str(tmp_path / "r")},
                                   "prepare": {"source": "tiny-llama"}}))
    with pytest.raises(SystemExit) as e:
        main(["plan", str(cfg), *flags])
    assert e.value.code == 2
    assert flags[0] in capsys.readouterr().err


# --------------------------------------------------------------------------- manifests


def _manifest() -> store.Manifest:
    return store.Manifest(stage="s", version=1, fingerprint="f", config={"a": 1}, upstream={},
                          outputs={"x.bin": store.OutputFile(size=3, sha256="0" * 64)},
                          metrics={"ppl": 12.5}, started_at=1.0, finished_at=2.0)


def _rewrite(folder: Path, edit: Any, *, keep_checksum: bool = False) -> None:
    path = folder / store.MANIFEST
    obj = json.loads(path.read_text())
    obj = edit(obj)
    if isinstance(obj, dict) and not keep_checksum and store.CHECKSUM_KEY in obj:
        obj[store.CHECKSUM_KEY] = store.manifest_checksum(obj)  # valid checksum, bad shape
    path.write_text(json.dumps(obj))


BAD_MANIFESTS = {
    "outputs a string": (lambda o: {**o, "outputs": "x"}, False, "'outputs' is a str"),
    "outputs null": (lambda o: {**o, "outputs": None}, False, "'outputs' is a NoneType"),
    "metrics a list": (lambda o: {**o, "metrics": []}, False, "'metrics' is a list"),
    "version a bool": (lambda o: {**o, "version": True}, False, "'version' is a bool"),
    "output entry a number": (lambda o: {**o, "outputs": {"x.bin": 3}}, False, "not {size"),
    "output escapes": (lambda o: {**o, "outputs": {"../x": {"size": 1, "sha256": "a"}}},
                       False, "not a path inside"),
    "top level a list": (lambda o: [o], False, "a JSON object, not list"),
    "stage missing": (lambda o: {k: v for k, v in o.items() if k != "stage"}, False,
                      "'stage' is missing"),
    "edited metric": (lambda o: {**o, "metrics": {"ppl": 1.0}}, True, "checksum does not match"),
    "no checksum": (lambda o: {k: v for k, v in o.items() if k != store.CHECKSUM_KEY}, True,
                    "no checksum"),
}


@pytest.mark.parametrize("case", list(BAD_MANIFESTS))
def test_bad_manifest_is_refused_naming_the_file(tmp_path: Path, case: str) -> None:
    edit, keep, message = BAD_MANIFESTS[case]
    store.write_manifest(tmp_path, _manifest())
    assert store.read_manifest(tmp_path).metrics == {"ppl": 12.5}
    _rewrite(tmp_path, edit, keep_checksum=keep)
    with pytest.raises(store.ManifestError) as e:
        store.read_manifest(tmp_path)
    assert message in str(e.value) and str(tmp_path / store.MANIFEST) in str(e.value)


def test_damaged_manifest_and_failure_record_mean_recompute(tmp_path: Path,
                                                            data_dir: Path) -> None:
    cfg = tiny_config(tmp_path / "run", data_dir)
    (tmp_path / "run" / "prepare").mkdir(parents=True)
    (tmp_path / "run" / "prepare" / store.MANIFEST).write_text('{"outputs": "x"}')
    (tmp_path / "run" / "degrade").mkdir()
    (tmp_path / "run" / "degrade" / store.FAILED).write_text("[1, 2]")
    (tmp_path / "run" / "evaluate").mkdir()
    (tmp_path / "run" / "evaluate" / store.FAILED).write_text("")
    plans = {p.name: p for p in plan_run(cfg)}
    assert plans["prepare"].state == "stale" and "manifest.json" in plans["prepare"].damage
    assert plans["degrade"].state == "failed"
    assert "failed.json is unreadable" in plans["degrade"].reasons[0]
    assert plans["evaluate"].state == "failed"


# --------------------------------------------------------------------------- lock


def _old(path: Path) -> None:
    os.utime(path, (time.time() - 60, time.time() - 60))


@pytest.mark.parametrize("content", ["", "[]", "null", '{"pid": "x", "host": "h"}',
                                     '{"pid": 1.5}', "{garbled", '{"pid": true, "host": "h"}'],
                         ids=["empty", "list", "null", "pid not int", "pid float", "garbled",
                              "pid bool"])
def test_damaged_lock_is_taken_over(tmp_path: Path, content: str) -> None:
    (tmp_path / LOCK_NAME).write_text(content)
    _old(tmp_path / LOCK_NAME)
    with RunLock(tmp_path):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()


@pytest.mark.skipif(process_start(os.getpid()) is None, reason="needs /proc")
@pytest.mark.parametrize("field", ["start", "boot_id"], ids=["reused pid", "other boot"])
def test_lock_of_a_reused_pid_is_taken_over(tmp_path: Path, field: str) -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        holder = {"pid": child.pid, "host": socket.gethostname(), "since": 0,
                  "start": process_start(child.pid), "boot_id": boot_id()}
        holder[field] = 1 if field == "start" else "another-boot"
        (tmp_path / LOCK_NAME).write_text(json.dumps(holder))
        with RunLock(tmp_path):
            assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    finally:
        child.kill()
        child.wait()


def test_lock_records_boot_and_start(tmp_path: Path) -> None:
    with RunLock(tmp_path):
        held = json.loads((tmp_path / LOCK_NAME).read_text())
    if process_start(os.getpid()) is not None:
        assert held["start"] == process_start(os.getpid()) and held["boot_id"] == boot_id()


# --------------------------------------------------------------------------- run directory


@pytest.mark.parametrize("user_file", ["data/notes.txt", "prepare/x", "report/a.md",
                                       "config.yaml", "photo.jpg"])
def test_user_folder_is_refused_as_run_dir_and_left_alone(tmp_path: Path,
                                                          user_file: str) -> None:
    target = tmp_path / "mine" / user_file
    target.parent.mkdir(parents=True)
    target.write_text("precious")
    with pytest.raises(rundir.RunDirError, match="not empty and recoup did not create it"):
        rundir.claim(tmp_path / "mine", ("prepare", "data", "report"))
    assert target.read_text() == "precious"
    assert not (tmp_path / "mine" / rundir.MARK).exists()


def test_run_dir_marked_when_created_and_old_runs_adopted(tmp_path: Path) -> None:
    rundir.claim(tmp_path / "new", ("prepare",))
    assert (tmp_path / "new" / rundir.MARK).is_file()
    (tmp_path / "empty").mkdir()
    rundir.claim(tmp_path / "empty", ("prepare",))
    assert (tmp_path / "empty" / rundir.MARK).is_file()
    old = tmp_path / "old"
    (old / "logs").mkdir(parents=True)
    (old / "config.yaml").write_text("run: {}\n")
    (old / "logs" / "run.log").write_text("")
    with pytest.raises(rundir.RunDirError):  # no stage folder of recoup's: not adopted
        rundir.claim(old, ("prepare",))
    (old / "prepare").mkdir()
    (old / "prepare" / store.MANIFEST).write_text("{}")
    (old / "degrade").mkdir()
    (old / "degrade" / store.FAILED).write_text("{}")
    rundir.claim(old, ("prepare",))
    assert (old / rundir.MARK).is_file()
    mixed = tmp_path / "mixed"
    shutil.copytree(old, mixed)
    (mixed / rundir.MARK).unlink()
    (mixed / "thesis.tex").write_text("mine")
    with pytest.raises(rundir.RunDirError):  # one file of the user's: refused
        rundir.claim(mixed, ("prepare",))
    (tmp_path / "file").write_text("")
    with pytest.raises(rundir.RunDirError, match="is not a folder"):
        rundir.claim(tmp_path / "file", ())


def test_foreign_stage_folder_is_not_ours(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "mine.jsonl").write_text("{}")
    assert not rundir.is_ours(tmp_path / "data")
    (tmp_path / "data" / store.FAILED).write_text("{}")
    assert rundir.is_ours(tmp_path / "data") and rundir.is_ours(tmp_path / "nothing")


def _stage(folder: Path, manifest: bool) -> None:
    folder.mkdir(parents=True)
    (folder / "out.bin").write_text(folder.name)
    if manifest:
        (folder / store.MANIFEST).write_text("{}")


@pytest.mark.parametrize("staging_complete", [True, False],
                         ids=["kill after staging complete", "kill with staging partial"])
def test_sweep_finishes_or_undoes_an_interrupted_replacement(tmp_path: Path,
                                                             staging_complete: bool) -> None:
    _stage(tmp_path / "degrade.tmp-old-4242", manifest=True)
    _stage(tmp_path / "degrade.tmp-staging", manifest=staging_complete)
    (tmp_path / ".report.md.tmp-4242-abc123").write_text("half")
    (tmp_path / "report.md.tmp-4242").write_text("half")
    (tmp_path / "prepare").mkdir()
    (tmp_path / "prepare" / ".model.safetensors.tmp-77-0f0f").write_text("half")
    (tmp_path / "notes.tmp-draft").write_text("not ours")
    removed = rundir.sweep(tmp_path, ("prepare", "degrade"))
    expected = "degrade.tmp-staging" if staging_complete else "degrade.tmp-old-4242"
    assert (tmp_path / "degrade" / "out.bin").read_text() == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["degrade", "notes.tmp-draft",
                                                          "prepare"]
    assert not any((tmp_path / "prepare").iterdir()) and removed


# --------------------------------------------------------------------------- data digests


def test_data_digest_cached_by_size_and_mtime(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "d.txt"
    f.write_text("one")
    cache = tmp_path / "hashes.json"
    h = rundir.DataHasher(cache)
    first = h.digest(f)
    h.save()
    calls: list[Path] = []
    real = store.sha256_file
    monkeypatch.setattr(store, "sha256_file", lambda p: calls.append(p) or real(p))
    assert rundir.DataHasher(cache).digest(f) == first and not calls
    f.write_text("two!")
    assert rundir.DataHasher(cache).digest(f) != first and calls == [f]


def test_data_paths_found_in_a_section_and_escape_warned(tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture
                                                         ) -> None:
    section = {"wikitext": "w.raw", "zeroshot": {"tasks": [{"path": "p.jsonl",
                                                            "labels": None}]},
               "source": {"path": "../outside.jsonl"}}
    assert rundir.data_paths(section) == ["w.raw", "p.jsonl", "../outside.jsonl"]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "w.raw").write_text("x")
    with caplog.at_level(logging.WARNING):
        digests = rundir.data_digests(section, tmp_path / "data", rundir.DataHasher(None))
    assert digests["p.jsonl"] == "absent" and len(digests["w.raw"]) == 64
    assert str((tmp_path / "outside.jsonl").resolve()) in caplog.text


def test_binary_data_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "bin.jsonl").write_bytes(b"\x00\x01\x02PK")
    with pytest.raises(ValueError, match="bin.jsonl is a binary file"):
        rundir.check_text_file(tmp_path / "bin.jsonl", "data.source.path")
    (tmp_path / "latin.jsonl").write_bytes(b'{"a": "caf\xe9 ok and more text"}\n')
    with pytest.raises(ValueError, match="latin.jsonl is not UTF-8"):
        rundir.check_text_file(tmp_path / "latin.jsonl", "data.source.path")


# --------------------------------------------------------------------------- evaluate cache


@pytest.mark.parametrize("damage", ["edited value", "garbled", "old format"])
def test_bad_cache_entry_is_dropped_with_a_warning(tmp_path: Path, damage: str,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "wikitext-x.json"
    write_checked(path, {"ppl": 12.5})
    assert read_checked(path) == {"ppl": 12.5}
    obj = json.loads(path.read_text())
    if damage == "edited value":
        obj["value"]["ppl"] = 3.0
        path.write_text(json.dumps(obj))
    elif damage == "garbled":
        path.write_bytes(b"\x00\xff{{")
    else:
        path.write_text(json.dumps({"ppl": 3.0}))
    with caplog.at_level(logging.WARNING):
        assert read_checked(path) is None
    assert str(path) in caplog.text and not path.exists()


# --------------------------------------------------------------------------- network


@pytest.fixture
def silent_server() -> Iterator[str]:
    """127.0.0.1:PORT that accepts connections and never answers."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(srv.accept()[0])
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield f"127.0.0.1:{srv.getsockname()[1]}"
    stop.set()
    t.join()
    for c in held:
        c.close()
    srv.close()


def _closed_port() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"127.0.0.1:{port}"


@pytest.mark.parametrize("command", [["job", "status", "j1"], ["job", "logs", "j1"],
                                     ["job", "stop", "j1"], ["job", "list"]],
                         ids=["job status", "job logs", "job stop", "job list"])
def test_job_commands_time_out_on_a_silent_dashboard(silent_server: str, command: list[str],
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from recoup.cluster.jobs import NET_TIMEOUT_ENV

    monkeypatch.setenv(NET_TIMEOUT_ENV, "0.5")
    t0 = time.monotonic()
    rc = main([*command[:2], *command[2:], "--address", f"http://{silent_server}"])
    assert rc != 0 and time.monotonic() - t0 < 60
    err = capsys.readouterr().err
    assert f"http://{silent_server} did not answer within 0.5 s" in err
    assert "Traceback" not in err


def test_submit_times_out_on_a_silent_dashboard(silent_server: str, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    from recoup.cluster.jobs import NET_TIMEOUT_ENV

    monkeypatch.setenv(NET_TIMEOUT_ENV, "0.5")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"run": {"dir": str(tmp_path / "r")},
                                   "prepare": {"source": "tiny-llama"}}))
    rc = main(["submit", str(cfg), "--address", f"http://{silent_server}"])
    assert rc != 0 and "did not answer within 0.5 s" in capsys.readouterr().err


def test_ray_address_probe(silent_server: str) -> None:
    from recoup.cluster.runtime import probe_ray_address

    with pytest.raises(ConnectionError, match=f"{silent_server} did not answer within 0.5 s"):
        probe_ray_address(silent_server, timeout_s=0.5)
    closed = _closed_port()
    with pytest.raises(ConnectionError, match=f"cannot reach the Ray cluster at {closed}"):
        probe_ray_address(closed, timeout_s=0.5)
    with pytest.raises(ConnectionError, match="is not HOST:PORT"):
        probe_ray_address("nohostport", timeout_s=0.5)
    grpc = pytest.importorskip("grpc")
    from concurrent import futures

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        probe_ray_address(f"127.0.0.1:{port}", timeout_s=5)  # a gRPC server answers
        probe_ray_address(f"ray://127.0.0.1:{port}", timeout_s=5)
    finally:
        server.stop(0)


def test_run_with_silent_cluster_address_fails_fast(silent_server: str, tmp_path: Path,
                                                    data_dir: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from recoup.cluster.jobs import NET_TIMEOUT_ENV

    monkeypatch.setenv(NET_TIMEOUT_ENV, "0.5")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({
        "run": {"dir": str(tmp_path / "r"), "data_dir": str(data_dir), "pipeline": ["prepare"]},
        "cluster": {"mode": "ray", "address": silent_server},
        "prepare": {"source": "tiny-llama"}}))
    rc = main(["run", str(cfg), "--no-progress"])
    err = capsys.readouterr().err
    assert rc != 0 and f"{silent_server} did not answer" in err, err


# --------------------------------------------------------------------------- model files


def _safetensors(path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(16, 16)}, str(path))


def test_truncated_safetensors_is_named(tmp_path: Path) -> None:
    from recoup.stages.prepare import check_model_files, check_safetensors

    f = tmp_path / "model.safetensors"
    _safetensors(f)
    check_safetensors(f)
    data = f.read_bytes()
    f.write_bytes(data[:-100])
    with pytest.raises(ValueError, match="model.safetensors is truncated"):
        check_safetensors(f)
    f.write_bytes(struct.pack("<Q", 10**9) + b"{}")
    with pytest.raises(ValueError, match="model.safetensors is not a valid safetensors"):
        check_safetensors(f)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="model.safetensors"):
        check_model_files(tmp_path, "prepare.source")


def test_folder_with_only_config_json_is_named(tmp_path: Path) -> None:
    from recoup.stages.prepare import check_gguf, check_model_files

    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ValueError, match=f"{tmp_path} has config.json but no weights"):
        check_model_files(tmp_path, "prepare.source")
    (tmp_path / "config.json").write_text("{trunc")
    with pytest.raises(ValueError, match="config.json is not readable JSON"):
        check_model_files(tmp_path, "prepare.source")
    (tmp_path / "m.gguf").write_bytes(b"NOPE" + b"\0" * 10)
    with pytest.raises(ValueError, match="m.gguf is not a GGUF file"):
        check_gguf(tmp_path / "m.gguf", "prepare.source")
