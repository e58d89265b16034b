"""Every Python example in the README runs as written."""

import re
from pathlib import Path

import pytest

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)


def test_the_readme_has_examples():
    assert len(BLOCKS) >= 2


def _promises(block: str) -> tuple[list[str], list[str]]:
    """What an example says it does: the output a `print(...)  # text` line shows, and the files it names
    ("out/....png") that it writes."""
    printed = [line.split("#", 1)[1].strip() for line in block.splitlines()
               if line.lstrip().startswith("print(") and "#" in line]
    return printed, re.findall(r'"(out/[^"]+\.png)"', block)


def test_the_promise_reader_finds_what_the_examples_say():
    printed, files = _promises(next(b for b in BLOCKS if "# sd1 64" in b))
    assert printed == ["sd1 64"] and files == ["out/grid.png"]


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs_and_shows_what_it_says(index, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # examples write to out/
    exec(compile(BLOCKS[index], f"README.md example {index}", "exec"), {"__name__": "readme_example"})
    lines = capsys.readouterr().out.splitlines()
    printed, files = _promises(BLOCKS[index])
    for expected in printed:
        assert expected in lines, f"example {index} should print {expected!r}; it printed {lines}"
    for name in files:
        from PIL import Image

        with Image.open(tmp_path / name) as picture:
            assert picture.size[0] >= 64 and picture.size[1] >= 64, name
