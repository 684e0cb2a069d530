"""tuneforge's own endpoints, beside OpenAI's API: what the dashboard shows that OpenAI has no call for.

- `GET /v1/files/{file_id}/report?model=&max_length=&validation=` — the validation report of an uploaded
  training file (the same as `tuneforge data validate --json`): errors and warnings by line with
  their codes, token statistics counted with the chosen base model's tokenizer, the resolved epochs,
  the cost of the same job at OpenAI and the estimated local training time.
- `GET /v1/tuneforge/base_models` — the base models this server can fine-tune, with the methods.
- `GET /v1/tuneforge/models` — the project's fine-tuned models with their job, base and size on disk,
  and every checkpoint that can be chatted with.

They use the same keys and project scoping as the OpenAI routes, so scripts can call them too.
"""

from __future__ import annotations

import contextlib
import functools
import tempfile
import threading
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query, Request
from sqlalchemy import select

from ..data.render import MAX_LENGTH
from ..models.catalogue import DESCRIPTIONS, ModelNotFound, available
from ..store.database import CheckpointRow, FileRow, JobRow, ModelRow
from .deps import DB, Caller, SettingsDep
from .errors import APIError, bad_request, not_found
from .files import store_file
from .metadata import metadata_filter
from .models import checkpoint_base
from .protocol import FileObject

router = APIRouter(prefix="/v1", tags=["tuneforge"])

METHODS = ["lora", "full"]
_tokenizer_lock = threading.Lock()


@functools.lru_cache(maxsize=4)
def _tokenizer(base: str):
    from ..models.load import load_tokenizer

    return load_tokenizer(base)


def _tokenizer_for(base: str):
    with _tokenizer_lock:  # two first requests must not convert the same GGUF at once
        return _tokenizer(base)


def _dir_size(path: str | Path | None) -> int | None:
    if not path:
        return None
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    if not p.is_dir():
        return None
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


@contextlib.contextmanager
def _named_like(blob: Path, filename: str):
    """The validator tells formats by extension; a stored blob may have none (file-abc...). Give it
    the uploaded name's extension through a symlink in a temporary folder."""
    suffix = Path(filename).suffix.lower()
    if blob.suffix.lower() == suffix:
        yield blob
        return
    with tempfile.TemporaryDirectory(prefix="tuneforge-report-") as tmp:
        link = Path(tmp) / f"upload{suffix}"
        link.symlink_to(blob.resolve())
        yield link


@router.get("/files/{file_id}/report")
def file_report(
    file_id: str,
    db: DB,
    caller: Caller,
    model: Annotated[str | None, Query()] = None,
    max_length: Annotated[int, Query(ge=16, le=65536)] = MAX_LENGTH,  # what a job on this file would use
    method: Annotated[str, Query(pattern="^(lora|full)$")] = "lora",
    validation: Annotated[bool, Query()] = False,
):
    from ..data.validate import MIN_EXAMPLES, validate_file
    from ..train.speed import estimated_tokens_per_second

    row = db.scalar(select(FileRow).where(FileRow.id == file_id, FileRow.project == caller.project))
    if row is None:
        raise not_found("file", file_id, param="file_id")
    names = available()
    base = model or names[0]
    if base not in names:
        raise bad_request(f"Model {base!r} is not available here; choose one of {names}", param="model",
                          code="model_not_available")
    if not Path(row.path).is_file():
        raise APIError(404, f"The content of file {file_id} is no longer on disk.", param="file_id",
                       code="file_not_found")
    try:
        tokenizer = _tokenizer_for(base)
    except ModelNotFound as err:
        raise bad_request(str(err), param="model", code="model_not_available") from err
    with _named_like(Path(row.path), row.filename) as path:
        report = validate_file(path, tokenizer=tokenizer, max_length=max_length,  # (a validation file may be small)
                               tokens_per_second=estimated_tokens_per_second(base, method),
                               min_examples=1 if validation else MIN_EXAMPLES).to_dict()
        stored_name = path.name
    report["path"] = row.filename  # the server's disk layout is none of the caller's business
    converted = (f"-o {Path(stored_name).stem}.jsonl", f"-o {Path(row.filename).stem}.jsonl")  # a CSV's convert command
    for issue in report["errors"] + report["warnings"]:  # (messages that name the file name it as uploaded)
        issue["message"] = issue["message"].replace(stored_name, row.filename).replace(*converted)
    return {"object": "file.report", "file_id": row.id, "filename": row.filename, "model": base,
            "method": method, **report}


