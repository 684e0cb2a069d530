"""Check a training file before any GPU time is spent on it, and explain every problem.

Codes follow OpenAI's data-prep cookbook names where one exists; each issue carries the 1-based line
and the field (e.g. messages[1].role) so the user can go straight to it.

Errors (the file is refused):
  invalid_json, data_type, missing_messages_list, message_missing_key, message_unrecognized_key,
  unrecognized_role, missing_content, invalid_weight, example_missing_assistant_message,
  unrecognized_key (a key that changes what is taught: label, weight, functions),
  invalid_encoding, empty_file, unsupported_format            - per record / file, from formats.py
  invalid_n_examples   fewer than 10 examples (OpenAI's minimum); for raw text, fewer than 10 training
                       sequences: a document longer than max_length is split into windows of
                       max_length tokens, each a sequence, so this is only counted with a tokenizer
  no_loss_tokens       every example's assistant messages have weight 0: nothing to learn
  example_too_long     truncation to max_length removes every token the loss is taken on, so the
                       example would train nothing; a longer example that keeps some answer is only
                       truncated (warning); raw text is split into windows, never cut. OpenAI's
                       65,536-token cap is not used: max_length is the limit that matters to a local
                       run.
  unrenderable_example the model's chat template rejects the conversation (some templates insist
                       on alternating user/assistant turns)
Warnings (training proceeds):
  example_truncated, duplicate_example (names both lines), missing_system_message (only when
  some examples have one and others do not), missing_user_message, no_loss_tokens (some examples
  learn nothing: all their answers have weight 0; training leaves them out), identical_answers
  (preference pairs whose two answers are the same: DPO learns nothing from them) and
  unrecognized_key (a key no format reads) - one warning each per file, at the first such line,
  naming the others.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .example import Example
from .formats import Issue, parse_file
from .render import IGNORE, MAX_LENGTH, Rendered, render_example, render_preference
from .stats import TokenStats, estimate_costs, estimate_local_seconds, resolve_n_epochs

__all__ = ["DataError", "Issue", "Report", "load_examples", "validate_file"]

log = logging.getLogger(__name__)

MIN_EXAMPLES = 10
MIN_LENGTH = 16  # the fewest tokens per example a run trains with (train.config), and so a file is checked at
SHOWN = 20  # issues listed per section in the text report; the JSON has them all


@dataclass
class Report:
    path: str
    format: str
    n_examples: int  # records in the file, good or bad (what OpenAI's minimum counts)
    # what training reads, when counted: n_examples, with a raw text's windows in place of the text
    n_sequences: int | None = None
    errors: list[Issue] = field(default_factory=list)
    warnings: list[Issue] = field(default_factory=list)
    max_length: int = MAX_LENGTH
    stats: TokenStats | None = None  # only when a tokenizer was given; of the good examples only
    n_epochs: int | None = None
    billing_tokens: int | None = None
    costs: list[dict[str, Any]] = field(default_factory=list)
    tokens_per_second: float | None = None
    estimated_local_seconds: float | None = None
    # preference pairs: the tokens DPO trains on an epoch (prompt + each answer, both sequences)
    dpo_tokens: int | None = None
    estimated_local_seconds_dpo: float | None = None

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "format": self.format,
            "ok": self.ok,
            "n_examples": self.n_examples,
            "n_sequences": self.n_sequences,
            "errors": [i.to_dict() for i in self.errors],
            "warnings": [i.to_dict() for i in self.warnings],
            "max_length": self.max_length,
            "stats": self.stats.to_dict() if self.stats else None,
            "n_epochs": self.n_epochs,
            "billing_tokens": self.billing_tokens,
            "costs": self.costs,
            "tokens_per_second": self.tokens_per_second,
            "estimated_local_seconds": self.estimated_local_seconds,
            "dpo_tokens": self.dpo_tokens,
            "estimated_local_seconds_dpo": self.estimated_local_seconds_dpo,
        }

    def format_text(self) -> str:
        lines = [f"{self.path}: {self.format}, {_counted(self)}"]
        lines += _issue_section("Errors", self.errors) + _issue_section("Warnings", self.warnings)
        lines += _stats_lines(self)
        lines.append("OK" if self.ok else f"FAILED: {len(self.errors)} error(s)")
        return "\n".join(lines)


class DataError(ValueError):
    """A training file with errors; `.report` holds all of them."""

    def __init__(self, report: Report):
        self.report = report
        shown = "; ".join(str(i) for i in report.errors[:5])
        more = f"; and {len(report.errors) - 5} more" if len(report.errors) > 5 else ""
        said = f"{report.path}: {len(report.errors)} error(s): {shown}{more}"
        # the report adds nothing to a whole-file problem (a format it cannot read, an empty file)
        whole_file = all(i.line is None for i in report.errors)
        super().__init__(said + ("" if said.endswith(".") else ".") + (
            "" if whole_file else f" Run `tuneforge data validate {report.path}` for the full report."))


def validate_file(
    path: str | Path, tokenizer=None, max_length: int = MAX_LENGTH, tokens_per_second: float | None = None,
    min_examples: int = MIN_EXAMPLES,
) -> Report:
    """`min_examples`: OpenAI's minimum for a training file; a validation or held-out file passes 1."""
    return _validate(path, tokenizer, max_length, tokens_per_second, min_examples)[0]


