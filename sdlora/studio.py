"""What the web page does, as plain Python: mixes from the library, pictures, X/Y grids, training jobs.

The page (webui/) only turns form fields into these calls, so everything here is tested without a
browser. One Studio serves many users at once: each request builds its own Mix and the base's
Mixer applies it per call (a ContextVar), so requests never see each other's adapters.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from .atomic import atomic_file, atomic_folder, is_temporary
from .errors import SdloraError
from .batching import Batcher
from .generate import Generated, GenerateSettings, Item, generate, labelled_grid, save_png
from .library import AdapterLibrary
from .block_weights import check_keys, lbw_weights
from .mixing import AdapterWeights, Mix
from .prompt_tags import parse_prompt_tags


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; the page's sliders stay inside these, the server checks them."""

    max_prompt_chars: int = 1000
    max_weight: float = 4.0  # |weight| of an adapter; A1111 users go up to about 2
    max_images: int = 8
    max_side: int = 1024
    max_steps: int = 150
    max_grid_cells: int = 64
    max_upload_mb: int = 50
    max_data_root_mb: int = 2048  # everything under --data-root together: uploads cannot fill the disk


@dataclass(frozen=True)
class Slot:
    """One row of the page's adapter mixer."""

    name: str
    unet: float = 1.0
    text_encoder: float = 1.0
    enabled: bool = True
    blocks: str = ""  # "down=1, mid=0.5, up=1"; empty: 1 everywhere
    steps: str = ""  # "0-10": denoising steps 0 to 9; empty: all


def _parse_blocks(text: str) -> dict[str, float] | None:
    """'down=1, mid=0.5, up.1=0, IN05=0' (groups, block indices, LBW names), or an LBW preset or weight list
    ('MIDD', '1,0,0,...' of 12/17/20/26 numbers)."""
    if not text.strip():
        return None
    if "=" not in text:
        return lbw_weights(text)
    out = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep:
            raise SdloraError(f"cannot read block weights {text!r}", "write e.g. down=1, mid=0.5, up.1=0, IN05=0, "
                              "or an LBW preset such as MIDD")
        out[key.strip()] = value.strip()
    check_keys(out)
    return out


def _parse_steps(text: str) -> tuple[int, int] | None:
    if not text.strip():
        return None
    m = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", text)
    if not m:
        raise SdloraError(f"cannot read the step range {text!r}", "write e.g. 0-10 (steps 0 to 9)")
    return int(m.group(1)), int(m.group(2))


@dataclass
class TrainJob:
    """One training run in a background thread; the page polls it."""

    name: str
    total: int
    status: str = "starting"  # starting | running | stopping | done | stopped | failed
    step: int = 0
    losses: list[float] = field(default_factory=list)
    error: str = ""
    adapter: str = ""  # the library name once done
    out_dir: Path | None = None
    stop_event: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def samples(self) -> list[Path]:
        folder = self.out_dir / "samples" if self.out_dir else None
        return sorted(folder.glob("step-*.png")) if folder and folder.is_dir() else []


