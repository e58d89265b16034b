"""The lock of tested versions: write it, check an environment against it, report drift from it.

    python requirements/lock.py write FREEZE.txt      pip freeze --all output -> requirements/lock.txt
    python requirements/lock.py check                 this interpreter's packages equal the lock, or exit 1
    python requirements/lock.py drift                 print how this interpreter's packages differ (exit 0)

Only the standard library: it runs in a venv before anything else is installed. The lock is in
pip's constraints form (`name==version` lines), so `pip install -c requirements/lock.txt ...` installs
exactly these versions and nothing that the install would not pull in anyway.
"""

from __future__ import annotations

import re
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

LOCK = Path(__file__).with_name("lock.txt")
# Never locked: the project itself (installed editable from the work tree).
NOT_LOCKED = {"sdlora"}
HEADER = """\
# The exact versions `make demo`, `make test` and .ci/run install (pip constraints form), written by
# `make lock` from the newest versions the registries served that day, less those requirements/hold.txt
# holds back (each with its reason).
# Move it forward on purpose: `make test-latest` (reports the drift, runs the suite unlocked), then
# `make lock`, then `make test`, and commit this file with what changed. Local version labels such as
# torch's +cpu are dropped: `torch==2.13.0` accepts the CPU build.
"""
LINE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def public(version: str) -> str:
    return version.split("+", 1)[0]


def read_lock(path: Path = LOCK) -> dict[str, str]:
    """{canonical name: version} from a constraints file; anything else than `name==version` is refused."""
    pins: dict[str, str] = {}
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = LINE.match(line)
        if not m:
            raise SystemExit(f"{path}:{n}: {raw!r} is not a `name==version` pin; run `make lock` to rewrite the lock")
        pins[canonical(m.group(1))] = m.group(2)
    return pins


def installed() -> dict[str, str]:
    """{canonical name: public version} of every distribution installed into this interpreter's site-packages.

    Only there: once setuptools is imported (pytest's plugins do) its vendored copies of jaraco.*, autocommand
    and others are on sys.path with their own .dist-info folders, but nobody installed them."""
    paths = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    found = {}
    for dist in metadata.distributions(path=paths):
        name = dist.metadata["Name"]
        if name:
            found[canonical(name)] = public(dist.version)
    return {k: v for k, v in found.items() if k not in NOT_LOCKED}


def differences(pins: dict[str, str], have: dict[str, str]) -> list[str]:
    """What differs, one line each: another version, or a package the lock does not know.

    A locked package that is not installed is fine: the lock covers the test extra, `make demo` installs less.
    """
    lines = []
    for name in sorted(have):
        if name not in pins:
            lines.append(f"{name} {have[name]} is installed but not in the lock")
        elif public(pins[name]) != have[name]:
            lines.append(f"{name} {have[name]} installed, lock says {pins[name]}")
    return lines


def write(freeze: Path, out: Path = LOCK) -> None:
    """Rewrite the lock from `pip freeze --all` output: sorted, local labels dropped, the project left out."""
    pins = {}
    for raw in freeze.read_text().splitlines():
        m = LINE.match(raw.strip())
        if m and canonical(m.group(1)) not in NOT_LOCKED:
            pins[canonical(m.group(1))] = (m.group(1), public(m.group(2)))
    if not pins:
        raise SystemExit(f"{freeze}: no `name==version` lines; pass the output of `pip freeze --all`")
    body = "".join(f"{name}=={version}\n" for name, version in (pins[k] for k in sorted(pins)))
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(HEADER + body)
    tmp.replace(out)  # never a half-written lock
    print(f"wrote {out} ({len(pins)} packages)")


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "write":
        write(Path(argv[1]))
        return 0
    if argv in (["check"], ["drift"]):
        diff = differences(read_lock(), installed())
        if argv == ["drift"]:
            print(f"drift from {LOCK.name}: " + ("none" if not diff else f"{len(diff)} packages"))
            print("".join(f"  {line}\n" for line in diff), end="")
            return 0
        if diff:
            print(f"{sys.executable}: the installed packages differ from {LOCK} ({len(diff)}):", file=sys.stderr)
            print("".join(f"  {line}\n" for line in diff), end="", file=sys.stderr)
            print("remove the virtual environment (rm -rf .venv) and run the make target again", file=sys.stderr)
            return 1
        print(f"installed packages match {LOCK.name}")
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
