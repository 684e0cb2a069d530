"""Human-readable text of a base-vs-tuned comparison (the JSON form is the report dict itself)."""

from __future__ import annotations

import textwrap


def _row(name: str, base, tuned, fmt: str) -> str:
    return f"  {name:<22}{format(base, fmt):>12}{format(tuned, fmt):>12}"


def format_comparison(report: dict) -> str:
    b, t = report["base"], report["tuned"]
    lines = [f"{report['n_examples']} held-out examples from {report['data']}", "",
             f"  {'':<22}{'base':>12}{'tuned':>12}",
             _row("cross-entropy", b["loss"], t["loss"], ".3f"),
             _row("perplexity", b["perplexity"], t["perplexity"], ".2f"),
             _row("token accuracy", b["token_accuracy"], t["token_accuracy"], ".1%")]
    if report["classification"]:
        lines.append(_row("exact match", b["exact_match"], t["exact_match"], ".1%"))
    if report.get("preference_pairs"):
        lines.append(_row("preferred ranked first", b["preference_accuracy"], t["preference_accuracy"], ".1%"))
        lines.append(_row("preference margin", b["preference_margin"], t["preference_margin"], ".2f"))
    fit = report["fit"]
    lines += ["", f"fit: {fit['verdict']} ({fit['reason']})"]
    for i, prompt in enumerate(report["prompts"]):
        lines += ["", f"Q: {prompt}"]
        for who, answer in (("base", b["samples"][i]), ("tuned", t["samples"][i])):
            lines.append(textwrap.fill(answer.strip() or "(empty)", 100,
                                       initial_indent=f"  {who:>5}: ", subsequent_indent=" " * 9))
    return "\n".join(lines)
