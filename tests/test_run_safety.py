"""Run-directory safety (issue 24): --force deletes only what prunelab made, --resume keys on content, one process
per run directory, stale temporary folders cleaned, recipes that cannot leak or silently mis-read values."""

from __future__ import annotations

import ast
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from prunelab.recipe import RecipeError, load_recipe
from prunelab.run import main
from prunelab.rundir import MARKER, describe_force
from prunelab.stages.core import fingerprint
from prunelab.stages.core.lock import RunLock, lock_path

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "tests" / "data" / "tiny_corpus.txt"


def _run(out: Path, *extra: str) -> int:
    return main(["recipes/debug.yaml", "--output-dir", str(out), "--no-progress", *extra])


def _finished(run_dir: Path) -> dict[str, str]:
    return {p.parent.name: json.loads(p.read_text())["finished"] + str(p.stat().st_mtime_ns)
            for p in sorted(run_dir.glob("*/done.json"))}


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ----------------------------------------------------------------------------- 1. --force
def test_force_never_deletes_a_folder_prunelab_did_not_make(tmp_path, capsys):
    """The issue's example: `--force --output-dir out name=Documents` over a folder holding thesis.txt."""
    thesis = tmp_path / "out" / "Documents" / "thesis.txt"
    thesis.parent.mkdir(parents=True)
    thesis.write_text("t\n")
    assert _run(tmp_path / "out", "--force", "name=Documents") == 2
    err = capsys.readouterr().err
    assert str(thesis.parent) in err and MARKER in err and "not a prunelab run directory" in err
    assert thesis.read_text() == "t\n"
    assert main(["recipes/debug.yaml", "--output-dir", str(tmp_path / "out"), "--dry-run", "--force", "name=Documents"]) == 0
    out = capsys.readouterr().out
    assert "--force would be REFUSED" in out and str(thesis.parent) in out
    assert thesis.read_text() == "t\n" and not lock_path(thesis.parent).exists()


def test_force_deletes_a_run_it_made_and_dry_run_says_what(tmp_path, capsys):
    assert _run(tmp_path) == 0
    run_dir = tmp_path / "debug"
    marker = json.loads((run_dir / MARKER).read_text())
    assert marker["tool"] == "prunelab" and marker["name"] == "debug" and marker["version"] == 1
    (run_dir / "notes.txt").write_text("mine")  # inside a prunelab run: goes with it
    assert main(["recipes/debug.yaml", "--output-dir", str(tmp_path), "--dry-run", "--force"]) == 0
    out = capsys.readouterr().out
    assert f"--force would DELETE {run_dir}" in out and "files" in out and (run_dir / "notes.txt").exists()
    assert _run(tmp_path, "--force") == 0
    assert not (run_dir / "notes.txt").exists() and (run_dir / MARKER).is_file()
    assert not list(tmp_path.glob(".debug.*"))  # no trash folder, no lock file left


def test_force_refuses_a_run_made_before_the_marker_with_a_hint(tmp_path, capsys):
    old = tmp_path / "debug"
    shutil.copytree(ROOT / "tests" / "fixtures" / "v1-runs" / "debug", old)
    assert _run(tmp_path, "--force") == 2
    err = capsys.readouterr().err
    assert "older prunelab" in err and "rm -r" in err and "--resume" in err
    assert (old / "recipe.resolved.yaml").is_file()
    assert "REFUSED" in describe_force(old)


def test_force_refuses_a_file_and_a_symlink(tmp_path, capsys):
    (tmp_path / "debug").write_text("not a folder")
    assert _run(tmp_path, "--force") == 2
    assert "is a file" in capsys.readouterr().err and (tmp_path / "debug").read_text() == "not a folder"


