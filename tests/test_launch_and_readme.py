"""The README's two commands and the accelerate configs stay true."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```\n(.*?)\n```", section, re.DOTALL)


def test_readme_has_exactly_two_commands_and_ci_runs_the_test_one():
    cmds = _commands()
    assert len(cmds) == 2
    setup_and_run, setup_and_test = cmds
    assert "torch==2.13.0" in setup_and_run and "pipeline/run.py recipes/smollm2/" in setup_and_run
    assert "torch==2.13.0" in setup_and_test and "pytest" in setup_and_test
    # .ci/run extracts the block between the markers: it must be the same line
    marked = (ROOT / "README.md").read_text().split("<!-- test-command:start -->")[1].split("<!-- test-command:end -->")[0]
    assert setup_and_test in marked
    recipe = setup_and_run.rsplit(" ", 1)[1]
    assert (ROOT / recipe).is_file()


@pytest.mark.parametrize("path", sorted((ROOT / "launch").glob("*.yaml")), ids=lambda p: p.name)
def test_launch_configs_parse_and_name_themselves(path):
    cfg = yaml.safe_load(path.read_text())
    assert cfg["num_processes"] >= 1 and "distributed_type" in cfg
    assert f"launch/{path.name}" in path.read_text().splitlines()[0]


def test_accelerate_launch_with_the_cpu_config(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "launch/cpu-single.yaml",
         "pipeline/run.py", "recipes/debug.yaml", "--output-dir", str(tmp_path), "--no-progress"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "debug" / "model" / "model.safetensors").is_file()
