"""The adapter library: one folder of .safetensors files, addressed by name, never by path.

Every operation takes a name and resolves it against the folder's current listing, so a name
from a web form ("../../etc/passwd", "a/b", "x.safetensors") can only ever select a listed
file. Writes go through adapter_io (temporary file, then rename) and never replace a file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .adapter_io import check_name, describe, read_adapter_file, write_adapter_file
from .atomic import is_temporary
from .errors import SdloraError


@dataclass(frozen=True)
class LibraryEntry:
    name: str
    format: str
    method: str
    ranks: str
    base_family: str
    trigger_words: str
    size_kb: float

    @staticmethod
    def columns() -> list[str]:
        return ["name", "format", "method", "rank", "base", "trigger words", "size (KB)"]

    def row(self) -> list:
        return [self.name, self.format, self.method, self.ranks, self.base_family, self.trigger_words, self.size_kb]


class AdapterLibrary:
    def __init__(self, folder: str | Path):
        self.folder = Path(folder).resolve()
        self.folder.mkdir(parents=True, exist_ok=True)
        self._rows: dict[str, tuple[tuple[int, int], LibraryEntry]] = {}  # name -> ((mtime, size), row)

    def names(self) -> list[str]:
        return sorted(p.stem for p in self.folder.glob("*.safetensors")
                      if p.is_file() and not p.is_symlink() and not is_temporary(p))

    def paths(self, names: list[str]) -> dict[str, Path]:
        """The files of listed adapters (one listing for all); any other name is refused."""
        listed = set(self.names())
        for name in names:
            if not isinstance(name, str) or name not in listed:
                raise SdloraError(f"no adapter named {name!r} in the library {self.folder}",
                                  "choose one of the listed adapters")
        return {name: self.folder / f"{name}.safetensors" for name in names}

    def path(self, name: str) -> Path:
        """The file of a listed adapter; anything else is refused by name."""
        return self.paths([name])[name]

    def entries(self) -> list[LibraryEntry]:
        """One row per adapter. Reading a file means loading its tensors, and the page lists the library
        on every load, so each row is kept until its file's size or time changes."""
        out = []
        for name in self.names():
            path = self.folder / f"{name}.safetensors"
            st = path.stat()
            key = (st.st_mtime_ns, st.st_size)
            if self._rows.get(name, (None,))[0] != key:
                self._rows[name] = (key, self._entry(name, path))
            out.append(self._rows[name][1])
        return out

    @staticmethod
    def _entry(name: str, path: Path) -> LibraryEntry:
        try:
            af = read_adapter_file(path)
            info = describe(af, str(path))
        except Exception as err:  # noqa: BLE001  one bad file costs its own row only, never the listing
            reason = str(err).split("; ")[0].replace(str(path), path.name) if isinstance(err, SdloraError) else \
                f"{type(err).__name__}: {err}"
            size = round(path.stat().st_size / 1024, 1) if path.exists() else 0.0
            return LibraryEntry(name, "unreadable", reason[:200], "", "", "", size)
        return LibraryEntry(name, info["format"], info["method"], ",".join(map(str, info["ranks"])),
                            info["base_family"] or "?", ", ".join(info["trigger_words"]),
                            round(info["size_bytes"] / 1024, 1))

    def metadata(self, name: str) -> dict[str, str]:
        """A listed adapter's safetensors metadata (kohya's ss_* keys and ours), from the header only."""
        from .formats.io import read_metadata

        return read_metadata(self.path(name))

    def inspect(self, name: str) -> dict:
        path = self.path(name)
        info = describe(read_adapter_file(path), str(path))
        info.pop("per_module")
        info["file"] = path.name  # the library's own path is none of the page's business
        return info

    def _new_path(self, name: str) -> Path:
        check_name(name)
        path = self.folder / f"{name}.safetensors"
        if path.exists():
            raise SdloraError(f"the library already has an adapter named {name!r}", "choose another name")
        return path

    def export(self, name: str, fmt: str, base, new_name: str | None = None) -> str:
        """Write adapter `name` in layout `fmt` (sdlora, kohya, diffusers) as a new library entry."""
        new_name = new_name or f"{name}-{fmt}"
        out = self._new_path(new_name)
        write_adapter_file(read_adapter_file(self.path(name), base), out, fmt, base)
        return new_name

    def merge(self, weighted: list[tuple[str, float]], new_name: str, base, rank: int | None = None) -> str:
        """The weighted sum of listed adapters as one new adapter (exact, or SVD to `rank`)."""
        from .tools.merge import merge

        if len(weighted) < 2:
            raise SdloraError("merging needs at least two adapters", "select two or more")
        out = self._new_path(new_name)
        merged, _ = merge([(read_adapter_file(self.path(n), base), w) for n, w in weighted], rank=rank,
                          family=base.family)
        write_adapter_file(merged, out, "sdlora", base)
        return new_name

    def rename(self, name: str, new_name: str) -> str:
        src, dst = self.path(name), self._new_path(new_name)
        src.rename(dst)
        return new_name

    def delete(self, name: str, confirm: str) -> None:
        """Removes the file only when `confirm` repeats the name (the page asks the user to type it)."""
        path = self.path(name)
        if confirm != name:
            raise SdloraError(f"not deleted: type the name {name!r} to confirm", "type the adapter's name exactly")
        path.unlink()