# ----------------------------------------------------------------------------- 2. resume keyed on content
def test_fingerprint_whole_and_sampled(tmp_path, monkeypatch):
    small = tmp_path / "a.txt"
    small.write_text("hello world\n")
    fp = fingerprint.file_fingerprint(small)
    assert fp["method"] == "whole"
    small.write_text("hello worle\n")  # same size, one byte
    assert fingerprint.file_fingerprint(small) != fp
    # large files: size + safetensors header + 8 sampled 1 MiB slices (limit lowered so the test file stays small)
    monkeypatch.setattr(fingerprint, "FULL_HASH_LIMIT", 1024)
    big = tmp_path / "w.safetensors"
    header = json.dumps({"w": {"dtype": "F32", "shape": [3 * 2**18], "data_offsets": [0, 3 * 2**20]}}).encode()
    data = bytearray(len(header).to_bytes(8, "little") + header + bytes(3 * 2**20))
    big.write_bytes(data)
    ref = fingerprint.file_fingerprint(big)
    assert ref["method"] == "sampled" and ref["size"] == len(data)
    os.utime(big, (1, 1))  # a timestamp is not content
    assert fingerprint.file_fingerprint(big) == ref
    for offset in (len(data) // 2, len(data) - 1, 20):  # inside a slice, the last byte, the header
        changed = bytearray(data)
        changed[offset] ^= 1
        big.write_bytes(changed)
        assert fingerprint.file_fingerprint(big) != ref, offset
    big.write_bytes(data[:-1])  # truncated
    assert fingerprint.file_fingerprint(big) != ref


def test_changed_calibration_text_reruns_from_calibrate(tmp_path, caplog):
    """The issue's example: change the calibration text in place and resume: calibrate and every later stage run
    again (load always runs), the log names the file, and the result is a fresh run's."""
    corpus = tmp_path / "corpus.txt"
    shutil.copy(CORPUS, corpus)
    args = ["name=c", f"stages.calibrate.source.path={corpus}"]
    assert _run(tmp_path, *args) == 0
    run_dir = tmp_path / "c"
    before = _finished(run_dir)
    assert _run(tmp_path, *args, "--resume") == 0
    assert {k: v for k, v in _finished(run_dir).items() if not k.endswith("load")} == \
        {k: v for k, v in before.items() if not k.endswith("load")}  # nothing changed: all restored
    text = CORPUS.read_text()
    corpus.write_text(text[len(text) // 2 :] + text[: len(text) // 2])  # same bytes, another order
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert _run(tmp_path, *args, "--resume") == 0
    after = _finished(run_dir)
    assert all(after[k] != before[k] for k in before), "a stage was restored from the stale calibration"
    log = caplog.text
    assert f"02-calibrate: not restored: stages.calibrate.source.path: the content of {corpus} changed" in log
    assert "restored from a finished run" not in log
    fresh = tmp_path / "fresh"
    assert _run(fresh, *args) == 0
    got, ref = (json.loads((d / "c" / "metrics.json").read_text()) for d in (tmp_path, fresh))
    assert got["eval"] == ref["eval"] and got["plan"] == ref["plan"]


def _local_model(folder: Path, auto_map: bool = False) -> Path:
    from prunelab.stages.io.tiny import byte_tokenizer, tiny_alias

    tiny_alias("tiny-random-llama").save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    if auto_map:
        cfg = json.loads((folder / "config.json").read_text())
        cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.Evil"}
        (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def test_changed_model_weights_rerun_every_stage(tmp_path, caplog):
    model = _local_model(tmp_path / "model-src")
    args = ["name=m", f"model.source={model}"]
    assert _run(tmp_path / "out", *args) == 0
    run_dir = tmp_path / "out" / "m"
    before = _finished(run_dir)
    weights = model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")
    data[start + 1001] ^= 0x40  # one weight, in place, same size
    weights.write_bytes(data)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert _run(tmp_path / "out", *args, "--resume") == 0
    after = _finished(run_dir)
    assert all(after[k] != before[k] for k in before)
    assert f"01-load: model.source: the content of {model} changed (files model.safetensors)" in caplog.text
    assert "02-calibrate: not restored: an input file of an earlier stage changed" in caplog.text
    load = json.loads((run_dir / "01-load" / "done.json").read_text())
    assert set(load["inputs"]["model.source"]["fingerprint"]) >= {"config.json", "model.safetensors", "tokenizer.json"}


def test_run_made_before_fingerprints_adopts_its_inputs(tmp_path):
    run_dir = tmp_path / "debug"
    shutil.copytree(ROOT / "tests" / "fixtures" / "v1-runs" / "debug", run_dir)
    assert main([str(run_dir / "recipe.resolved.yaml"), "--resume", "--output-dir", str(tmp_path), "--no-progress"]) == 0
    done = json.loads((run_dir / "02-calibrate" / "done.json").read_text())
    assert done["inputs"]["stages.calibrate.source.path"]["fingerprint"]["size"] == CORPUS.stat().st_size
    assert "inputs_hash" in done


# ----------------------------------------------------------------------------- 3. one process per run directory
HOLD = """
import sys, time
from pathlib import Path
from prunelab.stages.core.lock import RunLock
with RunLock(Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(120)
"""


def test_a_second_process_is_refused_at_once_then_a_killed_holder_is_taken_over(tmp_path, capsys, caplog):
    assert _run(tmp_path) == 0
    run_dir = tmp_path / "debug"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        capsys.readouterr()
        assert _run(tmp_path, "--resume") == 2
        err = capsys.readouterr().err
        assert f"PID {holder.pid}" in err and socket.gethostname() in err and "in use" in err
        assert _run(tmp_path, "--force") == 2  # --force does not delete a run another process is writing
        assert (run_dir / "metrics.json").is_file()
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    assert lock_path(run_dir).exists()  # a killed holder leaves its lock file: stale, taken over
    with caplog.at_level(logging.WARNING):
        assert _run(tmp_path, "--resume") == 0
    assert f"'pid': {holder.pid}" in caplog.text and "took over the lock" in caplog.text
    assert not lock_path(run_dir).exists()


def test_two_real_runs_into_one_folder_then_kill_9(tmp_path):
    """The issue's example: a second `--resume` run with another num_blocks into a folder a run is writing is refused
    (it used to exit 0 and leave results.json and metrics.json disagreeing); after a kill -9 of the first, the second
    takes the stale lock over, finishes, and leaves no temporary name behind."""
    cmd = [sys.executable, "pipeline/run.py", "recipes/debug.yaml", "--no-progress", "--output-dir", str(tmp_path)]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS.read_text() * 4)
    slow = [f"stages.calibrate.source.path={corpus}", "stages.calibrate.num_samples=1024",
            "stages.calibrate.seq_len=128"]  # scoring outlasts a second process's start
    first = subprocess.Popen([*cmd, *slow], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run_dir, partial = tmp_path / "debug", tmp_path / "debug" / "04-score" / "partial"
    try:
        deadline = time.monotonic() + 600
        while first.poll() is None and time.monotonic() < deadline and not (partial.is_dir() and any(partial.glob("*.json"))):
            time.sleep(0.02)
        second = subprocess.run([*cmd, *slow, "--resume", "stages.prune.num_blocks=3"], cwd=ROOT, capture_output=True,
                                text=True)
        assert second.returncode == 2 and f"PID {first.pid} on host {socket.gethostname()}" in second.stderr
        assert first.poll() is None, "the first run ended before the kill"
    finally:
        if first.poll() is None:
            os.kill(first.pid, signal.SIGKILL)
        first.wait()
    assert json.loads(lock_path(run_dir).read_text())["pid"] == first.pid
    again = subprocess.run([*cmd, "--resume", "stages.prune.num_blocks=3"], cwd=ROOT, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"'pid': {first.pid}" in again.stderr and "took over the lock" in again.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    plan = json.loads((run_dir / "05-prune" / "plan.json").read_text())
    assert metrics["model"]["layers_after"] == 3 and metrics["plan"]["removed_blocks"] == plan["removed_blocks"]
    assert not lock_path(run_dir).exists() and not [p for p in run_dir.rglob(".*") if p.name != MARKER]


def test_a_stale_lock_file_is_taken_over(tmp_path):
    run_dir = tmp_path / "debug"
    lock_path(run_dir).write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname(), "started": "x"}))
    assert _run(tmp_path) == 0
    assert not lock_path(run_dir).exists()
    with RunLock(run_dir) as lock:  # and the lock works after a takeover: a second holder in-process is refused
        assert lock.took_over is None
        with pytest.raises(RuntimeError, match=f"PID {os.getpid()}"):
            RunLock(run_dir).acquire()


# ----------------------------------------------------------------------------- 4. stale temporary folders
def test_resume_removes_what_a_kill_inside_export_left(tmp_path):
    """The state a kill -9 between export's two renames leaves: model/ gone, .model.old-PID (the previous model) and
    .model.tmp-PID (the new one), and no done.json; plus a half-written atomic file of a dead process elsewhere."""
    assert _run(tmp_path) == 0
    run_dir = tmp_path / "debug"
    dead, alive = _dead_pid(), os.getppid()
    (run_dir / "07-export" / "done.json").unlink()
    (run_dir / "model").rename(run_dir / f".model.old-{dead}")
    shutil.copytree(run_dir / f".model.old-{dead}", run_dir / f".model.tmp-{dead}")
    (run_dir / "04-score" / f".scores.json.tmp-{dead}").write_text("{half")
    (run_dir / f".keep.tmp-{alive}").mkdir()  # a live process's temp folder is left alone
    assert _run(tmp_path, "--resume") == 0
    left = sorted(p.name for p in run_dir.rglob(".*") if p.name != MARKER)
    assert left == [f".keep.tmp-{alive}"]
    assert (run_dir / "model" / "model.safetensors").is_file()


# ----------------------------------------------------------------------------- 5. recipes: resolvers, types, paths
def test_resolvers_are_off_but_key_interpolation_stays(monkeypatch):
    monkeypatch.setenv("A1_SECRET", "hf_s3cr3t")
    with pytest.raises(RecipeError, match="resolver 'oc.env'") as exc:
        load_recipe("recipes/debug.yaml", ["name=${oc.env:A1_SECRET}"])
    assert "hf_s3cr3t" not in str(exc.value)
    with pytest.raises(RecipeError, match="'oc.env'"):  # nested inside an allowed one
        load_recipe("recipes/debug.yaml", ["name=${oc.select:seed,${oc.env:A1_SECRET}}"])
    recipe = load_recipe("recipes/debug.yaml", ["stages.eval_dense.perplexity.tiny.seq_len=${stages.calibrate.seq_len}"])
    assert recipe.stages["eval_dense"].perplexity["tiny"].seq_len == 64


@pytest.mark.parametrize("override,field", [
    ("model=[1,2]", "model"), ("stages.prune.num_blocks=true", "stages.prune.num_blocks"), ("seed=false", "seed"),
    ("stages.calibrate.seq_len=true", "stages.calibrate.seq_len"), ("stages={a: 1}", "stages.a"),
])
def test_wrong_shapes_and_bools_are_recipe_errors(override, field):
    with pytest.raises(RecipeError) as exc:
        load_recipe("recipes/debug.yaml", [override])
    assert str(exc.value).splitlines()[1].strip().startswith(f"- {field}")


def test_bools_stay_bools():
    recipe = load_recipe("recipes/debug.yaml", ["stages.export.verify=false"])
    assert recipe.stages["export"].verify is False


def test_two_export_stages_are_refused(tmp_path):
    text = (ROOT / "recipes" / "debug.yaml").read_text() + "  export2:\n    type: export\n"
    path = tmp_path / "two.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError, match="stages.export2: a second export stage would overwrite model/"):
        load_recipe(path)


def test_home_is_expanded_once_for_every_path(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copy(CORPUS, tmp_path / "c.txt")
    recipe = load_recipe("recipes/debug.yaml", ["output_dir=~/runs", "stages.calibrate.source.path=~/c.txt"])
    assert recipe.output_dir == str(tmp_path / "runs") and recipe.run_dir == tmp_path / "runs" / "debug"
    assert recipe.stages["calibrate"].source.path == str(tmp_path / "c.txt")
    assert main(["recipes/debug.yaml", "--no-progress", "output_dir=~/runs", "stages.calibrate.source.path=~/c.txt"]) == 0
    assert (tmp_path / "runs" / "debug" / "metrics.json").is_file()
    assert not (ROOT / "~").exists()


def test_torch_load_is_weights_only_everywhere():
    missing = []
    for path in [*ROOT.glob("stages/**/*.py"), *ROOT.glob("pipeline/**/*.py")]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                ok = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                         for k in node.keywords)
                if not ok:
                    missing.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not missing, missing


def test_custom_code_auto_map_is_not_exported(tmp_path):
    model = _local_model(tmp_path / "src", auto_map=True)
    assert _run(tmp_path / "out", f"model.source={model}") == 0
    exported = json.loads((tmp_path / "out" / "debug" / "model" / "config.json").read_text())
    assert "auto_map" not in exported



def test_an_output_dir_that_is_a_file_is_a_run_error_not_a_traceback(tmp_path):
    """Below the preflight (which refuses it first on the CLI): the runner's own lock step says what is wrong."""
    from prunelab.runner import RunError, execute

    (tmp_path / "f").write_text("x")
    recipe = load_recipe("recipes/debug.yaml", [f"output_dir={tmp_path / 'f'}"])
    with pytest.raises(RunError, match="output_dir must be a folder"):
        execute(recipe, recipe.run_dir)

