"""docs/contributing.md's walkthrough, followed literally in a copy of the tree: the file
it says to append to gets its block appended, the file it says to create is created, then the
usage block and the "Run it" commands (the single-file ones) run there and pass."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "contributing.md"
# What a clean clone holds that the walkthrough touches or runs.
_TREE = ("gridllm", "router", "scheduler_svc", "worker_svc", "kernels", "protos", "tests",
         "pyproject.toml")


def code_blocks(language: str) -> list[tuple[str, str]]:
    """(file named on the block's ``# File:`` first line or "", code without that line)."""
    blocks = []
    for block in re.findall(rf"```{language}\n(.*?)```", DOC.read_text(), flags=re.DOTALL):
        first, _, rest = block.partition("\n")
        match = re.fullmatch(r"# File: (\S+)", first)
        blocks.append((match.group(1), rest) if match else ("", block))
    return blocks


def _run_it_commands() -> list[str]:
    """The commands of the "4. Run it" section that name a single test or source file."""
    section = DOC.read_text().split("### 4. Run it", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.DOTALL).group(1)
    return [line for line in block.splitlines()
            if line.startswith(".venv/bin/") and re.search(r"\.py\b", line)]


@pytest.fixture(scope="module")
def followed(tmp_path_factory) -> Path:
    """A copy of the tree with the walkthrough's file blocks applied."""
    clone = tmp_path_factory.mktemp("clone")
    for name in _TREE:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, clone / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(source, clone / name)
    for path, code in code_blocks("python"):
        if not path:
            continue
        target = clone / path
        prose = DOC.read_text().split(f"# File: {path}")[0].rsplit("```", 1)[0]
        if target.exists():
            # The walkthrough says to append to an existing file.
            assert "Append it to" in prose[-600:], f"the doc must say what to do with {path}"
            target.write_text(target.read_text().rstrip("\n") + "\n\n\n" + code)
        else:
            target.write_text(code)
    return clone


def _env(clone: Path) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(clone), "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("PYTEST_ADDOPTS", None)
    return env


def test_walkthrough_names_its_files():
    paths = {path for path, _ in code_blocks("python") if path}
    assert paths == {"worker_svc/logits_processors.py", "tests/worker_svc/test_eta_cutoff.py"}


def test_walkthrough_starts_from_the_clean_tree():
    """What it adds is not there yet: the new test file, and the processor's name."""
    from worker_svc.logits_processors import registered_logits_processors

    created = [path for path, _ in code_blocks("python") if path.startswith("tests/")]
    assert created and not any((REPO / path).exists() for path in created)
    new_names = set()
    for _, code in code_blocks("python"):
        new_names |= set(re.findall(r'@register_logits_processor\("(\w+)"', code))
    assert new_names and not new_names & set(registered_logits_processors())


def test_usage_block_runs_after_the_walkthrough(followed):
    usage = [code for path, code in code_blocks("python") if not path]
    assert usage
    for code in usage:
        result = subprocess.run([sys.executable, "-c", code], cwd=followed, env=_env(followed),
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]


def test_run_it_commands_pass(followed):
    commands = _run_it_commands()
    assert any("pytest" in c for c in commands) and any("ruff" in c for c in commands)
    for command in commands:
        tool, *args = command.split()
        name = tool.rsplit("/", 1)[1]
        if name == "ruff" and shutil.which("ruff", path=os.path.dirname(sys.executable)) is None:
            continue  # the dev extras are not installed here; `make lint` checks the same
        argv = ([sys.executable, "-m", "pytest", "-p", "no:cacheprovider"] if name == "pytest"
                else [shutil.which("ruff", path=os.path.dirname(sys.executable))]) + args
        result = subprocess.run(argv, cwd=followed, env=_env(followed), capture_output=True,
                                text=True, timeout=600)
        assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}{result.stderr[-2000:]}"
        if name == "pytest":
            assert " passed" in result.stdout and "skipped" not in result.stdout, result.stdout
