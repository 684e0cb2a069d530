"""The dashboard end to end: headless Chromium (Debian's) against a real `tuneforge serve` subprocess.

One server for the module (its own TUNEFORGE_HOME and key); each test opens a fresh browser context.
The flow is the issue's: wrong then right API key; upload a good and a bad file and read the report;
create a job on tiny-llama from the form, watch it reach `succeeded` with a loss curve drawn; chat
with the tuned model (and compare it with its base); see it on the Models page; cancel a job.
"""

from __future__ import annotations

import json
import re
import urllib.request

import pytest

from tests.conftest import PARIS_AND_OSLO, tiny_model_calling_two_tools
from tuneforge.ui.harness import BAD_FILE_ERRORS, LiveServer, chromium_path, write_bad_file, write_good_file

pytestmark = pytest.mark.slow

if chromium_path() is None:
    pytest.skip("headless browser tests need Debian's chromium: apt-get install -y chromium", allow_module_level=True)

sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the dev extra)")

JOB_TIMEOUT_MS = 240_000


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = LiveServer(tmp_path_factory.mktemp("ui-home"))
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("ui-data")
    return {"good": write_good_file(d / "good.jsonl"), "bad": write_bad_file(d / "bad.jsonl")}


@pytest.fixture(scope="module")
def browser():
    from tuneforge.ui.harness import launch_chromium

    with sync_api.sync_playwright() as p:
        b = launch_chromium(p)
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    """A page already holding the right key (as after the first visit)."""
    ctx = browser.new_context(viewport={"width": 1280, "height": 800})
    ctx.add_init_script(f"localStorage.setItem('tuneforge.apiKey', {json.dumps(server.key)})")
    pg = ctx.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.on("dialog", lambda d: d.accept())  # confirm() for cancel/delete
    pg.set_default_timeout(30_000)
    yield pg
    ctx.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def expect(locator):
    return sync_api.expect(locator)


def test_api_key_asked_once_wrong_key_is_reported(browser, server):
    ctx = browser.new_context(viewport={"width": 1280, "height": 800})
    pg = ctx.new_page()
    pg.goto(server.url + "/")
    dialog = pg.locator("#key-dialog")
    expect(dialog).to_be_visible()
    pg.fill("#key-input", "tf-this-is-not-a-key-0000")
    pg.click("#key-save")
    expect(pg.locator("#key-error")).to_contain_text("Wrong API key")
    expect(dialog).to_be_visible()
    pg.fill("#key-input", "   ")  # nothing pasted: said, and the wrong key's message does not stay up
    pg.click("#key-save")
    expect(pg.locator("#key-error")).to_contain_text("Paste an API key")

    pg.fill("#key-input", server.key)
    pg.click("#key-save")
    expect(dialog).to_be_hidden()
    expect(pg.locator("h1")).to_have_text("Fine-tuning jobs")
    # kept in the browser: a reload asks nothing
    pg.reload()
    expect(pg.locator("h1")).to_have_text("Fine-tuning jobs")
    expect(dialog).to_be_hidden()

    # a key revoked (or replaced) later: the UI says so instead of showing empty pages
    pg.evaluate("localStorage.setItem('tuneforge.apiKey', 'tf-revoked-key-123456789')")
    pg.reload()
    expect(pg.locator("#banner")).to_contain_text("rejected your API key")
    expect(pg.locator("#key-label")).to_have_text("Key rejected")
    ctx.close()


def test_upload_shows_report_for_good_and_bad_files(page, server, data):
    page.goto(server.url + "/#/upload")
    page.select_option("#report-model", "tiny-llama")
    page.set_input_files("#upload-input", str(data["bad"]))
    verdict = page.locator("[data-test=report-verdict]")
    expect(verdict).to_contain_text("3 errors", timeout=60_000)
    rows = page.locator("[data-test=errors-table] tbody tr")
    expect(rows).to_have_count(len(BAD_FILE_ERRORS))
    for line, code in BAD_FILE_ERRORS.items():
        row = page.locator(f"[data-test=errors-table] tr[data-line='{line}']")
        expect(row).to_have_attribute("data-code", code)
        expect(row).to_contain_text(code)
    expect(page.locator("[data-test=train-this]")).to_have_count(0)
    # a file with errors: its count is of lines, its tokens only of what could be read - said so
    expect(page.locator("[data-test=report-stats]")).to_contain_text("lines, those with errors included")

    page.set_input_files("#upload-input", str(data["good"]))
    expect(verdict).to_contain_text("Valid: 24 examples", timeout=60_000)
    expect(page.locator("[data-test=errors-table]")).to_have_count(0)
    stats = page.locator("[data-test=report-stats]")
    expect(stats).to_contain_text("Epochs")
    expect(stats).to_contain_text("Local time")
    expect(stats).not_to_contain_text("errors included")
    expect(stats).not_to_contain_text("as DPO")  # chat examples, not preference pairs
    expect(page.locator("[data-test=costs] tbody tr").first).to_contain_text("$")
    expect(page.locator("[data-test=token-stats]")).to_contain_text("Tokens")
    expect(page.locator("[data-test=train-this]")).to_be_visible()
    # both uploads are listed
    expect(page.locator("tr[data-file]")).to_have_count(2)


