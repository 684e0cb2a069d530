"""Every tuneforge command, each a thin call into the library.

stdout carries only the result (for `chat`, just the answer; with --json, one JSON document);
progress bars and messages go to stderr. A user mistake exits with status 2 and one clear line,
never a traceback.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

# transformers' own bars ("Loading weights" at every model load) say nothing a user of these commands
# needs, on the stderr that carries our progress and messages
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

app = typer.Typer(help="Fine-tune language models on your own machine.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
data_app = typer.Typer(help="Validate and convert training data.", no_args_is_help=True)
keys_app = typer.Typer(help="Manage API keys of the server.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(keys_app, name="keys")

JsonOpt = Annotated[bool, typer.Option("--json", help="Print a machine-readable JSON result.")]


def _say(msg: str) -> None:
    typer.echo(msg, err=True)


def _rank() -> int:
    """This process's rank under torchrun (0 otherwise): only rank 0 speaks for a run."""
    return int(os.environ.get("RANK", "0"))


def user_errors(fn):
    """Turn the library's errors about bad input into one line on stderr and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from sqlalchemy.exc import ArgumentError, OperationalError

        from .data.validate import DataError
        from .models.catalogue import ModelNotFound

        try:
            return fn(*args, **kwargs)
        except (DataError, ModelNotFound, OSError, ValueError, KeyError) as err:
            if _rank() == 0:  # under torchrun every process sees the same bad input: one says so
                _say(f"error: {err.args[0] if isinstance(err, KeyError) else err}")
            raise typer.Exit(2) from None
        except (ArgumentError, OperationalError) as err:  # a database URL that is malformed or unreachable
            _say(f"error: database: {str(err.orig if hasattr(err, 'orig') else err).splitlines()[0]}")
            raise typer.Exit(2) from None

    return wrapper


def _print_json(obj) -> None:
    typer.echo(json.dumps(obj, indent=2, default=str))


def _auto_or(kind, option: str):
    """Parse an option that is a number or the word 'auto'."""

    def parse(value: str):
        if value == "auto":
            return value
        try:
            return kind(value)
        except ValueError:
            what = "a whole number" if kind is int else "a number"
            raise ValueError(f"{option} must be {what} or auto, got {value!r}") from None

    return parse


def _existing_file(path: Path | None, option: str) -> Path | None:
    """An input file option's path made absolute (a run folder's config is read back from anywhere),
    after checking it is a file."""
    if path is None:
        return None
    if path.is_dir():
        raise ValueError(f"{option} {path} is a folder, not a file")
    if not path.exists():
        raise FileNotFoundError(f"{option} {path}: no such file")
    return path.resolve()


# ---------------------------------------------------------------- data


@data_app.command("validate")
@user_errors
def data_validate(
    file: Path,
    base: Annotated[str, typer.Option(help="Model whose tokenizer counts tokens.")] = "smollm2-135m-instruct",
    max_length: Annotated[int, typer.Option(help="Tokens per example before truncation.")] = 1024,
    json_out: JsonOpt = False,
):
    """Check a training file: errors by line, token statistics, epochs and cost."""
    from .data.validate import check_max_length, validate_file
    from .models.load import load_tokenizer

    _existing_file(file, "FILE")
    _as_options(check_max_length)(max_length=max_length)  # (train's refusal, before the tokenizer loads)
    report = validate_file(file, tokenizer=load_tokenizer(base), max_length=max_length,
                           tokens_per_second=_local_tokens_per_second())
    if json_out:
        _print_json(report.to_dict())
    else:
        typer.echo(report.format_text())
    raise typer.Exit(0 if report.ok else 1)


def _local_tokens_per_second() -> float:
    from .train.speed import estimated_tokens_per_second

    return estimated_tokens_per_second()


@data_app.command("stored")
@user_errors
def data_stored(
    out: Annotated[Path, typer.Option("-o", "--out", help="JSONL file to write.")],
    project: Annotated[str, typer.Option(help="Project whose stored completions to read.")] = "default",
    model: Annotated[str | None, typer.Option(help="Only completions of this model (e.g. an ft: name).")] = None,
    metadata: Annotated[list[str] | None, typer.Option(help="Only completions with this metadata: key=value.")] = None,
    responses: Annotated[bool, typer.Option("--responses", help="Read the kept Responses API answers instead.")] = False,
    database_url: Annotated[str | None, typer.Option(envvar="TUNEFORGE_DATABASE_URL")] = None,
    json_out: JsonOpt = False,
):
    """Write the server's stored chat completions (`store: true`), or with --responses its kept
    responses, as chat JSONL: training data again."""
    from .monitor.stored import response_examples, training_examples, why_no_examples, write_jsonl
    from .store.database import session

    wanted = {}
    for pair in metadata or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--metadata {pair!r}: expected key=value")
        wanted[key] = value
    with session(database_url) as s:
        examples = (response_examples if responses else training_examples)(s, project, model, wanted)
        if not examples and responses:
            raise ValueError(f"no completed kept responses match in project {project!r} (model={model}, metadata={wanted})")
        if not examples:
            raise ValueError(f"{why_no_examples(s, project, model, wanted)} (project {project!r})")
    write_jsonl(examples, out)
    if json_out:
        _print_json({"out": str(out), "n_examples": len(examples)})
    else:
        typer.echo(f"wrote {len(examples)} examples to {out}")


@data_app.command("convert")
@user_errors
def data_convert(
    file: Path,
    out: Annotated[Path, typer.Option("-o", "--out", help="JSONL file to write.")],
    prompt_col: Annotated[str | None, typer.Option(help="Column with the prompt.")] = None,
    completion_col: Annotated[str | None, typer.Option(help="Column with the answer.")] = None,
    text_col: Annotated[str | None, typer.Option(help="Classification: column with the text.")] = None,
    label_col: Annotated[str | None, typer.Option(help="Classification: column with the label.")] = None,
    chosen_col: Annotated[str | None, typer.Option(help="Preference pairs: column with the preferred answer.")] = None,
    rejected_col: Annotated[str | None, typer.Option(help="Preference pairs: column with the other answer.")] = None,
    system: Annotated[str | None, typer.Option(help="System message for every example.")] = None,
    json_out: JsonOpt = False,
):
    """Convert a CSV file into JSONL: prompt/completion, text/label or prompt/chosen/rejected columns."""
    from .data.convert import from_csv, write_jsonl

    source = _existing_file(file, "FILE")
    if source.suffix.lower() in (".jsonl", ".json"):  # read as a CSV, its first line was one "column" name
        raise ValueError(f"{file} is JSON, not a CSV: convert reads tables; check a JSONL training file with "
                         f"tuneforge data validate {file}")
    if out.resolve() == source:
        raise ValueError(f"-o {out} is the CSV file being converted: write the JSONL somewhere else")
    if out.is_dir():
        raise ValueError(f"-o {out} is a folder: name the JSONL file to write")
    rows = from_csv(file, prompt_col=prompt_col, completion_col=completion_col, text_col=text_col,
                    label_col=label_col, chosen_col=chosen_col, rejected_col=rejected_col, system=system)
    write_jsonl(rows, out)
    if json_out:
        _print_json({"out": str(out), "n_examples": len(rows)})
    else:
        typer.echo(f"wrote {len(rows)} example{'' if len(rows) == 1 else 's'} to {out}")


# ---------------------------------------------------------------- train


class _Progress:
    """A tqdm bar on stderr fed by the training loop's events."""

    def __init__(self, quiet: bool):
        self.bar = None
        self.quiet = quiet

    def __call__(self, event: dict) -> None:
        from tqdm import tqdm

        if event["type"] == "message":
            if self.bar:
                self.bar.write(event["message"], file=sys.stderr)
            else:
                _say(event["message"])
        elif event["type"] == "metrics":
            row = event["data"]
            if self.bar is None:
                self.bar = tqdm(total=row["total_steps"], initial=row["step"] - 1, file=sys.stderr,
                                unit="step", dynamic_ncols=True, disable=self.quiet)
            self.bar.update(1)
            post = {"loss": f"{row['train_loss']:.3f}", "tok/s": f"{row['tokens_per_second']:.0f}"}
            if "valid_loss" in row:
                post["valid"] = f"{row['valid_loss']:.3f}"
            self.bar.set_postfix(post)

    def close(self):
        if self.bar:
            self.bar.close()


