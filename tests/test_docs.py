"""Every command the documents show is one the tools accept as written.

Each ``python -m MODULE ...`` of ours in README.md, BENCHMARKS.md and the module docstrings
(the usage blocks of the tools, benchmarks and configs; backslash continuations joined, a
trailing ``# comment`` or a following ``&&``/``;``/``|``/``>`` dropped, ``[optional]`` brackets
and ``...`` removed) is parsed by its own tool, without running it:

* argparse tools (the benchmarks, ``tests.faults``, ``jaxscaleseg.models.summary``): through
  their ``main`` with ``ArgumentParser.parse_args`` stopped right after it parsed, so unknown
  flags, bad choices and values of the wrong type fail as the user would see them;
* absl tools (``jaxscaleseg.train`` and the other CLIs started by ``cli.run``): every flag must
  be one the tool declares (its key flags), and ``--config FILE[:variants]`` with its
  ``--config.key=value`` overrides is loaded as the tool's flag loads it and validated.

So a renamed flag, a removed choice, or a config field a document still names fails here.
Values the documents leave to the reader (``WORKDIR``, ``DIR``, ``configs/<name>.py``) are
accepted as text; ``PLACEHOLDERS`` gives the few that a parser checks a number for.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import re
import shlex
from pathlib import Path

import pytest
from absl import flags
from ml_collections import config_flags

from jaxscaleseg import cli, config_schema

REPO = Path(__file__).resolve().parent.parent
DOCUMENTS = ("README.md", "BENCHMARKS.md")
# Python files whose module docstrings show commands (benchmarks/results/ holds records of
# runs at their commits, not documents).
DOCSTRING_FILES = sorted(
    [*REPO.glob("benchmarks/*.py"), *REPO.glob("configs/*.py"), REPO / "tests" / "faults.py"]
    + list(REPO.glob("jaxscaleseg/**/*.py"))
)
# Placeholders the documents use where a parser wants a number.
PLACEHOLDERS = {"C": "1284"}
_COMMAND = re.compile(r"python3? -m ((?:jaxscaleseg|benchmarks|tests)\.[\w.]+)([^`\n]*)")
_END = re.compile(r"\s(?:#|&&|;|\||>)")


def _joined_lines(text: str):
    """(line number, line) with backslash continuations joined onto their first line."""
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        start, line = index, lines[index]
        while line.rstrip().endswith("\\") and index + 1 < len(lines):
            index += 1
            line = line.rstrip().rstrip("\\") + " " + lines[index].strip()
        yield start + 1, line
        index += 1


def _documents():
    """(name, text): the two documents, and the module docstrings that show a command."""
    for name in DOCUMENTS:
        yield name, (REPO / name).read_text()
    for path in DOCSTRING_FILES:
        docstring = ast.get_docstring(ast.parse(path.read_text()), clean=False)
        if docstring and "python -m" in docstring:
            yield str(path.relative_to(REPO)), docstring


def documented_commands() -> list[tuple[str, str, list[str]]]:
    """``(where, module, arguments)`` of every command of ours in the documents."""
    found = []
    for name, text in _documents():
        for number, line in _joined_lines(text):
            for match in _COMMAND.finditer(line):
                text = _END.split(" " + match.group(2).replace("[", "").replace("]", ""))[0]
                arguments = [PLACEHOLDERS.get(a, a) for a in shlex.split(text) if a != "..."]
                found.append((f"{name}:{number}", match.group(1), arguments))
    return found


COMMANDS = documented_commands()


class _Parsed(Exception):
    """Raised in place of running a tool once its arguments parsed."""


def _is_absl_tool(module) -> bool:
    return "cli.run(main)" in inspect.getsource(module)


def _check_argparse(module, arguments: list[str], where: str, monkeypatch, capsys) -> None:
    parse = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        parse(self, args, namespace)
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    try:
        module.main(arguments)
    except _Parsed:
        return
    except SystemExit:
        error = capsys.readouterr().err.strip().splitlines() or ["exited"]
        pytest.fail(f"{where}: {error[-1]}")  # argparse's last line names the argument
    pytest.fail(f"{where}: {module.__name__}.main ran without parsing its arguments")


def _config_arguments(arguments: list[str]) -> tuple[str | None, list[str]]:
    """The ``--config`` file (None: not given) and the ``--config.key[=value]`` overrides."""
    file, overrides = None, []
    for index, argument in enumerate(arguments):
        if argument.startswith("--config="):
            file = argument.split("=", 1)[1]
        elif argument == "--config" and index + 1 < len(arguments):
            file = arguments[index + 1]
        elif argument.startswith("--config."):
            overrides.append(argument)
    return file, overrides


def _check_config(file: str, overrides: list[str], where: str) -> None:
    path, _, variant = file.partition(":")
    if not (REPO / path).is_file():
        pytest.fail(f"{where}: config file {path} does not exist")
    argv = ["prog", f"--config={REPO / path}{':' + variant if variant else ''}", *overrides]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file(  # as cli.CONFIG, reading the overrides from this argv
        "config", None, "", flag_values=values, lock_config=True, sys_argv=argv
    )
    try:
        values(argv)
        config_schema.validate(values.config)
    except Exception as e:  # noqa: BLE001 (any failure is the document's)
        pytest.fail(f"{where}: {type(e).__name__}: {e}")


def _check_absl(module, arguments: list[str], where: str) -> None:
    declared = {f.name for f in cli.FLAGS.get_key_flags_for_module(module)}
    for argument in arguments:
        if not argument.startswith("--") or argument.startswith("--config."):
            continue
        name = argument[2:].split("=", 1)[0]
        if name not in declared and not (name.startswith("no") and name[2:] in declared):
            pytest.fail(f"{where}: {module.__name__} has no flag --{name} (see its --help)")
    file, overrides = _config_arguments(arguments)
    if file is not None and "<" not in file:
        _check_config(file, overrides, where)


def test_the_documents_show_commands_of_every_kind():
    modules = {module for _, module, _ in COMMANDS}
    assert {"jaxscaleseg.train", "jaxscaleseg.evaluate", "benchmarks.scaling"} <= modules
    assert len(COMMANDS) >= 50
    assert any("--config.loss.search=union" in arguments for _, _, arguments in COMMANDS)


@pytest.mark.parametrize(
    ("where", "module_name", "arguments"), COMMANDS, ids=[c[0] for c in COMMANDS]
)
def test_documented_command_parses(where, module_name, arguments, monkeypatch, capsys):
    # tests/ is on pytest's path: ``tests.faults`` is imported as ``faults``, as its test does.
    module = importlib.import_module(module_name.removeprefix("tests."))
    if _is_absl_tool(module):
        _check_absl(module, arguments, where)
    else:
        _check_argparse(module, arguments, where, monkeypatch, capsys)


def test_a_stale_command_fails_the_checks(monkeypatch, capsys):
    """The checks can fail: an unknown flag, a bad choice, an unknown config field."""
    from benchmarks import scaling
    from jaxscaleseg import train

    with pytest.raises(pytest.fail.Exception, match="unrecognized arguments"):
        _check_argparse(scaling, ["--no_such_flag"], "doc:1", monkeypatch, capsys)
    with pytest.raises(pytest.fail.Exception, match="invalid choice"):
        _check_argparse(scaling, ["--preset", "huge"], "doc:2", monkeypatch, capsys)
    with pytest.raises(pytest.fail.Exception, match="no flag --flip"):
        _check_absl(train, ["--config", "configs/synthetic.py", "--flip"], "doc:3")
    with pytest.raises(pytest.fail.Exception, match="doc:4"):
        _check_absl(train, ["--config=configs/synthetic.py", "--config.loss.no_field=1"], "doc:4")
    with pytest.raises(pytest.fail.Exception, match="does not exist"):
        _check_absl(train, ["--config", "configs/missing.py"], "doc:5")
