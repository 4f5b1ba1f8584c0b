"""consumer.spec: the pipelines file, the default pipeline from CDC_* variables, text templates."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from consumer.events import EventError, join_text
from consumer.service import _load_embedders
from consumer.settings import Settings
from consumer.spec import (
    LocalEmbedderSpec,
    PipelinesFileError,
    PipelineSpec,
    load_pipelines,
    parse_pipelines,
    pipeline_settings,
    template_columns,
)
from tests.unit.fakes import FakeEmbedder

TWO_PIPELINES = """
pipelines:
  documents:
    source_table: public.documents
    text_columns: [title, body]
    vector_table: public.document_embeddings
  tickets:
    source_table: support.tickets
    key_columns: [org_id, ticket_id]
    text_template: "{subject}\\n\\n{description}"
    vector_table: support.ticket_embeddings
    embedder: {kind: local, model: /models/small, max_seq_length: 256}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pipelines.yaml"
    path.write_text(text)
    return path


def test_without_a_file_the_variables_make_the_one_pipeline() -> None:
    settings = Settings.from_env_map(
        {"CDC_SOURCE_TABLE": "shop.items", "CDC_TEXT_COLUMNS": "name,notes", "CDC_MODEL": "/m"}
    )
    (spec,) = load_pipelines(settings)
    assert (spec.name, spec.source_table, spec.text_columns) == ("items", "shop.items", ("name", "notes"))
    assert spec.embedder == LocalEmbedderSpec(model="/m")
    view = spec.settings(settings)
    # the default pipeline's view is the process settings themselves
    assert view.model_dump() == settings.model_dump() | {"pipeline_name": "items"}


def test_a_file_declares_several_pipelines_each_with_its_own_view(tmp_path: Path) -> None:
    process = Settings.from_env_map({"CDC_CONSUMER_GROUP": "g", "CDC_TOPIC_PREFIX": "x"})
    documents, tickets = parse_pipelines(write(tmp_path, TWO_PIPELINES))
    assert tickets.key_columns == ("org_id", "ticket_id")
    view = tickets.settings(process)
    assert (view.pipeline, view.source_topic, view.vector_table) == (
        "tickets",
        "x.support.tickets",
        "support.ticket_embeddings",
    )
    assert (view.text_column_list, view.text_template) == (
        ("subject", "description"),
        "{subject}\n\n{description}",
    )
    assert (view.model, view.max_seq_length, view.key_column_list) == (
        "/models/small",
        256,
        ("org_id", "ticket_id"),
    )
    # process-level settings stay shared: one consumer group, one retry topic for both pipelines
    assert view.retry_topic == documents.settings(process).retry_topic == "g.retry"


