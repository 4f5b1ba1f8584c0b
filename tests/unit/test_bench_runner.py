import math

import pytest

from consumer.bench.runner import model_share


def test_model_share_splits_the_bulk_time_into_model_and_the_rest() -> None:
    before = {("cdc_embedder_model_seconds_sum", ()): 5.0, ("cdc_embedder_db_seconds_sum", ()): 1.0}
    after = {("cdc_embedder_model_seconds_sum", ()): 50.0, ("cdc_embedder_db_seconds_sum", ()): 3.0}
    bulk = {"embedded": 1800.0, "seconds": 50.0, "raw_beside_texts_per_s": 50.0}
    share = model_share(before, after, bulk)
    assert share["consumer_model_s"] == pytest.approx(45.0)
    assert share["consumer_db_s"] == pytest.approx(2.0)
    assert share["model_busy_fraction"] == pytest.approx(0.9)
    assert share["consumer_model_texts_per_s"] == pytest.approx(40.0)
    assert share["consumer_model_to_raw"] == pytest.approx(0.8)


def test_model_share_without_model_time_is_not_a_number() -> None:
    share = model_share({}, {}, {"embedded": 0.0, "seconds": 10.0, "raw_beside_texts_per_s": 50.0})
    assert share["model_busy_fraction"] == 0.0
    assert math.isnan(share["consumer_model_to_raw"])