def test_create_job_watch_it_succeed_then_chat(page, server, data):
    good = server.upload(data["good"])
    page.goto(server.url + "/#/jobs")
    page.click("[data-test=create-job]")
    page.select_option("#f-model", "tiny-llama")
    expect(page.locator("[data-test=model-description]")).to_contain_text("random weights")  # said where it is chosen
    page.select_option("#f-training_file", good["id"])
    page.fill("input[name=suffix]", "e2e")
    page.fill("input[name=n_epochs]", "2")
    page.click("#create-submit")

    page.wait_for_url(re.compile(r".*#/jobs/ftjob-.*"))
    root = page.locator(".page[data-page=jobs]")
    # live: the status changes and the curve grows without a reload
    expect(page.locator("[data-test=loss-chart] .chart")).to_have_attribute("data-points", re.compile(r"^[1-9]\d*$"),
                                                                            timeout=JOB_TIMEOUT_MS)
    expect(root).to_have_attribute("data-status", "succeeded", timeout=JOB_TIMEOUT_MS)
    expect(page.locator(".badge[data-status=succeeded]")).to_be_visible()
    points = int(page.locator("[data-test=loss-chart] .chart").get_attribute("data-points"))
    assert points >= 2, "the loss curve should have several points"
    expect(page.locator("[data-test=loss-chart] path[data-series=train]")).to_have_count(1)
    expect(page.locator("[data-test=accuracy-chart] path[data-series=train]")).to_have_count(1)
    expect(page.locator("[data-test=checkpoints] tbody tr").first).to_be_visible()
    name = page.locator("[data-test=fine-tuned-model]").inner_text()
    assert name.startswith("ft:tiny-llama:") and ":e2e:" in name
    expect(page.locator("[data-test=snippet]")).to_contain_text(f'model="{name}"')
    expect(page.locator("[data-test=events]")).to_contain_text("successfully completed")
    expect(page.locator("[data-action=cancel]")).to_have_count(0)

    # playground: stream an answer from the tuned model
    page.click("text=Open in playground")
    expect(page.locator("#pg-model")).to_have_value(name)
    page.fill("#pg-max-tokens", "12")
    page.fill("#pg-prompt", "What is twice 3?")
    page.click("#pg-send")
    answer = page.locator(f".msg.assistant[data-model='{name}']")
    expect(answer).to_have_attribute("data-done", "true", timeout=60_000)
    expect(answer.locator(".meta")).to_contain_text("tokens")

    # compare mode: the same prompt to the base model and the tuned one, side by side
    page.check("#pg-compare")
    expect(page.locator("#pg-compare-model")).to_have_value("tiny-llama")
    page.fill("#pg-prompt", "What is twice 5?")
    page.click("#pg-send")
    expect(page.locator(".chats.compare .chat")).to_have_count(2)
    for model in ("tiny-llama", name):
        expect(page.locator(f".msg.assistant[data-model='{model}'][data-done=true]").last).to_be_visible(timeout=60_000)

    # models page: the model with its job, base and size on disk
    page.goto(server.url + "/#/models")
    row = page.locator(f"tr[data-model='{name}']")
    expect(row).to_contain_text("tiny-llama")
    expect(row).to_contain_text(re.compile(r"\d+(\.\d+)? (B|KB|MB|GB)"))
    expect(row.locator("a[href^='#/jobs/ftjob-']")).to_be_visible()

    # "Train more": a job on the fine-tuned model, its file's tokens counted with the model's base
    row.locator("[data-action=train-more]").click()
    expect(page.locator("#f-model")).to_have_value(name)
    expect(page.locator("[data-test=model-description]")).to_contain_text("Starts from this model's weights")
    page.select_option("#f-training_file", good["id"])
    expect(page.locator("#create-form")).to_contain_text("Ready to train")
    page.goto(server.url + "/#/models")

    # deleted, the model is no longer offered on its job's page (its checkpoints still are)
    job_link = row.locator("a[href^='#/jobs/ftjob-']").get_attribute("href")
    row.locator("[data-action=delete]").click()
    expect(row).to_have_count(0)
    page.goto(server.url + "/" + job_link)
    expect(page.locator("[data-test=model-deleted]")).to_contain_text(name)
    expect(page.locator("text=Open in playground")).to_have_count(0)
    expect(page.locator("[data-test=checkpoints] tbody tr").first).to_be_visible()


def test_create_a_dpo_job_on_preference_pairs_on_a_four_bit_base(page, server, pairs_file, data):
    pairs, chats = server.upload(pairs_file), server.upload(data["good"])
    page.goto(server.url + f"/#/upload/{pairs['id']}")
    expect(page.locator("[data-test=report-stats]")).to_contain_text("Local time as DPO", timeout=60_000)
    page.goto(server.url + "/#/jobs")
    page.click("[data-test=create-job]")
    page.select_option("#f-model", "tiny-llama")
    # the chosen file's report shows under it: a chat file is flagged for DPO before any job is made
    page.select_option("#f-training_file", chats["id"])
    expect(page.locator("#create-form")).to_contain_text("Ready to train")
    expect(page.locator("#create-form")).to_contain_text("epochs with Epochs on auto")
    page.fill("input[name=n_epochs]", "2")  # the summary follows the Epochs typed
    expect(page.locator("#create-form")).to_contain_text("Ready to train: 24 examples2 epochs · about")
    page.fill("input[name=n_epochs]", "auto")
    page.select_option("#f-validation_file", chats["id"])  # a validation file's summary: no epochs or time
    expect(page.locator("#create-form")).to_contain_text("Ready to validate on")
    page.select_option("#f-validation_file", "")
    # the server's suffix and seed rules, said together before any request
    page.fill("input[name=suffix]", "my bot!/x")
    page.fill("input[name=seed]", "-5")
    page.click("#create-submit")
    expect(page.locator("#create-form")).to_contain_text("Suffix must be 1 to 64 letters")
    expect(page.locator("#create-form")).to_contain_text("Seed must be a whole number")
    page.fill("input[name=suffix]", "")
    page.fill("input[name=seed]", "")
    page.click(".seg label:has(input[value=dpo])")  # the radio itself is hidden under its label
    expect(page.locator("[data-test=dpo-mismatch]")).to_contain_text("this file holds chat examples")
    page.select_option("#f-training_file", pairs["id"])
    expect(page.locator("#create-form")).to_contain_text("Ready to train")
    expect(page.locator("[data-test=dpo-mismatch]")).to_have_count(0)
    page.check("input[name=quantize]")  # on a 4-bit base (QLoRA)
    page.fill("input[name=n_epochs]", "1")
    page.click("#create-submit")

    page.wait_for_url(re.compile(r".*#/jobs/ftjob-.*"))
    expect(page.locator(".page[data-page=jobs]")).to_have_attribute("data-status", "succeeded", timeout=JOB_TIMEOUT_MS)
    expect(page.locator("[data-test=method]")).to_have_text("DPO · lora (nf4)")
    expect(page.locator("[data-test=accuracy-chart] h2")).to_have_text("Preferred answer ranked first")
    expect(page.locator("[data-test=accuracy-chart] path[data-series=train]")).to_have_count(1)
    job = server.api("GET", f"/v1/fine_tuning/jobs/{page.url.rsplit('/', 1)[-1]}")
    assert job["method"]["type"] == "dpo" and job["method"]["dpo"]["hyperparameters"]["n_epochs"] == 1
    assert job["metadata"]["tuneforge.quantize"] == "nf4"