def load_examples(path: str | Path, tokenizer=None, max_length: int = MAX_LENGTH,
                  min_examples: int = MIN_EXAMPLES) -> list[Example]:
    """The examples of a file that passes validation; DataError otherwise (trainer and server use this)."""
    report, examples = _validate(path, tokenizer, max_length, None, min_examples)
    if not report.ok:
        raise DataError(report)
    if report.warnings:
        log.warning("%s: %d warning(s), first: %s", report.path, len(report.warnings), report.warnings[0])
    return examples


def check_max_length(max_length) -> None:
    """ValueError, in train's words (train.config), for a max_length a run refuses: a file checked at
    it would be reported on for training that cannot happen."""
    if isinstance(max_length, bool) or not isinstance(max_length, int):
        raise ValueError(f"max_length must be a whole number of tokens, got {max_length!r}")
    if max_length < MIN_LENGTH:
        raise ValueError(f"max_length must be at least {MIN_LENGTH}, got {max_length}")


def _validate(path, tokenizer, max_length, tokens_per_second, min_examples) -> tuple[Report, list[Example]]:
    check_max_length(max_length)
    parsed = parse_file(path)
    examples = parsed.examples
    issues = parsed.issues + _duplicate_issues(examples) + _missing_role_issues(examples)
    issues += _no_loss_issues(examples) + _identical_answer_issues(examples)
    report = Report(str(path), parsed.format, parsed.n_records, max_length=max_length)
    texts = any(e.kind == "text" for e in examples)
    stats = None
    if tokenizer is not None and examples:
        examples, rendered, found = _render_all(examples, tokenizer, max_length)
        issues += found
        stats = TokenStats.from_rendered(examples, rendered, max_length)
    report.n_sequences = _n_sequences(parsed.n_records, stats, texts)
    if report.n_sequences is not None:
        issues += _count_issues(report, parsed.issues, min_examples)
    if n := report.n_sequences or parsed.n_records:
        report.n_epochs = resolve_n_epochs(n)
    if stats is not None:
        _add_token_numbers(report, stats, tokens_per_second)
        _add_dpo_numbers(report, [e for e in examples if e.kind == "preference"], tokenizer, max_length)
    issues.sort(key=lambda i: (i.line is not None, i.line or 0))  # whole-file problems first
    report.errors = [i for i in issues if i.severity == "error"]
    report.warnings = [i for i in issues if i.severity == "warning"]
    return report, examples


def _n_sequences(n_records: int, stats: TokenStats | None, texts: bool) -> int | None:
    """The sequences training reads: a record each (a bad one counts, as OpenAI counts it), but a raw
    text's windows in its place. Unknown (None) for text until a tokenizer has counted the windows:
    the trainer checks the file before its model (and tokenizer) loads, and must not refuse a few
    long documents then."""
    if stats is None:
        return None if texts else n_records
    return n_records - stats.n_tokenized + stats.n_sequences


