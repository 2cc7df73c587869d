"""Running an evaluation: several modes (and alphas) side by side on one data set in one engine,
every answer judged, rows appended to samples.jsonl batch by batch so that a killed run resumes
where it stopped, then results.json, report.md and the plots."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sys
import time
from pathlib import Path

from tqdm import tqdm

from ngsd_jax.decoding.pair import (
    ALPHA_MODES,
    DecodeOptions,
    check_options,
    decode_prompts,
    decode_settings,
    encode_prompts,
    in_program_expert_risk,
    load_pair,
    reflect_prompts,
)
from ngsd_jax.decoding.settings import MODES
from ngsd_jax.errors import UsageError
from ngsd_jax.evaluation.dataset import read_dataset
from ngsd_jax.evaluation.judges import exact_answer, keyword_verdicts, load_judge
from ngsd_jax.evaluation.metrics import compute_results, first_difference
from ngsd_jax.evaluation.report import report_table, write_outputs
from ngsd_jax.files import directory_problem, jsonl_values, write_text_atomic
from ngsd_jax.parallel import distributed

REFLECT_IN_SWEEP = "reflect"  # an --alpha-sweep entry meaning "alpha from --reflect", as decode sets it


@dataclasses.dataclass
class EvalOptions:
    """An evaluation run: the data set and its fields, the conditions, the judge, the output
    directory, and the decode options every condition shares."""

    dataset: Path
    decode: DecodeOptions = dataclasses.field(default_factory=DecodeOptions)
    prompt_field: str | None = None
    label_field: str | None = None
    harmful_label: str | None = None
    prefill_field: str | None = None
    prefill_tokens: int | None = None
    answer_field: str | None = None
    limit: int | None = None
    modes: str = "base,ngsd,safedecoding"
    alpha_sweep: str | None = None
    judge: str | None = None
    out: Path = Path("eval_out")
    resume: bool = False
    trace_prompt: int | None = None


@dataclasses.dataclass(frozen=True)
class Condition:
    """A mode, and for ngsd/always a fixed alpha of a sweep (None: alpha as decode sets it)."""

    mode: str
    alpha: float | None = None

    @property
    def name(self) -> str:
        return self.mode if self.alpha is None else f"{self.mode} a={self.alpha:g}"


def parse_conditions(modes_arg: str, sweep_arg: str | None, has_benign: bool) -> list[Condition]:
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
                value = math.nan
            if not 0 <= value <= 1:  # NaN too
                raise UsageError(f"--alpha-sweep: '{entry}' is neither an alpha in [0, 1] nor '{REFLECT_IN_SWEEP}'")
            sweep.append(value)
        if not sweep:
            raise UsageError("--alpha-sweep: give at least one alpha")
    conditions = []
    for mode in dict.fromkeys(modes):
        alphas = dict.fromkeys(sweep) if mode in ALPHA_MODES else [None]
        conditions += [Condition(mode, a) for a in alphas]
    return conditions


def row_key(row: dict) -> tuple:
    return row["index"], row["mode"], row["alpha_setting"]


def read_samples(path: Path) -> list[dict]:
    """The complete rows of samples.jsonl; a line cut off by a killed run is dropped from the file."""
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    rows, kept = [], []
    for _, line, row in jsonl_values(lines):
        if line.endswith("\n") and isinstance(row, dict):
            rows.append(row)
            kept.append(line)
    if len(kept) != len(lines) and distributed.is_primary():
        write_text_atomic(path, "".join(kept))
    return rows


def _run_fingerprint(opts: EvalOptions, conditions, judge_name) -> dict:
    settings = dataclasses.asdict(opts.decode)
    del settings["devices"]["compilation_cache"]  # where compiled programs are kept changes no answer
    return {
        "dataset_sha256": hashlib.sha256(opts.dataset.read_bytes()).hexdigest(),
        "fields": [opts.prompt_field, opts.label_field, opts.harmful_label, opts.prefill_field, opts.prefill_tokens,
                   opts.answer_field, opts.limit],
        "conditions": [c.name for c in conditions],
        "judge": judge_name,
        "options": json.loads(json.dumps(settings)),  # as run.json reads back (tuples: lists)
            }


def _check_out_dir(opts: EvalOptions, fingerprint) -> dict | None:
    """Refuses an --out that holds another run (before any model loads); the run.json of the run
    --resume continues, or None."""
    samples_path, run_path = opts.out / "samples.jsonl", opts.out / "run.json"
    if samples_path.exists() and not opts.resume:
        raise UsageError(f"{samples_path} exists: pass --resume to continue that run, or choose another --out")
    if not (opts.resume and run_path.is_file()):
        return None
    previous = json.loads(run_path.read_text(encoding="utf-8"))
    changed = [k for k in fingerprint if previous.get(k) != fingerprint[k]]
    if changed:
        raise UsageError(f"--resume: {opts.out} was run with other settings ({changed[0]} differs); "
                         f"rerun those settings or choose another --out")
    return previous


def _check_weights(opts: EvalOptions, previous: dict | None, weights: dict) -> None:
    """Refuses to resume a run whose models have other weights now (retrained at the same path),
    which would mix two models' answers in one results.json."""
    if previous is None:
        return
    before = previous.get("weights") or {}
    changed = [role for role in weights if before.get(role) != weights[role]]
    if changed:
        raise UsageError(f"--resume: the {' and '.join(changed)} weights differ from those {opts.out} was run with "
                         f"(retrained or replaced at the same path?); rerun with another --out")


