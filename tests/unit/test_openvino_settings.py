"""The OpenVINO runtime's settings, spec fields, cache folders, calibration files and error paths (no model
is loaded here: tests/integration/test_openvino_backend.py loads one)."""

from __future__ import annotations

import fcntl
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from pydantic import ValidationError

from consumer import cli
from consumer.embedders import build_embedder
from consumer.embedders.base import ModelLoadError
from consumer.embedders.openvino import OpenVINOEmbedder
from consumer.embedders.openvino_export import (
    IR_FILE,
    META_FILE,
    cache_folder,
    calibration_texts,
    export_apart,
)
from consumer.service import _load_embedders
from consumer.settings import Settings, SettingsError, load_settings
from consumer.spec import LocalEmbedderSpec, PipelinesFileError, PipelineSpec, parse_pipelines
from tests.unit.fakes import FakeEmbedder

OPENVINO_PIPELINES = """
pipelines:
  exact:
    source_table: public.documents
    text_columns: [title, body]
    vector_table: public.exact
    embedder: {kind: local, model: /models/small, runtime: openvino}
  fast:
    source_table: public.documents
    text_columns: [title, body]
    vector_table: public.fast
    embedder: {kind: local, model: /models/small, runtime: openvino, quantization: int8}
"""


def test_auto_is_the_default_and_the_cache_is_under_the_home_folder() -> None:
    s = Settings()
    assert (s.embed_runtime, s.embed_quantization) == ("auto", "none")
    assert (LocalEmbedderSpec().runtime, LocalEmbedderSpec().quantization) == ("auto", "none")
    assert s.openvino_cache_dir == Path("~/.cache/cdc-embedder/openvino")
    assert s.model_identity == s.model
    assert LocalEmbedderSpec().identity == s.model


def test_int8_is_an_identity_of_its_own_and_lossless_keeps_the_models() -> None:
    lossless = Settings.from_env_map({"CDC_MODEL": "/m", "CDC_EMBED_RUNTIME": "openvino"})
    int8 = Settings.from_env_map(
        {"CDC_MODEL": "/m", "CDC_EMBED_RUNTIME": "openvino", "CDC_EMBED_QUANTIZATION": "int8"}
    )
    assert (lossless.model_identity, int8.model_identity) == ("/m", "/m+int8")
    assert int8.model == "/m"  # still what is loaded


def test_int8_on_torch_is_refused_naming_both_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CDC_EMBED_QUANTIZATION", "int8")
    with pytest.raises(SettingsError, match="CDC_EMBED_QUANTIZATION=int8 needs CDC_EMBED_RUNTIME=openvino"):
        load_settings()


@pytest.mark.parametrize(
    ("variable", "value"), [("CDC_EMBED_RUNTIME", "onnx"), ("CDC_EMBED_QUANTIZATION", "int4")]
)
def test_a_bad_value_names_the_variable(monkeypatch: pytest.MonkeyPatch, variable: str, value: str) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError, match=variable):
        load_settings()


def test_the_variables_make_the_default_pipelines_spec_and_back() -> None:
    env = {"CDC_MODEL": "/m", "CDC_EMBED_RUNTIME": "openvino", "CDC_EMBED_QUANTIZATION": "int8"}
    settings = Settings.from_env_map(env)
    spec = PipelineSpec.from_settings(settings)
    assert isinstance(spec.embedder, LocalEmbedderSpec)
    assert (spec.embedder.runtime, spec.embedder.quantization, spec.embedder.identity) == (
        "openvino",
        "int8",
        "/m+int8",
    )
    view = spec.settings(settings)
    assert (view.model, view.model_identity, view.embed_runtime) == ("/m", "/m+int8", "openvino")


def test_a_pipelines_file_declares_the_runtime_and_quantization(tmp_path: Path) -> None:
    path = tmp_path / "pipelines.yaml"
    path.write_text(OPENVINO_PIPELINES)
    exact, fast = (spec.settings(Settings()) for spec in parse_pipelines(path))
    assert (exact.embed_runtime, exact.embed_quantization, exact.model_identity) == (
        "openvino",
        "none",
        "/models/small",
    )
    assert (fast.embed_quantization, fast.model_identity) == ("int8", "/models/small+int8")