def _count_issues(report: Report, issues: list[Issue], min_examples: int) -> list[Issue]:
    n = report.n_sequences
    if n >= min_examples or any(i.line is None and i.severity == "error" for i in issues):  # (unreadable: said)
        return []
    what = "examples" if n == report.n_examples else "training sequences"
    msg = f"Training file has {_counted(report)}, but must have at least {min_examples} {what}"
    return [Issue("invalid_n_examples", msg)]


def _counted(report: Report) -> str:
    """The file's size as its user counts it: examples, or documents and the sequences they make."""
    if report.n_sequences is None or report.n_sequences == report.n_examples:
        return f"{report.n_examples} example(s)"
    return (f"{report.n_examples} document(s), {report.n_sequences} training sequence(s) of up to "
            f"{report.max_length} tokens")


def _duplicate_issues(examples: list[Example]) -> list[Issue]:
    first_seen: dict[str, int | None] = {}
    issues = []
    for ex in examples:
        key = json.dumps([ex.kind, ex.messages, ex.tools, ex.text, ex.chosen, ex.rejected], sort_keys=True)
        if key in first_seen:
            msg = f"same example as line {first_seen[key]}; duplicates get extra weight in training"
            issues.append(Issue("duplicate_example", msg, ex.line, severity="warning"))
        else:
            first_seen[key] = ex.line
    return issues


def _missing_role_issues(examples: list[Example]) -> list[Issue]:
    # One warning per file, not per example. A system message is only flagged when other examples
    # have one: a file with none trains and serves consistently with the template's default, and
    # prompt/completion or ###Human files cannot carry one at all.
    chats = [e for e in examples if e.kind != "text"]
    issues = []
    for role, why in (
        ("system", "the model sees two prompt styles; add one to every example or to none"),
        ("user", "the model learns to answer without being asked"),
    ):
        lacking = [e.line for e in chats if not any(m.get("role") == role for m in e.messages)]
        if lacking and (role == "user" or len(lacking) < len(chats)):
            listed = ", ".join(map(str, lacking[:5])) + (", ..." if len(lacking) > 5 else "")
            msg = f"{len(lacking)} of {len(chats)} example(s) have no {role} message (line {listed}); {why}"
            issues.append(Issue(f"missing_{role}_message", msg, lacking[0], severity="warning"))
    return issues


def _lines(lines: list[int | None]) -> str:
    return ", ".join(map(str, lines[:5])) + (", ..." if len(lines) > 5 else "")


def _no_loss_issues(examples: list[Example]) -> list[Issue]:
    """Chats whose every answer has weight 0 teach nothing (training leaves them out): said once per
    file, and an error when no example is left to learn from."""
    silent = [e.line for e in examples
              if e.kind == "chat" and all(m.get("weight", 1) == 0 for m in e.assistant_messages())]
    if not silent:
        return []
    if len(silent) == len(examples):
        return [Issue("no_loss_tokens", "every example's assistant messages have weight 0: nothing to learn from",
                      silent[0], "weight")]
    msg = (f"{len(silent)} of {len(examples)} example(s) have weight 0 on every assistant message (line "
           f"{_lines(silent)}): they teach nothing and training leaves them out")
    return [Issue("no_loss_tokens", msg, silent[0], "weight", severity="warning")]


def _identical_answer_issues(examples: list[Example]) -> list[Issue]:
    same = [e.line for e in examples if e.kind == "preference" and e.chosen == e.rejected]
    if not same:
        return []
    msg = (f"{len(same)} preference pair(s) have the same preferred and non-preferred answer (line "
           f"{_lines(same)}): DPO learns nothing from them")
    return [Issue("identical_answers", msg, same[0], "non_preferred_output", severity="warning")]


def _render_all(examples, tokenizer, max_length) -> tuple[list[Example], list[Rendered], list[Issue]]:
    kept, rendered, issues = [], [], []
    for ex in examples:
        try:
            r = render_example(ex, tokenizer)
        except Exception as err:  # chat templates raise their own (jinja) errors on shapes they reject
            msg = f"the model's chat template cannot render this example: {err}"
            issues.append(Issue("unrenderable_example", msg, ex.line))
            continue
        kept.append(ex)
        rendered.append(r)
        issues += _length_issues(ex, r, max_length)
    return kept, rendered, issues


