"""Multi-host roles on one host: which rows of a batch each process places (pretending the 8
fake CPU devices belong to several processes), and that only process 0 writes files
(pretending to be another process by faking `jax.process_index()`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
from conftest import env_with_8_devices

from ngsd_jax.checkpoints.weights import export_hf, load_model
from ngsd_jax.parallel import distributed
from ngsd_jax.training import state as train_state
from ngsd_jax.training.recipe import Recipe

SCRIPT = Path(__file__).with_name("distributed_check.py")


def test_each_process_places_its_contiguous_share_of_every_batch():
    run = subprocess.run([sys.executable, str(SCRIPT)], env=env_with_8_devices(), capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    spans = json.loads(run.stdout.splitlines()[-1])
    # 16 rows; the batch is split over data x fsdp and whole on tensor, the devices dealt out in order.
    assert spans["data=8 over 2"] == [[0, 8], [8, 16]]
    assert spans["data=4,tensor=2 over 4"] == [[0, 4], [4, 8], [8, 12], [12, 16]]
    assert spans["tensor=8 over 2"] == [[0, 16], [0, 16]]  # tensor spans processes: both feed every row
    assert spans["data=2,fsdp=2,tensor=2 over 2"] == [[0, 8], [8, 16]]
    assert spans["data=2,fsdp=2,tensor=2 over 4"] == [[0, 4], [4, 8], [8, 12], [12, 16]]
    assert spans["fsdp=8 over 8"] == [[2 * p, 2 * p + 2] for p in range(8)]
    assert spans["placed equal"]
    assert spans["placed rows per device"] == [[0, 4], [4, 8], [8, 12], [12, 16]]


def _pretend_process(monkeypatch, index: int) -> None:
    monkeypatch.setattr(jax, "process_index", lambda: index)


def test_only_process_0_writes_the_run_directory(tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    (run_dir / "state" / "7").mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    _pretend_process(monkeypatch, 1)
    assert not distributed.is_primary()
    train_state.check_run_dir(run_dir, Recipe(), resume=False, overwrite=True)
    train_state.write_atomic(run_dir / "data" / "train.jsonl", "{}\n")
    distributed.say("from process 1")
    assert (run_dir / "state" / "7").is_dir() and (run_dir / "metrics.jsonl").is_file()  # process 0 clears them
    assert not (run_dir / "recipe.json").exists() and not (run_dir / "data").exists()
    assert capsys.readouterr().err == ""
    _pretend_process(monkeypatch, 0)
    train_state.check_run_dir(run_dir, Recipe(), resume=False, overwrite=True)
    train_state.write_atomic(run_dir / "data" / "train.jsonl", "{}\n")
    distributed.say("from process 0")
    assert not (run_dir / "state").exists() and not (run_dir / "metrics.jsonl").exists()
    assert json.loads((run_dir / "recipe.json").read_text())["name"] == Recipe().name
    assert (run_dir / "data" / "train.jsonl").read_text() == "{}\n"
    assert capsys.readouterr().err == "from process 0\n"


def test_only_process_0_writes_the_hugging_face_export(make_tiny_hf, tmp_path, monkeypatch):
    model = load_model(make_tiny_hf("llama"))
    _pretend_process(monkeypatch, 1)
    export_hf(model, tmp_path / "from1")
    assert not (tmp_path / "from1").exists()
    _pretend_process(monkeypatch, 0)
    export_hf(model, tmp_path / "from0")
    assert (tmp_path / "from0" / "model.safetensors").is_file()
