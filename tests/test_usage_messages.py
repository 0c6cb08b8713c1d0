"""Mistakes a new user makes get one line that names the mistake, with the exit code README promises
(2 for usage errors): a missing config file, a file that is not a strategy, two configs in folders
of the same name, a --whole depth the model does not have."""

import json
import sys

import pytest
from conftest import TINY_CONFIG, synthetic_lut

from amoeba_profile.cli import main as cli
from amoeba_profile.core.arch import resolve_arch
from amoeba_profile.core.errors import ArchError
from amoeba_profile.table.lut import load_table


def run_main(monkeypatch, capsys, *args):
    """(exit code, stdout, stderr) of ``amoeba-profile ARGS`` through the entry point, in-process."""
    monkeypatch.setattr(sys, "argv", ["amoeba-profile", *args])
    monkeypatch.setitem(cli._state, "debug", False)
    with pytest.raises(SystemExit) as done:
        cli.main()
    captured = capsys.readouterr()
    return done.value.code, captured.out, captured.err


def _one_line(err: str) -> str:
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err.strip()


def test_a_missing_config_path_says_the_file_does_not_exist(tmp_path, monkeypatch, capsys):
    missing = tmp_path / "cfg" / "missing.json"
    code, _, err = run_main(monkeypatch, capsys, "build-lut", "--model", str(missing), "--out", str(tmp_path / "lut"))
    line = _one_line(err)
    assert code == 2 and f"{missing}: the file does not exist" in line and "unknown model" not in line
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArchError, match="the folder holds no config.json"):
        resolve_arch(str(tmp_path / "empty"))
    with pytest.raises(ArchError, match="unknown model 'llama9'"):  # a bare word is still a model name
        resolve_arch("llama9")
    assert not (tmp_path / "lut").exists()


def test_a_file_that_is_no_pickle_names_the_file_and_the_problem(tmp_path, monkeypatch, capsys, tiny_arch):
    from amoeba_profile.table.lut import write_table

    lut = synthetic_lut(tiny_arch, lambda h, p, c: 1.0, lambda f, p: 1.0, lambda p, c: 1.0, meta={"dtype": "float32"})
    table = tmp_path / "t.csv"
    write_table(table, lut.frame, lut.meta)
    strategy = tmp_path / "strategy.npy"
    strategy.write_bytes(b"x\x9c not a pickle")  # a zlib stream: what a compressed save looks like
    code, _, err = run_main(
        monkeypatch,
        capsys,
        "select",
        "--lut",
        str(table),
        "--budget-ms",
        "100",
        "--prompt-len",
        "16",
        "--gen-len",
        "20",
        "--strategy",
        str(strategy),
    )
    line = _one_line(err)
    assert (
        code == 2
        and f"{strategy}: not a NumPy .npy or pickle file (byte 0x78 at offset 0 is no pickle opcode)" in line
        and "KeyError" not in line
    )
    strategy.write_bytes(b"\x80\x04\x95\x10")  # a pickle cut short inside its frame header
    code, _, err = run_main(
        monkeypatch,
        capsys,
        "select",
        "--lut",
        str(table),
        "--budget-ms",
        "100",
        "--prompt-len",
        "16",
        "--gen-len",
        "20",
        "--strategy",
        str(strategy),
    )
    assert code == 2 and "the file ends before its data does (truncated or empty)" in _one_line(err)


def test_whole_depth_outside_the_model_is_a_usage_error(tmp_path, monkeypatch, capsys, tiny_config_path):
    code, _, err = run_main(
        monkeypatch,
        capsys,
        "build-lut",
        "--model",
        str(tiny_config_path),
        "--out",
        str(tmp_path / "lut"),
        "--whole",
        "9x1",
    )
    assert code == 2 and "--whole 9x1: tiny has 4 layers; keep 1..4" in _one_line(err)
    code, _, err = run_main(
        monkeypatch,
        capsys,
        "build-lut",
        "--model",
        str(tiny_config_path),
        "--out",
        str(tmp_path / "lut"),
        "--whole",
        "0x1",
    )
    assert code == 2 and "--whole 0x1" in _one_line(err)
    assert not (tmp_path / "lut").exists()


def test_name_option_checks_the_name(tiny_arch):
    from amoeba_profile.core.arch import renamed

    assert renamed(tiny_arch, "m-2").name == "m-2" and renamed(tiny_arch, "m-2").hidden_size == tiny_arch.hidden_size
    for bad in ("", "../x", "a/b", "-x", "x" * 101):
        with pytest.raises(ArchError, match="--name"):
            renamed(tiny_arch, bad)


def test_two_configs_in_folders_of_one_name_collide_in_one_line_and_name_fixes_it(tmp_path, monkeypatch, capsys):
    small = {**TINY_CONFIG, "num_hidden_layers": 2}
    first, second = tmp_path / "a" / "m" / "config.json", tmp_path / "b" / "m" / "config.json"
    for path, config in ((first, small), (second, {**small, "intermediate_size": 96})):
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(config))
    out = tmp_path / "lut"
    grid = ("--out", str(out), "--quick", "--prompt-len", "16", "--contexts", "16", "--widths", "1")
    code, built, err = run_main(monkeypatch, capsys, "build-lut", "--model", str(first), *grid)
    assert code == 0, err
    table = next(out.rglob("m-float32.csv"))
    code, _, err = run_main(monkeypatch, capsys, "build-lut", "--model", str(second), *grid)
    line = _one_line(err.splitlines()[-1] + "\n")
    assert code == 1 and line == (
        f"error: {table}: holds another model also named 'm' (ffn_size=128 there, 96 here); "
        "name this one with --name (e.g. --name m-2) or choose another --out"
    )
    code, built, err = run_main(monkeypatch, capsys, "build-lut", "--model", str(second), "--name", "m-2", *grid)
    assert code == 0, err
    other = table.with_name("m-2-float32.csv")
    assert f"table: {other}" in built
    assert load_table(other).arch.ffn_size == 96 and load_table(table).arch.ffn_size == 128
    # each measured table keeps the config it was built from, for select --export
    assert load_table(other).meta.source_config == {**small, "intermediate_size": 96}
    assert load_table(table).meta.source_config == small