class Studio:
    def __init__(self, base, library: AdapterLibrary, outputs: str | Path, data_root: str | Path | None = None,
                 limits: Limits = Limits(), base_spec: str = "embedded", batch_window_ms: float = 50.0,
                 max_batch: int = 8, max_queue: int = 64):
        self.base, self.library, self.limits, self.base_spec = base, library, limits, base_spec
        # The page's and the API's pictures: requests close together run as one per-sample pass.
        self.batcher = Batcher(base, batch_window_ms, max_batch, max_queue)
        self.outputs = Path(outputs).resolve()
        self.outputs.mkdir(parents=True, exist_ok=True)
        self.data_root = Path(data_root).resolve() if data_root else None
        self._loaded: dict[str, tuple[str, float]] = {}  # library name -> (name in the base, file mtime)
        self._load_lock = threading.Lock()
        self._job: TrainJob | None = None
        self._job_lock = threading.Lock()

    # ---- mixes ---------------------------------------------------------------------------------
    def _internal(self, name: str) -> str:
        """Library names are file stems; the base's adapter names must be [\\w-]."""
        return "lib-" + hashlib.sha1(name.encode()).hexdigest()[:16]

    def _ensure_loaded(self, names: list[str]) -> dict[str, str]:
        paths = self.library.paths(names)  # refuses names not in the listing
        with self._load_lock:
            mtimes = {n: p.stat().st_mtime for n, p in paths.items()}
            stale = [n for n in names if self._loaded.get(n, ("", None))[1] != mtimes[n]]
            if stale:
                with self.base.mixer.exclusive():  # no picture is being made while layers change
                    for n in stale:
                        internal = self._internal(n)
                        # A changed file replaces its earlier load once it has passed the checks.
                        self.base.load_adapter(paths[n], internal, replace=True)
                        self._loaded[n] = (internal, mtimes[n])
            return {n: self._loaded[n][0] for n in names}

    def _weights(self, name: str, w: AdapterWeights) -> AdapterWeights:
        values = [w.unet, w.text_encoder, *(w.blocks or {}).values()]
        if any(abs(v) > self.limits.max_weight for v in values):
            raise SdloraError(f"a weight of adapter {name!r} is outside +-{self.limits.max_weight:g}",
                              f"use weights between -{self.limits.max_weight:g} and {self.limits.max_weight:g}")
        return w

    def build_mix(self, prompt: str, slots: list[Slot]) -> tuple[str, Mix, list[str]]:
        """(prompt without <lora:> tags, the Mix, a description per adapter). Tags add to the slots."""
        if len(prompt) > self.limits.max_prompt_chars:
            raise SdloraError(f"the prompt has {len(prompt)} characters, more than {self.limits.max_prompt_chars}",
                              "shorten it")
        clean, tagged = parse_prompt_tags(prompt)
        wanted: dict[str, AdapterWeights] = {}
        for slot in slots:
            if not slot.enabled or not slot.name:
                continue
            if slot.name in wanted:
                raise SdloraError(f"adapter {slot.name!r} is in the mixer twice", "keep one row per adapter")
            wanted[slot.name] = AdapterWeights(unet=slot.unet, text_encoder=slot.text_encoder,
                                               blocks=_parse_blocks(slot.blocks), steps=_parse_steps(slot.steps))
        for name, w in tagged.items():
            if name in wanted:
                raise SdloraError(f"adapter {name!r} is both in the mixer and in a <lora:> tag", "keep one")
            wanted[name] = w
        wanted = {n: self._weights(n, w) for n, w in wanted.items()}
        internal = self._ensure_loaded(list(wanted))
        described = [f"{n}: unet {w.unet:g}, text encoder {w.text_encoder:g}" for n, w in wanted.items()]
        return clean, Mix({internal[n]: w for n, w in wanted.items()}), described

    def settings(self, prompt: str, negative: str = "", seed: int = 0, steps: int = 20, guidance: float = 5.0,
                 width: int | None = None, height: int | None = None, num: int = 1, scheduler: str | None = None,
                 same_seed: bool = False) -> GenerateSettings:
        lim = self.limits
        if len(negative) > lim.max_prompt_chars:
            raise SdloraError(f"the negative prompt is longer than {lim.max_prompt_chars} characters", "shorten it")
        checks = [(1 <= num <= lim.max_images, f"images must be 1 to {lim.max_images}"),
                  (1 <= steps <= lim.max_steps, f"steps must be 1 to {lim.max_steps}"),
                  (all(v is None or v <= lim.max_side for v in (width, height)), f"sides must be at most {lim.max_side}"),
                  (math.isfinite(guidance) and guidance <= 30, "guidance must be a finite number up to 30")]
        for ok, what in checks:
            if not ok:
                raise SdloraError(what, "change the setting")
        extra = {"scheduler": scheduler} if scheduler else {}
        return GenerateSettings(prompts=(prompt,), negative=negative, seed=int(seed), steps=int(steps),
                                guidance=float(guidance), width=width, height=height, num=int(num),
                                same_seed=same_seed, **extra)

    # ---- pictures ------------------------------------------------------------------------------
    def _save(self, results: list[Generated], described: list[str]) -> list[tuple[Path, str]]:
        day = self.outputs / time.strftime("%Y-%m-%d")
        out = []
        for r in results:
            r.extra["adapters"] = described
            path = save_png(r.image, day / f"{time.strftime('%H%M%S')}-{uuid.uuid4().hex[:8]}.png", r.pnginfo())
            out.append((path, r.parameters_text() + ("\nAdapters: " + "; ".join(described) if described else "")))
        return out

    def pictures(self, prompt: str, slots: list[Slot], **settings) -> tuple[list[Generated], list[str]]:
        """Pictures for one request (through the batcher: a pass shared with requests close in time, each
        picture exactly what it is alone) and a description of its adapters."""
        clean, mix, described = self.build_mix(prompt, slots)
        s = self.settings(clean, **settings)
        items = [Item(clean, s.negative, s.seed_of(k), mix) for k in range(s.num)]
        return self.batcher.submit(s, items), described

    def generate(self, prompt: str, slots: list[Slot], **settings) -> list[tuple[Path, str]]:
        """Pictures for one request, saved with their settings in the PNG; (path, caption) each."""
        return self._save(*self.pictures(prompt, slots, **settings))

    def xy_cells(self, prompt: str, slots: list[Slot], x_name: str, x_weights: list[float], y_name: str,
                 y_weights: list[float], **settings) -> list[list[Image.Image]]:
        """Adapter x_name's UNet/TE weight across, y_name's down, the other slots as set, one seed:
        rows[i][j] has y_weights[i] and x_weights[j]; each row is one batched pass with a per-sample
        mix per column."""
        if not x_weights or not y_weights or len(x_weights) * len(y_weights) > self.limits.max_grid_cells:
            raise SdloraError(f"the grid needs 1 to {self.limits.max_grid_cells} cells", "give fewer weights")
        if x_name == y_name:
            raise SdloraError("the X and Y adapters are the same", "choose two different adapters")
        others = [s for s in slots if s.name not in (x_name, y_name)]
        clean, base_mix, _ = self.build_mix(prompt, others)
        internal = self._ensure_loaded([x_name, y_name])
        for w in (*x_weights, *y_weights):
            self._weights(x_name, AdapterWeights(unet=w, text_encoder=w))
        s = dataclasses.replace(self.settings(clean, **{**settings, "num": 1}), num=len(x_weights), same_seed=True)
        rows = []
        for wy in y_weights:
            mixes = [Mix({**base_mix.adapters, internal[x_name]: wx, internal[y_name]: wy}) for wx in x_weights]
            rows.append([r.image for r in generate(self.base, s, progress=False, mix=mixes)])
        return rows

    def xy_grid(self, prompt: str, slots: list[Slot], x_name: str, x_weights: list[float], y_name: str,
                y_weights: list[float], **settings) -> Path:
        """xy_cells as one labelled picture, saved among the outputs."""
        rows = self.xy_cells(prompt, slots, x_name, x_weights, y_name, y_weights, **settings)
        grid = labelled_grid(rows, [f"{y_name} {w:g}" for w in y_weights], [f"{x_name} {w:g}" for w in x_weights])
        return save_png(grid, self.outputs / time.strftime("%Y-%m-%d") / f"xy-{uuid.uuid4().hex[:8]}.png")

    # ---- datasets and training -----------------------------------------------------------------
    def datasets(self) -> list[str]:
        if not self.data_root or not self.data_root.is_dir():
            return []
        return sorted(p.name for p in self.data_root.iterdir()
                      if p.is_dir() and not p.is_symlink() and not is_temporary(p))

    def dataset_path(self, name: str) -> Path:
        if name not in self.datasets():
            raise SdloraError(f"no dataset named {name!r} under the data root", "choose one of the listed folders")
        return self.data_root / name

    def add_dataset(self, name: str, files: list[str | Path]) -> str:
        """A new dataset folder from uploaded pictures and their same-name .txt captions."""
        from .adapter_io import check_name
        from .training.data import check_image
        from .training.images import IMAGE_SUFFIXES as IMAGE_EXTS

        if not self.data_root:
            raise SdloraError("no data root is configured", "start the page with --data-root DIR")
        check_name(name)
        if name in self.datasets():
            raise SdloraError(f"a dataset named {name!r} exists", "choose another name")
        limit = self.limits.max_upload_mb * 2**20
        files = [Path(f) for f in files]
        total = sum(f.stat().st_size for f in files)
        if total > limit:
            raise SdloraError(f"the upload is {total / 2**20:.1f} MB, more than {self.limits.max_upload_mb} MB",
                              "upload fewer or smaller pictures")
        held = sum(p.stat().st_size for p in Path(self.data_root).rglob("*") if p.is_file())
        if held + total > self.limits.max_data_root_mb * 2**20:
            raise SdloraError(f"the data root holds {held / 2**20:.0f} MB; with this upload it would pass its "
                              f"{self.limits.max_data_root_mb} MB limit", "delete datasets you no longer need")
        kept = [f for f in files if f.suffix.lower() in (*IMAGE_EXTS, ".txt")]
        if not any(f.suffix.lower() in IMAGE_EXTS for f in kept):
            raise SdloraError("the upload holds no pictures", "upload .png, .jpg or .webp files with .txt captions")
        for f in kept:  # every picture decoded whole, every caption UTF-8 text, before anything is stored
            if f.suffix.lower() in IMAGE_EXTS:
                _, reason = check_image(f)
                if reason:
                    raise SdloraError(f"{Path(f.name).name} is not a usable picture: {reason}", "upload real pictures")
            else:
                try:
                    f.read_bytes().decode("utf-8")
                except UnicodeDecodeError:
                    raise SdloraError(f"{Path(f.name).name} is not UTF-8 text", "captions are plain text files") from None
        with atomic_folder(self.data_root / name) as tmp:  # a failed copy leaves no half dataset
            for f in kept:
                (tmp / Path(f.name).name).write_bytes(f.read_bytes())
        return name

    def start_training(self, dataset: str, name: str, **options) -> TrainJob:
        """Train on a listed dataset in a background thread (one run at a time); the adapter joins
        the library as NAME when done."""
        from .adapter_io import check_name
        from .training.config import TrainConfig
        from .training.loop import train

        check_name(name)
        if name in self.library.names():
            raise SdloraError(f"the library already has an adapter named {name!r}", "choose another name")
        data = self.dataset_path(dataset)
        with self._job_lock:
            if self._job and self._job.status in ("starting", "running", "stopping"):
                raise SdloraError("a training run is going on", "wait for it or stop it")
            out_dir = self.outputs / "train" / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
            cfg = TrainConfig.load(None, data_dir=str(data), out_dir=str(out_dir), name=name, base=self.base_spec,
                                   **{k: v for k, v in options.items() if v not in (None, "")})
            job = TrainJob(name=name, total=cfg.steps, out_dir=out_dir)

            def on_step(step, total, loss):
                job.status, job.step = ("running" if not job.stop_event.is_set() else "stopping"), step
                job.losses.append(loss)

            def run():
                try:
                    result = train(cfg, progress=False, on_step=on_step, should_stop=job.stop_event.is_set)
                    # into the library atomically (a new name, checked above)
                    with atomic_file(self.library.folder / f"{name}.safetensors") as f:
                        f.write(result.adapter.read_bytes())
                    job.adapter = name
                    job.status = "stopped" if job.stop_event.is_set() else "done"
                except Exception as err:  # the page shows it; the thread must not die silently
                    job.error, job.status = str(err), "failed"

            job.thread = threading.Thread(target=run, name=f"train-{name}", daemon=True)
            self._job = job
            job.thread.start()
            return job

    def job(self) -> TrainJob | None:
        return self._job

    def stop_training(self) -> None:
        if self._job and self._job.status in ("starting", "running"):
            self._job.stop_event.set()
            self._job.status = "stopping"