_stopped_by = [signal.SIGINT]  # the signal that stopped training: the exit status is 128 + its number


def _sigterm_as_interrupt():
    """A kill (SIGTERM) stops training the way Ctrl-C does: checkpoint first, then exit - with 143 (a
    kill's status, as a shell reports it), where Ctrl-C exits with 130."""

    def handler(signum, frame):
        _stopped_by[0] = signal.SIGTERM
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def _given(ctx: typer.Context, names: set[str]) -> list[str]:
    """The options among `names` that the command line gave (not left at their defaults), as typed."""
    return [f"--{n.replace('_', '-')}" for n in ctx.params if n in names  # (typer's own click: by name)
            and getattr(ctx.get_parameter_source(n), "name", None) == "COMMANDLINE"]


@app.command()
@user_errors
def train(
    ctx: typer.Context,
    data: Annotated[Path | None, typer.Option(help="Training file (JSONL or .txt).")] = None,
    out: Annotated[Path | None, typer.Option(help="Run folder to create.")] = None,
    base: Annotated[str, typer.Option(help="Base model: catalogue name, HF folder or .gguf.")] = "smollm2-135m-instruct",
    method: Annotated[str, typer.Option(help="lora or full.")] = "lora",
    objective: Annotated[str, typer.Option(
        help="supervised, or dpo (preference pairs: raise the preferred answer over the other).")] = "supervised",
    dpo_beta: Annotated[float, typer.Option(help="DPO: how far the model may move from the base.")] = 0.1,
    validation_data: Annotated[Path | None, typer.Option(
        help="Validation file; default: hold out --validation-split of --data.")] = None,
    validation_split: Annotated[str, typer.Option(
        help="Fraction of --data held out for validation when no --validation-data is given (0 = train on all; "
             "auto: 0.1 when --data has 20 examples or more, else none).")] = "auto",
    n_epochs: Annotated[str, typer.Option(help="Epochs, or auto.")] = "auto",
    batch_size: Annotated[str, typer.Option(help="Examples per step, or auto.")] = "auto",
    learning_rate_multiplier: Annotated[str, typer.Option(help="Scales the base learning rate, or auto.")] = "auto",
    lora_rank: Annotated[int, typer.Option()] = 16,
    lora_alpha: Annotated[int, typer.Option()] = 32,
    lora_dropout: Annotated[float, typer.Option()] = 0.0,
    lora_targets: Annotated[str, typer.Option(help="Comma-separated names of the linear layers to adapt; "
                                              "default: all seven projections, q_proj ... down_proj.")] = "",
    max_length: Annotated[int, typer.Option(
        help="Tokens per example; longer ones are truncated (raw text: split into sequences of this many).")] = 1024,
    seed: Annotated[int, typer.Option()] = 42,
    early_stopping: Annotated[int, typer.Option(help="Stop after N validation passes without improvement (0 = off).")] = 0,
    precision: Annotated[str, typer.Option(help="auto, bf16 or fp32.")] = "auto",
    activation_checkpointing: Annotated[bool, typer.Option(
        help="Recompute each layer in the backward pass: a fraction of the activation memory, ~1/3 slower.")] = False,
    quantize: Annotated[str | None, typer.Option(
        help="nf4: keep the frozen base in 4 bits (QLoRA; needs bitsandbytes). LoRA only.")] = None,
    resume: Annotated[Path | None, typer.Option(help="Continue an interrupted run from its last checkpoint.")] = None,
    init_from: Annotated[Path | None, typer.Option(
        help="A finished run, or a checkpoint of a run (RUN/checkpoints/step-N), to go on training on new data "
             "(continued fine-tuning): its weights are the start, its base, method and LoRA shape this run's.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace the run already in --out.")] = False,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
    json_out: JsonOpt = False,
):
    """Fine-tune a base model; writes weights, metrics, checkpoints and a loss curve to --out."""
    if quiet:  # transformers' bars too (converting a GGUF base on first use): tqdm reads it on import
        os.environ["TQDM_DISABLE"] = "1"
    from .train.config import TrainConfig
    from .train.loop import RESULT_FILE, TrainingStopped
    from .train.loop import train as run_training

    if resume:
        # (any other setting given would be dropped unread: `--resume RUN --n-epochs 5` ran the old epochs)
        if given := _given(ctx, set(ctx.params) - {"resume", "quiet", "json_out"}):
            raise ValueError(f"--resume continues a run with the settings it started with: give it alone "
                             f"(not with {', '.join(given)})")
        cfg = TrainConfig.load(resume)
        if (resume / RESULT_FILE).is_file():
            raise ValueError(f"{resume} has finished training: nothing to resume (train again with --overwrite)")
        for name, path in (("training", cfg.data), ("validation", cfg.validation_data)):
            if path and not Path(path).is_file():  # (kept absolute in the run's config) moved or deleted since
                raise FileNotFoundError(f"{resume}: the run's {name} file {path} is gone: put it back there "
                                        "to continue the run (its examples are read again)")
    else:
        if data is None or out is None:
            raise ValueError("--data and --out are required (or --resume RUN)")
        if init_from and out.resolve() in (init_from.resolve(), *init_from.resolve().parents):
            # (--overwrite cleared the run once its weights were read: a crash before the first checkpoint
            # lost both runs, and the new config's init_from named itself, so --resume could not go on;
            # a checkpoint of --out went with it)
            raise ValueError(f"--init-from {init_from} is --out too, or inside it: write the continued run to "
                             "another folder")
        _check_out(out, overwrite)
        if init_from and (given := _given(ctx, {"base", "method", "lora_rank", "lora_alpha", "lora_targets", "quantize"})):
            raise ValueError(f"--init-from trains on with the base, method and LoRA shape of {init_from}: "
                             f"leave out {', '.join(given)}")
        targets = [t.strip() for t in lora_targets.split(",") if t.strip()]  # none: TrainConfig's default
        cfg = _as_options(TrainConfig)(
            data=str(_existing_file(data, "--data")), out=str(out.resolve()), base=_local_base(base), method=method,
            objective=objective, dpo_beta=dpo_beta,
            validation_data=str(v) if (v := _existing_file(validation_data, "--validation-data")) else None,
            validation_split=_auto_or(float, "--validation-split")(validation_split),
            n_epochs=_auto_or(int, "--n-epochs")(n_epochs), batch_size=_auto_or(int, "--batch-size")(batch_size),
            learning_rate_multiplier=_auto_or(float, "--learning-rate-multiplier")(learning_rate_multiplier),
            lora_rank=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
            **({"lora_targets": targets} if targets else {}),
            max_length=max_length, seed=seed, early_stopping_patience=early_stopping,
            precision=precision, activation_checkpointing=activation_checkpointing, quantize=quantize,
            init_from=str(init_from.resolve()) if init_from else None,
        )
    _sigterm_as_interrupt()
    progress = _Progress(quiet)
    try:
        result = run_training(cfg, on_event=progress, resume=resume is not None)
    except TrainingStopped as stop:
        progress.close()
        if _rank() == 0:
            _say(f"stopped: {stop}. Continue with: tuneforge train --resume {cfg.out}")
        raise typer.Exit(128 + _stopped_by[0]) from None
    except KeyboardInterrupt:  # before the steps (loading, tokenising, baseline) or after the last one:
        progress.close()  # the loop saves nothing then, but the user is told what is left, by the same status
        if _rank() == 0:
            from .train.config import CONFIG_FILE

            started = (Path(cfg.out) / CONFIG_FILE).is_file()
            _say(f"stopped: interrupted. Continue with: tuneforge train --resume {cfg.out}" if started else
                 "stopped: interrupted before the run folder was made; nothing was written")
        raise typer.Exit(128 + _stopped_by[0]) from None
    progress.close()
    if _rank() != 0:
        return  # under torchrun, rank 0 speaks for the run
    if json_out:
        _print_json(asdict(result))
    else:
        final = result.final
        valid = f", valid loss {final['valid_loss']:.3f}" if "valid_loss" in final else ""
        if "valid_reward_accuracy" in final:  # DPO
            valid += f", preferred answer ranked first on {final['valid_reward_accuracy']:.0%} of validation pairs"
        typer.echo(f"{result.run_dir}: {result.steps} steps, {result.trained_tokens} tokens, "
                   f"train loss {final.get('train_loss', float('nan')):.3f}{valid}")


