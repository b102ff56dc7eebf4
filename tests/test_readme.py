"""Keeps the README's commands true: the quick start is two commands, CI runs the README's
test command, and every `aigc-ray ...` line in the README's code blocks parses."""

import re
import shlex
from pathlib import Path

import pytest
import tomllib

from aigc_ray.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def code_blocks(text: str) -> list[str]:
    return re.findall(r"```(?:bash|sh)\n(.*?)```", text, flags=re.S)


def test_quick_start_is_two_commands_and_ci_runs_the_same_test_command():
    quick = README.split("## Quick start", 1)[1]
    commands = [line for line in code_blocks(quick)[0].splitlines() if line.strip() and not line.startswith("#")]
    assert len(commands) == 2
    install_and_train, test_command = commands
    assert install_and_train == "pip install -e '.[dev]' && aigc-ray train"
    ci = (ROOT / ".ci" / "run").read_text()
    # the same packages as the quick start's install, at the versions pinned in requirements.lock
    # (test_dependencies checks the lock satisfies pyproject's requirements, [dev] included)
    assert "pip install --quiet -r requirements.lock" in ci and "pip install --quiet --no-deps -e ." in ci
    assert ci.strip().splitlines()[-1] == test_command  # CI ends by running the README's test command


def test_packaging_matches_the_readme():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["name"] == "aigc-ray"
    assert project["scripts"]["aigc-ray"] == "aigc_ray.cli:main"
    assert "dev" in project["optional-dependencies"]


def _aigc_lines() -> list[str]:
    lines = []
    for block in code_blocks(README):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            for part in line.split("&&"):
                part = part.strip()
                idx = part.find("aigc-ray ")
                if idx != -1 and "ray job submit" not in part[:idx]:
                    lines.append(part[idx:])
    return lines


@pytest.mark.parametrize("line", _aigc_lines())
def test_every_readme_command_parses(line):
    args = shlex.split(re.sub(r"<[^>]+>", "x", line))[1:]
    parser = build_parser()
    parser.exit = lambda status=0, message=None: (_ for _ in ()).throw(AssertionError(message))
    parser.error = lambda message: (_ for _ in ()).throw(AssertionError(f"{line}: {message}"))
    parser.parse_args(args)


def test_the_command_table_lists_every_command():
    from aigc_ray.cli import build_parser

    table = README.split("## Commands", 1)[1].split("\n\n", 2)[1]
    listed = {line.split("`aigc-ray ", 1)[1].split()[0] for line in table.splitlines() if "`aigc-ray " in line}
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert listed == set(sub.choices)


def test_the_deployment_loop_walks_train_sweep_promote_canary_finish_export():
    section = README.split("## Deployment loop", 1)[1].split("\n## ", 1)[0]
    lines = [line.split("  #")[0].strip() for line in code_blocks(section)[0].splitlines() if line.strip()]
    steps = [line.split()[1] for line in lines if line.startswith("aigc-ray ")]
    assert steps == ["train", "serve", "tune", "promote", "promote", "export"]
    promote, finish = (line for line in lines if line.startswith("aigc-ray promote"))
    assert "--sweep runs/tune" in promote and "--canary" in promote and finish.endswith("--finish")
    assert "--out runs/tune" in next(line for line in lines if line.startswith("aigc-ray tune"))
    assert "--checkpoint runs/tune/best" in next(line for line in lines if line.startswith("aigc-ray export"))