def test_a_command_picks_its_pipeline_by_name(tmp_path: Path) -> None:
    settings = Settings.from_env_map({"CDC_PIPELINES_FILE": str(write(tmp_path, TWO_PIPELINES))})
    assert pipeline_settings(settings, "tickets").source_table == "support.tickets"
    with pytest.raises(PipelinesFileError, match="name one: the pipelines are documents, tickets"):
        pipeline_settings(settings, None)
    with pytest.raises(PipelinesFileError, match="no pipeline 'nope'"):
        pipeline_settings(settings, "nope")
    assert pipeline_settings(Settings(), None).pipeline == "documents"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("pipelines: []", "must hold a mapping 'pipelines:'"),
        ("nothing: here", "must hold a mapping 'pipelines:'"),
        ("pipelines: {a: 3}", "pipeline 'a': must be a mapping"),
        ("pipelines:\n  Docs: {source_table: a, vector_table: b}", "pipeline 'Docs': name: Value error"),
        ("pipelines:\n  a: {source_table: a}", "pipeline 'a': vector_table: Field required"),
        ("pipelines:\n  a: {source_table: 'x;y', vector_table: b}", "source_table: Value error, 'x;y'"),
        ("pipelines:\n  a: {source_table: a, vector_table: b, colour: red}", "colour: Extra inputs"),
        (
            "pipelines:\n  a: {source_table: a, vector_table: b, embedder: {kind: magic}}",
            "embedder: Input tag",
        ),
        (
            "pipelines:\n  a: {source_table: a, vector_table: b, text_columns: [t], text_template: '{t}'}",
            "text_columns or text_template (one of them, not both)",
        ),
        (
            "pipelines:\n  a: {source_table: a, vector_table: b, text_template: 'no fields'}",
            "names no column",
        ),
        (
            "pipelines:\n  a: {source_table: a, vector_table: b, text_columns: [t]}\n"
            "  b: {source_table: c, vector_table: public.b, text_columns: [t]}",
            "pipelines 'a' and 'b' have the same vector_table public.b",
        ),
        (
            "pipelines:\n  a: {source_table: a, vector_table: b, text_columns: [t], search_view: v}\n"
            "  b: {source_table: c, vector_table: d, text_columns: [t], search_view: v}",
            "serve the search_view public.v from different source tables",
        ),
        (
            "pipelines:\n  a: {source_table: a, vector_table: b, text_columns: [t], search_view: b}",
            "public.b is a vector_table and a search_view",
        ),
        ("pipelines:\n  a: {source_table: a, vector_table: a2}", "give text_columns or text_template"),
        (
            "pipelines:\n  a: {source_table: a, vector_table: b, text_columns: [t], chunking: chunk,\n"
            "      embedder: {kind: openai, model: m}}",
            "chunking: chunk needs the model's tokenizer",
        ),
        ("pipelines: {a: [unclosed", "cannot read"),
        (  # PyYAML alone would keep the second and drop the first without a word
            "pipelines:\n  a: {source_table: a, text_columns: [t], vector_table: a2}\n"
            "  a: {source_table: b, text_columns: [t], vector_table: b2}",
            "'a' is given twice",
        ),
    ],
)
def test_a_bad_file_names_the_file_the_pipeline_and_the_field(
    tmp_path: Path, text: str, message: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(PipelinesFileError) as caught:
        parse_pipelines(path)
    assert str(path) in str(caught.value)
    assert "CDC_PIPELINES_FILE" in str(caught.value)
    assert message in str(caught.value)


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(PipelinesFileError, match=r"cannot read .*missing\.yaml"):
        parse_pipelines(tmp_path / "missing.yaml")


def test_template_columns_in_order_each_once() -> None:
    assert template_columns("{title}: {body} ({title})") == ("title", "body")
    for bad in ("{0}", "{a.b}", "{a[0]}", "{"):
        with pytest.raises(ValueError):
            template_columns(bad)


@pytest.mark.parametrize(
    ("row", "text"),
    [
        ({"title": "T", "body": "B"}, "T: B"),
        ({"title": None, "body": "B"}, ": B"),
        ({"title": "  ", "body": None}, ":"),
        ({"title": 3, "body": "B"}, "3: B"),
    ],
)
def test_a_template_makes_the_text(row: dict[str, object], text: str) -> None:
    assert join_text(row, ("title", "body"), "{title}: {body}") == text


def test_a_template_of_empty_columns_is_no_text() -> None:
    assert join_text({"title": None, "body": " "}, ("title", "body"), "{title}\n\n{body}") == ""


def test_a_template_needs_every_column_it_names() -> None:
    with pytest.raises(EventError, match="no column 'body'"):
        join_text({"title": "T"}, ("title", "body"), "{title} {body}")


def test_a_pipeline_name_is_a_safe_label() -> None:
    with pytest.raises(ValueError, match="lower case"):
        PipelineSpec(name="Bad Name", source_table="a", vector_table="b")
    assert Settings(source_table="public.Mixed$Case").pipeline == "mixed_case"


async def test_pipelines_of_one_model_share_one_loaded_copy(tmp_path: Path) -> None:
    again = (
        "  again:\n    source_table: public.documents\n    text_columns: [title]\n"
        "    vector_table: public.again\n"
        "    embedder: {kind: local, model: /models/small, max_seq_length: 256}\n"
    )
    views = [spec.settings(Settings()) for spec in parse_pipelines(write(tmp_path, TWO_PIPELINES + again))]
    loaded: list[str] = []

    def factory(view: Settings) -> FakeEmbedder:
        loaded.append(view.pipeline)
        return FakeEmbedder()

    with ThreadPoolExecutor(1) as executor:
        embedders = await _load_embedders(views, factory, executor)
    assert loaded == ["documents", "tickets"]
    assert embedders["again"] is embedders["tickets"] is not embedders["documents"]


def test_an_openai_pipeline_becomes_the_settings_of_that_backend(tmp_path: Path) -> None:
    remote = (
        "  remote:\n    source_table: public.notes\n    text_columns: [body]\n"
        "    vector_table: public.note_vectors\n"
        "    embedder: {kind: openai, model: text-embedding-3-small, dimensions: 1536, concurrency: 8}\n"
    )
    *_, spec = parse_pipelines(write(tmp_path, TWO_PIPELINES + remote))
    view = spec.settings(Settings())
    assert (view.embedder, view.openai_model, view.openai_dimensions, view.openai_concurrency) == (
        "openai",
        "text-embedding-3-small",
        1536,
        8,
    )
    # the stored model and the text hashes name the server, the model and the dimension
    assert view.model == view.openai_spec().identity == "openai:api.openai.com/v1/text-embedding-3-small@1536"
    from_env = Settings.from_env_map(
        {"CDC_EMBEDDER": "openai", "CDC_OPENAI_MODEL": "m", "CDC_OPENAI_DIMENSIONS": "8"}
    )
    (default,) = load_pipelines(from_env)
    assert default.embedder.kind == "openai"
    assert default.settings(from_env).openai_model == "m"