def _local_base(base: str) -> str:
    """A base model given as a folder or .gguf file, made absolute as --data is: eval, chat, export,
    import and --resume read it back from the run's config, from any directory. A name stays a name."""
    from .models.catalogue import EMBEDDED, TINY

    path = Path(base).expanduser()
    return base if base in (EMBEDDED, TINY) or not path.exists() else str(path.resolve())


# TrainConfig's fields whose --option is not the field's own name
_OPTION_OF = {"early_stopping_patience": "--early-stopping"}


def _as_options(make):
    """`make` (TrainConfig) with its errors naming the --options typed, not the config's fields:
    "n_epochs must be at least 1" is said as "--n-epochs must be at least 1"."""

    def build(**kwargs):
        try:
            return make(**kwargs)
        except ValueError as err:
            field, _, rest = str(err).partition(" ")
            if field in kwargs or field in _OPTION_OF:
                raise ValueError(f"{_OPTION_OF.get(field, '--' + field.replace('_', '-'))} {rest}") from None
            raise

    return build


def _check_out(out: Path, overwrite: bool) -> None:
    """--out must be a new or empty folder, or hold a run that --overwrite replaces: a trained run is
    not lost to a typo, and an interrupted one is pointed at --resume."""
    from .train.config import CONFIG_FILE
    from .train.loop import RESULT_FILE

    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    _check_writable(out)
    if overwrite or not out.is_dir() or not any(out.iterdir()) or _rank() != 0:
        return  # (under torchrun rank 0 alone checks: the others may see the folder it is filling)
    if (out / RESULT_FILE).is_file():
        raise ValueError(f"--out {out} already holds a trained run: choose another folder, or --overwrite to replace it")
    if (out / CONFIG_FILE).is_file():
        raise ValueError(f"--out {out} holds an unfinished run: continue it with --resume {out}, "
                         "or --overwrite to start again")
    raise ValueError(f"--out {out} is a folder with other files in it: choose a new or empty folder")