def test_monitor_shows_traffic_and_makes_a_training_file_from_stored_completions(page, server):
    from tests.conftest import tiny_ends_by_itself

    tokens = 0
    for i, rating in enumerate(("good", "bad", "good")):
        done = server.api("POST", "/v1/chat/completions", {
            "model": "tiny-llama", "max_tokens": 3, "store": True, "metadata": {"rating": rating, "run": "monitor"},
            "messages": [{"role": "user", "content": f"monitor question {i}"}], **tiny_ends_by_itself()})
        tokens += done["usage"]["total_tokens"]
    page.goto(server.url + "/#/monitor")
    expect(page.locator("[data-test=usage-table] tr[data-model='tiny-llama']")).to_be_visible()
    expect(page.locator("[data-test=usage-table] tr[data-model='tiny-llama']")).to_contain_text("p95")
    quality = page.locator("[data-test=usage-table] tr[data-model='tiny-llama'] [data-test=quality]")
    expect(quality).to_contain_text(re.compile(r"\d+ kept"))  # the kept answers' quality signals
    expect(quality).to_contain_text(re.compile(r"\b[2-9]\d* good\b.*\b[1-9]\d* bad\b|\b[1-9]\d* bad\b.*\b[2-9]\d* good\b"))
    chart = page.locator("[data-test=usage-chart]")
    expect(chart).to_have_attribute("data-bars", re.compile(r"^2[45]$"))  # the hours of the last day
    assert int(chart.locator("g[data-tokens]").last.get_attribute("data-tokens")) >= tokens  # this hour's bar
    expect(page.locator("[data-test=openai-cost]")).to_contain_text("gpt-4o-mini $")
    page.select_option("#usage-days", "7")
    expect(chart).to_have_attribute("data-bars", re.compile(r"^[78]$"))  # days now
    # a rater sees each answer's question, and rates on the Monitor: the second answer becomes good
    page.fill("#stored-metadata", "run=monitor")
    page.click("#stored-filter")
    rows = page.locator("[data-test=stored-table] tbody tr")
    expect(rows).to_have_count(3)
    second = rows.filter(has_text="monitor question 1")
    expect(second.locator("[data-test=stored-question]")).to_have_text("monitor question 1")
    second.locator("[data-rate=good]").click()
    expect(second.locator(".rating")).to_have_attribute("data-rating", "good")
    expect(second.locator("[data-test=stored-metadata]")).to_have_text("rating=good, run=monitor")  # run kept
    page.fill("#stored-metadata", "run=monitor, rating=good")
    page.click("#stored-filter")
    expect(page.locator("[data-test=stored-table] tbody tr")).to_have_count(3)
    expect(page.locator("[data-test=stored-table] .rating [data-rate=good].active")).to_have_count(3)
    page.click("#stored-make-file")
    page.click("[data-test=train-on-it]")
    page.wait_for_url(re.compile(r".*#/jobs/new\?file=file-.*"))
    file_id = page.url.rsplit("=", 1)[-1]
    expect(page.locator("#f-training_file")).to_have_value(file_id)
    content = urllib.request.urlopen(urllib.request.Request(
        f"{server.url}/v1/files/{file_id}/content", headers={"Authorization": f"Bearer {server.key}"})).read().decode()
    assert [json.loads(x)["messages"][0]["content"] for x in content.splitlines()] == [
        "monitor question 0", "monitor question 1", "monitor question 2"]


def test_monitor_list_answered_late_does_not_replace_the_filtered_one(page, server):
    """The page's first, unfiltered list answered after a filter's list replaced it: the table showed
    every stored completion where the filter asked for one (and 'Make a training file' listed them)."""
    from tests.conftest import tiny_ends_by_itself

    for run in ("race", "other"):
        server.api("POST", "/v1/chat/completions", {"model": "tiny-llama", "max_tokens": 3, "store": True,
                                                     "metadata": {"run": run}, **tiny_ends_by_itself(),
                                                     "messages": [{"role": "user", "content": f"{run} question"}]})
    held = []

    def hold_the_first(route):  # the unfiltered list waits until the filtered one is shown
        if "metadata" not in route.request.url and not held:
            held.append(route)
        else:
            route.continue_()

    page.route("**/v1/chat/completions?*", hold_the_first)
    page.goto(server.url + "/#/monitor")
    while not held:
        page.wait_for_timeout(50)
    page.fill("#stored-metadata", "run=race")
    page.click("#stored-filter")
    rows = page.locator("[data-test=stored-table] tbody tr")
    expect(rows).to_have_count(1)
    held[0].continue_()
    page.wait_for_load_state("networkidle")
    page.wait_for_timeout(300)
    expect(rows).to_have_count(1)
    expect(rows.first).to_contain_text("race question")


WEATHER_TOOLS = [{"type": "function", "function": {"name": name, "description": what, "parameters": {
    "type": "object", "properties": {arg: {"type": "string"}}, "required": [arg]}}}
    for name, what, arg in (("get_weather", "Current weather", "city"), ("search_web", "Search the web", "query"))]