def _length_issues(ex: Example, r: Rendered, max_length: int) -> list[Issue]:
    n = len(r.input_ids)
    if n <= max_length or ex.kind == "text":  # a long text is split into windows, none of it cut
        return []
    if r.n_loss_tokens and all(x == IGNORE for x in r.labels[:max_length]):
        msg = f"{n} tokens; cutting to max_length {max_length} removes every answer token, so it trains nothing"
        return [Issue("example_too_long", msg, ex.line)]
    msg = f"{n} tokens; the last {n - max_length} are cut to fit max_length {max_length}"
    return [Issue("example_truncated", msg, ex.line, severity="warning")]


def _add_token_numbers(report: Report, stats: TokenStats, tokens_per_second: float | None) -> None:
    report.stats = stats
    report.billing_tokens = stats.billing_tokens
    report.tokens_per_second = tokens_per_second
    if report.n_epochs:
        report.costs = estimate_costs(stats.billing_tokens, report.n_epochs)
        report.estimated_local_seconds = estimate_local_seconds(
            stats.trained_tokens * report.n_epochs, tokens_per_second
        )


def _add_dpo_numbers(report: Report, pairs: list[Example], tokenizer, max_length: int) -> None:
    """The statistics above count a preference pair as its prompt and preferred answer (what
    supervised training reads); DPO reads both answers, so its tokens and time are given beside."""
    if not pairs:
        return
    report.dpo_tokens = sum(
        len(r.input_ids) for e in pairs for r in render_preference(e, tokenizer, max_length)
    )
    if report.n_epochs:
        report.estimated_local_seconds_dpo = estimate_local_seconds(
            report.dpo_tokens * report.n_epochs, report.tokens_per_second
        )


# --- text report ------------------------------------------------------------------------------------


def _issue_section(title: str, issues: list[Issue]) -> list[str]:
    if not issues:
        return []
    lines = [f"{title} ({len(issues)}):"] + [f"  {i}" for i in issues[:SHOWN]]
    if len(issues) > SHOWN:
        lines.append(f"  ... and {len(issues) - SHOWN} more (--json lists them all)")
    return lines


def _dist(d: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:,.0f}" if v == int(v) else f"{k} {v:,.1f}" for k, v in d.items())


def _stats_lines(report: Report) -> list[str]:
    lines = []
    s = report.stats
    if s:
        lines += [
            f"Messages per example: {_dist(s.messages_per_example)}",
            f"Tokens per example: {_dist(s.tokens_per_example)}",
            f"Answer (loss) tokens per example: {_dist(s.loss_tokens_per_example)}",
            f"Examples over max_length {report.max_length}: {s.n_truncated}",
        ]
    if report.n_epochs:
        n = report.n_sequences or report.n_examples
        lines.append(f"Default epochs (OpenAI's rule for {n} examples): {report.n_epochs}")
    if report.billing_tokens is not None:
        lines.append(
            f"Billing tokens: {report.billing_tokens:,} per epoch, {report.billing_tokens * (report.n_epochs or 0):,}"
            " in all (counted with this model's tokenizer; OpenAI's differs)"
        )
    lines += [f"  {c['model']}: about {_usd(c['usd'])} (price as of {c['as_of']})" for c in report.costs]
    if report.estimated_local_seconds is not None:
        lines.append(
            f"Estimated local training time: {_duration(report.estimated_local_seconds)} "
            f"at {report.tokens_per_second:,.0f} tokens/s"
        )
    if report.dpo_tokens is not None:
        when = report.estimated_local_seconds_dpo
        lines.append(f"As DPO (both answers of each pair): {report.dpo_tokens:,} tokens per epoch"
                     + (f", about {_duration(when)} here" if when is not None else ""))
    return lines


def _usd(amount: float) -> str:
    return f"${amount:,.2f}" if amount >= 0.01 else f"${amount:.4f}"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes}m" if hours else f"{minutes}m {secs}s" if minutes else f"{secs}s"
