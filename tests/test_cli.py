"""The command line as scripts use it: exit codes, stdout carrying only the result, clear errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import write_chat
from tuneforge.train import metrics as metrics_log
from tuneforge.train.checkpoint import checkpoint_dirs


def tf(*args, check=True, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "tuneforge.cli", *map(str, args)],
                          capture_output=True, text=True, env=os.environ.copy(), timeout=600, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_validate_reports_errors_with_line_and_code(tmp_path):
    bad = tmp_path / "bad.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
    bad.write_text("\n".join([good] * 11 + ['{"messages": [{"role": "robot", "content": "x"}]}']) + "\n")
    proc = tf("data", "validate", bad, "--base", "tiny-llama", "--json", check=False)
    assert proc.returncode == 1
    report = json.loads(proc.stdout)
    codes = {(e["code"], e["line"]) for e in report["errors"]}
    assert ("unrecognized_role", 12) in codes
    assert "Traceback" not in proc.stderr


def test_validate_good_file_shows_epochs_and_cost(chat_file):
    proc = tf("data", "validate", chat_file, "--base", "tiny-llama", "--json")
    report = json.loads(proc.stdout)
    assert report["n_examples"] == 24 and report["n_epochs"] == 4
    assert any(c["model"] == "gpt-3.5-turbo" for c in report["costs"])


def test_validate_refuses_the_max_length_train_refuses(tmp_path, chat_file):
    """`data validate --max-length 1` reported on the file, for a length `train` refuses (at least 16)."""
    checked = tf("data", "validate", chat_file, "--base", "tiny-llama", "--max-length", "1", check=False)
    trained = tf("train", "--data", chat_file, "--out", tmp_path / "r", "--base", "tiny-llama", "--max-length", "1",
                 check=False)
    assert checked.returncode == trained.returncode == 2 and checked.stdout == ""
    assert checked.stderr == trained.stderr == "error: --max-length must be at least 16, got 1\n"
    least = tf("data", "validate", chat_file, "--base", "tiny-llama", "--max-length", "16", "--json", check=False)
    assert json.loads(least.stdout)["max_length"] == 16, least.stderr  # checked (its examples do not fit)


def test_missing_file_and_unknown_model_are_one_line_errors(tmp_path, chat_file):
    proc = tf("data", "validate", tmp_path / "nope.jsonl", check=False)
    assert proc.returncode == 2 and "nope.jsonl" in proc.stderr and "Traceback" not in proc.stderr
    proc = tf("train", "--data", chat_file, "--out", tmp_path / "r", "--base", "no-such-model", check=False)
    assert proc.returncode == 2 and "no-such-model" in proc.stderr and "Traceback" not in proc.stderr
    proc = tf("train", "--data", chat_file, "--out", tmp_path / "r", "--n-epochs", "many", check=False)
    assert proc.returncode == 2 and "many" in proc.stderr


def test_convert_csv_then_train_then_chat_prints_only_the_answer(tmp_path):
    csv = tmp_path / "qa.csv"
    csv.write_text("q,a\n" + "".join(f"What is {i} plus {i}?,{2 * i}\n" for i in range(12)))
    out = tmp_path / "data.jsonl"
    tf("data", "convert", csv, "--prompt-col", "q", "--completion-col", "a", "-o", out)
    assert len(out.read_text().splitlines()) == 12
    result = json.loads(tf("train", "--data", out, "--out", tmp_path / "run", "--base", "tiny-llama",
                           "--n-epochs", "1", "--json").stdout)
    assert result["steps"] == 3 and result["config"]["n_epochs"] == 1
    proc = tf("chat", tmp_path / "run", "What is 3 plus 3?", "--max-tokens", "5", "--json")
    answer = json.loads(proc.stdout)
    assert answer["completion_tokens"] <= 5 and set(answer) >= {"text", "finish_reason"}
    plain = tf("chat", tmp_path / "run", "What is 3 plus 3?", "--max-tokens", "5").stdout
    assert plain == answer["text"] + "\n"  # greedy: same answer, and nothing else on stdout


def test_convert_reports_missing_column(tmp_path):
    csv = tmp_path / "qa.csv"
    csv.write_text("question,answer\nq,a\n")
    proc = tf("data", "convert", csv, "--prompt-col", "q", "--completion-col", "a", "-o", tmp_path / "o.jsonl",
              check=False)
    assert proc.returncode == 2 and "'q'" in proc.stderr and "question" in proc.stderr


def test_train_resumes_after_a_kill(tmp_path):
    data = write_chat(tmp_path / "train.jsonl", 40)
    run = tmp_path / "run"
    # started with relative paths, resumed from another directory (the run folder keeps them absolute)
    cmd = [sys.executable, "-m", "tuneforge.cli", "train", "--data", data.name, "--out", run.name,
           "--base", "tiny-llama", "--n-epochs", "4", "--batch-size", "2", "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=os.environ.copy(), cwd=tmp_path)
    deadline = time.time() + 300
    while not checkpoint_dirs(run) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert checkpoint_dirs(run), "no checkpoint was written"
    proc.send_signal(signal.SIGKILL)  # no chance to save anything more
    proc.wait()
    killed_at = len(metrics_log.read(run))
    assert killed_at < 72
    result = json.loads(tf("train", "--resume", run, "--json").stdout)
    steps = [r["step"] for r in metrics_log.read(run)]
    assert result["steps"] == 72 and steps == list(range(1, 73))  # no step lost or repeated


def test_a_trained_run_is_kept_from_mistakes_and_overwrite_clears_it(tmp_path, chat_file):
    run = tmp_path / "run"
    tf("train", "--data", chat_file, "--out", run, "--base", "tiny-llama", "--n-epochs", "1", "--quiet")
    adapter = (run / "adapter" / "adapter_model.safetensors").read_bytes()
    proc = tf("train", "--data", chat_file, "--out", run, "--base", "tiny-llama", "--method", "full", check=False)
    assert proc.returncode == 2 and "already holds a trained run" in proc.stderr
    assert (run / "adapter" / "adapter_model.safetensors").read_bytes() == adapter  # untouched
    proc = tf("train", "--resume", run, check=False)
    assert proc.returncode == 2 and "has finished training" in proc.stderr
    result = json.loads((run / "result.json").read_text())
    assert result["final"]["valid_loss"]  # (a resume of a finished run used to rewrite it empty)
    tf("train", "--data", chat_file, "--out", run, "--base", "tiny-llama", "--method", "full", "--n-epochs", "1",
       "--overwrite", "--quiet", "--validation-split", "0")
    # the LoRA run's adapter is gone: eval, chat and export would have loaded it before the new model
    assert not (run / "adapter").exists() and (run / "model" / "model.safetensors").is_file()
    # and all 24 examples trained: none held out for validation
    result = json.loads((run / "result.json").read_text())
    assert "valid_loss" not in result["final"] and result["final"]["trained_tokens"] > 0


@pytest.mark.parametrize("option,value,says", [
    ("--n-epochs", "0", "--n-epochs must be at least 1, got 0"),
    ("--batch-size", "0", "--batch-size must be at least 1, got 0"),
    ("--learning-rate-multiplier", "0", "--learning-rate-multiplier must be above 0"),
    ("--precision", "xyz", "--precision must be one of auto, bf16, fp32"),
    ("--validation-split", "1", "--validation-split must be at least 0 and below 1, got 1.0"),
    ("--early-stopping", "-1", "--early-stopping must be at least 0, got -1"),
])
def test_out_of_range_options_are_refused_before_anything_runs(tmp_path, chat_file, option, value, says):
    proc = tf("train", "--data", chat_file, "--out", tmp_path / "r", "--base", "tiny-llama", option, value, check=False)
    assert proc.returncode == 2 and says in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "r").exists()


def test_an_unknown_base_bad_data_or_an_unusable_out_are_refused_before_the_model_loads(tmp_path, chat_file):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(chat_file.read_text() + '{"messages": [{"role": "robot", "content": "x"}]}\n')
    (tmp_path / "afile").write_text("")
    for args, says in [
        (("--data", chat_file, "--base", "no-such-model", "--out", tmp_path / "r"), "unknown base model 'no-such-model'"),
        (("--data", bad, "--base", "tiny-llama", "--out", tmp_path / "r"), "line 25, field messages[0].role"),
        (("--data", chat_file, "--base", "tiny-llama", "--out", tmp_path / "afile" / "run"), "afile is a file"),
        (("--data", chat_file, "--base", "tiny-llama", "--out", tmp_path / "r", "--objective", "dpo"),
         "line 1: DPO trains on preference pairs"),
    ]:
        proc = tf("train", *args, check=False)
        assert proc.returncode == 2 and says in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert "Loading base model" not in proc.stderr
    assert not (tmp_path / "r").exists()


def test_validation_split_given_is_honoured_on_a_small_file_auto_holds_out_none(tmp_path):
    ten = tmp_path / "ten.jsonl"
    write_chat(ten, 10)
    proc = tf("train", "--data", ten, "--out", tmp_path / "a", "--base", "tiny-llama", "--n-epochs", "1", "--quiet")
    assert "10 training and 0 validation examples" in proc.stderr
    proc = tf("train", "--data", ten, "--out", tmp_path / "b", "--base", "tiny-llama", "--n-epochs", "1", "--quiet",
              "--validation-split", "0.3")
    assert "7 training and 3 validation examples" in proc.stderr


def test_a_checkpoint_the_disk_cannot_take_is_one_line_and_the_run_resumes_once_there_is_room(tmp_path, chat_file):
    import resource

    def small_files():  # a file-size limit: writes past 200 kB fail as they do on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    run = tmp_path / "run"
    proc = tf("train", "--data", chat_file, "--out", run, "--base", "tiny-llama", "--n-epochs", "1", "--quiet",
              check=False, preexec_fn=small_files)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    (error,) = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert "the checkpoint could not be written" in error and "resume" in error
    assert not list((run / "checkpoints").iterdir())  # no half-written checkpoint left to take the space
    tf("train", "--resume", run, "--quiet")
    assert (run / "result.json").is_file()


def test_lora_targets_choose_the_adapted_layers_and_a_base_it_cannot_train_is_refused(tmp_path, chat_file):
    tf("train", "--data", chat_file, "--out", tmp_path / "r", "--base", "tiny-llama", "--n-epochs", "1",
       "--lora-targets", "q_proj, v_proj", "--quiet")
    config = json.loads((tmp_path / "r" / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["q_proj", "v_proj"]
    proc = tf("train", "--data", chat_file, "--out", tmp_path / "s", "--base", "tiny-llama", "--lora-targets", "attn_q",
              check=False)
    assert proc.returncode == 2 and "lora_targets ['attn_q']: no linear layer" in proc.stderr
    assert not (tmp_path / "s").exists()  # nothing made for a run that never started
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=300)).save_pretrained(tmp_path / "gpt2")
    proc = tf("train", "--data", chat_file, "--out", tmp_path / "g", "--base", tmp_path / "gpt2", check=False)
    assert proc.returncode == 2 and "base model type 'gpt2' (GPT2LMHeadModel)" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "g").exists()


def test_key_and_database_mistakes_are_one_line_errors():
    proc = tf("keys", "revoke", "key-nope", check=False)
    assert proc.returncode == 2 and "key-nope" in proc.stderr and "Traceback" not in proc.stderr
    proc = tf("usage", "--database-url", "garbage", check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("error: database") and "Traceback" not in proc.stderr


def test_resume_of_a_folder_that_is_no_run_says_so(tmp_path):
    proc = tf("train", "--resume", tmp_path / "never-trained", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "never-trained: not a tuneforge run folder (no config.json)" in proc.stderr


def test_resume_of_a_run_whose_training_file_is_gone_names_it(tmp_path, chat_file):
    from tuneforge.train.config import TrainConfig

    run = tmp_path / "run"
    run.mkdir()
    TrainConfig(data=str(tmp_path / "moved.jsonl"), out=str(run), base="tiny-llama").save(run)
    proc = tf("train", "--resume", run, check=False)  # was a bare "[Errno 2] No such file or directory: ..."
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"the run's training file {tmp_path / 'moved.jsonl'} is gone" in proc.stderr, proc.stderr
    assert "Loading base model" not in proc.stderr


def test_resume_with_other_settings_refuses_them_by_name(tmp_path):
    """`--resume RUN --n-epochs 5` ran the run's old epochs: every setting but --resume was dropped unread
    (only --data and --out were refused). --quiet and --json are how it speaks, not settings."""
    from tuneforge.train.config import TrainConfig

    run = tmp_path / "run"
    run.mkdir()
    TrainConfig(data=str(tmp_path / "data.jsonl"), out=str(run), base="tiny-llama").save(run)
    proc = tf("train", "--resume", run, "--n-epochs", "5", "--learning-rate-multiplier", "2", "--quiet", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == ("error: --resume continues a run with the settings it started with: give it alone "
                                   "(not with --n-epochs, --learning-rate-multiplier)")
    proc = tf("train", "--resume", run, "--quiet", "--json", check=False)  # on to the next check
    assert proc.returncode == 2 and "training file" in proc.stderr and "give it alone" not in proc.stderr


def test_init_from_refuses_a_base_or_lora_shape_of_its_own(tmp_path, chat_file):
    """--init-from trains on with the earlier run's base, method and LoRA shape: one given as well
    would be overridden unread, so it is refused by name."""
    proc = tf("train", "--data", chat_file, "--out", tmp_path / "next", "--init-from", tmp_path / "first",
              "--base", "tiny-llama", "--lora-rank", "8", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().endswith("leave out --base, --lora-rank"), proc.stderr


def test_init_from_refuses_its_own_out_folder(tmp_path, chat_file):
    """--init-from RUN --out RUN --overwrite cleared RUN once its weights were read: a crash before the
    first checkpoint lost the run, and the new config named itself as the run to continue from."""
    (run := tmp_path / "run").mkdir()
    proc = tf("train", "--data", chat_file, "--out", run, "--init-from", run, "--overwrite", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "is --out too, or inside it: write the continued run to another folder" in proc.stderr, proc.stderr


def test_init_from_a_checkpoint_continues_from_its_weights(tmp_path, chat_file):
    """A checkpoint (RUN/checkpoints/step-N) is a starting point like a finished run (it was refused:
    "is a checkpoint ... --init-from RUN"); one inside --out is refused as --out itself is."""
    run = tmp_path / "run"
    tf("train", "--data", chat_file, "--out", run, "--base", "tiny-llama", "--method", "full", "--n-epochs", "2",
       "--quiet")
    ckpt = checkpoint_dirs(run)[0]
    result = json.loads(tf("train", "--data", chat_file, "--out", tmp_path / "next", "--init-from", ckpt,
                           "--n-epochs", "1", "--json").stdout)
    assert (result["config"]["init_from"], result["config"]["method"]) == (str(ckpt), "full")
    proc = tf("train", "--data", chat_file, "--out", run, "--init-from", ckpt, "--overwrite", check=False)
    assert proc.returncode == 2 and "is --out too, or inside it" in proc.stderr, proc.stderr
    assert ckpt.is_dir()


def test_convert_given_a_jsonl_file_says_it_is_no_csv(tmp_path, chat_file):
    proc = tf("data", "convert", chat_file, "--prompt-col", "q", "--completion-col", "a", "-o", tmp_path / "o.jsonl",
              check=False)  # was "column 'q' not found; columns there: {"messages": [{"role": "system", ..."
    assert proc.returncode == 2 and "is JSON, not a CSV" in proc.stderr and "data validate" in proc.stderr
    assert not (tmp_path / "o.jsonl").exists()


def test_sigterm_saves_a_checkpoint_and_says_how_to_resume(tmp_path):
    data = write_chat(tmp_path / "train.jsonl", 40)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "tuneforge.cli", "train", "--data", str(data), "--out", str(run),
           "--base", "tiny-llama", "--n-epochs", "20", "--batch-size", "2", "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=os.environ.copy())
    deadline = time.time() + 300
    while len(metrics_log.read(run)) < 3 and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM  # 143, as for any process a kill stops (Ctrl-C: 130)
    assert f"tuneforge train --resume {run}" in err
    state = json.loads((checkpoint_dirs(run)[-1] / "state.json").read_text())
    assert state["kind"] == "interrupt" and state["state"]["global_step"] >= 3


@pytest.mark.parametrize("folder_made", [False, True])
def test_a_kill_before_the_first_step_says_what_is_left_with_a_kill_s_status(tmp_path, chat_file, monkeypatch,
                                                                              folder_made):
    # while the base loads, the data is tokenised or DPO's reference is computed, the loop's own handler
    # is not yet there: the process ended with 130 and not a word, whatever signal stopped it
    from typer.testing import CliRunner

    from tuneforge.cli import app
    from tuneforge.train import loop

    def killed_while_loading(cfg, **kw):
        if folder_made:
            Path(cfg.out).mkdir()
            cfg.save(Path(cfg.out))
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the signal arrives first

    monkeypatch.setattr(loop, "train", killed_while_loading)
    before = signal.getsignal(signal.SIGTERM)
    try:
        result = CliRunner().invoke(app, ["train", "--data", str(chat_file), "--out", str(tmp_path / "run"),
                                          "--base", "tiny-llama", "--json"])
    finally:
        signal.signal(signal.SIGTERM, before)
    assert result.exit_code == 128 + signal.SIGTERM and result.stdout == ""
    said = f"Continue with: tuneforge train --resume {tmp_path / 'run'}" if folder_made else "nothing was written"
    assert said in result.stderr, result.stderr


def test_export_writes_a_loadable_merged_model(tmp_path, chat_file):
    tf("train", "--data", chat_file, "--out", tmp_path / "run", "--base", "tiny-llama", "--n-epochs", "1")
    tf("export", tmp_path / "run", "-o", tmp_path / "merged")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in n for n, _ in model.named_parameters())
    # the weights as trained (fp32), even where chat and the server load them in bf16
    saved = load_file(tmp_path / "merged" / "model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.float32}
    assert (Path(tmp_path / "merged") / "tokenizer.json").exists()


@pytest.mark.parametrize("args", [["--help"], ["data", "--help"], ["train", "--help"], ["eval", "--help"],
                                  ["chat", "--help"], ["export", "--help"], ["serve", "--help"]])
def test_every_command_has_help(args):
    assert "Usage" in tf(*args).stdout


def test_models_lists_the_catalogue_and_says_what_each_is():
    lines = tf("models").stdout.splitlines()
    tiny = next(line for line in lines if line.startswith("tiny-llama "))
    assert "random weights" in tiny
    assert "tiny-llama" in json.loads(tf("models", "--json").stdout)  # scripts get the names alone


def test_usage_summarises_served_requests():
    from tuneforge.monitor.usage import UsageRecord, record
    from tuneforge.store.database import StoredCompletionRow, session

    with session() as s:
        for status in (200, 200, 404, 499):  # (499: the client hung up, a Stop: no error, counted apart)
            record(s, UsageRecord("POST", "/v1/chat/completions", status, 10.0 * status / 100 if status < 499 else 6.0,
                                  project="p", model="ft:x", prompt_tokens=5, completion_tokens=7))
    out = json.loads(tf("usage", "--json").stdout)
    assert out["data"] == [{"project": "p", "model": "ft:x", "requests": 4, "prompt_tokens": 20,
                            "completion_tokens": 28, "errors": 1, "stopped_by_client": 1,
                            "mean_latency_ms": 21.6, "p95_latency_ms": 40.4}]  # (20 + 20 + 40.4 + 6) / 4
    mini = next(c for c in out["openai_cost"] if c["model"] == "gpt-4o-mini")
    assert mini["usd"] == pytest.approx((20 * 0.3 + 28 * 1.2) / 1e6)
    text = tf("usage").stdout
    assert "p95_latency_ms" in text and "gpt-4o-mini $0.0000" in text
    from tuneforge.monitor.stored import quality

    with session() as s:
        s.add(StoredCompletionRow(id="chatcmpl-q1", project="p", model="ft:x", messages=[], meta={"rating": "good"},
                                  completion={"choices": [{"finish_reason": "length"}]}))
        s.add(StoredCompletionRow(id="chatcmpl-q2", project="q", model="ft:y", messages=[], meta=None,
                                  completion={"choices": [{"finish_reason": "stop"}]}))
        s.commit()
        assert [q["model"] for q in quality(s)] == ["ft:x", "ft:y"]
    out = json.loads(tf("usage", "--project", "p", "--json").stdout)
    assert out["quality"] == [{"project": "p", "model": "ft:x", "kept": 1, "ratings": {"good": 1},
                               "cut_at_max_tokens": 1}]
    assert "Kept answers of ft:x (p): 1, 1 rated good, 1 cut at max tokens" in tf("usage").stdout
    from tuneforge.store.database import UsageRow, now

    with session() as s:  # a request from three days ago: in all time, not in the last day
        s.add(UsageRow(project="p", model="ft:x", method="POST", path="/v1/chat/completions", status=200,
                       latency_ms=1.0, created_at=now() - 3 * 86400))
        s.commit()
    assert json.loads(tf("usage", "--json").stdout)["data"][0]["requests"] == 5
    assert json.loads(tf("usage", "--json", "--days", "1").stdout)["data"][0]["requests"] == 4
    assert "--days" in tf("usage", "--days", "-1", check=False).stderr
    assert json.loads(tf("usage", "--json", "--model", "ft:x").stdout)["data"][0]["requests"] == 5
    only_other = json.loads(tf("usage", "--json", "--model", "ft:y").stdout)
    assert only_other["data"] == [] and all(c["usd"] == 0 for c in only_other["openai_cost"])


def test_data_stored_writes_kept_responses(tmp_path):
    from tests.serve.test_reports import keep_response

    keep_response("default", {"rating": "good"})
    keep_response("default", {"rating": "bad"}, answer="Five.")
    out = tmp_path / "next.jsonl"
    done = json.loads(tf("data", "stored", "-o", out, "--responses", "--metadata", "rating=good", "--json").stdout)
    assert done["n_examples"] == 1
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["messages"][0] == {"role": "system", "content": "Answer briefly."}
    assert row["messages"][-1] == {"role": "assistant", "content": "Four."}
    missing = tf("data", "stored", "-o", out, "--responses", "--metadata", "rating=none", check=False)
    assert missing.returncode == 2 and "no completed kept responses" in missing.stderr


def test_prune_deletes_old_kept_traffic_and_says_how_much():
    from tests.monitor.test_retention import counts, keep

    keep(60)
    keep(5)
    out = json.loads(tf("prune", "--days", "30", "--usage-days", "90", "--json").stdout)
    assert out == {"deleted": {"stored_completions": 1, "responses": 1, "usage": 0}}
    assert counts() == (1, 1, 2)
    assert tf("prune", "--days", "1").stdout.strip() == "1 stored completion deleted, 1 kept response deleted"
    bad = tf("prune", check=False)
    assert bad.returncode == 2 and bad.stderr.startswith("error: say what to delete")


def test_quiet_training_shows_no_progress_bar_not_even_while_converting_a_gguf_base(tmp_path, chat_file, monkeypatch):
    from tests.models.test_gguf import write_gguf
    from tuneforge.models.tiny import tiny_model

    monkeypatch.setenv("TUNEFORGE_HOME", str(tmp_path / "home"))  # no converted models: the first use converts
    base = tmp_path / "tiny.gguf"
    write_gguf(base, *tiny_model())
    proc = tf("train", "--data", chat_file, "--out", tmp_path / "run", "--base", base, "--n-epochs", "1", "--quiet")
    assert "Converting" not in proc.stderr and "%|" not in proc.stderr, proc.stderr


def test_prune_says_what_it_deleted_in_words():
    from tests.monitor.test_retention import keep

    keep(100)
    keep(100)
    assert tf("prune", "--usage-days", "30").stdout.strip() == "2 usage rows deleted"  # (was "2 usage deleted")
    keep(100)
    assert tf("prune", "--days", "30", "--usage-days", "30").stdout.strip() == \
        "3 stored completions deleted, 3 kept responses deleted, 1 usage row deleted"


def test_eval_mistakes_are_one_line_without_an_empty_progress_bar(tmp_path):
    held = write_chat(tmp_path / "held.jsonl", 4)
    (tmp_path / "notarun").mkdir()
    for args, says in [((tmp_path / "notarun", "--samples", "-2"), "samples must be at least 0, got -2"),
                       ((tmp_path / "notarun",), f"{tmp_path / 'notarun'}: not a tuneforge run folder (no config.json)")]:
        proc = tf("eval", *args, "--data", held, check=False)
        assert proc.returncode == 2 and proc.stderr.splitlines() == [f"error: {says}"], proc.stderr


def test_a_base_model_folder_given_relative_is_found_from_anywhere(tmp_path, chat_file):
    """--base ./folder was stored as typed: eval (and chat, export, import, --resume) from any other
    directory looked for the base there and failed ("./base: no such folder"), as --data once did."""
    from tuneforge.models.tiny import tiny_model

    model, tokenizer = tiny_model()
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    run = tmp_path / "run"
    tf("train", "--data", chat_file, "--out", run, "--base", "./base", "--n-epochs", "1", "--quiet", cwd=tmp_path)
    assert json.loads((run / "config.json").read_text())["base"] == str((tmp_path / "base").resolve())
    report = json.loads(tf("eval", run, "--data", write_chat(tmp_path / "held.jsonl", 4), "--samples", "0",
                           "--json").stdout)  # (from the tests' directory, not tmp_path)
    assert report["n_examples"] == 4


def test_eval_of_a_continued_run_compares_it_with_the_model_it_started_from(tmp_path, chat_file):
    """The table's first column is the earlier run's model (it was the bare base's), named above it; once
    the earlier run is gone, eval compares with the base and says so in one line, not a traceback."""
    import re
    import shutil

    first, second = tmp_path / "first", tmp_path / "second"
    tf("train", "--data", chat_file, "--out", first, "--base", "tiny-llama", "--n-epochs", "1", "--quiet")
    tf("train", "--data", chat_file, "--out", second, "--init-from", first, "--n-epochs", "1", "--quiet")
    held = write_chat(tmp_path / "held.jsonl", 4)
    out = tf("eval", second, "--data", held, "--samples", "1").stdout
    assert f"earlier: {first}, the model this run continued training from" in out
    assert re.search(r"^ +earlier +tuned$", out, re.MULTILINE) and re.search(r"^  earlier: ", out, re.MULTILINE), out
    report = json.loads(tf("eval", second, "--data", held, "--samples", "0", "--json").stdout)
    assert (report["before"], report["continued_from"]) == (str(first), str(first))
    shutil.rmtree(first)
    proc = tf("eval", second, "--data", held, "--samples", "0")
    assert "Traceback" not in proc.stderr
    assert [line for line in proc.stderr.splitlines() if "gone" in line] == [
        f"{first}: the weights this run continued training from are gone: comparing with the base model tiny-llama "
        "instead"], proc.stderr
    assert f"base: tiny-llama ({first}, the model this run continued training from, is gone)" in proc.stdout


def test_eval_refuses_what_it_cannot_score_and_its_json_is_valid(tmp_path, chat_file):
    from safetensors.torch import save_file

    from tuneforge.models.tiny import tiny_model

    run = tmp_path / "run"
    tf("train", "--data", chat_file, "--out", run, "--base", "tiny-llama", "--n-epochs", "1", "--quiet")
    long = tmp_path / "long.jsonl"  # the answer lies past max_length 1024: was scored as cross-entropy 0.000
    long.write_text(json.dumps({"messages": [{"role": "user", "content": "word " * 300},
                                             {"role": "assistant", "content": "A short answer here."}]}) + "\n")
    proc = tf("eval", run, "--data", long, "--samples", "0", check=False)
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1 and "line 1: example_too_long" in proc.stderr
    adapter = run / "adapter" / "adapter_model.safetensors"  # weights as a diverged training leaves them
    save_file({k: torch.full_like(v, float("nan")) for k, v in load_file(adapter).items()}, adapter,
              metadata={"format": "pt"})
    held = write_chat(tmp_path / "held.jsonl", 4)

    def no_nan(constant):
        raise AssertionError(f"{constant} in the JSON")

    report = json.loads(tf("eval", run, "--data", held, "--samples", "0", "--json").stdout, parse_constant=no_nan)
    assert report["tuned"]["loss"] is None and report["base"]["loss"] > 0
    model, tokenizer = tiny_model(hidden_size=32)  # a base the run's adapter does not fit
    model.save_pretrained(tmp_path / "narrow")
    tokenizer.save_pretrained(tmp_path / "narrow")
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps(config | {"base": str(tmp_path / "narrow")}))
    proc = tf("eval", run, "--data", held, check=False)
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"error: {run}: the run's weights do not fit its base model {tmp_path / 'narrow'}: "
                                  "size mismatch for ")