def _check_writable(out: Path) -> None:
    """Before any model loads: a run folder that cannot be made or written to is said now, naming
    --out, not as an OS error after a base model's load (or, for a file in the way, a bare errno)."""
    import errno
    import tempfile

    existing = out.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"--out {out}: {existing} is a file, so no folder can be made under it")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:  # read-only file system, no permission, an immutable folder...
        why = "a read-only file system" if err.errno == errno.EROFS else (err.strerror or str(err)).lower()
        raise ValueError(f"--out {out}: cannot write in {existing} ({why})") from None


# ---------------------------------------------------------------- evaluate, chat, export


@app.command("eval")
@user_errors
def evaluate(
    run: Path,
    data: Annotated[Path, typer.Option(help="Held-out examples (JSONL).")],
    samples: Annotated[int, typer.Option(help="Answers to show side by side.")] = 3,
    json_out: JsonOpt = False,
):
    """Compare the tuned model with the model before training (the base, or for a continued run the
    earlier run's) on held-out data."""
    from tqdm import tqdm

    from .evaluate.compare import compare
    from .evaluate.report import format_comparison, json_safe

    bar = None  # made once compare has loaded the models: a run or data it refuses shows no empty bar

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, file=sys.stderr, desc="evaluating base and tuned", unit="step")
        bar.update(done - bar.n)

    try:
        report = compare(run, _existing_file(data, "--data"), n_samples=samples, on_progress=progress)
    finally:
        if bar is not None:
            bar.close()
    if json_out:
        _print_json(json_safe(report))  # (a diverged model's NaN loss as null: JSON has no NaN)
    else:
        typer.echo(format_comparison(report))


