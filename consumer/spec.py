"""What a pipeline is: a source table, its key, how its text is made, and its target (table + embedder).

One deployment runs one or more pipelines. They are declared in a YAML file (`CDC_PIPELINES_FILE`), or,
by default, one pipeline is made from today's `CDC_*` variables, so a deployment that never heard of
pipelines keeps working unchanged.

Each pipeline's modules still take a `Settings`: `PipelineSpec.settings` returns the process settings
with this pipeline's fields in place, so routing, the batch logic and the sink need no second path.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from string import Formatter
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from consumer.embedders.openai import OpenAIEmbedderSpec
from consumer.settings import DEFAULT_MODEL, Settings, SettingsError, env_name

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]*$")
_TABLE = re.compile(r"^([A-Za-z_][A-Za-z0-9_$]*\.)?[A-Za-z_][A-Za-z0-9_$]*$")
# A pipeline's name is a metric label value and part of log lines: short, and nothing to escape.
_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")


class _Spec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class LocalEmbedderSpec(_Spec):
    """sentence-transformers in this process (the default: gte-small)."""

    kind: Literal["local"] = "local"
    model: str = DEFAULT_MODEL
    max_seq_length: int = Field(default=512, ge=8)
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # with openvino: its precision hint
    token_budget: int = Field(default=1024, ge=0)
    runtime: Literal["auto", "torch", "openvino"] = "auto"
    quantization: Literal["none", "int8"] = "none"

    @model_validator(mode="after")
    def _runtime(self) -> LocalEmbedderSpec:
        if self.quantization != "none" and self.runtime != "openvino":
            raise ValueError(f"quantization {self.quantization} needs runtime openvino")
        return self

    @property
    def identity(self) -> str:
        """What the text hash and the stored `model` column say: the same model embeds the same way."""
        return f"{self.model}+int8" if self.quantization == "int8" else self.model


EmbedderSpec = Annotated[LocalEmbedderSpec | OpenAIEmbedderSpec, Field(discriminator="kind")]


def template_columns(template: str) -> tuple[str, ...]:
    """The columns a text template such as "{title}\\n\\n{body}" names, in order, each once."""
    try:
        fields = [name for _, name, _, _ in Formatter().parse(template) if name is not None]
    except ValueError as exc:
        raise ValueError(f"is not a text template like '{{title}}\\n\\n{{body}}': {exc}") from None
    if not fields:
        raise ValueError("names no column: write columns in braces, like '{title}\\n\\n{body}'")
    bad = [f for f in fields if not _IDENTIFIER.match(f)]
    if bad:
        raise ValueError(f"names {bad[0]!r}, which is not a column name (no formats or indexing)")
    return tuple(dict.fromkeys(fields))


class PipelineSpec(_Spec):
    name: str
    source_table: str
    key_columns: tuple[str, ...] | None = Field(
        default=None, description="The source's primary key when unset."
    )
    text_columns: tuple[str, ...] | None = Field(
        default=None, description="Columns joined with a blank line; or give text_template."
    )
    text_template: str | None = Field(default=None, description='e.g. "{title}\\n\\n{body}"')
    vector_table: str
    embedder: EmbedderSpec = LocalEmbedderSpec()
    max_text_chars: int = Field(default=200_000, ge=1)
    chunking: Literal["truncate", "chunk"] = "truncate"
    chunk_overlap_tokens: int = Field(default=32, ge=0)
    on_model_change: Literal["refuse", "reembed"] = "refuse"
    hnsw_m: int = Field(default=16, ge=2, le=100)
    hnsw_ef_construction: int = Field(default=64, ge=4, le=1000)
    # The view the users' searches read; pipelines of one source that name the same view are the old
    # and the new target of a model change (`cdc-embedder migrate`).
    search_view: str | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError(f"{value!r} must be lower case letters, digits, - or _, starting with a letter")
        return value

    @field_validator("source_table", "vector_table", "search_view")
    @classmethod
    def _table(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not _TABLE.match(value):
            raise ValueError(f"{value!r} is not a table name like schema.table")
        return value if "." in value else f"public.{value}"

    @field_validator("key_columns", "text_columns")
    @classmethod
    def _columns(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is not None and (not value or not all(_IDENTIFIER.match(c) for c in value)):
            raise ValueError(f"{list(value)!r} is not a list of column names")
        return value

    @field_validator("text_template")
    @classmethod
    def _template(cls, value: str | None) -> str | None:
        if value is not None:
            template_columns(value)
        return value

    @model_validator(mode="after")
    def _consistent(self) -> PipelineSpec:
        if (self.text_columns is None) == (self.text_template is None):
            raise ValueError("give text_columns or text_template (one of them, not both)")
        if self.source_table == self.vector_table:
            raise ValueError("vector_table must not be the source table")
        if self.hnsw_ef_construction < 2 * self.hnsw_m:
            raise ValueError("hnsw_ef_construction must be at least twice hnsw_m")
        if self.chunking == "chunk" and not isinstance(self.embedder, LocalEmbedderSpec):
            raise ValueError(
                "chunking: chunk needs the model's tokenizer: a local embedder, or chunking: truncate"
            )
        return self

    @classmethod
    def from_settings(cls, settings: Settings) -> PipelineSpec:
        """The default pipeline, from today's CDC_* variables."""
        return cls(
            name=settings.pipeline,
            source_table=settings.source_table,
            key_columns=settings.key_column_list,
            text_columns=None if settings.text_template else settings.text_column_list,
            text_template=settings.text_template,
            vector_table=settings.vector_table,
            embedder=settings.openai_spec()
            if settings.embedder == "openai"
            else LocalEmbedderSpec(
                model=settings.model,
                max_seq_length=settings.max_seq_length,
                dtype=settings.embed_dtype,
                token_budget=settings.embed_token_budget,
                runtime=settings.embed_runtime,
                quantization=settings.embed_quantization,
            ),
            max_text_chars=settings.max_text_chars,
            chunking=settings.chunking,
            chunk_overlap_tokens=settings.chunk_overlap_tokens,
            on_model_change=settings.on_model_change,
            hnsw_m=settings.hnsw_m,
            hnsw_ef_construction=settings.hnsw_ef_construction,
            search_view=settings.search_view,
        )

    def settings(self, process: Settings) -> Settings:
        """The process settings with this pipeline's fields in place.

        Validated anew rather than `model_copy`: a copy would keep the cached derived values (topics,
        table parts) of the process settings.
        """
        fields: dict[str, Any] = process.model_dump()
        fields.update(
            pipeline_name=self.name,
            source_table=self.source_table,
            key_columns=",".join(self.key_columns) if self.key_columns else None,
            key_column=None,
            text_columns=",".join(self.text_columns or template_columns(self.text_template or "")),
            text_template=self.text_template,
            vector_table=self.vector_table,
            **_embedder_fields(self.embedder, process),
            max_text_chars=self.max_text_chars,
            chunking=self.chunking,
            chunk_overlap_tokens=self.chunk_overlap_tokens,
            on_model_change=self.on_model_change,
            hnsw_m=self.hnsw_m,
            hnsw_ef_construction=self.hnsw_ef_construction,
            search_view=self.search_view,
        )
        return Settings.model_validate(fields)


