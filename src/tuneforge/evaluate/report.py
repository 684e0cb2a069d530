"""Human-readable text of a base-vs-tuned comparison, and its JSON form (the report dict itself, with
what JSON cannot hold made null)."""

from __future__ import annotations

import math
import textwrap


def json_safe(obj):
    """`obj` with every NaN or infinite number as None: JSON has neither (Python's json writes NaN and
    Infinity anyway, which jq, JavaScript and most other readers refuse). A diverged model's loss is
    NaN; a perplexity past the float range is inf - the text report shows both as they are."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj


def _row(name: str, base, tuned, fmt: str) -> str:
    return f"  {name:<22}{format(base, fmt):>12}{format(tuned, fmt):>12}"


def _before(report: dict) -> tuple[str, list[str]]:
    """(the column's name, the lines saying which model it is) of the model before training: the base,
    or a continued run's earlier model (the base when that was gone). A report written before there
    was a "before" field is a run's from the base."""
    started, before = report.get("continued_from"), report.get("before")
    if not started:
        return "base", []
    if before == started:
        return "earlier", [f"earlier: {started}, the model this run continued training from"]
    return "base", [f"base: {before} ({started}, the model this run continued training from, is gone)"]


def _loss_notes(b: dict, t: dict, before: str) -> list[str]:
    """A NaN loss in the table reads like a glitch of the report: say what it means."""
    notes = []
    for who, r in ((before, b), ("tuned", t)):
        if math.isnan(r["loss"]):
            notes.append(f"the {who} model's loss is not a number (NaN): its predictions hold NaN or infinite values"
                         + (", as when training diverges" if who == "tuned" else ""))
    return notes


def format_comparison(report: dict) -> str:
    b, t = report["base"], report["tuned"]
    before, which = _before(report)
    lines = [f"{report['n_examples']} held-out examples from {report['data']}", *which, "",
             f"  {'':<22}{before:>12}{'tuned':>12}",
             _row("cross-entropy", b["loss"], t["loss"], ".3f"),
             _row("perplexity", b["perplexity"], t["perplexity"], ".2f"),
             _row("token accuracy", b["token_accuracy"], t["token_accuracy"], ".1%")]
    if report["classification"]:
        lines.append(_row("exact match", b["exact_match"], t["exact_match"], ".1%"))
    if report.get("preference_pairs"):
        lines.append(_row("preferred ranked first", b["preference_accuracy"], t["preference_accuracy"], ".1%"))
        lines.append(_row("preference margin", b["preference_margin"], t["preference_margin"], ".2f"))
    if notes := _loss_notes(b, t, before):
        lines += [""] + notes
    fit = report["fit"]
    lines += ["", f"fit: {fit['verdict']} ({fit['reason']})"]
    width = max(5, len(before))  # (the answers' lines start under one another)
    for i, prompt in enumerate(report["prompts"]):
        lines += ["", f"Q: {prompt}"]
        for who, answer in ((before, b["samples"][i]), ("tuned", t["samples"][i])):
            lines.append(textwrap.fill(answer.strip() or "(empty)", 100,
                                       initial_indent=f"  {who:>{width}}: ", subsequent_indent=" " * (width + 4)))
    return "\n".join(lines)
