"""labhelpers.models: registry, resolution order, the offline stand-in rule, downloads, folder
checks, safetensors headers and ModelShape."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import write_fake_model

from labhelpers import models
from labhelpers.files import models_dir
from labhelpers.machine import NotEnoughResourcesError
from labhelpers.models import ModelError, ModelShape

QUIET = {"log": lambda _: None}
SMALL = "Qwen/Qwen2.5-0.5B-Instruct"


def fake_standin(name: str, recipe: int = models._STANDIN_RECIPE) -> Path:
    """A fake, already 'built' stand-in in the current course cache."""
    folder = write_fake_model(models_dir() / name)
    models.mark_standin(folder, name=name)
    if recipe != models._STANDIN_RECIPE:  # a stand-in an older tools/standin.py built
        (folder / models._STANDIN_STAMP).write_text(json.dumps({"recipe_version": recipe}))
    return folder


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every hub is unreachable; returns the hosts that were probed."""
    probed: list[str] = []
    monkeypatch.setattr(models, "_reachable", lambda host, *a, **k: probed.append(host) or False)
    return probed


@pytest.fixture
def cpu_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models, "gpu_available", lambda: False)


# --------------------------------------------------------------------------- registry


def test_registry_has_gpu_cpu_and_standin_models():
    reg = models.registry()
    assert reg["Qwen2.5-7B-Instruct-GPTQ-Int4"].hf_id == "Qwen/Qwen2.5-7B-Instruct-GPTQ-Int4"
    assert reg["Qwen2.5-7B-Instruct-GPTQ-Int4"].target == "gpu"
    assert reg["standin"].is_standin and reg["standin-gptq-int4"].is_standin
    assert "NOT QWEN" in reg["standin"].note.upper()
    for spec in reg.values():
        assert spec.fallback is None or spec.fallback in reg
        assert spec.is_standin or spec.hf_id
    assert reg["Qwen2.5-7B-Instruct"].memory_needed_gb() == pytest.approx(15.2 * 1.2 + 0.5)


def test_lookup_by_name_or_hub_id_case_insensitive():
    assert models._lookup("qwen/qwen2.5-0.5b-instruct").name == "Qwen2.5-0.5B-Instruct"
    assert models._lookup("Qwen2.5-0.5B-Instruct-GPTQ-Int4").weights == "gptq-int4"
    assert models._lookup("no-such-model") is None


# --------------------------------------------------------------------------- folders


def test_validate_accepts_complete_folder(tmp_path: Path):
    folder = write_fake_model(tmp_path / "m")
    assert models.validate_model_dir(folder) == folder.resolve()


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (lambda f: (f / "config.json").unlink(), "no readable config.json"),
        (lambda f: (f / "config.json").write_text("{not json"), "no readable config.json"),
        (lambda f: (f / "config.json").write_text("{}"), "no 'model_type'"),
        (lambda f: (f / "model.safetensors").unlink(), "no weight files"),
        (lambda f: (f / "tokenizer.json").unlink(), "no tokenizer"),
        (lambda f: (f / "model.safetensors").write_bytes(b"\x01\x02"), "unreadable"),
    ],
)
def test_validate_rejects_broken_folders(tmp_path: Path, breakage, message: str):
    folder = write_fake_model(tmp_path / "m")
    breakage(folder)
    with pytest.raises(ModelError, match=message) as info:
        models.validate_model_dir(folder)
    assert "delete the folder" in str(info.value) and "resume" in str(info.value)


def test_validate_detects_a_truncated_download(tmp_path: Path):
    folder = write_fake_model(tmp_path / "m", truncate=True)
    with pytest.raises(ModelError, match="model.safetensors is unreadable"):
        models.validate_model_dir(folder)


