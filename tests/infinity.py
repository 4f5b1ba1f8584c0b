"""The tests' use of the OpenAI-compatible server (consumer/stack/infinity.py): the stand-in model, small
requests, and the dead letters a test's own consumer made."""

from __future__ import annotations

from consumer.consumer_process import ConsumerProcess
from consumer.stack import infinity
from consumer.stack.infinity import API_KEY, InfinityServer

__all__ = ["API_KEY", "DIMENSION", "InfinityServer", "openai_env", "own_dead_letters"]
DIMENSION = 384  # the stand-in's


def openai_env(env: dict[str, str], base_url: str, key: str, name: str) -> dict[str, str]:
    """The stack's consumer settings with the openai backend serving the stand-in, 16 inputs a request
    (so that one batch makes several requests in flight)."""
    return {
        **infinity.openai_env(env, base_url, key, name, env["CDC_MODEL"], DIMENSION),
        "CDC_OPENAI_MAX_INPUTS_PER_REQUEST": "16",
    }


def own_dead_letters(consumer: ConsumerProcess) -> float:
    """Dead letters of the consumer's own making: not the records of invalid JSON that other tests put
    on the shared source topic (tests/harness.py `exercise`), which every new group reads again."""
    total = consumer.metric_sum("cdc_embedder_dead_letters_total")
    return total - consumer.metric_sum("cdc_embedder_dead_letters_total", error_class="invalid_json")
