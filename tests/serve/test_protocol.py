"""Request shapes (serve.protocol): what a body may hold, said as OpenAI says it."""

from __future__ import annotations

import pytest

from tests.serve.conftest import upload


@pytest.mark.parametrize("field,value", [
    ("n_epochs", True), ("n_epochs", "3"), ("batch_size", False), ("learning_rate_multiplier", "0.5"),
])
def test_hyperparameters_are_numbers_not_booleans_or_strings(client, field, value):
    file_id = upload(client).json()["id"]
    r = client.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": file_id,
                                                 "hyperparameters": {field: value}})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == f"hyperparameters.{field}"
    ok = client.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": file_id,
                                                  "hyperparameters": {"n_epochs": 2, "learning_rate_multiplier": 1}})
    assert ok.status_code == 200, ok.text