@pytest.fixture(scope="module")
def calls_get_weather(server, tmp_path_factory) -> str:
    """An ft: model of the server's project that answers PARIS_AND_OSLO with two get_weather calls,
    which the random tiny model never writes: the tiny model trained on that one answer until its loss
    is near 0 (seconds on 2 cores), registered with `tuneforge import` as a run folder of full weights."""
    import subprocess
    import sys

    from tuneforge.train.config import TrainConfig

    model = tiny_model_calling_two_tools()
    run = tmp_path_factory.mktemp("calls-run")
    model.save_pretrained(run / "model")
    TrainConfig(data="calls.jsonl", out=str(run), base="tiny-llama", method="full").save(run)
    out = subprocess.run([sys.executable, "-m", "tuneforge.cli", "import", str(run), "--project", "ui-e2e",
                          "--suffix", "tools"], env=server.env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


def test_monitor_shows_the_tools_a_stored_completion_was_offered_its_tool_calls_and_a_cut(page, browser, server,
                                                                                     calls_get_weather):
    """Reviewing kept completions to rate them: a completion whose request had tools says which (and a
    tool_choice other than auto), and an answer of tool calls shows the calls - it showed an empty
    answer and no tools, a blind review of exactly the answers whose tools go into the training file."""
    from tests.conftest import tiny_ends_by_itself

    kept = {"store": True, "metadata": {"run": "tools"}}
    called = server.api("POST", "/v1/chat/completions", {"model": calls_get_weather, "messages": PARIS_AND_OSLO,
                                                          "tools": WEATHER_TOOLS, "temperature": 0, "max_tokens": 200, **kept})
    assert called["choices"][0]["finish_reason"] == "tool_calls", called
    said = server.api("POST", "/v1/chat/completions", {"model": "tiny-llama", "tools": WEATHER_TOOLS, "tool_choice": "none",
                                                       "messages": [{"role": "user", "content": "Say A"}], "max_tokens": 3,
                                                       **kept, **tiny_ends_by_itself()})
    plain = server.api("POST", "/v1/chat/completions", {"model": "tiny-llama", "messages": [{"role": "user", "content": "Say A"}],
                                                        "max_tokens": 3, **kept, **tiny_ends_by_itself()})
    cut = server.api("POST", "/v1/chat/completions", {"model": "tiny-llama", "messages": [{"role": "user", "content": "Say A"}],
                                                      "max_tokens": 2, **kept})  # (the random model never ends unaided)
    assert cut["choices"][0]["finish_reason"] == "length"
    calls = [f"{c['function']['name']}({c['function']['arguments']})" for c in called["choices"][0]["message"]["tool_calls"]]
    assert calls == ['get_weather({"city": "Paris"})', 'get_weather({"city": "Oslo"})']

    def row(pg, done):
        return pg.locator(f"[data-test=stored-table] tr[data-id='{done['id']}'] [data-test=stored-answer]")

    page.goto(server.url + "/#/monitor")
    page.fill("#stored-metadata", "run=tools")
    page.click("#stored-filter")
    expect(page.locator("[data-test=stored-table] tbody tr")).to_have_count(4)
    expect(row(page, called).locator("[data-test=stored-tools]")).to_have_text("tools: get_weather, search_web")
    expect(row(page, called).locator("[data-test=stored-call]")).to_have_text(calls)
    expect(row(page, said).locator("[data-test=stored-tools]")).to_have_text("tools: get_weather, search_web · tool_choice: none")
    expect(row(page, said)).to_contain_text(said["choices"][0]["message"]["content"])
    expect(row(page, said).locator("[data-test=stored-call]")).to_have_count(0)
    expect(row(page, plain).locator("[data-test=stored-tools]")).to_have_count(0)
    # an answer cut at max_tokens is listed, and says a training file leaves it out
    expect(row(page, cut).locator("[data-test=stored-cut]")).to_have_text("cut at max tokens: not taken into training files")
    expect(page.locator("[data-test=stored-cut]")).to_have_count(1)

    # on a phone: the tools line and each call wrap inside the window, nothing scrolls sideways
    phone = browser.new_context(viewport={"width": 390, "height": 800})
    phone.add_init_script(f"localStorage.setItem('tuneforge.apiKey', {json.dumps(server.key)})")
    pg = phone.new_page()
    pg.goto(server.url + "/#/monitor")  # (unfiltered: a filter's list replacing this one would race the measuring)
    expect(row(pg, called).locator("[data-test=stored-call]")).to_have_count(2)
    for part in (row(pg, called).locator("[data-test=stored-tools]"), *row(pg, called).locator("[data-test=stored-call]").all()):
        box = part.bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= 390, (part.inner_text(), box)
    overflow = pg.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
    assert overflow <= 1, f"#/monitor scrolls sideways by {overflow}px at 390px"
    phone.close()


def test_playground_chats_kept_and_rated_become_training_data(page, server):
    """Stage 7's loop from the dashboard alone: keep the chats, rate the answers, make a training file
    of the good ones on the Monitor page."""
    from tests.conftest import tiny_ends_by_itself

    def ending(route):  # only answers that end by themselves are training data: the random model's must
        route.continue_(post_data=json.dumps(json.loads(route.request.post_data) | tiny_ends_by_itself()))

    page.route("**/v1/chat/completions", ending)
    page.goto(server.url + "/#/playground?model=tiny-llama")
    page.check("#pg-store")
    page.fill("#pg-max-tokens", "4")
    answers = page.locator(".msg.assistant[data-done=true]")
    for i, verdict in enumerate(("good", "bad")):
        page.fill("#pg-prompt", f"kept question {i}")
        page.click("#pg-send")
        expect(answers).to_have_count(i + 1, timeout=60_000)
        answers.nth(i).locator(f"[data-rate={verdict}]").click()
        expect(answers.nth(i).locator(".rating")).to_have_attribute("data-rating", verdict)
        expect(answers.nth(i).locator("[data-test=not-training-data]")).to_have_count(0)
    page.unroute("**/v1/chat/completions")  # the random model's own answer runs to max tokens: said
    page.fill("#pg-prompt", "kept question 2")
    page.click("#pg-send")
    expect(answers).to_have_count(3, timeout=60_000)
    expect(answers.nth(2).locator("[data-test=not-training-data]")).to_contain_text("cut at max tokens")
    page.goto(server.url + "/#/monitor")
    page.fill("#stored-metadata", "source=playground, rating=good")
    page.click("#stored-make-file")
    expect(page.locator("[data-test=stored-table] tbody tr")).to_have_count(1)
    page.click("[data-test=train-on-it]")
    page.wait_for_url(re.compile(r".*#/jobs/new\?file=file-.*"))
    content = urllib.request.urlopen(urllib.request.Request(
        f"{server.url}/v1/files/{page.url.rsplit('=', 1)[-1]}/content",
        headers={"Authorization": f"Bearer {server.key}"})).read().decode()
    (line,) = content.splitlines()  # the good one only, the whole conversation so far
    assert [m["content"] for m in json.loads(line)["messages"] if m["role"] == "user"] == ["kept question 0"]


def test_playground_offers_tools_shows_the_calls_and_sends_their_results(page, server, calls_get_weather):
    """A model tuned for function calling is tried in the Playground: the tools box's tools go with the
    request, the answer's calls show as name(arguments), and the results typed in go back as tool
    messages, each naming its call, and the model answers again."""
    sent = []
    page.on("request", lambda r: sent.append(json.loads(r.post_data)) if r.url.endswith("/v1/chat/completions") else None)
    page.goto(server.url + f"/#/playground?model={calls_get_weather}")
    page.fill("#pg-tools", "not json")
    page.fill("#pg-prompt", PARIS_AND_OSLO[0]["content"])
    page.click("#pg-send")
    expect(page.locator(".toast")).to_contain_text("Tools: not JSON")
    assert not sent
    page.fill("#pg-tools", json.dumps(WEATHER_TOOLS))
    page.fill("#pg-temperature", "0")
    page.click("#pg-send")
    first = page.locator(".msg.assistant[data-done=true]").first
    expect(first).to_be_visible(timeout=60_000)  # (the model loads on its first request)
    expect(first.locator("[data-test=pg-call]")).to_have_text(['get_weather({"city": "Paris"})', 'get_weather({"city": "Oslo"})'])
    assert sent[0]["tools"] == WEATHER_TOOLS
    page.fill("#pg-prompt", "and Rome?")
    page.click("#pg-send")  # the calls wait for their results
    expect(page.locator(".toast")).to_contain_text("Send the results of the tool calls first")
    results = first.locator("[data-test=pg-tool-result]")
    results.nth(0).fill("14 C, rain")
    results.nth(1).fill("3 C, snow")
    first.locator("[data-test=pg-send-results]").click()
    expect(page.locator(".msg.tool")).to_have_text(["get_weather → 14 C, rain", "get_weather → 3 C, snow"])
    expect(page.locator(".msg.assistant[data-done=true]")).to_have_count(2, timeout=60_000)
    messages = sent[-1]["messages"]
    calls = messages[1]["tool_calls"]
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "tool"]
    assert [(m["tool_call_id"], m["content"]) for m in messages[2:]] == [(calls[0]["id"], "14 C, rain"),
                                                                         (calls[1]["id"], "3 C, snow")]
    assert calls[0]["id"] != calls[1]["id"] and calls[1]["function"]["arguments"] == '{"city": "Oslo"}'


