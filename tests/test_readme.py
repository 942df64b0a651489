"""The README is the front door: its commands and code must stay true."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_ci_runs_exactly_the_readme_test_command():
    ci_lines = [
        line.strip()
        for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith(("#", "set ", "cd "))
    ]
    assert len(ci_lines) == 1, ci_lines
    command = ci_lines[0]
    assert "pip install torch==2.13.0" in command and "pytest" in command
    assert any(command == block.strip() for block in _blocks("bash")), command


@pytest.mark.filterwarnings("error::UserWarning")  # e.g. "no weight ... feeds a BatchNorm"
@pytest.mark.parametrize("index", range(len(_blocks("python"))))
def test_readme_python_snippet_runs(index):
    code = _blocks("python")[index]
    exec(compile(code, f"README.md python block {index}", "exec"), {"__name__": "readme"})
