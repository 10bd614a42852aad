"""labhelpers.files: the course cache, atomic folder writes, sizes, quiet library output."""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from labhelpers import files
from labhelpers.files import atomic_dir

# --------------------------------------------------------------------------- the cache


def test_cache_dir_follows_the_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("QWEN_LAB_CACHE", str(tmp_path / "explicit"))
    assert files.cache_dir() == tmp_path / "explicit" and (tmp_path / "explicit").is_dir()
    assert files.models_dir() == tmp_path / "explicit" / "models"
    monkeypatch.delenv("QWEN_LAB_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert files.cache_dir() == tmp_path / "xdg" / "qwen-deploy-lab"


def test_units():
    assert files.GB == 1e9 and files.GIB == 2**30


# --------------------------------------------------------------------------- atomic_dir


def test_atomic_dir_appears_only_when_complete(tmp_path: Path):
    dest = tmp_path / "out"
    with atomic_dir(dest) as tmp:
        (tmp / "a").write_text("x")
        assert not dest.exists(), "nothing at the final path while the block runs"
        assert tmp.parent == tmp_path and tmp.name.startswith(".tmp-out-")
    assert (dest / "a").read_text() == "x"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_dir_refuses_existing_and_cleans_up_on_error(tmp_path: Path):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "old").write_text("kept")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        with atomic_dir(dest):
            pass
    for error in (RuntimeError("crash"), KeyboardInterrupt()):
        with pytest.raises(type(error)):
            with atomic_dir(dest, overwrite=True) as tmp:
                (tmp / "half").write_text("x")
                raise error
    assert sorted(p.name for p in dest.iterdir()) == ["old"], "the old folder is untouched"
    assert [p.name for p in tmp_path.iterdir()] == ["out"], "no temporary folder left"


def test_overwrite_replaces_the_old_folder_only_at_the_end(tmp_path: Path):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "old").write_text("old")
    with atomic_dir(dest, overwrite=True) as tmp:
        (tmp / "new").write_text("new")
        assert (dest / "old").exists(), "the old version stays readable until the new one is done"
    assert [p.name for p in dest.iterdir()] == ["new"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


KILLED_WRITER = textwrap.dedent(
    """
    import sys, time
    from labhelpers.files import atomic_dir
    with atomic_dir(sys.argv[1], overwrite=True) as tmp:
        (tmp / "part").write_text("half")
        print("writing", flush=True)
        time.sleep(60)
    """
)


def test_a_killed_writer_leaves_the_old_folder_and_a_stale_temp_that_is_cleaned(tmp_path: Path):
    dest = tmp_path / "model"
    dest.mkdir()
    (dest / "weights").write_text("complete")
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(dest)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)  # no except clause runs: what a power cut does
    proc.wait(timeout=10)
    assert [p.name for p in dest.iterdir()] == ["weights"], "the old folder survives the crash"
    stale = [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-model-")]
    assert len(stale) == 1
    (tmp_path / ".old-other-1").mkdir()
    (tmp_path / ".tmp-file").write_text("a file, not a folder: kept")
    clean_stale_temps = importlib.import_module("standin").clean_stale_temps  # tools/standin.py
    removed = clean_stale_temps(tmp_path)
    assert sorted(p.name for p in removed) == sorted([stale[0].name, ".old-other-1"])
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp-file", "model"]
    assert clean_stale_temps(tmp_path / "missing") == []


# --------------------------------------------------------------------------- sizes


def test_dir_size_bytes_resolves_links_once(tmp_path: Path):
    blobs = tmp_path / "blobs"
    snap = tmp_path / "snapshots" / "abc"
    blobs.mkdir()
    snap.mkdir(parents=True)
    (blobs / "w1").write_bytes(b"x" * 1000)
    (blobs / "w2").write_bytes(b"y" * 234)
    (snap / "model.safetensors").symlink_to(blobs / "w1")
    (snap / "config.json").symlink_to(blobs / "w2")
    (snap / "broken").symlink_to(tmp_path / "missing")
    # the whole cache entry: each blob once, even though it is reached twice
    assert files.dir_size_bytes(tmp_path) == 1234
    # the snapshot folder alone: links resolved to their targets' sizes
    assert files.dir_size_bytes(snap) == 1234
    assert files.dir_size_bytes(blobs / "w2") == 234
    # weights only: config.json and the broken link are not counted
    assert files.dir_size_bytes(snap, weights_only=True) == 1000
    with pytest.raises(FileNotFoundError):
        files.dir_size_bytes(tmp_path / "nope")


# --------------------------------------------------------------------------- quiet_output


def test_output_goes_to_the_log_and_a_heartbeat_to_the_terminal(tmp_path: Path, capfd):
    log = tmp_path / "logs" / "build.log"
    with files.quiet_output(log, what="quantizing", every_s=0.05, status=lambda: "; x") as path:
        assert path == log
        os.write(1, b"table from C code\n")
        print("python noise", flush=True)
        os.write(2, b"stderr noise\n")
        subprocess.run([sys.executable, "-c", "print('child noise')"], check=True)
        time.sleep(0.3)
    print("after", flush=True)
    out = capfd.readouterr().out
    assert "noise" not in out and "table" not in out
    assert "… still quantizing (" in out and "s; x)" in out
    assert out.rstrip().endswith("after")
    text = log.read_text()
    for line in ("table from C code", "python noise", "stderr noise", "child noise"):
        assert line in text


def test_output_is_restored_after_an_error(tmp_path: Path, capfd):
    with pytest.raises(RuntimeError):
        with files.quiet_output(tmp_path / "x.log", what="working"):
            raise RuntimeError("boom")
    print("visible again", flush=True)
    assert "visible again" in capfd.readouterr().out
