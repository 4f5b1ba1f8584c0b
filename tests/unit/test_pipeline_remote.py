"""How the pipeline meets an embedding server's failures: rate limits and transient errors are waited
out on the same texts (never text by text, never routed), a refused input alone is dead-lettered, and a
wrong key holds the batch."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from consumer import model_calls, pipeline
from consumer.embedders.base import Embedding
from consumer.errors import Backpressure, Disposition, EmbedderConfigError, TransientEmbedError, diagnose
from consumer.pipeline import BatchProcessor
from consumer.retry import H_ERROR_CLASS, H_ERROR_MESSAGE
from consumer.settings import Settings
from tests.unit.fakes import DLQ_TOPIC, RETRY_TOPIC, FakeEmbedder, FakePublisher, FakeSink, Topic, k, text_of


class Scripted(FakeEmbedder):
    """Raises the scripted failures on its first calls, then embeds."""

    def __init__(self, failures: Sequence[BaseException]) -> None:
        super().__init__()
        self.failures = list(failures)

    def embed(self, texts: Sequence[str]) -> Embedding:
        if self.failures:
            self.calls.append(list(texts))
            raise self.failures.pop(0)
        return super().embed(texts)


@pytest.fixture(autouse=True)
def no_real_waits(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    monkeypatch.setattr(pipeline.asyncio, "sleep", sleep)
    return waits


def build(embedder: FakeEmbedder) -> tuple[BatchProcessor, FakeSink, FakePublisher]:
    sink, publisher = FakeSink(), FakePublisher()
    return BatchProcessor(Settings(), embedder, sink, publisher), sink, publisher


async def test_rate_limits_wait_the_servers_retry_after_and_resend_the_same_batch(
    no_real_waits: list[float],
) -> None:
    embedder = Scripted([Backpressure(2.5, "429"), Backpressure(0.5, "429")])
    processor, sink, publisher = build(embedder)
    topic = Topic()
    report = await processor.process([topic.create(1, 100, "a"), topic.create(2, 101, "b")])
    assert report.outcomes["embedded"] == 2
    assert no_real_waits == [2.5, 0.5]
    assert embedder.calls == [[text_of("a"), text_of("b")]] * 3  # never text by text
    assert publisher.sent == [] and set(sink.rows) == {k(1), k(2)}


async def test_a_rate_limit_longer_than_a_batch_can_wait_holds_the_batch() -> None:
    limit = model_calls.BACKPRESSURE_IN_PLACE_S
    processor, _, publisher = build(Scripted([Backpressure(limit / 2, "429")] * 3))
    with pytest.raises(Backpressure):  # the consumer pauses everything and applies the batch again
        await processor.process([Topic().create(1, 100, "a")])
    assert publisher.sent == []


async def test_transient_errors_are_retried_in_place_then_go_to_the_retry_topic() -> None:
    flaky = Scripted([TransientEmbedError("503 busy")])
    processor, _, publisher = build(flaky)
    report = await processor.process([Topic().create(1, 100, "a")])
    assert report.outcomes["embedded"] == 1 and publisher.sent == []

    down = Scripted([TransientEmbedError("503 busy")] * model_calls.TRANSIENT_ATTEMPTS)
    processor, _, publisher = build(down)
    topic = Topic()
    report = await processor.process([topic.create(1, 100, "a"), topic.create(2, 101, "b")])
    assert report.outcomes["retried"] == 2
    assert len(down.calls) == model_calls.TRANSIENT_ATTEMPTS  # the whole batch each time
    assert {s.topic for s in publisher.sent} == {RETRY_TOPIC}
    assert publisher.sent[0].header[H_ERROR_CLASS] == b"model_unavailable"


async def test_an_unreachable_server_holds_the_batch_instead_of_routing_its_texts() -> None:
    down = Scripted([TransientEmbedError("ConnectError: refused", unreachable=True)] * 10)
    processor, sink, publisher = build(down)
    with pytest.raises(TransientEmbedError) as raised:  # held, paused, and applied again later
        await processor.process([Topic().create(1, 100, "a")])
    assert diagnose(raised.value, Settings()).disposition is Disposition.OUTAGE
    assert len(down.calls) == model_calls.TRANSIENT_ATTEMPTS
    assert publisher.sent == [] and sink.rows == {}


async def test_a_refused_input_found_text_by_text_is_dead_lettered_never_written_as_zeros() -> None:
    """A failure of no known kind sends the batch text by text; a 400 for one of them then is a refused
    input like any other, not a vector of zeros stored under the text's hash."""

    class MalformedThenRefuses(FakeEmbedder):
        def embed(self, texts: Sequence[str]) -> Embedding:
            if len(texts) > 1:
                raise KeyError("index")  # a malformed answer to the whole batch
            result = super().embed(texts)
            return (
                Embedding(result.vectors * 0, 0, 0, {0: "400 bad input"}) if "poison" in texts[0] else result
            )

    processor, sink, publisher = build(MalformedThenRefuses())
    topic = Topic()
    report = await processor.process([topic.create(1, 100, "fine"), topic.create(2, 101, "poison")])
    assert report.outcomes["embedded"] == 1 and report.outcomes["dead_lettered"] == 1
    assert set(sink.rows) == {k(1)}
    [sent] = publisher.sent
    assert sent.topic == DLQ_TOPIC and sent.header[H_ERROR_MESSAGE] == b"400 bad input"


async def test_an_input_the_server_refuses_is_dead_lettered_alone_with_its_reason() -> None:
    class RefusesPoison(FakeEmbedder):
        def embed(self, texts: Sequence[str]) -> Embedding:
            result = super().embed(texts)
            bad = {i: "400 input too long" for i, t in enumerate(texts) if "poison" in t}
            return Embedding(result.vectors, result.tokens, 0, bad)

    processor, sink, publisher = build(RefusesPoison())
    topic = Topic()
    report = await processor.process([topic.create(1, 100, "fine"), topic.create(2, 101, "poison")])
    assert report.outcomes["embedded"] == 1 and report.outcomes["dead_lettered"] == 1
    assert report.embedded_texts == 1 and set(sink.rows) == {k(1)}
    [sent] = publisher.sent
    assert sent.topic == DLQ_TOPIC
    assert sent.header[H_ERROR_CLASS] == b"model_rejected"
    assert sent.header[H_ERROR_MESSAGE] == b"400 input too long"


async def test_a_wrong_key_holds_the_batch_and_routes_nothing() -> None:
    embedder = Scripted([EmbedderConfigError("401 Unauthorized", "set CDC_OPENAI_API_KEY")])
    processor, sink, publisher = build(embedder)
    with pytest.raises(EmbedderConfigError):
        await processor.process([Topic().create(1, 100, "a"), Topic().create(2, 101, "b")])
    assert len(embedder.calls) == 1 and publisher.sent == [] and sink.rows == {}


def test_the_consumer_holds_for_an_operator_on_a_wrong_key_and_waits_out_a_long_rate_limit() -> None:
    wrong_key = diagnose(EmbedderConfigError("401 Unauthorized", "set CDC_OPENAI_API_KEY"), Settings())
    assert wrong_key.disposition is Disposition.OPERATOR and "CDC_OPENAI_API_KEY" in wrong_key.fix
    assert not wrong_key.unexpected
    limited = diagnose(Backpressure(30, "429"), Settings())
    assert limited.disposition is Disposition.OUTAGE and not limited.database