def _embedder_fields(embedder: LocalEmbedderSpec | OpenAIEmbedderSpec, process: Settings) -> dict[str, Any]:
    """The settings that make `consumer.embedders.build_embedder` build this embedder."""
    if isinstance(embedder, LocalEmbedderSpec):
        return {
            "embedder": "local",
            "model": embedder.model,  # what to load; Settings.model_identity adds the quantization
            "max_seq_length": embedder.max_seq_length,
            "embed_dtype": embedder.dtype,
            "embed_token_budget": embedder.token_budget,
            "embed_runtime": embedder.runtime,
            "embed_quantization": embedder.quantization,
        }
    fields = {f"openai_{k}": v for k, v in embedder.model_dump(exclude={"kind"}).items()}
    # the identity is the `model` of what reads the vector table; without a declared dimension it is
    # known once the server answered, and the consumer puts it in then
    return {"embedder": "openai", "model": embedder.identity or process.model, **fields}


class PipelinesFileError(SettingsError):
    """The pipelines file is unreadable or invalid; the message names the file, pipeline and field."""


def load_pipelines(settings: Settings) -> tuple[PipelineSpec, ...]:
    """The declared pipelines (CDC_PIPELINES_FILE), or the default one from the CDC_* variables."""
    if settings.pipelines_file is None:
        return (PipelineSpec.from_settings(settings),)
    return parse_pipelines(settings.pipelines_file)