def _prepare_out_dir(opts: EvalOptions, fingerprint) -> list[dict]:
    """Writes run.json (the settings and weights the samples come from); the samples already there."""
    samples_path, run_path = opts.out / "samples.jsonl", opts.out / "run.json"
    if distributed.is_primary():
        opts.out.mkdir(parents=True, exist_ok=True)
        run_path.write_text(json.dumps(fingerprint, indent=1), encoding="utf-8")
    return read_samples(samples_path)


def evaluate(opts: EvalOptions) -> int:
    """Runs the evaluation `opts` describes (resuming it with `opts.resume`); prints the table."""
    if opts.prefill_tokens is not None and (opts.prefill_field is None or opts.prefill_tokens < 1):
        raise UsageError("--prefill-tokens K needs --prefill-field and K >= 1")
    if opts.limit is not None and opts.limit < 1:
        raise UsageError("--limit must be >= 1")
    problem = directory_problem(opts.out, "--out")
    if problem:
        raise UsageError(problem)
    items = read_dataset(opts.dataset, opts.prompt_field, opts.label_field, opts.harmful_label, opts.prefill_field,
                         opts.answer_field, opts.limit)
    conditions = parse_conditions(opts.modes, opts.alpha_sweep, any(not i.harmful for i in items))
    options = opts.decode
    check_options(options)
    judge_name, judge = load_judge(opts.judge)
    distributed.initialize(options.devices.multi_host)  # before any other jax call
    distributed.enable_compilation_cache(options.devices.compilation_cache)
    # Every process decodes every batch (one SPMD program) and judges its rows; process 0 alone
    # writes. A --resume reads the samples back on every process, so --out must then be shared.
    primary = distributed.is_primary()
    fingerprint = _run_fingerprint(opts, conditions, judge_name)
    previous = _check_out_dir(opts, fingerprint)  # other settings: refused before any model loads
    pair = load_pair(options, [c.mode for c in conditions], [i.prompt for i in items])
    fingerprint["weights"] = pair.fingerprints()
    _check_weights(opts, previous, fingerprint["weights"])
    samples = _prepare_out_dir(opts, fingerprint)
    samples_path = opts.out / "samples.jsonl"
    tokenizer = pair.base_tokenizer
    prefill_ids = {i.index: tokenizer.encode(i.prefill, add_special_tokens=False)[: opts.prefill_tokens]
                   for i in items if i.prefill}
    done = {row_key(r): r for r in samples}
    base_tokens = {r["index"]: r["tokens"] for r in samples if r["mode"] == "base"}
    reflections = {r["index"]: r for r in samples if r["reflect"] not in ("off", None) and r["risk"] is not None}
    batches = [items[i: i + options.batch_size] for i in range(0, len(items), options.batch_size)]
    for condition in conditions:
        settings = decode_settings(options, condition.mode)
        key = lambda item: (item.index, condition.mode, condition.alpha)  # noqa: E731
        progress = tqdm(total=len(items), initial=sum(key(i) in done for i in items), unit="prompt",
                        desc=condition.name, disable=not sys.stderr.isatty() or not primary)
        for batch in batches:
            if all(key(i) in done for i in batch):
                continue  # a batch is decoded whole, so its rows decode exactly as in an uninterrupted run
            # --reflect expert: alpha from the expert's own prefill inside the decode program, as decode sets it.
            expert_risk = in_program_expert_risk(pair, options, condition.mode) if condition.alpha is None else None
            alphas, risks, reflect_seconds, reflect_mode = _alphas(pair, options, condition, batch, reflections,
                                                                   in_program=expert_risk is not None)
            base_prompts, expert_prompts = encode_prompts(pair, options, [i.prompt for i in batch])
            forced = [prefill_ids.get(i.index, []) for i in batch]
            base_prompts = [p + f for p, f in zip(base_prompts, forced)]
            expert_prompts = None if expert_prompts is None else [p + f for p, f in zip(expert_prompts, forced)]
            compilations = pair.engine.compilations
            start = time.perf_counter()
            result = decode_prompts(pair, settings, options, base_prompts, expert_prompts, alphas, expert_risk,
                                    [len(f) for f in forced])
            seconds = time.perf_counter() - start
            if expert_risk is not None:
                alphas, risks = [float(a) for a in result.alpha], [float(r) for r in result.risk]
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
    results = compute_results(rows, conditions, items, judge_name, options.max_new_tokens, options.reflect, str(opts.dataset),
                              opts.prefill_tokens if opts.prefill_field else None)
    write_outputs(opts.out, results, rows, options.threshold, opts.trace_prompt)
    print(report_table(results))
    print(f"\nwrote {opts.out / 'results.json'}, report.md, samples.jsonl and the plots")
    return 0


