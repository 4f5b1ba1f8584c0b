"""consumer.router: records reach their pipeline by source topic, retry records by their origin header."""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import REGISTRY

from consumer.embedders.base import Embedding
from consumer.errors import ErrorClass
from consumer.events import Origin
from consumer.pipeline import BatchProcessor
from consumer.retry import H_ORIGINAL_TOPIC, RetryPolicy, RetryState
from consumer.router import Route, Router
from consumer.settings import Settings
from consumer.spec import PipelineSpec
from tests.unit.fakes import DLQ_TOPIC, FakeEmbedder, FakePublisher, FakeSink, Topic, k, text_of

PROCESS = Settings()
SPECS = {
    name: PipelineSpec(
        name=name,
        source_table=f"public.{name}",
        text_columns=("title", "body"),
        vector_table=f"public.{name}_v",
    )
    for name in ("notes", "tickets")
}


class Two:
    """Two pipelines over fake sinks, sharing a publisher (one Kafka transaction) like the service does."""

    def __init__(self) -> None:
        self.publisher = FakePublisher()
        self.sinks = {name: FakeSink() for name in SPECS}
        self.views = {name: spec.settings(PROCESS) for name, spec in SPECS.items()}
        self.topics = {name: Topic(view.source_topic) for name, view in self.views.items()}
        self.embedders = {name: FakeEmbedder() for name in SPECS}
        self.router = Router(
            [
                Route(
                    view.source_topic,
                    name,
                    BatchProcessor(view, self.embedders[name], self.sinks[name], self.publisher),
                )
                for name, view in self.views.items()
            ]
        )


def events_total(pipeline: str, outcome: str) -> float:
    labels = {"pipeline": pipeline, "op": "create", "outcome": outcome}
    return REGISTRY.get_sample_value("cdc_embedder_events_total", labels) or 0.0


async def test_each_record_lands_in_its_own_pipeline_and_is_counted_there() -> None:
    two = Two()
    before = {name: events_total(name, "embedded") for name in SPECS}
    notes, tickets = two.topics["notes"], two.topics["tickets"]
    report = await two.router.process(
        [notes.create(1, 100, "a"), tickets.create(1, 101, "b"), notes.create(2, 102, "c")]
    )
    assert set(two.sinks["notes"].rows) == {k(1), k(2)}
    assert set(two.sinks["tickets"].rows) == {k(1)}
    report.record_metrics()
    assert {name: events_total(name, "embedded") - before[name] for name in SPECS} == {
        "notes": 2,
        "tickets": 1,
    }


async def test_each_pipeline_embeds_its_part_ahead_and_the_model_is_free_after_the_last_ones() -> None:
    two = Two()
    notes, tickets = two.topics["notes"], two.topics["tickets"]
    batch = [notes.create(1, 100, "a"), tickets.create(1, 101, "b"), notes.create(2, 102, "c")]
    await two.router.embed_ahead(batch)
    calls = {name: e.calls for name, e in two.embedders.items()}
    assert calls == {"notes": [[text_of("a"), text_of("c")]], "tickets": [[text_of("b")]]}
    await two.router.process(batch)
    assert calls == {"notes": [[text_of("a"), text_of("c")]], "tickets": [[text_of("b")]]}  # none again

    fresh = Two()
    notes, tickets = fresh.topics["notes"], fresh.topics["tickets"]
    freed: list[dict[str, int]] = []  # the model calls made when the batch said it needs the model no more
    await fresh.router.process(
        [notes.create(1, 100, "a"), tickets.create(1, 101, "b")],
        lambda: freed.append({name: len(e.calls) for name, e in fresh.embedders.items()}),
    )
    assert freed == [{"notes": 1, "tickets": 1}]


async def test_a_retry_record_goes_back_to_the_pipeline_it_came_from() -> None:
    two = Two()
    source = two.topics["tickets"].create(7, 100, "retried text")
    route = RetryPolicy(PROCESS).route(
        RetryState(0, None, 0, Origin(source.topic, 0, source.offset)), ErrorClass.MODEL_ERROR, "boom"
    )
    assert route.topic == two.views["notes"].retry_topic == two.views["tickets"].retry_topic
    retry = Topic(route.topic).record(7, source.value, route.headers)
    await two.router.process([retry])
    assert set(two.sinks["tickets"].rows) == {k(7)}
    assert not two.sinks["notes"].rows


