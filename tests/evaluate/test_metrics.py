"""The reported numbers themselves: perplexity is exp(loss), however large."""

import math

from tuneforge.evaluate.metrics import summarise


def test_perplexity_is_exp_of_the_loss_uncapped_and_inf_past_the_float_range():
    assert math.isclose(summarise(2 * 60.0, 2, 1)["perplexity"], math.exp(60.0))  # (was capped at exp(50))
    assert summarise(1000.0, 1, 0)["perplexity"] == math.inf  # exp(1000) overflows a float
    assert math.isnan(summarise(math.nan, 3, 0)["perplexity"])
