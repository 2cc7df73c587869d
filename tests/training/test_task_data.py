"""The training data files in train/data/: they parse, every split follows the sha256 rule, the
ordinary and harmful task-format sets cover the task types they claim, and nothing held out is
also trained on (no prompt, and for the generated files no input passage or subject)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from collections import defaultdict

import pytest

from ngsd_jax.paths import DATA_DIR
from ngsd_jax.refusals import EXPERT_OPENINGS
from ngsd_jax.training import data as train_data

DATA = DATA_DIR
BENIGN_FILES = ["benign.jsonl", "ordinary.jsonl", "nearmiss.jsonl", "ordinary_messy.jsonl"]
HARMFUL_FILES = ["harmful.jsonl", "harmful_tasks.jsonl", "harmful_taxonomy.jsonl"]
HAZARD_CATEGORIES = ("violent_crimes", "nonviolent_crimes", "sex_related_crimes", "child_sexual_exploitation",
                     "indiscriminate_weapons", "suicide_self_harm", "hate", "defamation", "privacy",
                     "intellectual_property", "specialized_advice", "sexual_content", "elections", "misinformation",
                     "harassment")
NEAR_MISS_KINDS = ("word_sense_computing", "word_sense_cooking", "word_sense_sport", "word_sense_games",
                   "word_sense_household", "figure_of_speech", "safe_target", "fiction_film_plot", "history",
                   "definition", "safety_education", "medical_selfcare", "public_figure_facts", "legal_compliance")
# The refusal openings train/data/README.md promises (keyword judges recognise them).
REFUSAL_OPENINGS = ("I can't", "I cannot", "I won't", "I'm sorry", "I'm not able to", "I'm not going to")


def rows(name: str) -> list[dict]:
    parse = train_data.parse_harmful if name in HARMFUL_FILES else train_data.parse_benign
    return [row for _, row in train_data.read_jsonl(DATA / name, parse, strict=True)]


def normalise(prompt: str) -> str:
    return " ".join(re.sub(r"[^\w ]", " ", prompt.lower()).split())


def heldout_ids(items: list[dict]) -> set[str]:
    k = int(0.15 * len(items) + 0.5)
    return {r["id"] for r in sorted(items, key=lambda r: hashlib.sha256(r["id"].encode()).hexdigest())[:k]}


@pytest.mark.parametrize("name", BENIGN_FILES + HARMFUL_FILES)
def test_split_follows_the_sha256_rule_per_category(name):
    by_category = defaultdict(list)
    for r in rows(name):
        assert r["split"] in ("train", "heldout")
        by_category[r["category"]].append(r)
    for category, items in by_category.items():
        held = heldout_ids(items)
        wrong = [r["id"] for r in items if (r["split"] == "heldout") != (r["id"] in held)]
        assert not wrong, f"{name} {category}: split disagrees with the sha256 rule for {wrong[:5]}"


def test_ids_unique_and_no_prompt_in_both_splits():
    all_rows = [r for name in BENIGN_FILES + HARMFUL_FILES for r in rows(name)]
    ids = [r["id"] for r in all_rows]
    assert len(ids) == len(set(ids))
    splits = defaultdict(set)
    for r in all_rows:
        splits[normalise(r["prompt"])].add(r["split"])
    assert not [p for p, s in splits.items() if len(s) > 1]


def test_ordinary_and_harmful_task_sets_cover_the_same_formats():
    ordinary, harmful = rows("ordinary.jsonl"), rows("harmful_tasks.jsonl")
    ordinary_types = {r["task_type"] for r in ordinary}
    assert len(ordinary) >= 1500 and len(ordinary_types) >= 30
    assert len(harmful) >= 250
    assert {r["task_type"] for r in harmful} <= ordinary_types
    with_input = [r for r in ordinary if r["input_kind"] != "none"]
    assert len(with_input) >= len(ordinary) // 2
    assert all(r["response"].startswith(REFUSAL_OPENINGS) for r in harmful)
    for r in ordinary + harmful:
        assert r["prompt"] == r["prompt"].strip() and r["prompt"].isascii()


def test_the_taxonomy_file_fills_every_hazard_category_in_three_forms():
    """harmful_taxonomy.jsonl: the hazard categories of MLCommons AILuminate plus misinformation and
    harassment, each with at least 60 requests, 20 in each form, every refusal opening with what
    the expert's risk reads (refusals.EXPERT_OPENINGS)."""
    counts = defaultdict(lambda: defaultdict(int))
    for r in rows("harmful_taxonomy.jsonl"):
        counts[r["category"]][r["form"]] += 1
        assert r["response"].startswith(EXPERT_OPENINGS), r["id"]
    assert set(counts) == set(HAZARD_CATEGORIES)
    for category, forms in counts.items():
        assert set(forms) == {"direct", "task", "roleplay"} and min(forms.values()) >= 20, category


def test_near_misses_name_their_kind_and_number_a_thousand():
    kinds = defaultdict(int)
    for r in rows("nearmiss.jsonl"):
        kinds[r["category"]] += 1
    assert set(kinds) == set(NEAR_MISS_KINDS) and sum(kinds.values()) >= 1000


def test_no_generated_input_is_in_both_splits():
    sources = defaultdict(set)
    for name in ("ordinary.jsonl", "harmful_tasks.jsonl"):
        for r in rows(name):
            for key in r["source"].split("+"):
                sources[key].add(r["split"])
    sources.pop("none", None)
    assert len(sources) >= 150
    assert not [k for k, s in sources.items() if len(s) > 1]


def test_generator_reproduces_the_committed_files():
    spec = importlib.util.spec_from_file_location("make_task_data", DATA / "make_task_data.py")
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    pools = generator.build_pools()
    assert generator.dump(generator.build_ordinary(pools)) == (DATA / "ordinary.jsonl").read_text(encoding="utf-8")
    assert generator.dump(generator.build_harmful(pools)) == (DATA / "harmful_tasks.jsonl").read_text(encoding="utf-8")
    assert [json.loads(line)["id"] for line in (DATA / "ordinary.jsonl").open()][:2] == ["o0001", "o0002"]
