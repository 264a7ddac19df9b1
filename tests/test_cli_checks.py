"""Every numeric option and --out checked before any work, for every command (issue 23): one stderr line naming
the option, exit 2. The data spec points at a folder that does not exist, so an error about anything else than
the option proves the check ran before any data was read or model built."""
from __future__ import annotations

import pytest

from _helpers import one_line_error
from vitscope.cli import build_parser
from vitscope.cli._checks import RULES

NO_DATA = "imagefolder:/nonexistent/vitscope-test"
MODEL = ["--model", "test_vit_cifar", "--data", NO_DATA, "--device", "cpu"]


@pytest.mark.parametrize(("argv", "message"), [
    (["landscape", *MODEL, "--span", "nan"], "--span must be a finite number, got nan"),
    (["landscape", *MODEL, "--span", "inf"], "--span must be a finite number, got inf"),
    (["landscape", *MODEL, "--span", "0"], "--span must be a finite number > 0, got 0"),
    (["landscape", *MODEL, "--steps", "1"], "--steps must be an integer >= 2, got 1"),
    (["landscape", *MODEL, "--weight-decay", "-1"], "--weight-decay must be a finite number >= 0"),
    (["hessian", *MODEL, "--weight-decay", "nan"], "--weight-decay must be a finite number, got nan"),
    (["hessian", *MODEL, "--tol", "nan"], "--tol must be a finite number, got nan"),
    (["hessian", *MODEL, "--tol", "2"], "--tol must be a finite number in (0, 1), got 2"),
    (["hessian", *MODEL, "--mixup", "-1"], "--mixup must be a finite number >= 0, got -1.0"),
    (["hessian", *MODEL, "--cutmix", "inf"], "--cutmix must be a finite number, got inf"),
    (["hessian", *MODEL, "--k", "0"], "--k must be a positive integer, got 0"),
    (["hessian", *MODEL, "--batches", "0"], "--batches must be a positive integer, got 0"),
    (["probe", *MODEL, "--seed", "-1"], "--seed must be an integer in [0, 4294967295], got -1"),
    (["probe", *MODEL, "--crop-pct", "nan"], "--crop-pct must be a finite number, got nan"),
    (["probe", *MODEL, "--crop-pct", "1.5"], "--crop-pct must be a finite number in (0, 1], got 1.5"),
    (["probe", *MODEL, "--max-batches", "0"], "--max-batches must be a positive integer, got 0"),
    (["probe", *MODEL, "--position-grid", "0"], "--position-grid must be a positive integer, got 0"),
    (["probe", *MODEL, "-b", "0"], "--batch-size must be a positive integer, got 0"),
    (["probe", *MODEL, "-j", "-1"], "--workers must be an integer >= 0, got -1"),
    (["probe", *MODEL, "--img-size", "0"], "--img-size must be a positive integer, got 0"),
    (["robustness", *MODEL, "--eps=-1/255"], "--eps must be a finite number >= 0 (each of them)"),
    (["robustness", *MODEL, "--freqs", "0,1.5"], "--freqs must be a finite number in [0, 1] (each of them)"),
    (["robustness", *MODEL, "--pgd-alpha", "0"], "--pgd-alpha must be a finite number > 0, got 0"),
    (["robustness", *MODEL, "--freq-width", "nan"], "--freq-width must be a finite number, got nan"),
    (["robustness", *MODEL, "--occlusion-fraction", "0"], "--occlusion-fraction must be a finite number in (0, 1]"),
    (["robustness", *MODEL, "--severities", "0,6"], "--severities must be an integer in [1, 5] (each of them)"),
    (["attention", *MODEL, "--discard-ratio", "1"], "--discard-ratio must be a finite number in [0, 1), got 1.0"),
    (["attention", *MODEL, "--num-images", "0"], "--num-images must be a positive integer, got 0"),
    (["compare", "test_vit_cifar", "test_resnet", "--data", NO_DATA, "--ridge", "nan"], "--ridge must be a finite"),
    (["train", "--config", "cpu-quick", "--model", "test_vit_cifar", "--data", NO_DATA, "-b", "0"],
     "--batch-size must be a positive integer, got 0"),
    (["train", "--resume", "/nonexistent/vitscope-run", "--resume-epoch", "-1"], "--resume-epoch must be an integer"),
    (["demo", "--threads", "0"], "--threads must be a positive integer, got 0"),
    (["reproduce", "hdvw-robustness", "--seeds", "0"], "--seeds must be a positive integer, got 0"),
])
def test_bad_numbers_are_one_line_errors_before_any_work(argv, message, capsys, tmp_path):
    if "--out" not in argv and argv[0] in ("landscape", "hessian", "probe", "robustness", "attention", "compare",
                                           "train", "demo", "reproduce"):
        argv = [*argv, "--out", str(tmp_path / "out")]
    one_line_error(capsys, argv, message)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv", [
    ["probe", *MODEL, "--out", "/proc/vitscope-x"],
    ["hessian", *MODEL, "--out", "/proc/vitscope-x"],
    ["train", "--config", "cpu-quick", "--model", "test_vit_cifar", "--data", NO_DATA, "--out", "/proc/vitscope-x"],
    ["report", "/nonexistent", "--out", "/proc/vitscope-x/report.html"],
])
def test_an_unwritable_out_is_refused_before_the_work(argv, capsys):
    one_line_error(capsys, argv, "--out /proc/vitscope-x", "cannot write under /proc")


def test_an_out_under_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    one_line_error(capsys, ["probe", *MODEL, "--out", str(tmp_path / "file" / "sub")], "is a file")
    one_line_error(capsys, ["report", str(tmp_path), "--out", str(tmp_path)], "is a directory")


def test_every_ruled_option_exists_on_its_command():
    """The table of ranges names only options the commands have (a renamed option would go unchecked)."""
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for command, rules in RULES.items():
        dests = {a.dest for a in sub.choices[command]._actions}
        assert set(rules) <= dests, (command, set(rules) - dests)


@pytest.mark.parametrize(("argv", "message"), [
    (["landscape", *MODEL, "--span", "abc", "--out", "o"], "argument --span: invalid float value: 'abc'"),
    (["robustness", *MODEL, "--eps", "nan", "--out", "o"], "argument --eps: expected numbers like 1/255"),
    (["hessian", *MODEL, "--k", "1.5", "--out", "o"], "argument --k: invalid int value: '1.5'"),
])
def test_values_argparse_cannot_read_are_one_line_too(argv, message, capsys):
    from vitscope.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1 and message in err, err
