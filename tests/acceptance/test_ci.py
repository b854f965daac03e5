"""CI runs the README's two commands word for word, so what a newcomer types cannot regress."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _readme_commands() -> list[str]:
    """The commands of the README's "Try it" block, comments left out."""
    block = (ROOT / "README.md").read_text().split("## Try it", 1)[1].split("```bash\n", 1)[1]
    lines = block.split("```", 1)[0].splitlines()
    return [line for line in lines if line and not line.startswith("#")]


def _ci_commands() -> dict[str, str]:
    """The README_* commands .ci/run defines, as the shell reads them."""
    script = (ROOT / ".ci" / "run").read_text()
    found = re.findall(r'^(README_\w+)="([^"]*)"$', script, flags=re.MULTILINE)
    return dict(found)


def test_ci_runs_each_readme_command_verbatim() -> None:
    ci = _ci_commands()
    assert sorted(ci) == ["README_DEMO", "README_TESTS"]
    assert sorted(ci.values()) == sorted(_readme_commands())
    steps = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if "step " in line]
    for name in ci:
        assert any(f'"${name}"' in line for line in steps), f"no CI step runs {name}"


def test_the_readme_commands_are_the_two_it_promises() -> None:
    demo, tests = _readme_commands()
    assert shlex.split(demo)[-2:] == ["pgoutbox", "demo"]
    assert shlex.split(tests)[-3:] == ["python", "-m", "pytest"]
