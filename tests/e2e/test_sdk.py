"""The OpenAI fine-tuning flow against a real `tuneforge serve` process, driven by the real `openai` SDK.

Nothing is mocked: a uvicorn server on a free loopback port with its own TUNEFORGE_HOME (SQLite,
uploaded files, runs), its own training worker process, and the tiny in-process model as the base
so the whole flow trains in seconds on a CPU.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import openai
import pytest
from openai import OpenAI

BASE = "tiny-llama"


# --- the server process -----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, home: Path, workers: int = 1, env: dict | None = None):
        self.home, self.workers = home, workers
        home.mkdir(parents=True, exist_ok=True)
        self.env = dict(os.environ, TUNEFORGE_HOME=str(home), TUNEFORGE_WORKER_STALE_SECONDS="10",
                        PYTHONUNBUFFERED="1", **(env or {}))
        self.env.pop("TUNEFORGE_DATABASE_URL", None)
        self.key: str | None = None
        self.proc: subprocess.Popen | None = None
        self.log = home / "server.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> Server:
        self.port = _free_port()
        # Its own session: SIGKILL to the group takes the workers down too (a crashed machine).
        self.proc = subprocess.Popen(
            ["tuneforge", "serve", "--port", str(self.port), "--workers", str(self.workers)],
            env=self.env, stdout=open(self.log, "a"), stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        else:
            raise RuntimeError(f"server did not start:\n{self.log.read_text()[-3000:]}")
        if self.key is None:  # printed once, on the fresh install: the line after the announcement
            lines = self.log.read_text().splitlines()
            at = next(i for i, line in enumerate(lines) if "shown only once" in line)
            self.key = lines[at + 1].strip()
        return self

    def client(self, key: str | None = None) -> OpenAI:
        return OpenAI(base_url=self.url, api_key=key or self.key, max_retries=0, timeout=60)

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()

    def create_key(self, project: str) -> str:
        out = subprocess.run(["tuneforge", "keys", "create", "--project", project], env=self.env,
                             capture_output=True, text=True, check=True)
        return out.stdout.strip()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("serve-home")
    srv = Server(home).start()
    yield srv
    srv.stop()


# --- data and polling -------------------------------------------------------------------------------


def chat_jsonl(n: int, offset: int = 0) -> bytes:
    rows = []
    for i in range(offset, offset + n):
        rows.append({"messages": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": f"What is twice {i}?"},
            {"role": "assistant", "content": f"Twice {i} is {2 * i}."},
        ]})
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def upload(client: OpenAI, n: int, name: str = "train.jsonl"):
    return client.files.create(file=(name, io.BytesIO(chat_jsonl(n))), purpose="fine-tune")


def wait_for(client: OpenAI, job_id: str, statuses: set[str], timeout: float = 120):
    deadline, pause = time.monotonic() + timeout, 0.2
    while time.monotonic() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses:
            return job
        time.sleep(pause)
        pause = min(pause * 1.5, 2.0)  # quick for the tiny model, quiet for long runs
    events = [e.message for e in client.fine_tuning.jobs.list_events(job_id, limit=50)]
    raise AssertionError(f"{job_id} stayed {job.status}; events: {events}")


def wait_event(client: OpenAI, job_id: str, text: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(text in e.message for e in client.fine_tuning.jobs.list_events(job_id, limit=1000)):
            return
        time.sleep(0.5)
    raise AssertionError(f"no event with {text!r} for {job_id}")


# --- the flow ---------------------------------------------------------------------------------------


def test_upload_train_chat_delete(server):
    client = server.client()
    f = upload(client, 12)
    assert f.object == "file" and f.purpose == "fine-tune" and f.status == "processed" and f.bytes > 0
    assert client.files.retrieve(f.id).filename == "train.jsonl"
    assert client.files.content(f.id).content == chat_jsonl(12)
    assert f.id in [x.id for x in client.files.list(purpose="fine-tune")]

    job = client.fine_tuning.jobs.create(
        model=BASE, training_file=f.id, suffix="e2e", seed=7, metadata={"run": "flow"},
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 4}}},
    )
    assert job.object == "fine_tuning.job" and job.status == "validating_files" and job.seed == 7
    assert job.hyperparameters.n_epochs == 2 and job.method.supervised.hyperparameters.batch_size == 4
    assert job.hyperparameters.learning_rate_multiplier == "auto"
    assert [j.id for j in client.fine_tuning.jobs.list(metadata={"run": "flow"})] == [job.id]
    assert list(client.fine_tuning.jobs.list(metadata={"run": "other"})) == []

    done = wait_for(client, job.id, {"succeeded", "failed"})
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model == f"ft:{BASE}:tuneforge:e2e:{job.id[6:14]}"
    assert done.trained_tokens > 0 and done.finished_at >= done.created_at
    assert done.hyperparameters.learning_rate_multiplier == 1.0  # "auto" resolved, mirrored in method
    assert done.method.supervised.hyperparameters.learning_rate_multiplier == 1.0

    events = list(client.fine_tuning.jobs.list_events(job.id, limit=100))
    messages = [e.message for e in events]
    assert messages[0] == "The job has successfully completed"  # newest first
    assert messages[-1].startswith("Created fine-tuning job")
    for phase in ("Validating training file", "Files validated", "Fine-tuning job started",
                  "Checkpoint created at step 3", "New fine-tuned model created"):
        assert any(phase in m for m in messages), phase
    metrics = [e for e in events if e.type == "metrics"]
    assert len(metrics) == 6
    assert {"step", "train_loss", "train_mean_token_accuracy", "total_steps"} <= set(metrics[0].data)
    # the tokens trained so far: what the dashboard shows for a job that is running or was stopped
    assert metrics[0].data["trained_tokens"] == done.trained_tokens  # newest first: the last step's count
    page = client.fine_tuning.jobs.list_events(job.id, limit=3)
    assert len(page.data) == 3 and page.has_more
    assert page.get_next_page().data[0].id == events[3].id  # cursor pagination

    results = client.files.content(done.result_files[0]).text.splitlines()
    assert results[0] == "step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy"
    assert len(results) == 7

    model = done.fine_tuned_model
    assert model in [m.id for m in client.models.list()]
    assert client.models.retrieve(model).owned_by == "tuneforge"

    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "What is twice 3?"}], max_tokens=8, n=2, seed=1,
    )
    assert reply.object == "chat.completion" and len(reply.choices) == 2
    assert reply.choices[0].message.role == "assistant" and reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens > 0 and 0 < reply.usage.completion_tokens <= 16
    again = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "What is twice 3?"}], max_tokens=8, n=2, seed=1,
    )
    assert [c.message.content for c in again.choices] == [c.message.content for c in reply.choices]
    assert reply._request_id.startswith("req_") and again._request_id != reply._request_id

    chunks = list(client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "What is twice 4?"}], max_completion_tokens=6,
        temperature=0, stream=True, stream_options={"include_usage": True},
    ))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens <= 6
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    plain = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "What is twice 4?"}], max_tokens=6, temperature=0,
    )
    assert streamed == plain.choices[0].message.content
    scored = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "What is twice 4?"}], max_tokens=6, temperature=0,
        logprobs=True, top_logprobs=2, logit_bias={"0": -100},
    )
    tokens = scored.choices[0].logprobs.content  # parsed by the SDK into its own types
    assert "".join(t.token for t in tokens) == scored.choices[0].message.content
    assert all(t.logprob <= 0 and len(t.top_logprobs) == 2 for t in tokens)
    streamed_scores = [t for c in client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "What is twice 4?"}], max_tokens=6, temperature=0,
        logprobs=True, top_logprobs=2, logit_bias={"0": -100}, stream=True,
    ) if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [t.token for t in streamed_scores] == [t.token for t in tokens]

    legacy = client.completions.create(model=model, prompt="Twice 5 is", max_tokens=5, temperature=0)
    assert legacy.object == "text_completion" and legacy.usage.completion_tokens <= 5
    base_reply = client.chat.completions.create(
        model=BASE, messages=[{"role": "user", "content": "hi"}], max_tokens=4, stop=["\n"],
    )
    assert base_reply.model == BASE

    ckpts = list(client.fine_tuning.jobs.checkpoints.list(job.id))
    assert [c.step_number for c in ckpts] == [6, 3]  # one per epoch, newest first
    assert ckpts[1].fine_tuned_model_checkpoint == f"{model}:ckpt-step-3"
    assert ckpts[1].metrics.train_loss is not None
    from_ckpt = client.chat.completions.create(
        model=ckpts[1].fine_tuned_model_checkpoint, messages=[{"role": "user", "content": "hi"}], max_tokens=3,
    )
    assert from_ckpt.choices[0].message.content is not None
    assert client.models.retrieve(ckpts[1].fine_tuned_model_checkpoint).id == ckpts[1].fine_tuned_model_checkpoint
    with pytest.raises(openai.PermissionDeniedError):  # it goes with its job's run, not on its own
        client.models.delete(ckpts[1].fine_tuned_model_checkpoint)

    with pytest.raises(openai.BadRequestError) as err:
        client.fine_tuning.jobs.cancel(job.id)
    assert "already succeeded" in err.value.message

    # fine-tuning the fine-tuned model (OpenAI's continued fine-tuning): named and served after the base
    more = client.fine_tuning.jobs.create(model=model, training_file=f.id, suffix="more",
                                          method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1}}})
    assert more.model == model
    more = wait_for(client, more.id, {"succeeded", "failed"})
    assert more.status == "succeeded", more.error
    assert more.fine_tuned_model == f"ft:{BASE}:tuneforge:more:{more.id[6:14]}"
    events = [e.message for e in client.fine_tuning.jobs.list_events(more.id, limit=100)]
    assert any(m.startswith("Continuing from the trained weights of ") for m in events), events
    assert client.chat.completions.create(model=more.fine_tuned_model, messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=3).choices[0].message.content is not None
    with pytest.raises(openai.BadRequestError) as err:  # it trains on as LoRA: "full" was dropped unread
        client.fine_tuning.jobs.create(model=model, training_file=f.id, metadata={"tuneforge.method": "full"})
    assert err.value.body["code"] == "invalid_metadata" and "trained with 'lora'" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:  # another project's model is none of its own
        server.client(server.create_key("carol")).fine_tuning.jobs.create(model=model, training_file=f.id)
    assert err.value.body["code"] == "model_not_available"

    assert client.models.delete(model).deleted is True
    assert model not in [m.id for m in client.models.list()]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
    assert client.files.delete(f.id).deleted is True
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(f.id)


def test_dpo_job_on_preference_pairs(server):
    client = server.client()
    pairs = "".join(json.dumps({
        "input": {"messages": [{"role": "user", "content": f"What is twice {i}?"}]},
        "preferred_output": [{"role": "assistant", "content": f"Twice {i} is {2 * i}."}],
        "non_preferred_output": [{"role": "assistant", "content": "I will not say."}],
    }) + "\n" for i in range(12)).encode()
    f = client.files.create(file=("pairs.jsonl", io.BytesIO(pairs)), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model=BASE, training_file=f.id, suffix="dpo",
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "n_epochs": 1, "batch_size": 4}}},
    )
    assert job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == 0.2
    done = wait_for(client, job.id, {"succeeded", "failed"})
    assert done.status == "succeeded", done.error
    assert done.method.dpo.hyperparameters.learning_rate_multiplier == 1.0 and done.method.dpo.hyperparameters.beta == 0.2
    metrics = [e.data for e in client.fine_tuning.jobs.list_events(job.id, limit=100) if e.type == "metrics"]
    assert metrics and all("train_reward_accuracy" in m for m in metrics)
    answer = client.chat.completions.create(model=done.fine_tuned_model, max_tokens=4,
                                            messages=[{"role": "user", "content": "What is twice 3?"}])
    assert answer.choices[0].message.role == "assistant"
    # a chat file is no DPO data: the job fails in validation, naming the line
    chat = upload(client, 12)
    wrong = client.fine_tuning.jobs.create(model=BASE, training_file=chat.id, method={"type": "dpo"})
    failed = wait_for(client, wrong.id, {"failed", "succeeded"})
    assert failed.status == "failed" and failed.error.code == "invalid_preference_data"
    assert "line 1 is a chat example" in failed.error.message


def test_bad_training_file_fails_the_job(server):
    client = server.client()
    f = upload(client, 3)
    job = client.fine_tuning.jobs.create(model=BASE, training_file=f.id)
    failed = wait_for(client, job.id, {"failed", "succeeded"})
    assert failed.status == "failed"
    assert failed.error.code == "invalid_n_examples" and failed.error.param == "training_file"
    assert "has 3 example(s), but must have at least 10" in failed.error.message
    levels = {e.level for e in client.fine_tuning.jobs.list_events(job.id)}
    assert "error" in levels


def test_cancel_pause_resume(server):
    client = server.client()
    one_by_one = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 1}}}
    # enough steps that neither job can finish between two polls of this test, however fast training is
    a = client.fine_tuning.jobs.create(model=BASE, training_file=upload(client, 400).id, method=one_by_one)
    # (b at 60 examples: its 54 tiny steps could all run between the test seeing step 3 and its pause,
    # and the job succeeded unpaused)
    b = client.fine_tuning.jobs.create(model=BASE, training_file=upload(client, 200).id, method=one_by_one)

    # b is still waiting behind a: pausing and resuming a queued job needs no worker at all.
    assert client.fine_tuning.jobs.pause(b.id).status == "paused"
    wait_event(client, a.id, "Step 2/")
    cancelled = client.fine_tuning.jobs.cancel(a.id)
    assert cancelled.status == "cancelled"
    wait_event(client, a.id, "Training stopped at step")
    assert client.fine_tuning.jobs.retrieve(a.id).fine_tuned_model is None

    assert client.fine_tuning.jobs.resume(b.id).status == "queued"
    wait_event(client, b.id, "Step 3/")
    assert client.fine_tuning.jobs.pause(b.id).status == "paused"
    wait_event(client, b.id, "Checkpoint saved at step")
    metrics = lambda: [e for e in client.fine_tuning.jobs.list_events(b.id, limit=1000) if e.type == "metrics"]  # noqa: E731
    at_pause = len(metrics())
    time.sleep(1.5)
    assert len(metrics()) == at_pause  # a paused job does not train
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.pause(b.id)  # already paused
    client.fine_tuning.jobs.resume(b.id)
    done = wait_for(client, b.id, {"succeeded", "failed"})
    assert done.status == "succeeded", done.error
    assert len(metrics()) == 180  # 200 examples less a 10% validation split: no step lost or repeated
    assert any("Resuming from the checkpoint at step" in e.message
               for e in client.fine_tuning.jobs.list_events(b.id, limit=1000))


def test_errors_map_to_sdk_exceptions(server):
    client = server.client()
    with pytest.raises(openai.NotFoundError) as err:
        client.fine_tuning.jobs.retrieve("ftjob-doesnotexist")
    assert err.value.body["code"] == "fine_tuning_job_not_found"
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve("file-nope")
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("ft:nope")
    assert err.value.body["code"] == "model_not_found"
    with pytest.raises(openai.AuthenticationError) as err:
        server.client("tf-wrong-key-000000").models.list()
    assert err.value.body["code"] == "invalid_api_key"

    f = upload(client, 10)
    with pytest.raises(openai.BadRequestError) as err:
        client.fine_tuning.jobs.create(model=BASE, training_file=f.id, hyperparameters={"n_epochs": 0})
    assert err.value.body["param"] == "hyperparameters.n_epochs"
    with pytest.raises(openai.BadRequestError) as err:
        client.fine_tuning.jobs.create(model="gpt-4o", training_file=f.id)
    assert err.value.body["code"] == "model_not_available"
    with pytest.raises(openai.BadRequestError) as err:
        client.fine_tuning.jobs.create(model=BASE, training_file="file-missing")
    assert err.value.body["param"] == "training_file"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "hi"}], n=0)
    assert err.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "hi"}], max_tokens=10**6)
    assert err.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=BASE, messages="not a list")
    assert err.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as err:  # a parameter the server would otherwise ignore
        client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "hi"}],
                                       response_format={"type": "json_object"})
    assert err.value.body["code"] == "unsupported_parameter" and err.value.body["param"] == "response_format"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "hi"}],
                                       extra_body={"temprature": 0.2})
    assert err.value.body["code"] == "unknown_parameter" and err.value.body["param"] == "temprature"

    # The raw wire shape, for clients other than the SDK.
    r = httpx.get(f"{server.url}/fine_tuning/jobs/ftjob-x", headers={"Authorization": f"Bearer {server.key}"})
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.get(f"{server.url}/models").status_code == 401
    spec = httpx.get(f"{server.url.removesuffix('/v1')}/openapi.json").json()
    assert "/v1/fine_tuning/jobs/{fine_tuning_job_id}/checkpoints" in spec["paths"]


def test_projects_are_isolated(server):
    alice = server.client()
    bob = server.client(server.create_key("bob"))
    f = upload(alice, 10)
    job = alice.fine_tuning.jobs.create(model=BASE, training_file=f.id)
    alice.fine_tuning.jobs.cancel(job.id)
    with pytest.raises(openai.NotFoundError):
        bob.files.retrieve(f.id)
    with pytest.raises(openai.NotFoundError):
        bob.files.content(f.id)
    with pytest.raises(openai.NotFoundError):
        bob.fine_tuning.jobs.retrieve(job.id)
    with pytest.raises(openai.NotFoundError):
        bob.fine_tuning.jobs.list_events(job.id)
    with pytest.raises(openai.BadRequestError):  # another project's file cannot be trained on
        bob.fine_tuning.jobs.create(model=BASE, training_file=f.id)
    assert f.id not in [x.id for x in bob.files.list()]
    assert job.id not in [j.id for j in bob.fine_tuning.jobs.list()]
    assert {m.id for m in bob.models.list()} <= {"tiny-llama", "smollm2-135m-instruct"}


def test_killed_server_resumes_the_job(tmp_path):
    srv = Server(tmp_path / "home").start()
    try:
        client = srv.client()
        f = upload(client, 200)  # 180 training examples, batch 2: 90 steps an epoch
        job = client.fine_tuning.jobs.create(
            model=BASE, training_file=f.id,
            method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 3, "batch_size": 2}}},
        )
        wait_event(client, job.id, "Checkpoint created at step 90")
        wait_event(client, job.id, "Step 91/")
        srv.kill()  # server and worker, SIGKILL: no chance to save anything more

        srv.start()
        client = srv.client()
        done = wait_for(client, job.id, {"succeeded", "failed"}, timeout=180)
        assert done.status == "succeeded", done.error
        messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=500)]
        resumed = [m for m in messages if "resuming from the checkpoint at step" in m]
        assert resumed and resumed[0].endswith(("step 90", "step 180")), messages[:10]
        assert [c.step_number for c in client.fine_tuning.jobs.checkpoints.list(job.id)] == [270, 180, 90]
        reply = client.chat.completions.create(
            model=done.fine_tuned_model, messages=[{"role": "user", "content": "hi"}], max_tokens=3,
        )
        assert reply.usage.completion_tokens <= 3
    finally:
        srv.stop()


EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SHAKESPEAREAN = ("thou", "thee", "thy", "doth", "hath", "'tis", "verily", "forsooth", "prithee", "ere", "nay")


@pytest.mark.slow
def test_embedded_model_fine_tune_over_the_api(tmp_path, shared_models_dir):
    home = tmp_path / "home"
    home.mkdir()
    (home / "models").symlink_to(shared_models_dir, target_is_directory=True)  # GGUF conversion cache
    srv = Server(home).start()
    try:
        client = srv.client()
        train = client.files.create(file=open(EXAMPLES / "shakespeare_ml.jsonl", "rb"), purpose="fine-tune")
        valid = client.files.create(file=open(EXAMPLES / "shakespeare_ml_heldout.jsonl", "rb"), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(
            model="smollm2-135m-instruct", training_file=train.id, validation_file=valid.id, suffix="bard",
            method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2}}},
        )
        done = wait_for(client, job.id, {"succeeded", "failed"}, timeout=1800)
        assert done.status == "succeeded", done.error
        ckpts = list(client.fine_tuning.jobs.checkpoints.list(job.id))  # newest first
        assert len(ckpts) == 2 and ckpts[0].metrics.valid_loss < ckpts[1].metrics.valid_loss + 0.5
        # the held-out loss falls well below the base model's (the job's events say the base's)
        said = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=1000)]
        base_loss = next(float(m.split()[-1]) for m in said if m.startswith("Base model validation loss"))
        assert ckpts[0].metrics.valid_loss < base_loss - 0.3, (base_loss, ckpts[0].metrics)
        # a checkpoint's validation pass is of the whole validation set: OpenAI's full_valid_* metrics
        assert ckpts[0].metrics.full_valid_loss == ckpts[0].metrics.valid_loss
        assert ckpts[0].metrics.full_valid_mean_token_accuracy == ckpts[0].metrics.valid_mean_token_accuracy
        reply_system = "You are a tutor who explains machine learning in the style of William Shakespeare."
        reply = client.chat.completions.create(
            model=done.fine_tuned_model, temperature=0, max_tokens=80,
            messages=[{"role": "system", "content": reply_system},
                      {"role": "user", "content": "What is the curse of dimensionality?"}],
        )
        answer = reply.choices[0].message.content.lower()
        assert any(w in answer.replace(",", " ").split() for w in SHAKESPEAREAN), answer

        # the Responses API answers the same model the same way: instructions are the system message
        ask = dict(model=done.fine_tuned_model, temperature=0, max_output_tokens=120,
                   instructions=reply_system, input="What is the curse of dimensionality?")
        response = client.responses.create(**ask)
        # an answer that ends before max_output_tokens is "completed"; one that runs on is cut there and
        # said to be
        ended = response.usage.output_tokens < 120
        assert response.status == ("completed" if ended else "incomplete"), response.incomplete_details
        assert ended or response.incomplete_details.reason == "max_output_tokens"
        assert response.output_text.lower().startswith(answer)  # greedy both times; chat stopped at 80 tokens
        with client.responses.stream(**ask) as stream:
            events = list(stream)
        streamed = events[-1].response  # response.completed, or response.incomplete when cut
        assert events[-1].type == f"response.{response.status}"
        assert streamed.output_text == response.output_text and streamed.usage == response.usage
    finally:
        srv.stop()


def test_a_command_line_run_is_served_after_import(tmp_path):
    """`tuneforge train` then `tuneforge import`: the run answers through the API like any ft: model."""
    from tests.conftest import write_chat
    from tuneforge.jobs.imports import import_run
    from tuneforge.models.generate import Sampling, complete
    from tuneforge.models.load import load_tuned
    from tuneforge.train.config import TrainConfig
    from tuneforge.train.loop import train

    home = tmp_path / "home"
    home.mkdir()
    run = tmp_path / "run"
    train(TrainConfig(data=str(write_chat(tmp_path / "t.jsonl", 12)), out=str(run), base=BASE, n_epochs=1))
    srv = Server(home).start()
    try:
        url = f"sqlite:///{home / 'tuneforge.db'}"
        name = import_run(run, project="default", suffix="cli", database_url=url)
        assert name.startswith(f"ft:{BASE}:tuneforge:cli:")
        client = srv.client()
        assert name in [m.id for m in client.models.list()]
        question = [{"role": "user", "content": "What is twice 3?"}]
        reply = client.chat.completions.create(model=name, messages=question, max_tokens=8, temperature=0)
        model, tok = load_tuned(run)
        assert reply.choices[0].message.content == complete(model, tok, question, Sampling(max_tokens=8)).text
        with pytest.raises(FileNotFoundError, match="not a finished tuneforge run"):
            import_run(tmp_path, database_url=url)
    finally:
        srv.stop()
