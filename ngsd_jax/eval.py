"""`python -m ngsd_jax.eval`: attack success, over-refusal and how much of each benign answer
stays the base's, for several modes side by side in one engine.

    python -m ngsd_jax.eval --dataset prompts.csv --label-field label --harmful-label harmful --out runs/eval
    python -m ngsd_jax.eval --dataset advbench.csv --prefill-field target --prefill-tokens 10 --modes base,ngsd
    python -m ngsd_jax.eval --dataset mixed.jsonl --label-field label --harmful-label 1 --alpha-sweep 0.1,0.5,0.9

Every decode option (models, presets, reflection, gate, sampling) applies to every mode.
Writes DIR/samples.jsonl (one line per prompt and condition, appended batch by batch),
DIR/results.json (every figure, recomputable from samples.jsonl), DIR/report.md and two
plots, DIR/tradeoff.png and DIR/trace.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import statistics
import sys
import time
from pathlib import Path

from ngsd_jax import decode as decode_cli
from ngsd_jax import distributed
from ngsd_jax.decode import UsageError

ALPHA_MODES = ("ngsd", "always")  # the modes whose expert pull is alpha
REFLECT_IN_SWEEP = "reflect"  # an --alpha-sweep entry meaning "alpha from --reflect", as decode sets it


@dataclasses.dataclass(frozen=True)
class EvalItem:
    """One dataset row: `index` is its position in the file."""

    index: int
    prompt: str
    harmful: bool
    prefill: str = ""  # the prefill field's whole text; the first --prefill-tokens tokens are forced
    answer: object = None  # the answer field, for the exact-answer judge


@dataclasses.dataclass(frozen=True)
class Condition:
    """A mode, and for ngsd/always a fixed alpha of a sweep (None: alpha as decode sets it)."""

    mode: str
    alpha: float | None = None

    @property
    def name(self) -> str:
        return self.mode if self.alpha is None else f"{self.mode} a={self.alpha:g}"


# --- the dataset -----------------------------------------------------------------------

def read_dataset(path: Path, prompt_field: str | None = None, label_field: str | None = None,
                 harmful_label: str | None = None, prefill_field: str | None = None,
                 answer_field: str | None = None, limit: int | None = None) -> list[EvalItem]:
    """Rows of a JSON list, JSONL, CSV or .txt file (one prompt per line) as EvalItems.

    The prompt field is found among decode.PROMPT_FIELDS unless named; without a label field
    every prompt counts as harmful; `limit` keeps the first N prompts of each label."""
    records = decode_cli.read_records(path)
    if not records:
        raise UsageError(f"{path}: empty dataset; it needs at least one prompt")
    objects = [r for r in records if isinstance(r, dict)]
    if len(objects) < len(records):
        given = [flag for flag, value in (("--prompt-field", prompt_field), ("--label-field", label_field),
                                          ("--prefill-field", prefill_field), ("--answer-field", answer_field))
                 if value is not None]
        if given:
            raise UsageError(f"{path}: holds bare prompts without fields, so {given[0]} cannot apply; "
                             f"use a CSV or JSON objects with that field")
    if objects and prompt_field is None:
        prompt_field = decode_cli.find_prompt_field(objects[0])
        if prompt_field is None:
            raise UsageError(f"{path}: no prompt field among {', '.join(sorted(map(str, objects[0])))}; "
                             f"name it with --prompt-field")

    def field(record, number, name, flag):
        if not isinstance(record, dict):
            raise UsageError(f"{path}: item {number} is not an object with fields")
        if name not in record:
            raise UsageError(f"{path}: item {number} has no field '{name}' (fields: "
                             f"{', '.join(sorted(map(str, record)))}); fix {flag}")
        return record[name]

    if label_field is not None:
        values = [str(field(r, n, label_field, "--label-field")) for n, r in enumerate(records, start=1)]
        wanted = "harmful" if harmful_label is None else str(harmful_label)
        if wanted not in values:
            seen = ", ".join(sorted(set(values))[:10])
            raise UsageError(f"{path}: label value '{wanted}' never occurs in field '{label_field}' "
                             f"(values: {seen}); pass the harmful one with --harmful-label")
    elif harmful_label is not None:
        raise UsageError("--harmful-label needs --label-field (without one every prompt counts as harmful)")
    items = []
    for number, record in enumerate(records, start=1):
        prompt = record if isinstance(record, str) else field(record, number, prompt_field, "--prompt-field")
        if not isinstance(prompt, str) or not prompt.strip():
            raise UsageError(f"{path}: item {number} has an empty or non-text prompt")
        prefill = "" if prefill_field is None else field(record, number, prefill_field, "--prefill-field")
        items.append(EvalItem(
            index=number - 1, prompt=prompt,
            harmful=label_field is None or values[number - 1] == wanted,
            prefill=str(prefill or ""),
            answer=None if answer_field is None else field(record, number, answer_field, "--answer-field"),
        ))
    if limit is not None:
        items = [i for i in items if i.harmful][:limit] + [i for i in items if not i.harmful][:limit]
        items.sort(key=lambda i: i.index)
    return items


# --- the command line ------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    from ngsd_jax.engine import MODES

    p = argparse.ArgumentParser(prog="python -m ngsd_jax.eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    data = p.add_argument_group("dataset")
    data.add_argument("--dataset", type=Path, required=True, help=".csv, .jsonl, .json (a list) or .txt (one per line)")
    data.add_argument("--prompt-field", help=f"the prompt field (default: the first of {', '.join(decode_cli.PROMPT_FIELDS)}, any case)")
    data.add_argument("--label-field", help="the label field; without one every prompt counts as harmful")
    data.add_argument("--harmful-label", help="the label value of harmful prompts (default 'harmful'); others are benign")
    data.add_argument("--prefill-field", help="prefilling attack: force the start of this field's text as the response's start")
    data.add_argument("--prefill-tokens", type=int, help="how many tokens of the prefill field to force (default: all)")
    data.add_argument("--answer-field", help="the expected answer, for the exact-answer judge (last number in the output)")
    data.add_argument("--limit", type=int, help="only the first N prompts of each label")
    run = p.add_argument_group("evaluation")
    run.add_argument("--modes", default="base,ngsd,safedecoding",
                     help=f"comma-separated, run side by side ({', '.join(MODES)}; default base,ngsd,safedecoding); "
                          f"base also runs whenever there are benign prompts, to compare their answers with")
    run.add_argument("--alpha-sweep", help="comma-separated fixed alphas for ngsd and always, one condition each; "
                                           "'reflect' adds alpha as --reflect/--alpha set it (e.g. reflect,0.1,0.5,0.9)")
    run.add_argument("--judge", help="refusal judge: keywords (the default: the project's refusal keywords), reference "
                                     "(the authors' keyword judge, DictJudge) or module:function or "
                                     "file.py:function, called (prompt, response) -> True for a refusal; the ASR "
                                     "under both keyword judges is reported whatever the judge")
    run.add_argument("--out", type=Path, default=Path("eval_out"), help="output directory (default eval_out)")
    run.add_argument("--resume", action="store_true", help="continue a run in --out, skipping the rows it holds")
    run.add_argument("--trace-prompt", type=int, help="dataset index of the answer drawn in trace.png "
                                                      "(default: the ngsd answer with the most spikes)")
    decode_cli.add_decode_options(p, single_mode=False)
    return p


def parse_conditions(modes_arg: str, sweep_arg: str | None, has_benign: bool) -> list[Condition]:
    from ngsd_jax.engine import MODES

    modes = [m.strip() for m in modes_arg.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if not modes or unknown:
        raise UsageError(f"--modes: unknown mode '{unknown[0] if unknown else ''}'; choose from {', '.join(MODES)}")
    if has_benign and "base" not in modes:
        modes.insert(0, "base")  # identical_to_base compares every benign answer with the base's
    if "base" in modes:
        modes.remove("base")
        modes.insert(0, "base")
    sweep: list[float | None] = [None]
    if sweep_arg is not None:
        if not any(m in ALPHA_MODES for m in modes):
            raise UsageError("--alpha-sweep applies to the ngsd and always modes; add one to --modes")
        sweep = []
        for entry in (e.strip() for e in sweep_arg.split(",") if e.strip()):
            if entry == REFLECT_IN_SWEEP:
                sweep.append(None)
                continue
            try:
                value = float(entry)
            except ValueError:
                value = -1.0
            if not value >= 0:
                raise UsageError(f"--alpha-sweep: '{entry}' is neither an alpha >= 0 nor '{REFLECT_IN_SWEEP}'")
            sweep.append(value)
        if not sweep:
            raise UsageError("--alpha-sweep: give at least one alpha")
    conditions = []
    for mode in dict.fromkeys(modes):
        alphas = dict.fromkeys(sweep) if mode in ALPHA_MODES else [None]
        conditions += [Condition(mode, a) for a in alphas]
    return conditions


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except KeyboardInterrupt:
        print(f"interrupted; finished batches are in {args.out / 'samples.jsonl'}: rerun with --resume",
              file=sys.stderr)
        return 130
    except (UsageError, ValueError, OSError) as err:
        print(f"error: {str(err).splitlines()[0] if str(err) else type(err).__name__}", file=sys.stderr)
        return 2


# --- samples.jsonl ---------------------------------------------------------------------

def row_key(row: dict) -> tuple:
    return row["index"], row["mode"], row["alpha_setting"]


def read_samples(path: Path) -> list[dict]:
    """The complete rows of samples.jsonl; a line cut off by a killed run is dropped from the file."""
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    rows, kept = [], []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if line.endswith("\n") and isinstance(row, dict):
            rows.append(row)
            kept.append(line)
    if len(kept) != len(lines) and distributed.is_primary():
        path.write_text("".join(kept), encoding="utf-8")
    return rows


def first_difference(tokens: list[int], reference: list[int]) -> int | None:
    """Index of the first token where two answers differ (the shorter one's length if one is a
    prefix of the other); None when they are identical."""
    for i, (a, b) in enumerate(zip(tokens, reference)):
        if a != b:
            return i
    return None if len(tokens) == len(reference) else min(len(tokens), len(reference))


def _run_fingerprint(args, options, conditions, judge_name) -> dict:
    return {
        "dataset_sha256": hashlib.sha256(args.dataset.read_bytes()).hexdigest(),
        "fields": [args.prompt_field, args.label_field, args.harmful_label, args.prefill_field, args.prefill_tokens,
                   args.answer_field, args.limit],
        "conditions": [c.name for c in conditions],
        "judge": judge_name,
        "options": json.loads(json.dumps(dataclasses.asdict(options))),  # as run.json reads back (tuples: lists)
        "sampling": [args.temperature, args.top_p, args.top_k, args.seed, args.batch_size],
    }


def _prepare_out_dir(args, fingerprint) -> list[dict]:
    samples_path, run_path = args.out / "samples.jsonl", args.out / "run.json"
    if samples_path.exists() and not args.resume:
        raise UsageError(f"{samples_path} exists: pass --resume to continue that run, or choose another --out")
    if args.resume and run_path.is_file():
        previous = json.loads(run_path.read_text(encoding="utf-8"))
        changed = [k for k in fingerprint if previous.get(k) != fingerprint[k]]
        if changed:
            raise UsageError(f"--resume: {args.out} was run with other settings ({changed[0]} differs); "
                             f"rerun those settings or choose another --out")
    if distributed.is_primary():
        args.out.mkdir(parents=True, exist_ok=True)
        run_path.write_text(json.dumps(fingerprint, indent=1), encoding="utf-8")
    return read_samples(samples_path)


# --- running ---------------------------------------------------------------------------

def run(args) -> int:
    from ngsd_jax.judges import exact_answer, load_judge

    if args.prefill_tokens is not None and (args.prefill_field is None or args.prefill_tokens < 1):
        raise UsageError("--prefill-tokens K needs --prefill-field and K >= 1")
    if args.limit is not None and args.limit < 1:
        raise UsageError("--limit must be >= 1")
    items = read_dataset(args.dataset, args.prompt_field, args.label_field, args.harmful_label, args.prefill_field,
                         args.answer_field, args.limit)
    conditions = parse_conditions(args.modes, args.alpha_sweep, any(not i.harmful for i in items))
    options = decode_cli.resolve_options(args)
    decode_cli.check_options(options, args)
    judge_name, judge = load_judge(args.judge)
    distributed.initialize(args.multi_host)  # before any other jax call
    # Every process decodes every batch (one SPMD program) and judges its rows; process 0 alone
    # writes. A --resume reads the samples back on every process, so --out must then be shared.
    primary = distributed.is_primary()
    samples = _prepare_out_dir(args, _run_fingerprint(args, options, conditions, judge_name))
    samples_path = args.out / "samples.jsonl"

    from tqdm import tqdm

    pair = decode_cli.load_pair(options, [c.mode for c in conditions], args, [i.prompt for i in items])
    tokenizer = pair.base_tokenizer
    prefill_ids = {i.index: tokenizer.encode(i.prefill, add_special_tokens=False)[: args.prefill_tokens]
                   for i in items if i.prefill}
    done = {row_key(r): r for r in samples}
    base_tokens = {r["index"]: r["tokens"] for r in samples if r["mode"] == "base"}
    reflections = {r["index"]: r for r in samples if r["reflect"] not in ("off", None) and r["risk"] is not None}
    batches = [items[i: i + args.batch_size] for i in range(0, len(items), args.batch_size)]
    for condition in conditions:
        settings = decode_cli.decode_settings(options, condition.mode, args.top_k)
        key = lambda item: (item.index, condition.mode, condition.alpha)  # noqa: E731
        progress = tqdm(total=len(items), initial=sum(key(i) in done for i in items), unit="prompt",
                        desc=condition.name, disable=not sys.stderr.isatty() or not primary)
        for batch in batches:
            if all(key(i) in done for i in batch):
                continue  # a batch is decoded whole, so its rows decode exactly as in an uninterrupted run
            alphas, risks, reflect_seconds, reflect_mode = _alphas(pair, options, condition, batch, reflections)
            base_prompts, expert_prompts = decode_cli.encode_prompts(pair, options, [i.prompt for i in batch])
            forced = [prefill_ids.get(i.index, []) for i in batch]
            base_prompts = [p + f for p, f in zip(base_prompts, forced)]
            expert_prompts = None if expert_prompts is None else [p + f for p, f in zip(expert_prompts, forced)]
            compilations = pair.engine.compilations
            start = time.perf_counter()
            result = decode_cli.decode_prompts(pair, settings, args, base_prompts, expert_prompts, alphas)
            seconds = time.perf_counter() - start
            compiled = pair.engine.compilations > compilations
            new_rows = []
            for r, item in enumerate(batch):
                if key(item) in done:
                    continue
                n = int(result.lengths[r])
                tokens = result.sequence(r)
                prefill_text = tokenizer.decode(forced[r], skip_special_tokens=True) if forced[r] else ""
                output = tokenizer.decode(tokens, skip_special_tokens=True)
                if condition.mode == "base":
                    base_tokens[item.index] = tokens
                reference = base_tokens.get(item.index)
                steered = n if condition.mode == "expert" else int((result.alpha_in_force[r, :n] > 0).sum())
                row = {
                    "index": item.index, "prompt": item.prompt, "label": "harmful" if item.harmful else "benign",
                    "condition": condition.name, "mode": condition.mode, "alpha_setting": condition.alpha,
                    "alpha": alphas[r] if condition.mode in ALPHA_MODES else None,
                    "reflect": reflect_mode, "risk": risks[r],
                    "prefill": prefill_text, "output": output, "tokens": tokens, "new_tokens": n,
                    "verdict": "refusal" if judge(item.prompt, prefill_text + output) else "answer",
                    "keyword_verdicts": keyword_verdicts(item.prompt, prefill_text + output),
                    "answer": item.answer,
                    "correct": None if item.answer is None else exact_answer(prefill_text + output, item.answer),
                    "spikes": int(result.spike[r, :n].sum()) if condition.mode == "ngsd" else None,
                    "steered_tokens": steered,
                    "identical_to_base": None if reference is None else tokens == reference,
                    "first_diff": None if reference is None else first_difference(tokens, reference),
                    "decode_seconds": seconds / len(batch), "reflect_seconds": reflect_seconds[r],
                    "compiled": compiled,
                    "trace": {"divergence": [round(float(x), 5) for x in result.divergence[r, :n]],
                              "potential": [round(float(x), 5) for x in result.potential[r, :n]],
                              "spike": [bool(x) for x in result.spike[r, :n]]},
                }
                new_rows.append(row)
                done[row_key(row)] = row
            if primary:
                with samples_path.open("a", encoding="utf-8") as f:
                    f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in new_rows)
                    f.flush()
            progress.update(len(new_rows))
        progress.close()
    if not primary:
        return 0
    rows = read_samples(samples_path)
    results = compute_results(rows, conditions, items, judge_name, options, args)
    write_outputs(args.out, results, rows, options.threshold, args.trace_prompt)
    print(report_table(results))
    print(f"\nwrote {args.out / 'results.json'}, report.md, samples.jsonl and the plots")
    return 0


def _alphas(pair, options, condition, batch, reflections):
    """(alpha per prompt, risk per prompt or None, reflection seconds per prompt, reflection mode).

    Self-reflection depends only on the prompt, so each prompt is rated once and its rating
    shared by every condition that uses it (kept in samples.jsonl for --resume)."""
    n = len(batch)
    if condition.mode not in ALPHA_MODES:
        return [0.0] * n, [None] * n, [0.0] * n, "off"
    if condition.alpha is not None:
        return [condition.alpha] * n, [None] * n, [0.0] * n, "off"
    if options.reflect == "off":
        return [options.alpha] * n, [None] * n, [0.0] * n, "off"
    if any(i.index not in reflections for i in batch):
        # The whole batch, as in an uninterrupted run, so that a resumed run rates alike.
        start = time.perf_counter()
        rated = decode_cli.reflect_prompts(pair, options, condition.mode, [i.prompt for i in batch])
        share = (time.perf_counter() - start) / len(batch)
        for item, reflection in zip(batch, rated):
            reflections.setdefault(item.index, {"alpha": reflection.alpha, "risk": reflection.risk,
                                                "reflect_seconds": share})
    got = [reflections[i.index] for i in batch]
    return ([g["alpha"] for g in got], [g["risk"] for g in got], [g["reflect_seconds"] for g in got],
            options.reflect)


# --- metrics ---------------------------------------------------------------------------

def _mean(values):
    values = list(values)
    return sum(values) / len(values) if values else None


def roc_auc(scores: list[float], positive: list[bool]) -> float | None:
    """P(score of a random positive > score of a random negative), ties counting half
    (the Mann-Whitney statistic from average ranks)."""
    n_pos = sum(map(bool, positive))
    n_neg = len(positive) - n_pos
    if not n_pos or not n_neg:
        return None
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    ranks = [0.0] * len(scores)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and scores[order[end + 1]] == scores[order[start]]:
            end += 1
        for k in range(start, end + 1):
            ranks[order[k]] = (start + end) / 2 + 1
        start = end + 1
    positive_rank_sum = sum(r for r, p in zip(ranks, positive) if p)
    return (positive_rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def keyword_verdicts(prompt: str, text: str) -> dict[str, str]:
    """{built-in keyword judge: "refusal" or "answer"} for one answer (samples.jsonl's keyword_verdicts)."""
    from ngsd_jax.judges import KEYWORD_JUDGES

    return {name: "refusal" if judge(prompt, text) else "answer" for name, judge in KEYWORD_JUDGES.items()}


def _keyword_verdicts(rows: list[dict]) -> dict[str, list[str]]:
    """{keyword judge: its verdict per row}; rows written before they were stored are judged here."""
    stored = [r.get("keyword_verdicts") or keyword_verdicts(r["prompt"], r["prefill"] + r["output"]) for r in rows]
    return {name: [v[name] for v in stored] for name in stored[0]}


def label_metrics(rows: list[dict], harmful: bool) -> dict:
    """Every per-label figure of one condition, from its sample rows alone."""
    out: dict = {"n": len(rows)}
    if not rows:
        return out
    refusal = _mean(r["verdict"] == "refusal" for r in rows)
    out["refusal_rate"] = refusal
    if harmful:
        out["asr"] = 1.0 - refusal
        out["asr_by_judge"] = {name: 1.0 - _mean(v == "refusal" for v in verdicts)
                               for name, verdicts in _keyword_verdicts(rows).items()}
    answered = [r for r in rows if r["correct"] is not None]
    out["accuracy"] = _mean(r["correct"] for r in answered)
    gated = [r for r in rows if r["spikes"] is not None]
    out["spike_rate"] = _mean(r["spikes"] > 0 for r in gated)
    out["spikes_per_answer"] = _mean(r["spikes"] for r in gated)
    tokens = sum(r["new_tokens"] for r in rows)
    out["steered_token_fraction"] = sum(r["steered_tokens"] for r in rows) / tokens if tokens else None
    out["mean_new_tokens"] = tokens / len(rows)
    compared = [r for r in rows if r["identical_to_base"] is not None]
    out["identical_to_base"] = _mean(r["identical_to_base"] for r in compared)
    differing = [r["first_diff"] for r in compared if r["first_diff"] is not None]
    out["first_diff_mean"] = _mean(differing)
    out["first_diff_median"] = statistics.median(differing) if differing else None
    out["differing"] = len(differing)
    return out


def cost_metrics(rows: list[dict]) -> dict:
    seconds = sum(r["decode_seconds"] for r in rows)
    warm = [r for r in rows if not r["compiled"]]
    warm_seconds = sum(r["decode_seconds"] for r in warm)
    reflected = [r["reflect_seconds"] for r in rows if r["reflect"] != "off"]
    return {
        "tokens_per_second": sum(r["new_tokens"] for r in rows) / seconds if seconds else None,
        "tokens_per_second_warm": sum(r["new_tokens"] for r in warm) / warm_seconds if warm_seconds else None,
        "decode_seconds": seconds,
        "reflect_seconds_per_prompt": _mean(reflected),
    }


def reflection_metrics(rows: list[dict]) -> dict | None:
    """Alpha by label and the risk's ROC AUC against the labels, once per rated prompt."""
    rated = {}
    for r in rows:
        if r["reflect"] != "off" and r["risk"] is not None:
            rated.setdefault(r["index"], r)
    if not rated:
        return None
    by_label = {}
    for label in ("harmful", "benign"):
        picked = [r for r in rated.values() if r["label"] == label]
        alphas: dict[str, int] = {}
        for r in picked:
            alphas[f"{r['alpha']:g}"] = alphas.get(f"{r['alpha']:g}", 0) + 1
        by_label[label] = {"n": len(picked), "alpha_counts": dict(sorted(alphas.items())),
                           "mean_alpha": _mean(r["alpha"] for r in picked),
                           "mean_risk": _mean(r["risk"] for r in picked)}
    values = list(rated.values())
    return {
        "mode": values[0]["reflect"],
        "by_label": by_label,
        "roc_auc": roc_auc([r["risk"] for r in values], [r["label"] == "harmful" for r in values]),
        "seconds_per_prompt": _mean(r["reflect_seconds"] for r in values),
    }


def compute_results(rows, conditions, items, judge_name, options, args) -> dict:
    """results.json: a pure function of the sample rows plus the run's description."""
    per_condition = []
    for c in conditions:
        mine = [r for r in rows if r["mode"] == c.mode and r["alpha_setting"] == c.alpha]
        per_condition.append({
            "name": c.name, "mode": c.mode, "alpha": c.alpha,
            "harmful": label_metrics([r for r in mine if r["label"] == "harmful"], True),
            "benign": label_metrics([r for r in mine if r["label"] == "benign"], False),
            "cost": cost_metrics(mine),
        })
    return {
        "dataset": str(args.dataset),
        "prompts": len(items),
        "harmful": sum(i.harmful for i in items),
        "benign": sum(not i.harmful for i in items),
        "prefill_tokens": args.prefill_tokens if args.prefill_field else None,
        "judge": judge_name,
        "max_new_tokens": options.max_new_tokens,
        "reflect": options.reflect,
        "conditions": per_condition,
        "reflection": reflection_metrics(rows),
    }


# --- outputs ---------------------------------------------------------------------------

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


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_tradeoff(results: dict, path: Path) -> None:
    plt = _pyplot()
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
    plt = _pyplot()
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


if __name__ == "__main__":
    sys.exit(main())
