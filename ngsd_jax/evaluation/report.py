"""An evaluation's outputs: the table of conditions side by side, report.md, results.json and
the two plots (the refusal trade-off and one answer's trace)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.0f}%"


def _num(x, digits=1) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def report_table(results: dict) -> str:
    """The modes side by side, one row per condition (markdown)."""
    accuracy = any(c[label].get("accuracy") is not None for c in results["conditions"]
                   for label in ("harmful", "benign"))
    head = ["condition", "harmful refused", "ASR", "ASR keywords / reference", "benign refused",
            "benign identical to base",
            "first differing token (mean / median)", "benign with a spike", "spikes per answer (harmful / benign)",
            "steered tokens", "tokens/s", "reflection s/prompt"]
    if accuracy:
        head.append("accuracy")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in results["conditions"]:
        h, b, cost = c["harmful"], c["benign"], c["cost"]
        steered = [x.get("steered_token_fraction") for x in (h, b) if x.get("n")]
        by_judge = h.get("asr_by_judge") or {}
        cells = [c["name"], _pct(h.get("refusal_rate")), _pct(h.get("asr")),
                 f"{_pct(by_judge.get('keywords'))} / {_pct(by_judge.get('reference'))}", _pct(b.get("refusal_rate")),
                 _pct(b.get("identical_to_base")),
                 f"{_num(b.get('first_diff_mean'))} / {_num(b.get('first_diff_median'))}",
                 _pct(b.get("spike_rate")),
                 f"{_num(h.get('spikes_per_answer'))} / {_num(b.get('spikes_per_answer'))}",
                 " / ".join(_pct(s) for s in steered) or "—",
                 _num(cost["tokens_per_second"]), _num(cost["reflect_seconds_per_prompt"], 2)]
        if accuracy:
            both = [x.get("accuracy") for x in (h, b) if x.get("accuracy") is not None]
            cells.append(_pct(both[0]) if len(both) == 1 else " / ".join(_pct(a) for a in both))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_outputs(out: Path, results: dict, rows: list[dict], threshold: float, trace_prompt: int | None) -> None:
    (out / "results.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    trace_row = pick_trace_row(rows, trace_prompt)
    has_tradeoff = results["harmful"] > 0 and results["benign"] > 0
    if has_tradeoff:
        plot_tradeoff(results, out / "tradeoff.png")
    if trace_row is not None:
        plot_trace(trace_row, threshold, out / "trace.png")
    (out / "report.md").write_text(report_markdown(results, trace_row, has_tradeoff), encoding="utf-8")


def pick_trace_row(rows: list[dict], index: int | None) -> dict | None:
    """The ngsd answer to draw: the given prompt's, else the one with the most spikes (lowest index on ties)."""
    ngsd = [r for r in rows if r["mode"] == "ngsd" and r["new_tokens"] > 0]
    if index is not None:
        ngsd = [r for r in ngsd if r["index"] == index]
    if not ngsd:
        return None
    return min(ngsd, key=lambda r: (-r["spikes"], r["index"]))


def report_markdown(results: dict, trace_row: dict | None, has_tradeoff: bool) -> str:
    lines = [f"# Evaluation of {results['dataset']}", "",
             f"{results['prompts']} prompts ({results['harmful']} harmful, {results['benign']} benign), "
             f"{results['max_new_tokens']} new tokens at most, judge `{results['judge']}`"
             + (f", the first {results['prefill_tokens']} tokens of each prompt's prefill forced"
                if results["prefill_tokens"] else "") + ".", "",
             report_table(results), "",
             "ASR: harmful prompts whose answer the judge did not call a refusal; also under each built-in "
             "keyword judge: `keywords` (the project's list) and `reference` (the authors' DictJudge, to set "
             "beside the paper's keyword ASR). Identical to base: the "
             "answer equals the `base` mode's token for token; the first differing token is averaged over "
             "the answers that differ. Spikes count the neuron's firings (ngsd only). Steered tokens: the "
             "share of generated tokens chosen from a distribution the expert moved (harmful / benign). "
             "tokens/s includes compilation (results.json also gives it without the batches that compiled)."]
    reflection = results["reflection"]
    if reflection is not None:
        lines += ["", f"## Self-reflection ({reflection['mode']})", "",
                  "| label | prompts | alpha counts | mean risk |", "|---|---|---|---|"]
        for label, r in reflection["by_label"].items():
            counts = ", ".join(f"{a}: {n}" for a, n in r["alpha_counts"].items()) or "—"
            lines.append(f"| {label} | {r['n']} | {counts} | {_num(r['mean_risk'])} |")
        lines += ["", f"ROC AUC of the risk against the labels: {_num(reflection['roc_auc'], 3)}; "
                      f"{_num(reflection['seconds_per_prompt'], 2)} s per prompt."]
    if has_tradeoff:
        lines += ["", "![trade-off](tradeoff.png)", "",
                  "Harmful prompts refused against benign prompts refused, one point per condition."]
    if trace_row is not None:
        lines += ["", "![trace](trace.png)", "",
                  f"The {trace_row['condition']} answer to prompt {trace_row['index']} "
                  f"({trace_row['label']}): divergence and the neuron's potential per generated token, "
                  f"spikes marked, {trace_row['spikes']} in all."]
    return "\n".join(lines) + "\n"


def plot_tradeoff(results: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
    for c in results["conditions"]:
        x, y = c["benign"].get("refusal_rate"), c["harmful"].get("refusal_rate")
        if x is None or y is None:
            continue
        ax.scatter([100 * x], [100 * y], s=30)
        ax.annotate(c["name"], (100 * x, 100 * y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("benign prompts refused (%)")
    ax.set_ylabel("harmful prompts refused (%)")
    ax.set_xlim(-5, 105)
    ax.set_ylim(-5, 105)
    ax.grid(alpha=0.3)
    ax.set_title("refusal trade-off (up and left is better)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_trace(row: dict, threshold: float, path: Path) -> None:
    trace = row["trace"]
    steps = range(len(trace["divergence"]))
    fig, ax = plt.subplots(figsize=(7, 3.2), dpi=100)
    ax.plot(steps, trace["divergence"], label="divergence D", lw=1.2)
    ax.plot(steps, trace["potential"], label="potential v (after reset)", lw=1.2)
    ax.axhline(threshold, color="gray", ls="--", lw=1, label=f"threshold {threshold:g}")
    spikes = [t for t, s in enumerate(trace["spike"]) if s]
    if spikes:
        ax.scatter(spikes, [threshold] * len(spikes), marker="v", color="red", zorder=3, label="spike")
    ax.set_xlabel("generated token")
    prompt = row["prompt"] if len(row["prompt"]) <= 70 else row["prompt"][:67] + "..."
    ax.set_title(f"{row['condition']}, {row['label']}: {prompt}", fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
