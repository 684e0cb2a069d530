"""One real fine-tune of the embedded SmolLM2-135M-Instruct on the bundled Shakespeare data."""

from __future__ import annotations

import pytest

from tests.conftest import EXAMPLES
from tuneforge.models.generate import Sampling, complete
from tuneforge.models.load import load_tuned
from tuneforge.train.config import TrainConfig
from tuneforge.train.loop import train

SYSTEM = "You are a tutor who explains machine learning in the style of William Shakespeare."
SHAKESPEAREAN = ("thou", "thee", "thy", "doth", "hath", "'tis", "verily", "forsooth", "prithee", "ere", "nay")


@pytest.mark.slow
def test_embedded_model_learns_the_style_and_validation_loss_falls(tmp_path):
    result = train(TrainConfig(
        data=str(EXAMPLES / "shakespeare_ml.jsonl"),
        validation_data=str(EXAMPLES / "shakespeare_ml_heldout.jsonl"),
        out=str(tmp_path / "run"), base="smollm2-135m-instruct", method="lora", n_epochs=2,
    ))
    assert result.final["valid_loss"] < result.baseline["loss"] - 0.3
    model, tok = load_tuned(tmp_path / "run")
    answer = complete(model, tok, [{"role": "system", "content": SYSTEM},
                                   {"role": "user", "content": "What is the curse of dimensionality?"}],
                      Sampling(max_tokens=80)).text.lower()
    assert any(w in answer.replace(",", " ").split() for w in SHAKESPEAREAN), answer
