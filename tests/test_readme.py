"""Keeps the README's commands true: the quick start is two commands, CI runs the README's
test command, and every `aigc-ray ...` line in the README's code blocks parses."""

import json
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
    assert re.search(r"pip install [-\w ]*-r requirements\.lock", ci) and re.search(r"pip install [-\w ]*--no-deps -e \.", ci)
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


def _subcommands() -> dict:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return sub.choices


def test_the_command_table_lists_exactly_the_flags_each_command_has():
    """Each row names every flag of its command (-h/-v aside) and no flag it lacks."""
    table = README.split("## Commands", 1)[1].split("\n\n", 2)[1]
    for line in table.splitlines():
        if "`aigc-ray " not in line:
            continue
        synopsis = line.split("`aigc-ray ", 1)[1].split("` |", 1)[0]
        command = synopsis.split()[0]
        listed = set(re.findall(r"--[a-z][a-z0-9-]*", synopsis))
        has = {o for a in _subcommands()[command]._actions for o in a.option_strings
               if o.startswith("--") and o not in ("--help", "--verbose")}
        assert listed == has, f"aigc-ray {command}: table lacks {sorted(has - listed)}, names {sorted(listed - has)}"


def test_every_flag_the_readme_gives_an_aigc_ray_command_exists():
    """Prose too: "`aigc-ray serve` ... `--insecure`" style mentions, per paragraph: a flag written next to
    `aigc-ray CMD` must be one of CMD's (or one of another command the paragraph names)."""
    commands = _subcommands()
    for section in README.split("\n## "):
        # a paragraph's flags may also be those of the commands its section's code blocks run
        in_blocks = {line.split()[1] for block in code_blocks(section) for line in block.splitlines()
                     if line.startswith("aigc-ray ") and len(line.split()) > 1}
        for paragraph in section.split("\n\n"):
            _check_paragraph_flags(paragraph, in_blocks, commands)


def _check_paragraph_flags(paragraph: str, in_blocks: set[str], commands: dict) -> None:
    if paragraph.lstrip().startswith(("```", "|")):
        return  # code blocks parse (test_every_readme_command_parses); the table is checked above
    # flags of the scripts and tools a paragraph also names (bench/, serve/ clients, ray, pip) are theirs
    if re.search(r"python (bench|serve|examples)/|`ray |pip install|`serve ", paragraph):
        return
    named = set(re.findall(r"`aigc-ray ([a-z]+)", paragraph)) & set(commands)
    if not named:
        return
    named |= in_blocks & set(commands)
    known = {o for c in named for a in commands[c]._actions for o in a.option_strings}
    flags = set(re.findall(r"`(--[a-z][a-z0-9-]*)", paragraph))
    assert flags <= known, f"{sorted(flags - known)} are not flags of aigc-ray {sorted(named)}:\n{paragraph[:300]}"


_PATH = re.compile(r"`((?:aigc_ray|serve|tune|deploy|bench|tests|examples|\.ci)/[\w./*-]*|[\w-]+\.(?:yaml|toml|lock))`")


def test_every_file_the_readme_names_exists():
    names = {m for m in _PATH.findall(README) if "<" not in m}
    assert len(names) > 10, names  # the pattern still finds the README's paths
    missing = [n for n in sorted(names) if not (list(ROOT.glob(n)) if "*" in n else (ROOT / n).exists())]
    assert not missing, f"the README names files that do not exist: {missing}"


def test_every_shipped_config_and_spec_the_readme_names_exists():
    from aigc_ray.config import named_configs

    shipped = set(named_configs())
    named = set(re.findall(r"--config ([a-z][\w-]+)", README)) | set(re.findall(r"`base: ([\w-]+)`", README))
    paragraph = README.split("Shipped configs (`--config NAME`):", 1)[1].split("\n\n", 1)[0]
    named |= {n for n in re.findall(r"`([a-z0-9]+(?:-[a-z0-9]+)+)`", paragraph) if not n.startswith("aigc-ray")}
    assert named and named <= shipped, f"not shipped: {sorted(named - shipped)}"
    assert shipped <= named, f"shipped but not in the README: {sorted(shipped - named)}"
    specs = set(re.findall(r"tune/([\w-]+)\.yaml", README))
    assert specs and all((ROOT / "tune" / f"{s}.yaml").is_file() for s in specs)


def test_serve_configs_point_at_a_checkpoint_a_readme_command_writes():
    """serve/config.yaml (and its copy in deploy/rayservice.yaml) serve runs/tune/best: `aigc-ray tune`'s
    default --out plus best/, which the README's sweep commands write."""
    import yaml

    tune = next(a for a in _subcommands()["tune"]._actions if a.dest == "out")
    written = f"{tune.default}/best"
    config = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    service = yaml.safe_load((ROOT / "deploy" / "rayservice.yaml").read_text())
    copy = yaml.safe_load(service["spec"]["serveConfigV2"])
    for app in (config["applications"][0], copy["applications"][0]):
        assert app["args"]["checkpoints"] == [written]
    assert "aigc-ray tune --spec tune/dcgan_asha.yaml" in README and written in README


def test_the_python_version_is_the_one_the_package_requires():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    floor = re.fullmatch(r">=(3\.\d+)", project["requires-python"]).group(1)
    assert f"(Python {floor}+;" in README
    assert floor == "3.11"  # tomllib, which the tests and CI use, is 3.11+


_FIGURE = re.compile(r"\[([^\]]*?(-?\d+(?:\.(\d+))?)[^\]\d]*)\]\((bench/results/[\w.-]+\.json)#([\w.\[\]-]+)\)")


def _quoted_figures(text: str) -> list[tuple[str, float, int, str, str]]:
    return [(m.group(1), float(m.group(2)), len(m.group(3) or ""), m.group(4), m.group(5)) for m in _FIGURE.finditer(text)]


def test_figures_quoted_from_bench_results_match_the_results_file():
    """A measured figure is quoted as a link to the results file the bench wrote and the value's key in it:
    `[1.35x](bench/results/NAME.json#key.sub)`. The figure, rounded as written, must be the file's value."""
    quoted = _quoted_figures(README)
    assert quoted, "no figure is quoted from bench/results (the pattern no longer matches the README?)"
    for text, shown, decimals, path, key in quoted:
        value = json.loads((ROOT / path).read_text())
        for part in key.split("."):
            value = value[int(part)] if isinstance(value, list) else value[part]
        assert round(float(value), decimals) == shown, f"README quotes {text!r} but {path}#{key} is {value}"


def test_the_figure_pattern_reads_values_keys_and_rounding():
    [(text, shown, decimals, path, key)] = _quoted_figures("was [1.35x the floor](bench/results/r.json#best.ratio).")
    assert (text, shown, decimals, path, key) == ("1.35x the floor", 1.35, 2, "bench/results/r.json", "best.ratio")
