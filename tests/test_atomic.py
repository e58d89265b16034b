"""Every writer goes through sdlora.atomic: a failure mid-write leaves the old result whole and no temporary
behind, and listings never offer a temporary."""

import os
import stat
from pathlib import Path

import pytest

from sdlora.atomic import atomic_file, atomic_folder, atomic_path


class Boom(Exception):
    pass


def test_a_failed_file_write_keeps_the_old_file_and_leaves_nothing(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(Boom):
        with atomic_file(target) as f:
            f.write(b"half")
            raise Boom
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["out.bin"]
    with atomic_file(target) as f:
        f.write(b"new")
    assert target.read_bytes() == b"new" and os.listdir(tmp_path) == ["out.bin"]


def test_a_path_writer_gets_a_fresh_name_and_umask_permissions(tmp_path):
    target = tmp_path / "sub" / "x.txt"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and not tmp.exists() and tmp.name.startswith(".")
        tmp.write_text("x")
    old = os.umask(0)
    os.umask(old)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~old  # not mkstemp's 0600


def test_folders_appear_whole_or_not_at_all(tmp_path):
    target = tmp_path / "folder"
    with pytest.raises(Boom):
        with atomic_folder(target) as tmp:
            (tmp / "a").write_text("a")
            raise Boom
    assert os.listdir(tmp_path) == []
    with atomic_folder(target) as tmp:
        (tmp / "a").write_text("a")
    assert os.listdir(target) == ["a"]
    with pytest.raises(OSError):  # a folder with content is never taken over without replace=True
        with atomic_folder(target) as tmp:
            (tmp / "b").write_text("b")
    assert os.listdir(target) == ["a"] and os.listdir(tmp_path) == ["folder"]
    with pytest.raises(Boom):
        with atomic_folder(target, replace=True) as tmp:
            raise Boom
    assert os.listdir(target) == ["a"]
    with atomic_folder(target, replace=True) as tmp:
        (tmp / "b").write_text("b")
    assert os.listdir(target) == ["b"] and os.listdir(tmp_path) == ["folder"]


def test_a_failed_dataset_upload_leaves_no_dataset_and_temporaries_are_never_listed(tmp_path, monkeypatch):
    from sdlora.library import AdapterLibrary
    from sdlora.studio import Studio

    (tmp_path / "library").mkdir()
    data = tmp_path / "data"
    data.mkdir()
    studio = Studio(None, AdapterLibrary(tmp_path / "library"), tmp_path / "out", data)
    styles = Path(__file__).resolve().parents[1] / "samples" / "styles" / "dots"
    files = sorted(styles.iterdir())[:4]
    real_write = Path.write_bytes
    calls = []

    def failing_write(self, content):
        calls.append(self)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real_write(self, content)

    monkeypatch.setattr(Path, "write_bytes", failing_write)
    with pytest.raises(OSError):
        studio.add_dataset("dots", files)
    monkeypatch.undo()
    assert studio.datasets() == [] and os.listdir(data) == []
    (data / ".left-by-a-killed-upload.tmp").mkdir()  # what kill -9 mid-copy leaves
    (tmp_path / "library" / ".half.safetensors").write_bytes(b"")
    assert studio.datasets() == [] and studio.library.names() == []
    assert studio.add_dataset("dots", files) == "dots" and studio.datasets() == ["dots"]
    assert sorted(os.listdir(data / "dots")) == sorted(f.name for f in files)
