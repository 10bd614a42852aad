"""labhelpers.models: registry, resolution order, offline fallback, atomic downloads."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from conftest import write_fake_model

from labhelpers import models, standin
from labhelpers.atomic import atomic_dir


def fake_standin(name: str) -> Path:
    """A fake, already 'built' stand-in in the current course cache."""
    folder = write_fake_model(standin.standin_dir(name))
    (folder / standin.BUILD_STAMP).write_text(
        json.dumps({"recipe_version": standin.RECIPE_VERSION})
    )
    return folder


def test_registry_has_gpu_cpu_and_standin_models():
    reg = models.registry()
    assert reg["Qwen2.5-7B-Instruct-GPTQ-Int4"].hf_id == "Qwen/Qwen2.5-7B-Instruct-GPTQ-Int4"
    assert reg["Qwen2.5-7B-Instruct-GPTQ-Int4"].target == "gpu"
    assert reg["standin"].is_standin and reg["standin-gptq-int4"].is_standin
    assert "NOT QWEN" in reg["standin"].note.upper()
    for spec in reg.values():
        assert spec.fallback is None or spec.fallback in reg
        assert spec.is_standin or spec.hf_id


def test_lookup_by_name_or_hub_id_case_insensitive():
    assert models.lookup("qwen/qwen2.5-0.5b-instruct").name == "Qwen2.5-0.5B-Instruct"
    assert models.lookup("Qwen2.5-0.5B-Instruct-GPTQ-Int4").weights == "gptq-int4"
    assert models.lookup("no-such-model") is None


def test_modelscope_rewrites_dots_in_folder_names():
    assert models.modelscope_folder_name("Qwen/Qwen2.5-7B-Instruct") == "Qwen/Qwen2___5-7B-Instruct"
    assert models.modelscope_folder_name("Qwen/Qwen1.5-0.5B") == "Qwen/Qwen1___5-0___5B"


def test_validate_accepts_complete_folder(tmp_path):
    folder = write_fake_model(tmp_path / "m")
    assert models.validate_model_dir(folder) == folder.resolve()


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (lambda f: (f / "config.json").unlink(), "no config.json"),
        (lambda f: (f / "config.json").write_text("{not json"), "not valid JSON"),
        (lambda f: (f / "model.safetensors").unlink(), "no weight files"),
        (lambda f: (f / "tokenizer.json").unlink(), "no tokenizer"),
        (lambda f: (f / "model.safetensors").write_bytes(b"\x01\x02"), "not a readable"),
    ],
)
def test_validate_rejects_broken_folders(tmp_path, breakage, message):
    folder = write_fake_model(tmp_path / "m")
    breakage(folder)
    with pytest.raises(models.ModelDirError, match=message) as info:
        models.validate_model_dir(folder)
    assert "delete the folder" in str(info.value)


def test_validate_detects_truncated_download(tmp_path):
    folder = write_fake_model(tmp_path / "m", truncate=True)
    with pytest.raises(models.ModelDirError, match="truncated"):
        models.validate_model_dir(folder)


def test_validate_detects_missing_shard(tmp_path):
    folder = write_fake_model(tmp_path / "m")
    index = {"weight_map": {"a": "model.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(models.ModelDirError, match="missing 1 of 2 weight shards"):
        models.validate_model_dir(folder)


def test_resolve_explicit_path(tmp_path):
    folder = write_fake_model(tmp_path / "my-model")
    assert models.resolve(str(folder), log=lambda _: None) == folder.resolve()


def test_resolve_missing_path_says_so(tmp_path):
    with pytest.raises(models.ModelNotFoundError, match="does not exist"):
        models.resolve(str(tmp_path / "nope"), log=lambda _: None)


def test_resolve_unknown_name_suggests_close_matches(tmp_cache):
    with pytest.raises(models.ModelNotFoundError, match="Did you mean 'Qwen2.5-0.5B-Instruct'"):
        models.resolve("Qwen2.5-0.5B-Instrukt", log=lambda _: None)


def test_resolve_finds_modelscope_cache_with_rewritten_name(tmp_cache, tmp_path):
    ms = tmp_path / "modelscope" / "models" / "Qwen" / "Qwen2___5-0___5B-Instruct"
    write_fake_model(ms)
    got = models.resolve("Qwen2.5-0.5B-Instruct", download_ok=False, log=lambda _: None)
    assert got == ms.resolve()


def test_course_cache_wins_over_modelscope_cache(tmp_cache, tmp_path):
    write_fake_model(tmp_path / "modelscope" / "models" / "Qwen" / "Qwen2___5-0___5B-Instruct")
    ours = write_fake_model(models.course_cache_path("Qwen/Qwen2.5-0.5B-Instruct"))
    got = models.resolve("Qwen2.5-0.5B-Instruct", download_ok=False, log=lambda _: None)
    assert got == ours.resolve()


def test_resolve_finds_hf_cache_snapshot(tmp_cache, tmp_path):
    repo = tmp_path / "hf" / "models--Qwen--Qwen2.5-0.5B-Instruct"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    snap = write_fake_model(repo / "snapshots" / "abc123")
    got = models.resolve("Qwen2.5-0.5B-Instruct", download_ok=False, log=lambda _: None)
    assert got == snap.resolve()


def test_broken_cache_copy_is_reported_and_skipped(tmp_cache, tmp_path):
    write_fake_model(models.course_cache_path("Qwen/Qwen2.5-0.5B-Instruct"), truncate=True)
    good = write_fake_model(
        tmp_path / "modelscope" / "models" / "Qwen" / "Qwen2___5-0___5B-Instruct"
    )
    lines: list[str] = []
    assert models.resolve("Qwen2.5-0.5B-Instruct", download_ok=False, log=lines.append) == (
        good.resolve()
    )
    assert any("unusable" in line and "truncated" in line for line in lines)


def test_offline_falls_back_to_standin_and_says_why(tmp_cache, monkeypatch):
    fake = fake_standin("standin-gptq-int4")
    monkeypatch.setenv("QWEN_LAB_OFFLINE", "1")
    lines: list[str] = []
    got = models.resolve("Qwen2.5-7B-Instruct-GPTQ-Int4", log=lines.append)
    assert got == fake.resolve()
    text = "\n".join(lines)
    assert "offline mode" in text and "OFFLINE STAND-IN" in text and "not Qwen" in text


def test_offline_without_standin_fallback_raises(tmp_cache, monkeypatch):
    monkeypatch.setenv("QWEN_LAB_OFFLINE", "1")
    with pytest.raises(models.ModelNotFoundError, match="could not be downloaded"):
        models.resolve("Qwen2.5-7B-Instruct", standin_ok=False, log=lambda _: None)


def test_unreachable_hubs_fall_back_without_hanging(tmp_cache, monkeypatch):
    fake_standin("standin")
    probed: list[str] = []
    monkeypatch.setattr(models, "can_reach", lambda host, *a, **k: probed.append(host) or False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hf-mirror.com")
    got = models.resolve("Qwen2.5-0.5B-Instruct", log=lambda _: None)
    assert got.name == "standin"
    assert probed == [models.MODELSCOPE_HOST, "hf-mirror.com"]


def test_hub_order_env(monkeypatch):
    monkeypatch.setenv("QWEN_LAB_HUB_ORDER", "hf, modelscope")
    assert models.hub_order() == ["hf", "modelscope"]
    monkeypatch.setenv("QWEN_LAB_HUB_ORDER", "hf,github")
    with pytest.raises(ValueError, match="github"):
        models.hub_order()


def test_can_reach_closed_loopback_port_fails_fast():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound but not listening: connection refused
        assert models.can_reach("127.0.0.1", port, timeout=1.0) is False


def test_download_goes_through_temp_dir_then_rename(tmp_cache, monkeypatch):
    seen: dict[str, Path] = {}

    def fake_modelscope(model_id: str, dest: Path) -> None:
        seen["dest"] = dest
        write_fake_model(dest)

    monkeypatch.setattr(models, "can_reach", lambda *a, **k: True)
    monkeypatch.setitem(models.DOWNLOADERS, "modelscope", fake_modelscope)
    got = models.resolve("Qwen2.5-0.5B-Instruct", log=lambda _: None)
    final = models.course_cache_path("Qwen/Qwen2.5-0.5B-Instruct")
    assert got == final
    assert seen["dest"] != final and not seen["dest"].exists()


def test_interrupted_download_leaves_nothing_and_tries_next_hub(tmp_cache, monkeypatch):
    def dies_half_way(model_id: str, dest: Path) -> None:
        (dest / "config.json").write_text("{}")
        raise ConnectionError("connection reset")

    def works(model_id: str, dest: Path) -> None:
        write_fake_model(dest)

    monkeypatch.setattr(models, "can_reach", lambda *a, **k: True)
    monkeypatch.setitem(models.DOWNLOADERS, "modelscope", dies_half_way)
    monkeypatch.setitem(models.DOWNLOADERS, "hf", works)
    lines: list[str] = []
    got = models.resolve("Qwen2.5-0.5B-Instruct", log=lines.append)
    assert any("modelscope: download failed (ConnectionError" in line for line in lines)
    assert got == models.course_cache_path("Qwen/Qwen2.5-0.5B-Instruct")
    leftovers = [p.name for p in got.parent.iterdir() if p.name.startswith(".tmp-")]
    assert leftovers == []


def test_corrupt_download_is_not_kept(tmp_cache, monkeypatch):
    monkeypatch.setattr(models, "can_reach", lambda *a, **k: True)
    monkeypatch.setitem(
        models.DOWNLOADERS, "modelscope", lambda mid, dest: write_fake_model(dest, truncate=True)
    )
    with pytest.raises(models.ModelDirError, match="truncated"):
        models.resolve("Qwen2.5-0.5B-Instruct", log=lambda _: None)
    assert not models.course_cache_path("Qwen/Qwen2.5-0.5B-Instruct").exists()


def test_not_enough_ram_is_refused_before_loading(tmp_path):
    spec = models.registry()["Qwen2.5-7B-Instruct"]
    with pytest.raises(models.NotEnoughResourcesError, match=r"needs about 18\.7 GB"):
        models.check_fits_in_ram(spec, available_gb=8.0)
    assert models.check_fits_in_ram(spec, available_gb=64.0) == pytest.approx(15.2 * 1.2 + 0.5)
    folder = write_fake_model(tmp_path / "m")
    assert models.check_fits_in_ram(folder, available_gb=1.0) < 1.0


def test_not_enough_disk_is_refused(tmp_path):
    with pytest.raises(models.NotEnoughResourcesError, match="QWEN_LAB_CACHE"):
        models.check_disk(10**6, tmp_path, what="a huge model")


def test_atomic_dir_refuses_existing_and_cleans_up_on_error(tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        with atomic_dir(dest):
            pass
    with pytest.raises(RuntimeError):
        with atomic_dir(dest, overwrite=True) as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError("crash")
    assert dest.is_dir() and not (dest / "half").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