def test_playground_stop_ends_the_answer_and_keeps_what_it_said(page, server):
    """A long answer on a CPU takes minutes; Clear was the only way to end it, and it wiped the whole
    conversation. Stop ends the answer, keeps its text in the chat, and the next question carries it."""
    sent = []
    page.on("request", lambda r: sent.append(json.loads(r.post_data)) if r.url.endswith("/v1/chat/completions") else None)
    page.goto(server.url + "/#/playground?model=tiny-llama")
    page.fill("#pg-max-tokens", "1900")  # (the random tiny model never ends by itself: it would write them all)
    page.fill("#pg-prompt", "write a lot")
    page.click("#pg-send")
    answer = page.locator(".msg.assistant").first
    expect(page.locator("#pg-stop")).to_be_visible()
    expect(page.locator("#pg-send")).to_be_hidden()
    page.wait_for_function("document.querySelector('.msg.assistant') && document.querySelector('.msg.assistant').firstChild"
                           " && document.querySelector('.msg.assistant').firstChild.nodeType === 3", timeout=60_000)
    page.click("#pg-stop")
    expect(answer.locator("[data-test=stopped]")).to_have_text("stopped")
    expect(answer).to_have_attribute("data-done", "true")
    expect(page.locator("#pg-send")).to_be_visible()
    expect(page.locator(".msg.error")).to_have_count(0)
    said = answer.evaluate("el => el.firstChild.textContent")
    assert said
    page.fill("#pg-max-tokens", "2")
    page.fill("#pg-prompt", "and then?")
    page.click("#pg-send")
    expect(page.locator(".msg.assistant[data-done=true]")).to_have_count(2, timeout=60_000)
    assert [m["role"] for m in sent[-1]["messages"]] == ["user", "assistant", "user"]
    assert sent[-1]["messages"][1]["content"] == said


def test_cancel_a_job(page, server, data):
    good = server.upload(data["good"])
    page.goto(server.url + "/#/jobs")
    expect(page.locator("h1")).to_have_text("Fine-tuning jobs")
    other = server.api("POST", "/v1/fine_tuning/jobs",
                       {"model": "tiny-llama", "training_file": good["id"], "hyperparameters": {"n_epochs": 1}})
    # a job created elsewhere (here: the API) shows up in the open list without a reload
    expect(page.locator(f"tr[data-job='{other['id']}']")).to_be_visible(timeout=30_000)
    job = server.api("POST", "/v1/fine_tuning/jobs",
                     {"model": "tiny-llama", "training_file": good["id"], "hyperparameters": {"n_epochs": 50}})
    page.goto(server.url + f"/#/jobs/{job['id']}")
    expect(page.locator("[data-action=cancel]")).to_be_visible()
    page.click("[data-action=cancel]")
    root = page.locator(".page[data-page=jobs]")
    expect(root).to_have_attribute("data-status", "cancelled")
    expect(page.locator("[data-action=cancel]")).to_have_count(0)
    expect(page.locator("[data-test=events]")).to_contain_text("cancelled")
    assert server.api("GET", f"/v1/fine_tuning/jobs/{job['id']}")["status"] == "cancelled"


def test_narrow_window_has_no_horizontal_scroll(browser, server):
    ctx = browser.new_context(viewport={"width": 420, "height": 800})
    ctx.add_init_script(f"localStorage.setItem('tuneforge.apiKey', {json.dumps(server.key)})")
    pg = ctx.new_page()
    for route in ("jobs", "jobs/new", "upload", "playground", "models", "monitor"):
        pg.goto(f"{server.url}/#/{route}")
        expect(pg.locator("h1")).to_be_visible()
        pg.wait_for_timeout(300)
        overflow = pg.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
        assert overflow <= 1, f"#/{route} scrolls sideways by {overflow}px at 420px"
    ctx.close()
    phone = browser.new_context(viewport={"width": 360, "height": 740})
    phone.add_init_script(f"localStorage.setItem('tuneforge.apiKey', {json.dumps(server.key)})")
    pg = phone.new_page()
    pg.goto(f"{server.url}/#/monitor")
    expect(pg.locator("h1")).to_be_visible()
    for link in pg.locator("[data-nav]").all():  # every page's link in sight, none scrolled away
        box = link.bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= 360, (link.inner_text(), box)
    phone.close()


def test_jobs_list_stops_asking_for_jobs_once_left(page, server):
    """A poll of the jobs list answered after the page was left started the next one: each such visit
    left one more loop asking for the list every 15 s (3 s while a job runs) for as long as the tab
    stayed open, on every other page."""
    page.clock.install()
    page.goto(server.url + "/#/jobs")
    expect(page.locator(".page[data-page=jobs] .spinner")).to_have_count(0)  # the list is in
    held = []
    jobs_list = re.compile(r".*/v1/fine_tuning/jobs\?.*")
    page.route(jobs_list, lambda route: held.append(route))
    page.clock.fast_forward(16_000)  # the next poll goes out, and is held until the page is left
    for _ in range(100):
        if held:
            break
        page.wait_for_timeout(50)
    assert held, "the jobs list was not polled"
    page.evaluate("location.hash = '#/models'")
    expect(page.locator("h1")).to_have_text("Models")
    asked = []
    page.on("request", lambda r: asked.append(r.url) if jobs_list.match(r.url) else None)
    for route in held:
        route.continue_()
    page.unroute(jobs_list)
    page.wait_for_timeout(500)
    page.clock.fast_forward(60_000)
    page.wait_for_timeout(500)
    assert not asked, f"the Models page still polls the jobs list: {asked}"


