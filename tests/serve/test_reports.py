"""tuneforge's own endpoints for the dashboard (in-process): file report, base models, model sizes, the UI."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from tuneforge.serve.app import create_app
from tuneforge.settings import get_settings
from tuneforge.store.database import JobRow, ModelRow, new_id, session
from tuneforge.store.keys import create_key
from tuneforge.ui.harness import BAD_FILE_ERRORS, write_bad_file, write_good_file


@pytest.fixture
def client():
    get_settings.cache_clear()
    key = create_key("proj")
    with TestClient(create_app(get_settings()), raise_server_exceptions=False) as c:
        c.headers["Authorization"] = f"Bearer {key}"
        yield c


def upload(c, path):
    return c.post("/v1/files", files={"file": (path.name, path.read_bytes())}, data={"purpose": "fine-tune"}).json()


def test_file_report_lists_errors_by_line_and_the_training_plan(client, tmp_path):
    bad = upload(client, write_bad_file(tmp_path / "bad.jsonl"))
    r = client.get(f"/v1/files/{bad['id']}/report", params={"model": "tiny-llama"})
    assert r.status_code == 200
    rep = r.json()
    assert rep["ok"] is False and rep["file_id"] == bad["id"] and rep["path"] == "bad.jsonl"
    assert {e["line"]: e["code"] for e in rep["errors"]} == BAD_FILE_ERRORS

    good = upload(client, write_good_file(tmp_path / "good.jsonl"))
    rep = client.get(f"/v1/files/{good['id']}/report", params={"model": "tiny-llama", "max_length": 512}).json()
    assert rep["ok"] is True and rep["n_examples"] == 24 and rep["max_length"] == 512
    assert rep["n_epochs"] >= 1 and rep["stats"]["tokens_per_example"]["max"] > 0
    assert rep["costs"] and all(c["usd"] > 0 for c in rep["costs"])
    assert rep["estimated_local_seconds"] > 0 and rep["tokens_per_second"] > 0


def test_file_report_names_the_file_as_uploaded(client, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    rep = client.get(f"/v1/files/{upload(client, empty)['id']}/report", params={"model": "tiny-llama"}).json()
    (error,) = rep["errors"]
    assert error["code"] == "empty_file" and error["message"].startswith("empty.jsonl") and "file-" not in error["message"]
    csv = tmp_path / "faq.csv"
    csv.write_text("q,a\nx,y\n")
    rep = client.get(f"/v1/files/{upload(client, csv)['id']}/report", params={"model": "tiny-llama"}).json()
    (error,) = rep["errors"]  # the command to convert it names the user's file and a JSONL named after it
    assert "tuneforge data convert faq.csv -o faq.jsonl" in error["message"] and "file-" not in error["message"]


def test_a_validation_file_may_be_small(client, tmp_path):
    from tests.conftest import write_chat

    small = upload(client, write_chat(tmp_path / "valid.jsonl", 3))
    as_training = client.get(f"/v1/files/{small['id']}/report", params={"model": "tiny-llama"}).json()
    assert not as_training["ok"] and as_training["errors"][0]["code"] == "invalid_n_examples"
    as_validation = client.get(f"/v1/files/{small['id']}/report", params={"model": "tiny-llama", "validation": True}).json()
    assert as_validation["ok"] and as_validation["n_examples"] == 3


def test_file_report_errors(client, tmp_path):
    good = upload(client, write_good_file(tmp_path / "good.jsonl"))
    r = client.get(f"/v1/files/{good['id']}/report", params={"model": "gpt-5"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    r = client.get("/v1/files/file-nope/report")
    assert r.status_code == 404 and r.json()["error"]["param"] == "file_id"
    r = client.get(f"/v1/files/{good['id']}/report", headers={"Authorization": "Bearer tf-wrong-wrong-wrong"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_base_models_and_tuned_models_with_size(client, tmp_path):
    bases = {m["id"]: m for m in client.get("/v1/tuneforge/base_models").json()["data"]}
    assert "random weights" in bases["tiny-llama"]["description"]  # a user sees what the test model is
    weights = tmp_path / "adapter"
    weights.mkdir()
    (weights / "adapter_model.safetensors").write_bytes(b"x" * 1234)
    with session() as s, s.begin():
        job = JobRow(id=new_id("ftjob-"), project="proj", model="tiny-llama", training_file="file-x",
                     status="succeeded", hyperparameters={}, seed=1)
        s.add(job)
        s.flush()
        s.add(ModelRow(id="ft:tiny-llama:tuneforge::abc", project="proj", base="tiny-llama", job_id=job.id,
                       path=str(weights), owned_by="tuneforge"))
    data = client.get("/v1/tuneforge/models").json()["data"]
    assert data == [{"id": "ft:tiny-llama:tuneforge::abc", "object": "model", "created": data[0]["created"],
                     "owned_by": "tuneforge", "base": "tiny-llama", "job_id": job.id, "size_bytes": 1234,
                     "checkpoints": []}]


def test_dashboard_is_served_without_shadowing_the_api(client):
    r = client.get("/", headers={"Authorization": ""})
    assert r.status_code == 200 and "text/html" in r.headers["content-type"] and "ui/app.js" in r.text
    for asset in ("app.js", "style.css", "favicon.svg"):
        assert client.get(f"/ui/{asset}").status_code == 200
    r = client.get("/v1/no/such/route")
    assert r.status_code == 404 and "error" in r.json()


def test_usage_and_stored_completions_back_into_a_training_file(client):
    from tests.conftest import tiny_ends_by_itself

    ask = {"model": "tiny-llama", "max_tokens": 3} | tiny_ends_by_itself()
    for i, rating in enumerate(("good", "bad", "good")):
        r = client.post("/v1/chat/completions", json=ask | {
            "messages": [{"role": "user", "content": f"question {i}"}], "store": True, "metadata": {"rating": rating}})
        assert r.status_code == 200, r.text
    client.post("/v1/chat/completions", json=ask | {"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]})

    rows = {r["model"]: r for r in client.get("/v1/tuneforge/usage", params={"days": 1}).json()["data"]}
    assert rows["tiny-llama"]["requests"] == 3 and rows["tiny-llama"]["completion_tokens"] > 0
    assert rows["no-such-model"]["errors"] == 1 and rows["tiny-llama"]["mean_latency_ms"] > 0

    made = client.post("/v1/tuneforge/stored_completions/training_file", params={"metadata[rating]": "good"}).json()
    assert made["object"] == "file" and made["purpose"] == "fine-tune" and made["filename"] == "stored-completions.jsonl"
    lines = client.get(f"/v1/files/{made['id']}/content").text.splitlines()
    assert [json.loads(x)["messages"][0]["content"] for x in lines] == ["question 0", "question 2"]
    assert client.get(f"/v1/files/{made['id']}/report", params={"model": "tiny-llama"}).json()["format"] == "chat"
    none = client.post("/v1/tuneforge/stored_completions/training_file", params={"metadata[rating]": "meh"})
    assert none.status_code == 400 and none.json()["error"]["code"] == "no_stored_completions"

    # an answer cut at max_tokens is listed as a match but is no training data: said so, not "no match"
    client.post("/v1/chat/completions", json={"model": "tiny-llama", "max_tokens": 2, "store": True,
                                              "metadata": {"rating": "cut"},
                                              "messages": [{"role": "user", "content": "question 3"}]})
    cut = client.post("/v1/tuneforge/stored_completions/training_file", params={"metadata[rating]": "cut"})
    said = cut.json()["error"]["message"]
    assert cut.status_code == 400 and "1 stored chat completion(s) match, but none ended by itself" in said

    # the quality signals of what was kept, beside the traffic: ratings as written, answers cut short
    quality = client.get("/v1/tuneforge/usage", params={"days": 1}).json()["quality"]
    assert quality == [{"model": "tiny-llama", "kept": 4, "ratings": {"good": 2, "bad": 1, "cut": 1},
                        "cut_at_max_tokens": 1}]


def keep_response(project: str, metadata: dict, *, status: str = "completed", answer: str = "Four.",
                  instructions: str | None = "Answer briefly.") -> None:
    """A kept response as serve.responses stores one (one that ended its answer by itself, which the
    random tiny model cannot be relied on to do)."""
    from tuneforge.store.database import ResponseRow

    response = {"id": new_id("resp_"), "status": status, "instructions": instructions, "metadata": metadata,
                "output": [{"content": [{"type": "output_text", "text": answer, "annotations": []}]}]}
    said = [("developer", "Be exact."), ("user", "And 2+2?")]
    with session() as s:
        s.add(ResponseRow(id=response["id"], project=project, model="tiny-llama", response=response,
                          context=[{"role": "user", "content": "What is 1+1?"}, {"role": "assistant", "content": "Two."}],
                          input=[{"id": new_id("msg_"), "role": role, "content": [{"type": "input_text", "text": text}]}
                                 for role, text in said]))
        s.commit()


def test_kept_responses_back_into_a_training_file(client):
    served = client.post("/v1/responses", json={"model": "tiny-llama", "input": "hi", "max_output_tokens": 16,
                                                "metadata": {"batch": "r"}})
    assert served.status_code == 200 and served.json()["status"] == "incomplete"  # cut: never training data
    keep_response("proj", {"batch": "r"})
    keep_response("proj", {"batch": "r"}, status="incomplete")
    keep_response("proj", {"batch": "other"}, answer="Five.")
    keep_response("elsewhere", {"batch": "r"}, answer="Six.")
    made = client.post("/v1/tuneforge/responses/training_file", params={"metadata[batch]": "r"}).json()
    assert made["purpose"] == "fine-tune" and made["filename"] == "kept-responses.jsonl"
    rows = [json.loads(x) for x in client.get(f"/v1/files/{made['id']}/content").text.splitlines()]
    assert rows == [{"messages": [
        {"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 1+1?"},
        {"role": "assistant", "content": "Two."}, {"role": "system", "content": "Be exact."},
        {"role": "user", "content": "And 2+2?"}, {"role": "assistant", "content": "Four."}]}]
    none = client.post("/v1/tuneforge/responses/training_file", params={"metadata[batch]": "nothing"})
    assert none.status_code == 400 and none.json()["error"]["code"] == "no_kept_responses"
