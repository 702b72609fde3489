"""The README's Python API example runs as written and prints what its comments say."""

from __future__ import annotations

import math
import re
import shlex
from pathlib import Path

from typer.testing import CliRunner

from flows.cli import app

README = Path(__file__).resolve().parent.parent / "README.md"


def section(title: str) -> str:
    """The text of the README's ``## title`` section, up to the next ``## `` heading."""
    text = README.read_text(encoding="utf-8")
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", text, flags=re.DOTALL | re.MULTILINE)
    assert match, f"README.md has no '## {title}' section"
    return match.group(1)


def code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)


def test_python_api_example_runs(tmp_path, monkeypatch, capsys, samples_dir):
    text = section("Python API")
    [shell] = code_blocks(text, "bash")
    [python] = code_blocks(text, "python")
    # The example runs "from the repository root"; here a scratch folder that sees data_samples/.
    (tmp_path / "data_samples").symlink_to(samples_dir, target_is_directory=True)
    monkeypatch.chdir(tmp_path)

    for line in shell.strip().splitlines():
        program, *args = shlex.split(line)
        assert program == "sftkit"
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output

    capsys.readouterr()
    exec(compile(python, f"{README} (Python API)", "exec"), {"__name__": "readme_example"})  # noqa: S102 - the point of the test
    printed = capsys.readouterr().out.splitlines()
    assert printed[:2] == ["5<|im_end|>", "Hello"]
    loss = float(printed[2])
    assert math.isfinite(loss) and loss > 0
    assert (tmp_path / "api_demo_run" / "final").is_dir()