@app.command()
@user_errors
def chat(
    model: Annotated[str, typer.Argument(help="Run folder, or a base model name.")],
    prompt: Annotated[str | None, typer.Argument(help="Message; omit for an interactive chat.")] = None,
    system: Annotated[str | None, typer.Option(help="System message.")] = None,
    max_tokens: Annotated[int, typer.Option()] = 256,
    temperature: Annotated[float, typer.Option()] = 0.0,
    seed: Annotated[int | None, typer.Option()] = None,
    json_out: JsonOpt = False,
):
    """Ask a tuned (or base) model; prints just the answer."""
    from .models.generate import Delta, Sampling, TorchThread, complete, stream
    from .models.load import load_any

    if json_out and prompt is None:
        raise ValueError("--json needs a PROMPT: the interactive chat prints text as it comes")
    sampling = Sampling(max_tokens=max_tokens, temperature=temperature, seed=seed)  # (checked before loading)
    torch_thread = TorchThread()  # the model is loaded and run on the thread that streams (see there)
    llm, tokenizer = torch_thread.run(load_any, model)
    history = [{"role": "system", "content": system}] if system else []
    if prompt is not None:
        answer = torch_thread.run(complete, llm, tokenizer, history + [{"role": "user", "content": prompt}], sampling)
        if json_out:
            _print_json(asdict(answer))
        else:
            typer.echo(answer.text)
        return
    _say("interactive chat; an empty line or Ctrl-D ends it")
    while True:
        try:
            sys.stderr.write("> ")  # the prompt is not part of the answers on stdout
            sys.stderr.flush()
            line = input()
        except (EOFError, KeyboardInterrupt):
            break
        if not line.strip():
            break
        history.append({"role": "user", "content": line})
        parts = []
        for piece in stream(llm, tokenizer, history, sampling, start=torch_thread.submit):
            if isinstance(piece, Delta):
                parts.append(piece.text)
                typer.echo(piece.text, nl=False)
        typer.echo()
        history.append({"role": "assistant", "content": "".join(parts)})