@router.get("/tuneforge/base_models")
def base_models(caller: Caller):
    return {"object": "list", "data": [{"id": name, "object": "model", "methods": METHODS,
                                        "description": DESCRIPTIONS[name]} for name in available()]}


@router.get("/tuneforge/models")
def tuned_models(db: DB, caller: Caller):
    models = db.scalars(select(ModelRow).where(ModelRow.project == caller.project).order_by(ModelRow.seq.desc())).all()
    ckpts = db.execute(
        select(CheckpointRow, JobRow.model, JobRow.status)
        .join(JobRow, JobRow.id == CheckpointRow.job_id)
        .where(JobRow.project == caller.project)
        .order_by(CheckpointRow.seq)
    ).all()
    by_job: dict[str, list[dict]] = {}
    checkpoints = []
    for c, base, status in ckpts:
        if not Path(c.path).is_dir():
            continue
        item = {"id": c.name, "object": "fine_tuning.job.checkpoint", "job_id": c.job_id,
                "base": checkpoint_base(base, c.path),
                "step_number": c.step, "created": int(c.created_at), "metrics": c.metrics or {},
                "size_bytes": _dir_size(c.path), "job_status": status}
        by_job.setdefault(c.job_id, []).append(item)
        checkpoints.append(item)
    data = [
        {"id": m.id, "object": "model", "created": int(m.created_at), "owned_by": m.owned_by, "base": m.base,
         "job_id": m.job_id, "size_bytes": _dir_size(m.path), "checkpoints": by_job.get(m.job_id, [])}
        for m in models
    ]
    return {"object": "list", "data": data, "checkpoints": checkpoints}


# --- monitoring: served traffic, and stored completions back into training data ---------------------


@router.get("/tuneforge/usage")
def usage(caller: Caller, db: DB, days: Annotated[float | None, Query(gt=0)] = None):
    """The caller's project's traffic over the last `days` (or all time): per model (monitor.usage:
    requests, tokens, errors, mean and p95 latency), per hour (up to 2 days) or day for a chart, what
    its tokens would have cost at OpenAI's prices for fine-tuned models, and the quality signals of
    the answers it kept (monitor.stored.quality: ratings, answers cut at max tokens)."""
    from ..monitor.stored import quality
    from ..monitor.usage import openai_cost, summary, timeline
    from ..store.database import now

    since = now() - days * 86400 if days else None
    rows = [{k: v for k, v in r.items() if k != "project"} for r in summary(caller.project, since=since)]
    bucket = 3600 if days and days <= 2 else 86400
    return {
        "object": "list", "data": rows, "bucket_seconds": bucket,
        "timeline": timeline(caller.project, since=since, bucket_seconds=bucket),
        "openai_cost": openai_cost(rows),
        "quality": [{k: v for k, v in q.items() if k != "project"} for q in quality(db, caller.project, since)],
    }


@router.post("/tuneforge/stored_completions/training_file", response_model=FileObject)
def stored_training_file(request: Request, caller: Caller, db: DB, settings: SettingsDep,
                         model: Annotated[str | None, Query()] = None):
    """The caller's stored chat completions (ended by themselves, of `model`, with every
    `metadata[k]=v` asked) as a chat JSONL file with purpose fine-tune: what `tuneforge data stored`
    writes, ready for a new job."""
    from ..monitor.stored import jsonl_bytes, training_examples, why_no_examples

    wanted = metadata_filter(request)
    examples = training_examples(db, caller.project, model, wanted)  # in this request's session
    if not examples:
        raise bad_request(why_no_examples(db, caller.project, model, wanted), param="metadata",
                          code="no_stored_completions")
    return store_file(db, caller, settings, "stored-completions.jsonl", jsonl_bytes(examples))


@router.post("/tuneforge/responses/training_file", response_model=FileObject)
def responses_training_file(request: Request, caller: Caller, db: DB, settings: SettingsDep,
                            model: Annotated[str | None, Query()] = None):
    """The caller's kept responses (completed ones, of `model`, with every `metadata[k]=v` asked) as
    a chat JSONL file with purpose fine-tune (`tuneforge data stored --responses`)."""
    from ..monitor.stored import jsonl_bytes, response_examples

    examples = response_examples(db, caller.project, model, metadata_filter(request))
    if not examples:
        raise bad_request("No kept response matches (completed, with the model and metadata asked)",
                          param="metadata", code="no_kept_responses")
    return store_file(db, caller, settings, "kept-responses.jsonl", jsonl_bytes(examples))