def test_dpo_form_flags_a_validation_file_of_chat_examples(page, server, pairs_file, data):
    """DPO validates on pairs too: a chat validation file was flagged only as a training file, and the
    job made from the form failed in validating_files a few seconds later."""
    pairs, chats = server.upload(pairs_file), server.upload(data["good"])
    page.goto(server.url + "/#/jobs/new?model=tiny-llama")
    page.select_option("#f-training_file", pairs["id"])
    expect(page.locator("#create-form")).to_contain_text("Ready to train")
    page.select_option("#f-validation_file", chats["id"])
    expect(page.locator("#create-form")).to_contain_text("Ready to validate on")
    expect(page.locator("[data-test=dpo-mismatch]")).to_have_count(0)  # LoRA: chat examples validate
    page.click(".seg label:has(input[value=dpo])")
    valid_slot = page.locator("#create-form .upload-slot").nth(1)
    expect(valid_slot.locator("[data-test=dpo-mismatch]")).to_contain_text("this file holds chat examples")
    expect(page.locator("[data-test=dpo-mismatch]")).to_have_count(1)  # (the pairs training file is fine)
    page.select_option("#f-validation_file", pairs["id"])
    expect(valid_slot).to_contain_text("Ready to validate on")
    expect(page.locator("[data-test=dpo-mismatch]")).to_have_count(0)


def test_monitor_filters_on_enter(page, server):
    """Typing a filter and pressing Enter did nothing: only a click on Filter applied it."""
    from tests.conftest import tiny_ends_by_itself

    for run in ("enter-a", "enter-b"):
        server.api("POST", "/v1/chat/completions", {
            "model": "tiny-llama", "max_tokens": 3, "store": True, "metadata": {"run": run},
            "messages": [{"role": "user", "content": f"question {run}"}], **tiny_ends_by_itself()})
    page.goto(server.url + "/#/monitor")
    rows = page.locator("[data-test=stored-table] tbody tr")
    expect(rows.filter(has_text="question enter-a")).to_have_count(1)  # the unfiltered list is in
    page.fill("#stored-metadata", "run=enter-b")
    page.press("#stored-metadata", "Enter")
    expect(rows).to_have_count(1)
    expect(rows.first.locator("[data-test=stored-metadata]")).to_have_text("run=enter-b")
    page.fill("#stored-model", "no-such-model")
    page.press("#stored-model", "Enter")
    expect(page.locator("[data-test=stored]")).to_contain_text("No stored completion matches")


def test_playground_answer_finishing_after_the_model_changed_stays_out_of_the_new_chat(page, server):
    """Another model picked while an answer streams starts a new conversation: the old model's answer,
    landing after, became the first message of the new one (sent with the next question, unseen)."""
    sent, held = [], []
    page.on("request", lambda r: sent.append(json.loads(r.post_data)) if r.url.endswith("/v1/chat/completions") else None)
    page.goto(server.url + "/#/playground?model=tiny-llama")
    page.fill("#pg-max-tokens", "3")
    page.route("**/v1/chat/completions", lambda route: held.append(route))
    page.fill("#pg-prompt", "first question")
    page.click("#pg-send")
    for _ in range(100):
        if held:
            break
        page.wait_for_timeout(50)
    assert held, "the question was not sent"
    other = next(v for v in page.locator("#pg-model option").evaluate_all("os => os.map((o) => o.value)") if v != "tiny-llama")
    page.select_option("#pg-model", other)  # a new conversation...
    expect(page.locator(".empty-hint")).to_contain_text(f"New conversation with {other}")
    page.select_option("#pg-model", "tiny-llama")  # ... and back, still before the answer came
    held[0].continue_()
    page.unroute("**/v1/chat/completions")
    expect(page.locator("#pg-send")).to_be_enabled(timeout=60_000)  # the first answer is in
    page.fill("#pg-prompt", "second question")
    page.click("#pg-send")
    expect(page.locator(".msg.assistant[data-done=true]")).to_have_count(1, timeout=60_000)
    assert sent[-1]["messages"] == [{"role": "user", "content": "second question"}]


def test_deleting_the_file_on_show_takes_its_report_away(page, server, data):
    """The report of a file just deleted stayed, its "Create a job with this file" leading to a form
    without the file (and its address to Not found on a reload)."""
    page.goto(server.url + "/#/upload")
    page.select_option("#report-model", "tiny-llama")
    page.set_input_files("#upload-input", str(data["good"]))
    expect(page.locator("[data-test=train-this]")).to_be_visible(timeout=60_000)
    file_id = page.url.rsplit("/", 1)[-1]
    page.locator(f"tr[data-file='{file_id}'] button:has-text('Delete')").click()
    expect(page.locator(f"tr[data-file='{file_id}']")).to_have_count(0)
    expect(page.locator("[data-test=report-verdict]")).to_have_count(0)
    expect(page.locator("[data-test=train-this]")).to_have_count(0)
    assert page.url.endswith("#/upload")


def test_playground_conversation_survives_leaving_the_page(page, server):
    """Going to another page of the dashboard and back lost the chat: the conversation (messages, model,
    system prompt) stays for the tab, and Clear still clears it."""
    sent = []
    page.on("request", lambda r: sent.append(json.loads(r.post_data)) if r.url.endswith("/v1/chat/completions") else None)
    page.goto(server.url + "/#/playground?model=tiny-llama")
    page.fill("#pg-system", "Answer in French.")
    page.fill("#pg-max-tokens", "3")
    page.fill("#pg-prompt", "remember me")
    page.click("#pg-send")
    answer = page.locator(".msg.assistant[data-done=true]")
    expect(answer).to_have_count(1, timeout=60_000)
    said = answer.evaluate("el => el.firstChild.textContent")
    page.click("[data-nav=models]")
    expect(page.locator("h1")).to_have_text("Models")
    page.click("[data-nav=playground]")  # (no model in the address: the chat's own)
    expect(page.locator("#pg-model")).to_have_value("tiny-llama")
    expect(page.locator("#pg-system")).to_have_value("Answer in French.")
    expect(page.locator(".msg.user")).to_have_text(["remember me"])
    expect(answer).to_have_count(1)
    assert answer.evaluate("el => el.firstChild.textContent") == said
    page.fill("#pg-max-tokens", "3")
    page.fill("#pg-prompt", "and now?")
    page.click("#pg-send")
    expect(answer).to_have_count(2, timeout=60_000)
    assert sent[-1]["messages"] == [{"role": "system", "content": "Answer in French."},
                                    {"role": "user", "content": "remember me"},
                                    {"role": "assistant", "content": said}, {"role": "user", "content": "and now?"}]
    page.reload()  # the tab keeps it
    expect(page.locator(".msg.user")).to_have_text(["remember me", "and now?"])
    page.click("#pg-clear")
    page.click("[data-nav=models]")
    expect(page.locator("h1")).to_have_text("Models")
    page.click("[data-nav=playground]")
    expect(page.locator("#pg-model")).to_be_visible()
    expect(page.locator(".msg")).to_have_count(0)


