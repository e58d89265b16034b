"""The lock (requirements/lock.txt): what runs here is what was tested, and the lock satisfies pyproject."""

import importlib.util
import os
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("sdlora_lock", ROOT / "requirements" / "lock.py")
lock = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lock)


@pytest.mark.skipif(os.environ.get("SDLORA_UNLOCKED") == "1",
                    reason="make test-latest runs without the lock; its drift is printed before the suite")
def test_the_installed_packages_are_the_locked_versions():
    import setuptools  # noqa: F401  puts its vendored packages (with .dist-info folders) on sys.path: not installs

    assert lock.differences(lock.read_lock(), lock.installed()) == []


def test_the_lock_satisfies_every_requirement_of_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = lock.read_lock()
    wanted = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]]
    wanted += [Requirement(r) for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]]
    for req in wanted:
        name = lock.canonical(req.name)
        assert name in pins, f"{req.name} is required but not locked"
        assert req.specifier.contains(Version(pins[name])), f"lock has {name}=={pins[name]}, pyproject wants {req}"
    held = [Requirement(line.split("#")[0].strip()) for line in (ROOT / "requirements" / "hold.txt").read_text().splitlines()
            if line.split("#")[0].strip()]
    for req in held:
        assert req.specifier.contains(Version(pins[lock.canonical(req.name)])), f"the lock breaks its own hold {req}"


def test_differences_name_other_versions_and_unlocked_packages_and_ignore_local_labels():
    pins = {"torch": "2.13.0", "numpy": "2.4.6", "peft": "0.21.2"}
    have = {"torch": "2.13.0", "numpy": "2.5.0", "extra-thing": "1.0"}  # peft not installed: fine (make demo)
    assert lock.differences(pins, have) == ["extra-thing 1.0 is installed but not in the lock",
                                            "numpy 2.5.0 installed, lock says 2.4.6"]
    assert lock.public("2.13.0+cpu") == "2.13.0"


def test_write_keeps_pins_drops_the_project_and_local_labels(tmp_path):
    freeze = tmp_path / "freeze.txt"
    freeze.write_text("Torch==2.13.0+cpu\n# Editable install\n-e /work/main\nsdlora==0.1.0\ntyping_extensions==4.16.0\n")
    out = tmp_path / "lock.txt"
    lock.write(freeze, out)
    assert lock.read_lock(out) == {"torch": "2.13.0", "typing-extensions": "4.16.0"}
    assert "Torch==2.13.0\n" in out.read_text()
    bad = tmp_path / "bad.txt"
    bad.write_text("numpy>=2\n")
    with pytest.raises(SystemExit, match="bad.txt:1"):
        lock.read_lock(bad)