def test_int8_without_openvino_in_a_pipelines_file_names_the_field(tmp_path: Path) -> None:
    path = tmp_path / "pipelines.yaml"
    path.write_text(
        OPENVINO_PIPELINES.replace(", runtime: openvino, quantization: int8", ", quantization: int8")
    )
    with pytest.raises(PipelinesFileError, match=r"'fast'.*quantization int8 needs runtime openvino"):
        parse_pipelines(path)
    with pytest.raises(ValidationError):
        LocalEmbedderSpec(runtime="torch", quantization="int8")


async def test_lossless_and_int8_of_one_model_are_two_loaded_models(tmp_path: Path) -> None:
    path = tmp_path / "pipelines.yaml"
    path.write_text(OPENVINO_PIPELINES)
    views = [spec.settings(Settings()) for spec in parse_pipelines(path)]
    with ThreadPoolExecutor(1) as executor:
        embedders = await _load_embedders(views, lambda _: FakeEmbedder(), executor)
    assert embedders["exact"] is not embedders["fast"]


def test_cache_folders_are_per_model_and_quantization(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a" / "model").mkdir(parents=True)
    (tmp_path / "b" / "model").mkdir(parents=True)
    base = {"CDC_EMBED_RUNTIME": "openvino", "CDC_OPENVINO_CACHE_DIR": str(tmp_path / "cache")}
    folders = {
        cache_folder(Settings.from_env_map({**base, "CDC_MODEL": model, "CDC_EMBED_QUANTIZATION": q}))
        for model in ("a/model", "b/model", str(tmp_path / "a" / "model"))
        for q in ("none", "int8")
    }
    # one folder per model (a relative path is its absolute one) and quantization, named for both
    assert len(folders) == 4
    assert {f.parent for f in folders} == {tmp_path / "cache"}
    assert sorted(f.name.rsplit("-", 1)[1] for f in folders) == ["int8", "int8", "lossless", "lossless"]
    assert all(f.name.startswith("model-") for f in folders)
    home = cache_folder(Settings.from_env_map({"CDC_MODEL": "thenlper/gte-small"}))
    assert home.parent == Path.home() / ".cache" / "cdc-embedder" / "openvino"
    assert home.name.startswith("gte-small-") and home.name.endswith("-lossless")


def test_calibration_texts_from_lines_and_jsonl(tmp_path: Path) -> None:
    lines = tmp_path / "texts.txt"
    lines.write_text("first text\n\nsecond text\nthird\n")
    assert calibration_texts(lines, 2) == ["first text", "second text"]
    jsonl = tmp_path / "rows.jsonl"
    rows = ['"a string"', json.dumps({"package": "vim", "text": " an editor ", "n": 3}), ""]
    jsonl.write_text("\n".join(rows) + "\n")
    assert calibration_texts(jsonl, 10) == ["a string", "vim\n\nan editor"]


@pytest.mark.parametrize(
    ("content", "message"), [("", "holds no calibration text"), ("{not json\n", "cannot read calibration")]
)
def test_a_calibration_file_without_texts_is_named(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(ModelLoadError, match=message) as failure:
        calibration_texts(path, 10)
    assert str(path) in str(failure.value)


def test_int8_without_an_export_names_the_command_and_the_cache_setting(tmp_path: Path) -> None:
    from consumer.embedders.openvino import OpenVINOEmbedder

    settings = Settings.from_env_map(
        {
            "CDC_MODEL": str(tmp_path / "model"),
            "CDC_EMBED_RUNTIME": "openvino",
            "CDC_EMBED_QUANTIZATION": "int8",
            "CDC_OPENVINO_CACHE_DIR": str(tmp_path / "cache"),
        }
    )
    with pytest.raises(ModelLoadError) as failure:
        OpenVINOEmbedder(settings)
    message = str(failure.value)
    assert "cdc-embedder openvino-export --quantization int8 --calibration" in message
    assert "CDC_OPENVINO_CACHE_DIR" in message and str(cache_folder(settings)) in message


def test_an_int8_export_without_calibration_texts_exits_2(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CDC_OPENVINO_CACHE_DIR", str(tmp_path))
    assert cli.main(["openvino-export", "--quantization", "int8"]) == 2
    assert "--calibration FILE" in capsys.readouterr().err


class Loaded:
    """Stands in for a backend class: records that it was built."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings


class Refused:
    def __init__(self, settings: Settings) -> None:
        raise ModelLoadError(f"{settings.model!r} is not a transformer with mean pooling")


@pytest.mark.parametrize(
    ("runtime", "openvino", "built"),
    [
        ("auto", Loaded, "openvino"),
        ("auto", Refused, "torch"),  # a model OpenVINO cannot take still embeds, on torch
        ("torch", Loaded, "torch"),
        ("openvino", Loaded, "openvino"),
    ],
)
def test_the_runtime_setting_picks_the_backend(
    monkeypatch: pytest.MonkeyPatch, runtime: str, openvino: type, built: str
) -> None:
    torch = type("Torch", (Loaded,), {})
    monkeypatch.setattr("consumer.embedders.openvino.OpenVINOEmbedder", openvino)
    monkeypatch.setattr("consumer.embedders.local.SentenceTransformerEmbedder", torch)
    embedder = build_embedder(Settings.from_env_map({"CDC_MODEL": "/m", "CDC_EMBED_RUNTIME": runtime}))
    assert isinstance(embedder, torch if built == "torch" else openvino)


def test_an_explicit_openvino_runtime_fails_rather_than_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("consumer.embedders.openvino.OpenVINOEmbedder", Refused)
    with pytest.raises(ModelLoadError, match="mean pooling"):
        build_embedder(Settings.from_env_map({"CDC_MODEL": "/m", "CDC_EMBED_RUNTIME": "openvino"}))


def test_a_model_replaced_in_its_folder_gets_another_cache_folder(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "weights.bin").write_bytes(b"first")
    settings = Settings.from_env_map({"CDC_MODEL": str(model), "CDC_OPENVINO_CACHE_DIR": str(tmp_path)})
    first = cache_folder(settings)
    assert cache_folder(settings) == first
    (model / "weights.bin").write_bytes(b"other")  # same size: a retrained model of the same shape
    assert cache_folder(settings) != first


def test_an_export_that_cannot_be_written_names_the_cache_setting(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")  # the cache folder's parent is a file: as unwritable as a read-only image
    settings = Settings.from_env_map(
        {"CDC_MODEL": "/m", "CDC_EMBED_RUNTIME": "openvino", "CDC_OPENVINO_CACHE_DIR": str(blocker / "cache")}
    )
    with pytest.raises(ModelLoadError, match="CDC_OPENVINO_CACHE_DIR to a writable folder"):
        OpenVINOEmbedder(settings)


def test_a_start_waiting_for_another_process_export_says_so_and_loads_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings.from_env_map({"CDC_MODEL": "/m", "CDC_OPENVINO_CACHE_DIR": str(tmp_path)})
    folder = cache_folder(settings)
    with ThreadPoolExecutor(1) as pool, (tmp_path / f".{folder.name}.lock").open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another consumer is exporting
        try:
            with caplog.at_level(logging.INFO, logger="consumer.embedders.openvino_export"):
                waiting = pool.submit(export_apart, settings)
                deadline = time.monotonic() + 30
                while "waiting for another process" not in caplog.text:
                    assert not waiting.done(), waiting.exception()
                    assert time.monotonic() < deadline, "no word of the wait"
                    time.sleep(0.01)
                folder.mkdir()  # its export lands, complete
                (folder / IR_FILE).write_text("<net/>")
                (folder / META_FILE).write_text("{}")
        finally:  # before the pool waits for its thread
            fcntl.flock(held, fcntl.LOCK_UN)
        waiting.result(timeout=30)
    assert "exporting" not in caplog.text  # loaded theirs, exported nothing