def test_playground_restored_answers_keep_their_line_and_ratings(page, server):
    """The chat drawn again from the tab's storage lost what was under each answer: its tokens and time,
    and for a kept chat the Good / Needs work buttons (and the cut-at-max-tokens note). They are drawn
    again, and a rating on a restored answer updates its stored completion."""
    page.goto(server.url + "/#/playground?model=tiny-llama")
    page.check("#pg-store")
    page.fill("#pg-max-tokens", "3")  # (the random tiny model never ends by itself: cut at max tokens)
    page.fill("#pg-prompt", "rate me later")
    page.click("#pg-send")
    answer = page.locator(".msg.assistant[data-done=true]")
    expect(answer).to_have_count(1, timeout=60_000)
    line = answer.locator(".meta").first.inner_text()
    assert re.fullmatch(r"3 tokens · \d+\.\ds · stopped at max tokens", line), line
    completion = answer.locator(".rating").get_attribute("data-completion")
    page.click("[data-nav=models]")
    expect(page.locator("h1")).to_have_text("Models")
    page.click("[data-nav=playground]")
    expect(answer).to_have_count(1)
    expect(answer.locator(".meta").first).to_have_text(line)
    expect(answer.locator("[data-test=not-training-data]")).to_contain_text("cut at max tokens")
    expect(answer.locator(".rating")).to_have_attribute("data-completion", completion)
    answer.locator("[data-rate=good]").click()
    expect(answer.locator(".rating")).to_have_attribute("data-rating", "good")
    assert server.api("GET", f"/v1/chat/completions/{completion}")["metadata"] == {"source": "playground", "rating": "good"}
    page.reload()  # the rating made on the restored answer is kept with it
    expect(answer.locator("[data-rate=good].active")).to_have_count(1)
    answer.locator("[data-rate=bad]").click()
    expect(answer.locator(".rating")).to_have_attribute("data-rating", "bad")
    assert server.api("GET", f"/v1/chat/completions/{completion}")["metadata"] == {"source": "playground", "rating": "bad"}


def test_create_form_offers_four_bits_only_for_lora(page, server):
    """"Base in 4 bits" stayed on with method Full, which the server refuses: it is off and disabled for
    Full, with the reason said, and back for LoRA."""
    page.goto(server.url + "/#/jobs/new?model=tiny-llama")
    quantize = page.locator("input[name=quantize]")
    hint = page.locator("[data-test=quantize-hint]")
    page.check("input[name=quantize]")
    expect(hint).to_be_hidden()
    page.click(".seg label:has(input[value=full])")
    expect(quantize).to_be_disabled()
    expect(quantize).not_to_be_checked()
    expect(hint).to_be_visible()
    expect(hint).to_contain_text("LoRA")
    page.click(".seg label:has(input[value=lora])")
    expect(quantize).to_be_enabled()
    expect(hint).to_be_hidden()


def test_unknown_job_and_file_addresses_say_what_was_not_found(page, server):
    """An address of a job (or file) that does not exist showed a bare "Not found": it names the id and
    links back to the list."""
    page.goto(server.url + "/#/jobs/ftjob-doesnotexist")
    card = page.locator("[data-test=not-found]")
    expect(card).to_contain_text("ftjob-doesnotexist")
    expect(card).to_contain_text("Job ftjob-doesnotexist not found")
    card.locator("a[href='#/jobs']").click()
    expect(page.locator("h1")).to_have_text("Fine-tuning jobs")
    page.goto(server.url + "/#/upload/file-doesnotexist")
    expect(card).to_contain_text("File file-doesnotexist not found")
    card.locator("a[href='#/upload']").click()
    expect(card).to_have_count(0)
    assert page.url.endswith("#/upload")


def test_create_form_errors_name_fields_by_their_labels(page, server, data):
    """The form's errors (its own and the server's) named hyperparameters by their API keys (n_epochs,
    learning_rate_multiplier), which the form shows nowhere: they say the fields' labels."""
    good = server.upload(data["good"])
    page.goto(server.url + f"/#/jobs/new?model=tiny-llama&file={good['id']}")
    error = page.locator("#create-form .form-error[role=alert]")
    page.fill("input[name=batch_size]", "2.5")
    page.click("#create-submit")
    expect(error).to_have_text('Batch size must be "auto" or a whole number.')
    page.fill("input[name=batch_size]", "auto")
    page.fill("input[name=learning_rate_multiplier]", "-1")
    page.click("#create-submit")
    expect(error).to_have_text('LR multiplier must be "auto" or a positive number.')
    page.fill("input[name=learning_rate_multiplier]", "auto")
    page.fill("input[name=n_epochs]", "100")  # refused by the server
    page.click("#create-submit")
    expect(error).to_contain_text("Epochs must be 'auto' or between 1 and 50")
    expect(error).not_to_contain_text("n_epochs")
    page.fill("input[name=n_epochs]", "auto")
    page.fill("input[name=suffix]", "my bot!")
    page.fill("input[name=seed]", "-5")
    page.click("#create-submit")
    expect(error).to_contain_text("Suffix must be 1 to 64 letters")
    expect(error).to_contain_text("Seed must be a whole number")


def test_report_counts_are_formatted(page, server, tmp_path):
    """A file's number of examples was shown as 1200 where every other count on the page reads 1,200."""
    many = server.upload(write_good_file(tmp_path / "many.jsonl", 1200))
    page.goto(server.url + f"/#/upload/{many['id']}?model=tiny-llama")
    expect(page.locator("[data-test=report-verdict]")).to_contain_text("Valid: 1,200 examples", timeout=60_000)
    page.goto(server.url + f"/#/jobs/new?model=tiny-llama&file={many['id']}")
    expect(page.locator("#create-form")).to_contain_text("Ready to train: 1,200 examples", timeout=60_000)