@app.command()
@user_errors
def export(
    run: Path,
    out: Annotated[Path, typer.Option("-o", "--out", help="Folder for the merged model.")],
    json_out: JsonOpt = False,
):
    """Write merged full weights of a run in Hugging Face format."""
    import torch

    from .models.adapters import merged
    from .models.load import load_tuned

    if out.exists() and not out.is_dir():
        raise ValueError(f"-o {out} is a file: name a folder for the merged model")
    model, tokenizer = load_tuned(run, dtype=torch.float32)  # the weights as trained, not as served
    full = merged(model)
    full.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if json_out:
        _print_json({"out": str(out)})
    else:
        typer.echo(f"merged model written to {out}")


@app.command("import")
@user_errors
def import_run_cmd(
    run: Path,
    project: Annotated[str, typer.Option(help="Project whose API keys may use the model.")] = "default",
    suffix: Annotated[str | None, typer.Option(help="Part of the ft: name.")] = None,
    database_url: Annotated[str | None, typer.Option(envvar="TUNEFORGE_DATABASE_URL")] = None,
    json_out: JsonOpt = False,
):
    """Register a run folder with the server; prints the new ft: model name alone on stdout."""
    from .jobs.imports import import_run

    name = import_run(run, project, suffix, database_url)
    if json_out:
        _print_json({"id": name, "object": "model", "project": project, "run": str(run.resolve())})
    else:
        typer.echo(name)


@app.command("models")
def list_models(json_out: JsonOpt = False):
    """Base models available on this machine."""
    from .models.catalogue import DESCRIPTIONS, available

    names = available()
    if json_out:
        _print_json(names)
    else:
        width = max(map(len, names))
        typer.echo("\n".join(f"{n:<{width}}  {DESCRIPTIONS[n]}" for n in names))


# ---------------------------------------------------------------- server


@app.command()
def serve(
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8000,
    workers: Annotated[int, typer.Option(help="Training worker processes to start.")] = 1,
    database_url: Annotated[str | None, typer.Option(envvar="TUNEFORGE_DATABASE_URL",
                                                        help="Default: SQLite under the tuneforge home.")] = None,
):
    """Run the OpenAI-compatible API server (files, fine-tuning jobs, models, chat)."""
    from .serve.app import serve as run_server

    run_server(host, port, workers, database_url)


@app.command()
def worker(
    database_url: Annotated[str | None, typer.Option(envvar="TUNEFORGE_DATABASE_URL")] = None,
):
    """Run one training worker against the server's database."""
    from .jobs.worker import run_worker

    run_worker(database_url)