def _alphas(pair, options, condition, batch, reflections, in_program: bool):
    """(alpha per prompt, risk per prompt or None, reflection seconds per prompt, reflection mode).

    Self-reflection depends only on the prompt, so each prompt is rated once and its rating
    shared by every condition that uses it (kept in samples.jsonl for --resume). `in_program`:
    the decode program sets alpha itself (--reflect expert), at no reflection cost."""
    n = len(batch)
    if in_program:
        return [0.0] * n, [None] * n, [0.0] * n, options.reflect
    if condition.mode not in ALPHA_MODES:
        return [0.0] * n, [None] * n, [0.0] * n, "off"
    if condition.alpha is not None:
        return [condition.alpha] * n, [None] * n, [0.0] * n, "off"
    if options.reflect == "off":
        return [options.alpha] * n, [None] * n, [0.0] * n, "off"
    if any(i.index not in reflections for i in batch):
        # The whole batch, as in an uninterrupted run, so that a resumed run rates alike.
        start = time.perf_counter()
        rated = reflect_prompts(pair, options, condition.mode, [i.prompt for i in batch])
        share = (time.perf_counter() - start) / len(batch)
        for item, reflection in zip(batch, rated):
            reflections.setdefault(item.index, {"alpha": reflection.alpha, "risk": reflection.risk,
                                                "reflect_seconds": share})
    got = [reflections[i.index] for i in batch]
    return ([g["alpha"] for g in got], [g["risk"] for g in got], [g["reflect_seconds"] for g in got],
            options.reflect)
