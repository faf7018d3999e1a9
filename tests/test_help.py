"""Help: `yolo-pipeline --help` lists every step with its line; every option of every step has help text and
shows its default."""

from __future__ import annotations

import pytest

from yolo.cli import COMMANDS, build_parser, has_no_default, main


def test_top_help_lists_the_steps(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for name, (_, line) in COMMANDS.items():
        assert f"  {name}" in text and line in text
    assert "parse argv" not in text  # the module's developer note is not user help


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_option_has_help_and_its_default(command):
    """An option without a default (None, "", an off switch) says what happens without it in its own text."""
    parser = build_parser(command)
    formatter = parser._get_formatter()
    for action in parser._actions:
        assert action.help and action.help.strip(), f"{command} {action.option_strings or action.dest}: no help"
        if action.option_strings and not action.required and not has_no_default(action.default):
            shown = formatter._expand_help(action)  # the text --help prints, defaults filled in
            assert "default" in shown.lower(), f"{command} {action.option_strings}: default not shown: {shown!r}"
    parser.format_help()  # every %(...)s in the help strings expands