async def test_a_record_of_no_pipeline_is_dead_lettered_with_the_way_back() -> None:
    two = Two()
    orphan = Topic("cdc.public.gone").create(1, 100, "text")
    headers = [
        (H_ORIGINAL_TOPIC, b"cdc.public.gone"),
        ("cdc-original-partition", b"0"),
        ("cdc-original-offset", b"0"),
    ]
    retry = Topic(PROCESS.retry_topic).record(1, orphan.value, headers)
    report = await two.router.process([retry])
    assert dict(report.outcomes) == {"dead_lettered": 1}
    [dead] = two.publisher.sent
    assert dead.topic == DLQ_TOPIC
    assert dead.header["cdc-error-class"] == b"no_pipeline"
    assert b"no pipeline reads cdc.public.gone" in dead.header["cdc-error-message"]
    assert b"CDC_PIPELINES_FILE" in dead.header["cdc-error-message"]
    assert not any(sink.rows for sink in two.sinks.values())


async def test_pipelines_of_one_table_each_apply_its_changes_and_retry_only_their_own_failures() -> None:
    """The old and the new target of a model change: both see every change; a retry goes back only to
    the pipeline that failed it."""
    publisher = FakePublisher()
    old, new = (
        PipelineSpec(
            name=n, source_table="public.docs", text_columns=("title", "body"), vector_table=f"public.{n}"
        )
        for n in ("old", "new")
    )
    sinks = {"old": FakeSink(), "new": FakeSink()}
    failing = FakeEmbedder(fail_texts=["poison\n\nbody"])
    router = Router(
        [
            Route(
                s.settings(PROCESS).source_topic,
                s.name,
                BatchProcessor(s.settings(PROCESS), e, sinks[s.name], publisher),
            )
            for s, e in ((old, FakeEmbedder()), (new, failing))
        ]
    )
    topic = Topic(old.settings(PROCESS).source_topic)
    await router.process([topic.create(1, 100, "fine"), topic.create(2, 101, "poison")])
    assert set(sinks["old"].rows) == {k(1), k(2)}
    assert set(sinks["new"].rows) == {k(1)}
    [retry] = publisher.sent
    assert retry.header["cdc-pipeline"] == b"new"

    failing.fail_texts.clear()
    old_calls = len(sinks["old"].writes)
    await router.process([Topic(retry.topic).record(2, retry.value, retry.headers)])
    assert set(sinks["new"].rows) == {k(1), k(2)}
    assert len(sinks["old"].writes) == old_calls  # the old pipeline never saw the retry


async def test_every_pipeline_embeds_and_writes_before_the_first_send_of_the_transaction() -> None:
    """A send starts the Kafka transaction's timeout on the broker: a pipeline that waits for its
    embedding server must not wait with the transaction of another pipeline's retry already open."""
    two = Two()
    sent_when_embedding: list[int] = []

    class Watching(FakeEmbedder):
        def embed(self, texts: Sequence[str]) -> Embedding:
            sent_when_embedding.append(len(two.publisher.sent))
            return super().embed(texts)

    failing = FakeEmbedder(fail_texts=["poison\n\nbody"])
    two.router = Router(
        [
            Route(
                two.views[name].source_topic,
                name,
                BatchProcessor(two.views[name], e, two.sinks[name], two.publisher),
            )
            for name, e in (("notes", failing), ("tickets", Watching()))
        ]
    )
    notes, tickets = two.topics["notes"], two.topics["tickets"]
    report = await two.router.process([notes.create(1, 100, "poison"), tickets.create(1, 101, "b")])
    assert report.outcomes["retried"] == 1 and report.outcomes["embedded"] == 1
    assert sent_when_embedding == [0] and len(two.publisher.sent) == 1
