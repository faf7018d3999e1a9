"""The CLI contract: one line on stderr and exit 2 for user errors, no traceback, no abbreviations."""

from __future__ import annotations

from yolo import __version__
from yolo.cli import main


def _run(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's exit path
        code = e.code
    err = capsys.readouterr().err
    return code, err


def test_unknown_step(capsys):
    code, err = _run(["trian", "--data", "x"], capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "invalid choice: 'trian'" in err


def test_abbreviated_flag_is_rejected(capsys):
    code, err = _run(["sample-data", "--ou", "/tmp/nowhere"], capsys)
    assert code == 2
    assert err.strip().splitlines() == ["yolo-pipeline sample-data: error: the following arguments are required: --out"]


def test_user_error_is_one_line_without_traceback(tmp_path, capsys):
    code, err = _run(["validate", "--data", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "v")], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("yolo-pipeline validate: error: ")
    assert "missing.yaml" in lines[0] and "Traceback" not in err
    assert not (tmp_path / "v" / "report.json").exists()


def test_version(capsys):
    try:
        main(["--version"])
    except SystemExit as e:
        assert e.code == 0
    assert __version__ in capsys.readouterr().out


def test_program_returns_mains_exit_code_and_freezes_the_heap_for_shutdown(monkeypatch):
    import gc

    from yolo import cli

    monkeypatch.setattr(cli, "main", lambda executable: 2 if executable else 0)
    try:
        assert cli.program() == 2
        assert gc.get_freeze_count() > 0  # shutdown's collections skip what existed when the step ended
    finally:
        gc.unfreeze()