class _UniqueKeys(yaml.SafeLoader):
    """YAML that refuses a key given twice in one mapping, where PyYAML keeps the last one silently: two
    pipelines of one name would be one, and the other's table would go unembedded unnoticed."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"{key!r} is given twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def parse_pipelines(path: Path) -> tuple[PipelineSpec, ...]:
    where = f"{path} ({env_name('pipelines_file')})"
    try:
        raw = yaml.load(path.read_text(), Loader=_UniqueKeys)  # a SafeLoader
    except (OSError, yaml.YAMLError) as exc:
        raise PipelinesFileError(f"cannot read {where}: {exc}") from None
    entries = raw.get("pipelines") if isinstance(raw, dict) else None
    if not isinstance(entries, Mapping) or not entries:
        raise PipelinesFileError(
            f"{where} must hold a mapping 'pipelines:' of pipeline names to their settings"
        )
    specs = []
    for name, body in entries.items():
        if not isinstance(body, Mapping):
            raise PipelinesFileError(f"{where}: pipeline {name!r}: must be a mapping of settings")
        try:
            specs.append(PipelineSpec.model_validate({"name": name, **body}))
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'pipeline'}: {e['msg']}" for e in exc.errors()
            )
            raise PipelinesFileError(f"{where}: pipeline {name!r}: {problems}") from None
    _check_apart(specs, where)
    return tuple(specs)


def _check_apart(specs: list[PipelineSpec], where: str) -> None:
    """Each pipeline keeps its vectors in a table of its own; a view serves pipelines of one source.

    Pipelines may share a source table: each change is applied to every one of them.
    """
    tables: dict[str, str] = {}
    views: dict[str, PipelineSpec] = {}
    for spec in specs:
        if spec.vector_table in tables:
            raise PipelinesFileError(
                f"{where}: pipelines {tables[spec.vector_table]!r} and {spec.name!r} have the same "
                f"vector_table {spec.vector_table}"
            )
        tables[spec.vector_table] = spec.name
        if spec.search_view is None:
            continue
        other = views.setdefault(spec.search_view, spec)
        if other.source_table != spec.source_table:
            raise PipelinesFileError(
                f"{where}: pipelines {other.name!r} and {spec.name!r} serve the search_view "
                f"{spec.search_view} from different source tables"
            )
    if clash := set(views) & set(tables):
        raise PipelinesFileError(f"{where}: {', '.join(clash)} is a vector_table and a search_view")


def pipeline_settings(settings: Settings, name: str | None) -> Settings:
    """The settings of the pipeline a command names; with no name, of the only one there is."""
    specs = {spec.name: spec for spec in load_pipelines(settings)}
    if name is None and len(specs) == 1:
        (spec,) = specs.values()
    elif name in specs:
        spec = specs[name]
    else:
        asked = "name one" if name is None else f"there is no pipeline {name!r}"
        raise PipelinesFileError(f"{asked}: the pipelines are {', '.join(specs)}")
    return spec.settings(settings)
