"""`make demo` selects the table it just built, even when its output folder already holds another
(README's `build-lut --predict` example writes one under out/lut too).

The recipe runs for real through make, with `BIN` pointing at a wrapper around this checkout's CLI
that builds a tiny config (quick, two widths) where the demo names TinyLlama: the wrapper changes
what is measured, not how the recipe finds, shows and selects the table."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY_CONFIG

ROOT = Path(__file__).resolve().parents[1]
WRAPPER = """#!{python}
import os, sys
args = sys.argv[1:]
if args[:1] == ["build-lut"] and "--predict" not in args:
    args[args.index("--model") + 1] = os.environ["DEMO_MODEL"]
    args += ["--quick", "--prompt-len", "128", "--contexts", "128,256", "--widths", "1,1/2"]
sys.argv = ["amoeba-profile", *args]
from amoeba_profile.cli.main import main
main()
"""


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_demo_selects_the_table_it_built_beside_a_predicted_one(tmp_path):
    config = tmp_path / "tinyllama-1.1b" / "config.json"
    config.parent.mkdir()
    config.write_text(json.dumps(TINY_CONFIG))
    out = tmp_path / "out" / "lut"
    env = {**os.environ, "DEMO_MODEL": str(config)}
    # README's roofline example, first: a second table under the demo's output folder.
    subprocess.run(
        [
            sys.executable,
            "-m",
            "amoeba_profile.cli.main",
            "build-lut",
            "--predict",
            "--device",
            "rtx-a5000",
            "--backend",
            "tensorrt-llm",
            "--model",
            str(config),
            "--out",
            str(out),
        ],
        check=True,
        env=env,
        capture_output=True,
        timeout=300,
    )
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "amoeba-profile"
    wrapper.write_text(WRAPPER.format(python=sys.executable))
    wrapper.chmod(0o755)
    stamp = tmp_path / "installed"  # newer than pyproject.toml: make skips the install
    stamp.touch()
    os.utime(stamp, (time.time() + 3600, time.time() + 3600))
    proc = subprocess.run(
        ["make", "-s", "demo", f"BIN={bin_dir}", f"STAMP={stamp}", f"OUT={out}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    built = next(p for p in out.rglob("*.csv") if "/pytorch/" in p.as_posix())
    assert len(list(out.rglob("*.csv"))) == 2
    assert f"table: {built}" in proc.stdout and f"path: {built}" in proc.stdout  # show read the built table
    assert "pick: L4-" in proc.stdout and "holds 2 tables" not in proc.stderr
