"""The prunelab command (pipeline.cli; ``python -m prunelab``): ls, cp, validate, run, bench, version, and shipped
recipe names wherever a recipe goes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from prunelab.cli import main

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = main.__module__.rsplit(".", 1)[0]  # "pipeline" in this checkout, "prunelab" after the rename


def test_version_and_help(capsys):
    assert main(["version"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("prunelab 0.1.0 (") and "torch " in out and "transformers " in out
    assert main([]) == 2 and "run" in capsys.readouterr().out
    assert main(["rnu"]) == 2 and "did you mean `prunelab run`" in capsys.readouterr().err


def test_ls_lists_every_shipped_recipe_with_a_line(capsys):
    assert main(["ls"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines()[1:] if line and not line.startswith(" ")}
    assert "debug" in rows and "smollm2/flap-20" in rows and not any(n.startswith("bench/") for n in rows)
    assert "tiny random Llama" in rows["debug"]
    assert main(["ls", "--all"]) == 0 and "bench/smollm2-20 " in capsys.readouterr().out


def test_cp_then_validate_and_run_outside_the_checkout(tmp_path, monkeypatch, capsys):
    """From an empty folder: cp rewrites the recipe's root-relative data path to the shipped file (comments kept),
    refuses to overwrite, and the copy validates and runs to the end."""
    monkeypatch.chdir(tmp_path)
    assert main(["cp", "debug", "r.yaml"]) == 0
    text = (tmp_path / "r.yaml").read_text()
    assert text.startswith("# python pipeline/run.py recipes/debug.yaml") and str(ROOT / "tests/data/tiny_corpus.txt") in text
    assert main(["cp", "debug", "r.yaml"]) == 2 and "--force" in capsys.readouterr().err
    assert main(["validate", "r.yaml"]) == 0 and "recipe is valid" in capsys.readouterr().out
    assert main(["run", "r.yaml", "stages.prune.num_blocks=1", "--no-progress"]) == 0
    assert "blocks 6 → 5" in capsys.readouterr().out and (tmp_path / "runs" / "debug" / "model" / "README.md").is_file()


def test_cp_into_a_folder_keeps_paths_that_resolve(tmp_path, capsys):
    """Run from the repository root the relative path exists, so the copy is byte for byte the shipped file."""
    assert main(["cp", "smollm2/flap-20", str(tmp_path)]) == 0
    assert (tmp_path / "flap-20.yaml").read_text() == (ROOT / "recipes/smollm2/flap-20.yaml").read_text()
    assert main(["cp", "flap-2O", str(tmp_path / "x.yaml")]) == 2 and "did you mean" in capsys.readouterr().err


def test_shipped_names_work_where_a_recipe_goes(tmp_path, capsys):
    assert main(["validate", "debug", "stages.prune.num_blocks=3"]) == 0
    assert '"num_blocks": 3' in capsys.readouterr().out
    assert main(["validate", "smollm2/flap-20", "--output-dir", str(tmp_path)]) == 0
    assert str(tmp_path) in capsys.readouterr().out
    assert main(["validate", "debgu"]) == 2 and "did you mean 'debug'" in capsys.readouterr().err
    assert main(["validate", "missing.yaml"]) == 2 and "not found" in capsys.readouterr().err


def test_python_dash_m_is_the_same_command(tmp_path):
    """``python -m prunelab`` (this checkout: ``python -m pipeline``) and ``python pipeline/run.py`` unchanged."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", PACKAGE, "validate", "debug"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "recipe is valid" in out.stdout, out.stderr
    script = subprocess.run([sys.executable, "pipeline/run.py", "recipes/debug.yaml", "--dry-run"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert script.returncode == 0 and "recipe is valid" in script.stdout, script.stderr


def test_bench_delegates_to_the_benchmarks_main(monkeypatch, tmp_path):
    seen = {}

    def fake_main(argv):
        seen["argv"] = argv
        seen["text"] = Path(argv[0]).read_text()
        return 0

    monkeypatch.setattr(f"{PACKAGE}.benchmarks.cli.main", fake_main)
    assert main(["bench", "bench/smollm2-20-quick", "--resume"]) == 0
    assert seen["argv"][1:] == ["--resume"] and yaml.safe_load(seen["text"])["name"]


BLOCKER = '''
import sys

class _Missing:
    """As if the extras were not installed: importing {names} fails."""
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name.split(".")[0] in {names!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}")
        return None

sys.meta_path.insert(0, _Missing)
'''


def test_base_install_runs_without_the_extras(tmp_path):
    """lm-eval and bitsandbytes are extras: with both unimportable (a meta-path blocker in sitecustomize), a recipe
    without zero-shot tasks or QLoRA runs to the end, and one with a task is refused at --dry-run naming the extra."""
    names = ("lm_eval", "bitsandbytes")
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(BLOCKER.format(names=names))
    env = {**os.environ, "PYTHONPATH": f"{tmp_path / 'site'}{os.pathsep}{ROOT}", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", PACKAGE, "run", "debug", "--output-dir", str(tmp_path / "runs"),
                          "--no-progress"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    probe = subprocess.run([sys.executable, "-c", f"import sys, {PACKAGE}.runner, {PACKAGE}.cli, {PACKAGE}.registry as r; r.load_stages(); "
                            f"print([m for m in {names!r} if m in sys.modules])"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
    assert probe.stdout.strip() == "[]", probe.stderr[-2000:]
    task = subprocess.run([sys.executable, "-m", PACKAGE, "validate", "debug", "stages.eval_pruned.tasks.boolq.limit=4"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert task.returncode == 2 and "pip install 'prunelab[eval]'" in task.stderr, task.stderr[-2000:]