def test_upload_input_is_reset_after_each_pick(page, server, data):
    """The same file picked again did not upload again: the input still held it, so Chromium fired no
    change. The input is emptied after each pick."""
    page.goto(server.url + "/#/upload")
    page.select_option("#report-model", "tiny-llama")
    before = len(server.api("GET", "/v1/files?limit=100")["data"])
    page.set_input_files("#upload-input", str(data["good"]))
    expect(page.locator("[data-test=train-this]")).to_be_visible(timeout=60_000)
    expect(page.locator("#upload-input")).to_have_value("")
    page.set_input_files("#upload-input", str(data["good"]))
    expect(page.locator("[data-test=report-verdict]")).to_be_visible(timeout=60_000)
    expect(page.locator("#upload-input")).to_have_value("")
    assert len(server.api("GET", "/v1/files?limit=100")["data"]) == before + 2


@pytest.fixture(scope="module")
def small_server(tmp_path_factory):
    """A server that takes uploads of 4 KB at most."""
    srv = LiveServer(tmp_path_factory.mktemp("ui-small-home"), env={"TUNEFORGE_MAX_UPLOAD_BYTES": "4096"})
    srv.start()
    yield srv
    srv.stop()


def test_upload_too_large_says_so_with_the_limit(browser, small_server, tmp_path):
    """A file over the server's upload limit (413) was headed "Something went wrong"."""
    big = write_good_file(tmp_path / "big.jsonl", 200)
    ctx = browser.new_context(viewport={"width": 1280, "height": 800})
    ctx.add_init_script(f"localStorage.setItem('tuneforge.apiKey', {json.dumps(small_server.key)})")
    pg = ctx.new_page()
    pg.goto(small_server.url + "/#/upload")
    pg.set_input_files("#upload-input", str(big))
    card = pg.locator("#report .callout.bad")
    expect(card.locator("strong")).to_have_text("File too large")
    expect(card).to_contain_text("the limit is 4,096 bytes (4.0 KB)")
    # the create form's upload too, whose input takes the same file again after the refusal
    pg.goto(small_server.url + "/#/jobs/new?model=tiny-llama")
    pg.select_option("#f-training_file", "__upload__")
    pg.set_input_files("[data-test=training_file-input]", str(big))
    expect(pg.locator("#create-form .upload-slot .form-error")).to_contain_text("File is too large")
    expect(pg.locator("[data-test=training_file-input]")).to_have_value("")
    ctx.close()


@pytest.fixture(scope="module")
def full_job(server, tmp_path_factory) -> dict:
    """A succeeded job trained full (its checkpoint's method is not the form's default), of one epoch of
    two steps: one checkpoint."""
    ten = server.upload(write_good_file(tmp_path_factory.mktemp("full") / "ten.jsonl", 10))
    job = server.api("POST", "/v1/fine_tuning/jobs", {
        "model": "tiny-llama", "training_file": ten["id"], "metadata": {"tuneforge.method": "full"},
        "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 5}}}})
    job = server.wait_job(job["id"], ("succeeded", "failed", "cancelled"), timeout=JOB_TIMEOUT_MS / 1000)
    assert job["status"] == "succeeded", job["error"]
    return job


def test_a_checkpoint_is_trained_on_from_its_jobs_page(page, server, data, full_job):
    """A job's checkpoint could be chatted with but not trained on from the dashboard (the server takes
    one as a job's model): its "Train more" opens the create form on it, which sends no method
    (the checkpoint's own is the job's; the form's default LoRA would be refused for this full one)."""
    good = server.upload(data["good"])
    (ckpt,) = [c["fine_tuned_model_checkpoint"] for c in
               server.api("GET", f"/v1/fine_tuning/jobs/{full_job['id']}/checkpoints")["data"]]
    sent = []
    page.on("request", lambda r: sent.append(json.loads(r.post_data))
            if r.method == "POST" and r.url.endswith("/v1/fine_tuning/jobs") else None)
    page.goto(server.url + f"/#/jobs/{full_job['id']}")
    page.locator(f"[data-test=checkpoints] tr[title='{ckpt}'] [data-action=train-more]").click()
    expect(page.locator("#f-model")).to_have_value(ckpt)
    expect(page.locator("[data-test=model-description]")).to_contain_text("Starts from this checkpoint's weights")
    page.select_option("#f-training_file", good["id"])
    expect(page.locator("#create-form")).to_contain_text("Ready to train")
    page.fill("input[name=n_epochs]", "1")
    page.click("#create-submit")
    page.wait_for_url(re.compile(r".*#/jobs/ftjob-.*"))
    job = server.api("GET", f"/v1/fine_tuning/jobs/{page.url.rsplit('/', 1)[-1]}")
    server.api("POST", f"/v1/fine_tuning/jobs/{job['id']}/cancel")  # (the worker is the module's)
    assert (sent[-1]["model"], sent[-1]["metadata"]) == (ckpt, {})
    assert (job["model"], job["metadata"]) == (ckpt, {"tuneforge.method": "full"})


def test_chart_steps_are_formatted(page, server, data):
    """The charts' step axis read 1000 where every other count on the page reads 1,000. A job of 1,200
    steps takes minutes here: its history (job and step events, as the worker writes them) is written
    into the server's database."""
    from tuneforge.store.database import EventRow, JobRow, new_id, session

    good = server.upload(data["good"])
    job_id = new_id("ftjob-")
    with session(f"sqlite:///{server.home / 'tuneforge.db'}") as s:
        s.add(JobRow(id=job_id, project="ui-e2e", model="tiny-llama", training_file=good["id"], status="succeeded",
                     hyperparameters={"n_epochs": 1, "batch_size": 1, "learning_rate_multiplier": 1.0}, seed=1,
                     meta={"tuneforge.method": "lora"}, trained_tokens=1200 * 81, finished_at=1_800_000_000))
        s.flush()
        s.add_all(EventRow(id=new_id("ftevent-"), job_id=job_id, type="metrics", created_at=1_700_000_000 + step,
                           message=f"Step {step}/1200: training loss={5 - step / 1000:.4f}",
                           data={"step": step, "total_steps": 1200, "train_loss": 5 - step / 1000,
                                 "train_mean_token_accuracy": step / 2400, "trained_tokens": 81 * step})
                  for step in range(1, 1201))
        s.commit()
    page.goto(server.url + f"/#/jobs/{job_id}")
    chart = page.locator("[data-test=loss-chart] .chart")
    expect(chart).to_have_attribute("data-points", "1200")
    ticks = chart.locator("svg text")
    expect(ticks.filter(has_text=re.compile(r"^1,000$"))).to_have_count(1)
    expect(ticks.filter(has_text=re.compile(r"^\d{4,}$"))).to_have_count(0)
