"""Kill the final table write with SIGKILL and race readers against rewrites, in real processes.

The unit tests crash the write in-process (an exception at each rename). This script is the
evidence for the claim in README: a ``kill -9`` anywhere in the write leaves the old table or the
new one, the same write run again converges, and a reader in another process never sees a mix.

    python benchmarks/crash_consistency.py --tries 50

Three experiments, each printing counts:
1. step kills: the writer kills itself just before each file-system step of ``write_table``
   (every ``open`` of a temp file or folder, ``fsync`` and ``rename``), on a first write and on a rewrite;
2. random kills: the parent SIGKILLs a writer that rewrites in a loop at a random moment;
3. reader race: reader processes load the table in a loop while a writer rewrites it.
"""

from __future__ import annotations

import argparse
import random
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Child programs: they import the package from this checkout and never touch timing.
_SETUP = textwrap.dedent("""
    import os, sys, signal, tempfile
    from pathlib import Path
    sys.path.insert(0, {root!r})
    from amoeba_profile.core.arch import ModelArch
        from amoeba_profile.table.lut import load_table, write_table
    from tests.conftest import synthetic_lut
    arch = ModelArch("tiny", 64, 4, 8, 4, 8, 128, 256, max_position=512)
    def table(value):
        return synthetic_lut(arch, lambda h, p, c: value, lambda f, p: value + 1, lambda p, c: value + 2)
    path = Path({path!r})
""")

_STEP_WRITER = _SETUP + textwrap.dedent("""
    kill_at, counter = int(sys.argv[1]), [0]
    def hook(real):
        def wrapped(*args, **kwargs):
            if counter[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            counter[0] += 1
            return real(*args, **kwargs)
        return wrapped
    os.replace, os.fsync, os.open = hook(os.replace), hook(os.fsync), hook(os.open)
    new = table(5.0)
    write_table(path, new.frame, {{**meta_fields(new.meta), "generation": "new"}})
    print(counter[0])
""")

_LOOP_WRITER = _SETUP + textwrap.dedent("""
    tables = [table(3.0), table(5.0)]
    i = 0
    while True:
        t = tables[i % 2]
        write_table(path, t.frame, {{**meta_fields(t.meta), "generation": str(i % 2)}})
        i += 1
""")

_READER = _SETUP + textwrap.dedent("""
    import time
    from amoeba_profile.core.errors import LutError
    deadline, reads, errors = time.monotonic() + float(sys.argv[1]), 0, []
    while time.monotonic() < deadline:
        try:
            lut = load_table(path)
            value = float(lut.frame["median_ms"].min())
            assert lut.meta.unknown_fields["generation"] in {{"3.0": ("0", "old"), "5.0": ("1",)}}[str(value)], "mixed table"
            reads += 1
        except (LutError, AssertionError) as exc:
            errors.append(str(exc))
    print(reads, len(errors), errors[:3])
""")


def _program(template: str, path: Path) -> str:
    return template.format(root=str(ROOT), path=str(path))


def _write_old(path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-c",
            _program(
                _SETUP
                + "\nt = table(3.0)\nwrite_table(path, t.frame, {{**meta_fields(t.meta), 'generation': 'old'}})\n",
                path,
            ),
        ],
        check=True,
    )


def _check(path: Path, allowed: set[str | None]) -> str:
    """Load the table in a fresh process; return its generation ("absent" when there is none)."""
    if not path.exists():
        return "absent"
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            _program(_SETUP + "\nprint(load_table(path).meta.unknown_fields.get('generation'))\n", path),
        ],
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        return "unloadable: " + out.stderr.strip().splitlines()[-1]
    generation = out.stdout.strip()
    return generation if generation in allowed else f"unexpected {generation}"


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith((".tmp", ".pending")))


def step_kills(work: Path) -> None:
    probe = work / "probe" / "t.csv"
    steps = int(
        subprocess.run(
            [sys.executable, "-c", _program(_STEP_WRITER, probe), "-1"], capture_output=True, text=True, check=True
        ).stdout
    )
    print(f"step kills: write_table makes {steps} file-system steps")
    for first in (True, False):
        outcomes: dict[str, int] = {}
        leftovers = 0
        for step in range(steps):
            path = work / f"step-{first}-{step}" / "t.csv"
            path.parent.mkdir(parents=True)
            if not first:
                _write_old(path)
            subprocess.run([sys.executable, "-c", _program(_STEP_WRITER, path), str(step)], capture_output=True)
            seen = _check(path, {"old", "new"})
            subprocess.run([sys.executable, "-c", _program(_STEP_WRITER, path), "-1"], check=True, capture_output=True)
            rerun = _check(path, {"new"})
            key = f"after kill: {seen:>8}, after rerun: {rerun}"
            outcomes[key] = outcomes.get(key, 0) + 1
            leftovers += bool(_leftovers(path.parent))
        print(
            f"  {'first write' if first else 'rewrite    '}: "
            + "; ".join(f"{n} x [{k}]" for k, n in outcomes.items())
            + f"; folders with temp files left after the rerun: {leftovers}"
        )


def random_kills(work: Path, tries: int) -> None:
    path = work / "random" / "t.csv"
    path.parent.mkdir(parents=True)
    _write_old(path)
    outcomes: dict[str, int] = {}
    leftovers = 0
    rng = random.Random(0)
    for _ in range(tries):
        proc = subprocess.Popen([sys.executable, "-c", _program(_LOOP_WRITER, path)])
        time.sleep(1.5 + rng.random())  # past the import, into the write loop
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        seen = _check(path, {"old", "0", "1"})
        bucket = {
            "old": "the table before the writer's first rewrite",
            "0": "a rewritten table",
            "1": "a rewritten table",
        }.get(seen, seen)
        outcomes[bucket] = outcomes.get(bucket, 0) + 1
        _write_old(path)  # the rerun
        leftovers += bool(_leftovers(path.parent))
    print(
        f"random kills ({tries}): "
        + "; ".join(f"{n} x {k}" for k, n in outcomes.items())
        + f"; tries with temp files left after the rerun: {leftovers}"
    )


def reader_race(work: Path, seconds: float, readers: int) -> None:
    path = work / "race" / "t.csv"
    path.parent.mkdir(parents=True)
    _write_old(path)
    writer_program = _program(
        _LOOP_WRITER.replace(
            "while True:",
            "import time\ndeadline = time.monotonic() + float(sys.argv[1])\nwhile time.monotonic() < deadline:",
        )
        + "\nprint(i)\n",
        path,
    )
    writer = subprocess.Popen([sys.executable, "-c", writer_program, str(seconds)], stdout=subprocess.PIPE, text=True)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _program(_READER, path), str(seconds)], stdout=subprocess.PIPE, text=True
        )
        for _ in range(readers)
    ]
    rewrites = int(writer.communicate()[0])
    results = [p.communicate()[0].split(" ", 2) for p in procs]
    reads = sum(int(r[0]) for r in results)
    errors = sum(int(r[1]) for r in results)
    examples = [r[2].strip() for r in results if int(r[1])]
    print(
        f"reader race: {rewrites} rewrites, {readers} reader processes, {reads} loads, {errors} errors"
        + ("" if not errors else f" e.g. {examples}")
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tries", type=int, default=50, help="random kills")
    parser.add_argument("--race-s", type=float, default=20.0, help="seconds of the reader race")
    parser.add_argument("--readers", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="amoeba-crash-") as tmp:
        work = Path(tmp)
        step_kills(work)
        random_kills(work, args.tries)
        reader_race(work, args.race_s, args.readers)


if __name__ == "__main__":
    main()