@app.command()
@user_errors
def usage(
    project: Annotated[str | None, typer.Option(help="Only this project.")] = None,
    model: Annotated[str | None, typer.Option(help="Only this model (a base or an ft: name).")] = None,
    days: Annotated[float | None, typer.Option(min=0.001, help="Only the last N days (default: all time).")] = None,
    database_url: Annotated[str | None, typer.Option(envvar="TUNEFORGE_DATABASE_URL")] = None,
    json_out: JsonOpt = False,
):
    """Served traffic per project and model: requests, tokens, errors, mean and p95 latency, and what
    the same tokens would have cost at OpenAI's prices for fine-tuned models; then the answers kept
    (store: true): how they were rated, how many were cut at max tokens."""
    from .monitor.stored import quality
    from .monitor.usage import openai_cost, summary
    from .store.database import now, session

    since = now() - days * 86400 if days else None
    rows = summary(project, since=since, database_url=database_url)
    rows = [r for r in rows if model is None or r["model"] == model]  # (one row per project and model)
    costs = openai_cost(rows)
    with session(database_url) as s:
        kept = [q for q in quality(s, project, since) if model is None or q["model"] == model]
    if json_out:
        _print_json({"data": rows, "openai_cost": costs, "quality": kept})
        return
    cols = ("project", "model", "requests", "prompt_tokens", "completion_tokens", "errors", "stopped_by_client",
            "mean_latency_ms", "p95_latency_ms")
    typer.echo("\t".join(cols))
    for r in rows:  # (a request without a model - listing files, say - shows as "-")
        typer.echo("\t".join("-" if r[c] is None else str(r[c]) for c in cols))
    typer.echo("The same tokens at OpenAI's fine-tuned model prices: "
               + ", ".join(f"{c['model']} ${c['usd']:.4f}" for c in costs))
    for q in kept:  # the answers kept with store: true, and what reviewers said of them
        rated = "".join(f", {n} rated {r}" for r, n in q["ratings"].items())
        typer.echo(f"Kept answers of {q['model']} ({q['project']}): {q['kept']}{rated}, "
                   f"{q['cut_at_max_tokens']} cut at max tokens")


# what `prune` deleted, as its report says it (singular, plural), by monitor.retention's table names
_PRUNED = {"stored_completions": ("stored completion", "stored completions"),
           "responses": ("kept response", "kept responses"), "usage": ("usage row", "usage rows")}


@app.command()
@user_errors
def prune(
    days: Annotated[float | None, typer.Option(
        help="Delete stored completions and kept responses older than this many days.")] = None,
    usage_days: Annotated[float | None, typer.Option(help="Delete usage rows older than this many days.")] = None,
    database_url: Annotated[str | None, typer.Option(envvar="TUNEFORGE_DATABASE_URL")] = None,
    json_out: JsonOpt = False,
):
    """Delete served traffic the server kept, once it is old enough (all projects). The server does the
    same hourly when TUNEFORGE_RETENTION_DAYS / TUNEFORGE_USAGE_RETENTION_DAYS are set."""
    from .monitor.retention import prune as prune_rows
    from .store.database import session

    if days is None and usage_days is None:
        raise ValueError("say what to delete: --days N (stored completions, kept responses), --usage-days N, or both")
    with session(database_url) as s:
        gone = prune_rows(s, days=days, usage_days=usage_days)
    if json_out:
        _print_json({"deleted": gone})
    else:
        typer.echo(", ".join(f"{n} {_PRUNED[name][n != 1]} deleted" for name, n in gone.items()))


@keys_app.command("create")
@user_errors
def keys_create(
    project: Annotated[str, typer.Option(help="Project the key belongs to.")] = "default",
    name: Annotated[str | None, typer.Option()] = None,
    json_out: JsonOpt = False,
):
    """Create an API key; prints the key alone on stdout (it is not shown again)."""
    from .store.keys import create_key

    key = create_key(project, name)
    if json_out:
        _print_json({"key": key, "project": project, "name": name})
    else:
        typer.echo(key)


@keys_app.command("list")
@user_errors
def keys_list(json_out: JsonOpt = False):
    """List API keys (never the secrets)."""
    from .store.keys import list_keys

    keys = list_keys()
    if json_out:
        _print_json(keys)
    elif not keys:
        _say("no API keys yet: tuneforge keys create --project NAME")
    else:
        for k in keys:
            typer.echo("\t".join(str(k.get(f, "")) for f in ("id", "project", "name", "created_at", "revoked")))


@keys_app.command("revoke")
@user_errors
def keys_revoke(key_id: str, json_out: JsonOpt = False):
    """Revoke an API key by id."""
    from .store.keys import revoke_key

    revoke_key(key_id)
    if json_out:
        _print_json({"id": key_id, "revoked": True})
    else:
        typer.echo(f"revoked {key_id}")


if __name__ == "__main__":
    app()