def test_validate_detects_a_missing_shard(tmp_path: Path):
    folder = write_fake_model(tmp_path / "m")
    index = {"weight_map": {"a": "model.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelError, match="lacks 1 of 2 shards"):
        models.validate_model_dir(folder)


def test_safetensors_headers_give_dtypes_shapes_and_bytes(tmp_path: Path):
    import numpy as np
    from safetensors.numpy import save_file

    save_file(
        {"a": np.zeros((10, 20), np.float16), "b": np.zeros(5, np.int32)},
        str(tmp_path / "x.safetensors"),
    )  # noqa: E501
    save_file({"c": np.zeros((3, 4), np.float32)}, str(tmp_path / "y.safetensors"))
    assert models.safetensors_tensors(tmp_path) == {
        "a": ("F16", (10, 20), 400),
        "b": ("I32", (5,), 20),
        "c": ("F32", (3, 4), 48),
    }
    assert models.count_parameters(tmp_path) == 200 + 5 + 12
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        models.count_parameters(tmp_path / "empty")


def test_not_enough_ram_is_refused_before_loading(tmp_path: Path):
    spec = models.registry()["Qwen2.5-7B-Instruct"]
    with pytest.raises(
        NotEnoughResourcesError, match=r"loading Qwen2\.5-7B-Instruct needs about 18\.7 GB"
    ):  # noqa: E501
        models.check_fits_in_ram(spec, available_gb=8.0)
    assert models.check_fits_in_ram(spec, available_gb=64.0) == pytest.approx(15.2 * 1.2 + 0.5)
    folder = write_fake_model(tmp_path / "m")
    assert models.check_fits_in_ram(folder, available_gb=1.0) == pytest.approx(
        (folder / "model.safetensors").stat().st_size / 1e9 * 1.2 + 0.5
    )


# --------------------------------------------------------------------------- stand-in paths


def test_standin_paths_and_build_stamp(tmp_cache: Path):
    assert models_dir() / "standin" == tmp_cache / "models" / "standin"
    assert not models.standin_built("standin")
    folder = fake_standin("standin", recipe=models._STANDIN_RECIPE - 1)
    assert models.is_standin(folder) and not models.standin_built("standin"), "an old recipe"
    fake_standin("standin")
    assert models.standin_built("standin")
    assert not models.is_standin(write_fake_model(tmp_cache / "other"))


def test_resolve_never_builds_a_standin_it_says_to_run_setup(tmp_cache: Path):
    with pytest.raises(ModelError, match=r"not built yet: run ./course setup"):
        models.resolve("standin", **QUIET)
    assert not (models_dir() / "standin").exists()
    fake_standin("standin")
    assert models.resolve("standin", **QUIET) == (models_dir() / "standin").resolve()


# --------------------------------------------------------------------------- resolve


def test_resolve_explicit_path(tmp_path: Path):
    folder = write_fake_model(tmp_path / "my-model")
    lines: list[str] = []
    assert models.resolve(str(folder), log=lines.append) == folder.resolve()
    assert "using the local folder" in lines[0]


def test_resolve_missing_path_says_so(tmp_path: Path):
    with pytest.raises(ModelError, match="does not exist"):
        models.resolve(str(tmp_path / "nope"), **QUIET)


def test_resolve_unknown_name_suggests_close_matches(tmp_cache: Path):
    with pytest.raises(ModelError, match="Did you mean 'Qwen2.5-0.5B-Instruct'"):
        models.resolve("Qwen2.5-0.5B-Instrukt", **QUIET)


def test_resolve_finds_modelscope_cache_with_rewritten_name(tmp_cache: Path, tmp_path: Path):
    ms = write_fake_model(tmp_path / "modelscope" / "models" / "Qwen" / "Qwen2___5-0___5B-Instruct")
    assert models.resolve("Qwen2.5-0.5B-Instruct", download_ok=False, **QUIET) == ms.resolve()


def test_course_cache_wins_over_modelscope_cache(tmp_cache: Path, tmp_path: Path):
    write_fake_model(tmp_path / "modelscope" / "models" / "Qwen" / "Qwen2___5-0___5B-Instruct")
    ours = write_fake_model(models_dir() / SMALL)
    assert models.resolve("Qwen2.5-0.5B-Instruct", download_ok=False, **QUIET) == ours.resolve()


def test_resolve_finds_hf_cache_snapshot(tmp_cache: Path, tmp_path: Path):
    repo = tmp_path / "hf" / "models--Qwen--Qwen2.5-0.5B-Instruct"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    snap = write_fake_model(repo / "snapshots" / "abc123")
    assert models.resolve("Qwen2.5-0.5B-Instruct", download_ok=False, **QUIET) == snap.resolve()


def test_broken_cache_copy_is_reported_and_skipped(tmp_cache: Path, tmp_path: Path):
    write_fake_model(models_dir() / SMALL, truncate=True)
    good = write_fake_model(
        tmp_path / "modelscope" / "models" / "Qwen" / "Qwen2___5-0___5B-Instruct"
    )
    lines: list[str] = []
    got = models.resolve("Qwen2.5-0.5B-Instruct", download_ok=False, log=lines.append)
    assert got == good.resolve()
    assert any("unusable" in line and "model.safetensors is unreadable" in line for line in lines)


def test_offline_falls_back_to_standin_and_says_why(tmp_cache: Path, monkeypatch):
    fake = fake_standin("standin-gptq-int4")
    monkeypatch.setenv("QWEN_LAB_OFFLINE", "1")
    lines: list[str] = []
    assert models.resolve("Qwen2.5-7B-Instruct-GPTQ-Int4", log=lines.append) == fake.resolve()
    text = "\n".join(lines)
    assert "offline mode" in text and "OFFLINE STAND-IN" in text and "NOT Qwen" in text


def test_no_fallback_wanted_or_none_registered_raises(tmp_cache: Path, monkeypatch, no_network):
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    monkeypatch.setenv("QWEN_LAB_OFFLINE", "1")
    fake_standin("standin")
    with pytest.raises(ModelError, match="could not be downloaded.*HF_ENDPOINT"):
        models.resolve("Qwen2.5-7B-Instruct", standin_ok=False, **QUIET)
    monkeypatch.delenv("QWEN_LAB_OFFLINE")
    with pytest.raises(ModelError, match="could not be downloaded"):
        models.resolve("Qwen/Qwen3-0.6B", **QUIET)  # an unregistered hub id has no stand-in
    assert no_network == ["www.modelscope.cn", "huggingface.co"]


def test_unreachable_hubs_fall_back_on_a_cpu_machine(
    tmp_cache, monkeypatch, no_network, cpu_machine
):
    fake_standin("standin")
    monkeypatch.setenv("HF_ENDPOINT", "https://hf-mirror.com")
    lines: list[str] = []
    assert models.resolve("Qwen2.5-0.5B-Instruct", log=lines.append).name == "standin"
    assert no_network == ["www.modelscope.cn", "hf-mirror.com"]
    assert any("cannot reach hf-mirror.com" in line for line in lines)


def test_a_gpu_machine_never_silently_measures_the_standin(
    tmp_cache: Path, monkeypatch, no_network
):
    fake_standin("standin")
    monkeypatch.setattr(models, "gpu_available", lambda: True)
    with pytest.raises(ModelError, match="GPU machine.*QWEN_LAB_OFFLINE=1"):
        models.resolve("Qwen2.5-0.5B-Instruct", **QUIET)
    monkeypatch.setenv("QWEN_LAB_OFFLINE", "1")  # the student accepts the stand-in
    assert models.resolve("Qwen2.5-0.5B-Instruct", **QUIET).name == "standin"
    assert models.resolve("standin", **QUIET).name == "standin", "asking for it by name is fine"


def test_offline_settings_and_endpoint(monkeypatch):
    for var in ("QWEN_LAB_OFFLINE", "HF_HUB_OFFLINE", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    assert not models.is_offline() and models._hf_endpoint() == "https://huggingface.co"
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert not models.is_offline()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert models.is_offline()
    monkeypatch.setenv("HF_ENDPOINT", "https://hf-mirror.com/")
    assert models._hf_endpoint() == "https://hf-mirror.com"


def test_reachable_fails_fast_on_a_closed_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))  # bound, not listening: connection refused
        assert models._reachable("127.0.0.1", timeout_s=1.0) is False


# --------------------------------------------------------------------------- downloads


@pytest.fixture
def hubs(monkeypatch: pytest.MonkeyPatch) -> dict:
    """Fake ModelScope and Hugging Face downloaders; set ``hubs["modelscope"|"hf"]``."""
    import huggingface_hub

    calls: dict = {"log": []}

    def make(hub: str):
        def download(model_id: str, local_dir: str, **kw) -> str:
            calls["log"].append((hub, model_id, local_dir))
            calls[hub](Path(local_dir))
            return local_dir

        return download

    monkeypatch.setattr(models, "_reachable", lambda *a, **k: True)
    monkeypatch.setitem(
        sys.modules, "modelscope", SimpleNamespace(snapshot_download=make("modelscope"))
    )  # noqa: E501
    monkeypatch.setattr(huggingface_hub, "snapshot_download", make("hf"))
    return calls


def test_download_goes_straight_into_the_course_cache(tmp_cache: Path, hubs: dict):
    hubs["modelscope"] = write_fake_model
    got = models.resolve("Qwen2.5-0.5B-Instruct", **QUIET)
    final = models_dir() / SMALL
    assert got == final.resolve()
    assert hubs["log"] == [("modelscope", SMALL, str(final))]


def test_an_interrupted_download_is_kept_for_resuming_and_the_next_hub_is_tried(tmp_cache, hubs):
    def dies_half_way(dest: Path) -> None:
        dest.mkdir(parents=True)
        (dest / "model.safetensors.incomplete").write_text("partial")
        raise ConnectionError("connection reset")

    def resumes(dest: Path) -> None:
        assert (dest / "model.safetensors.incomplete").exists(), (
            "the partial download is still there"
        )
        write_fake_model(dest)

    hubs["modelscope"], hubs["hf"] = dies_half_way, resumes
    lines: list[str] = []
    got = models.resolve("Qwen2.5-0.5B-Instruct", log=lines.append)
    assert any(
        "modelscope: download failed (ConnectionError" in line and "resume" in line
        for line in lines
    )
    assert got == (models_dir() / SMALL).resolve()
    assert [h for h, _, _ in hubs["log"]] == ["modelscope", "hf"]


def test_a_corrupt_download_is_an_error_not_a_model(tmp_cache: Path, hubs: dict):
    hubs["modelscope"] = lambda dest: write_fake_model(dest, truncate=True)
    with pytest.raises(ModelError, match="unreadable"):
        models.resolve("Qwen2.5-0.5B-Instruct", **QUIET)


def test_hub_order_setting(tmp_cache: Path, hubs: dict, monkeypatch):
    hubs["hf"] = write_fake_model
    monkeypatch.setenv("QWEN_LAB_HUB_ORDER", "hf, modelscope")
    models.resolve("Qwen2.5-0.5B-Instruct", **QUIET)
    assert [h for h, _, _ in hubs["log"]] == ["hf"]
    monkeypatch.setenv("QWEN_LAB_HUB_ORDER", "hf,github")
    with pytest.raises(ValueError, match="github"):
        models._download(models.registry()["Qwen2.5-1.5B-Instruct"], **QUIET)


def test_not_enough_disk_is_refused_before_downloading(tmp_cache: Path, hubs: dict, monkeypatch):
    monkeypatch.setattr(models.shutil, "disk_usage", lambda path: SimpleNamespace(free=10**8))
    with pytest.raises(
        NotEnoughResourcesError, match=r"needs about 1\.\d GB of disk.*QWEN_LAB_CACHE"
    ):
        models.resolve("Qwen2.5-0.5B-Instruct", **QUIET)
    assert hubs["log"] == []


# --------------------------------------------------------------------------- ModelShape

# A toy Qwen2 config small enough to count by hand: head_dim 16, q width 64, kv width 32.
TOY = {
    "model_type": "qwen2",
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "vocab_size": 1000,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
# Per layer: q 64x64 + k 64x32 + v 64x32 + o 64x64 + gate/up 64x128 x2 + down 128x64 = 36864.
TOY_LINEAR = 2 * 36864
TOY_BIAS = 2 * (64 + 32 + 32)  # q/k/v biases (Qwen2)
TOY_NORMS = 2 * 2 * 64 + 64  # two RMSNorms per layer + the final one
TOY_EMBED = 1000 * 64  # embedding; the untied lm_head has as many again


def test_toy_shape_and_params():
    shape = ModelShape.from_config(TOY, name="toy")
    assert (shape.name, shape.head_dim, shape.q_width, shape.kv_width) == ("toy", 16, 64, 32)
    assert (shape.bias_params, shape.norm_params) == (TOY_BIAS, TOY_NORMS)
    assert shape.params == TOY_LINEAR + TOY_BIAS + TOY_NORMS + 2 * TOY_EMBED == 202304
    tied = ModelShape.from_config({**TOY, "tie_word_embeddings": True})
    assert shape.params - tied.params == TOY_EMBED
    assert [(n, k, out) for n, k, out, _ in shape.linear_layers()][-1] == ("down_proj", 128, 64)
    row = shape.as_row()
    assert row["params_b"] == 0.0 and "quantization" not in row and row["dtype"] == "bfloat16"


def test_qwen1_config_dialect():
    qwen1 = {
        "model_type": "qwen",
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "intermediate_size": 256,  # twice each projection: w1, w2 are 128 wide
        "kv_channels": 16,
        "vocab_size": 1000,
        "seq_length": 256,
        "max_position_embeddings": 32768,
        "fp16": True,
    }
    shape = ModelShape.from_config(qwen1)
    assert (shape.num_kv_heads, shape.head_dim, shape.intermediate_size) == (4, 16, 128)
    assert shape.max_context == 256  # seq_length, not max_position_embeddings
    assert shape.qkv_bias and shape.dtype == "float16"


def test_multimodal_configs_are_read_through_text_config():
    wrapped = {"model_type": "qwen2_vl", "text_config": TOY, "quantization_config": {"bits": 4}}
    shape = ModelShape.from_config(wrapped)
    assert shape.num_layers == 2 and shape.quantization == {"bits": 4}


# Parameter counts from the model cards (Hugging Face, "Number of Parameters" and
# "Number of Parameters (Non-Embedding)"), rounded there to the digits given.
PUBLISHED_PARAMS = {
    "Qwen2.5-7B-Instruct": (7.61e9, 6.53e9),
    "Qwen2.5-0.5B-Instruct": (0.49e9, 0.36e9),
    "Qwen2.5-72B-Instruct": (72.7e9, 70.0e9),
    "Qwen3-8B": (8.2e9, 6.95e9),
}


@pytest.mark.parametrize("name", PUBLISHED_PARAMS)
def test_shipped_configs_match_model_card_parameter_counts(name: str):
    shape = ModelShape.from_config(name)
    total, non_embedding = PUBLISHED_PARAMS[name]
    assert shape.params == pytest.approx(total, rel=0.01)
    tables = shape.vocab_size * shape.hidden_size * (1 if shape.tie_word_embeddings else 2)
    assert shape.params - tables == pytest.approx(non_embedding, rel=0.01)


def test_config_loading_from_files_folders_objects_and_hub_ids(tmp_path: Path):
    cfg = models.shipped_configs()["Qwen3-8B"]["config"]
    folder = tmp_path / "Qwen3-8B-local"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(cfg))
    assert models.load_config(folder) == cfg
    assert models.load_config(folder / "config.json") == cfg
    assert models.load_config("qwen/qwen3-8b") == cfg  # hub id, any case
    assert models.load_config(SimpleNamespace(to_dict=lambda: {"a": 1})) == {"a": 1}
    assert ModelShape.from_config(folder).name == "Qwen3-8B-local"
    assert ModelShape.from_config("Qwen2.5-0.5B-Instruct").tie_word_embeddings
    assert (
        ModelShape.from_config("Qwen3-8B").qk_norm
        and not ModelShape.from_config("Qwen3-8B").qkv_bias
    )


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            {"model_type": "qwen2", "hidden_size": 64},
            "lacks positive whole numbers for num_attention_heads",
        ),  # noqa: E501
        ({**TOY, "num_key_value_heads": 3}, "cannot share 3 KV heads"),
        ({**TOY, "hidden_size": "64"}, "hidden_size"),
        ({**TOY, "num_hidden_layers": 0}, "num_hidden_layers"),
    ],
)
def test_bad_configs_are_clear_errors(config: dict, message: str):
    with pytest.raises(ValueError, match=message):
        ModelShape.from_config(config)


def test_bad_config_sources(tmp_path: Path):
    with pytest.raises(ValueError, match="not a shipped config.*Qwen3-8B"):
        models.load_config("Qwen9-1T")
    with pytest.raises(ValueError, match="no config for"):
        models.load_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="Expecting property name"):
        models.load_config(tmp_path)
