import os

# Set before anything imports huggingface_hub or gradio: no network, no telemetry.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
# `make test` runs two pytest-xdist workers on the two cores. Each worker (and every `sdlora` it spawns, through
# the environment) computes on one thread: this project's models are small, so a step is dispatch-bound and two
# threads per op cost more than they give (100 embedded training steps: 28 s on one thread, 33 s on two).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402


if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def embedded():
    """The embedded base, loaded once for the whole session (tests must not modify it)."""
    from sdlora.pipelines import load_base

    return load_base("embedded")


@pytest.fixture(scope="session")
def tiny_sd1_dir(tmp_path_factory):
    from tests.tiny_models import build_tiny_sd1

    return build_tiny_sd1(tmp_path_factory.mktemp("tiny-sd1"))


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory):
    from tests.tiny_models import build_tiny_sdxl

    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl"))


@pytest.fixture(scope="session")
def once_per_run(tmp_path_factory):
    """once_per_run(key, make) -> the text make() returned, made once per test run across xdist workers: the
    first worker to ask for `key` runs make() while holding its lock and writes the text whole (a worker
    killed mid-write leaves no half file); the others wait and read it. make() may write into
    once_per_run.folder, the run's folder, which every worker sees."""
    from filelock import FileLock

    folder = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        folder = folder.parent  # the run's folder, above each worker's own
    folder = folder / "once"
    folder.mkdir(exist_ok=True)

    def get(key: str, make) -> str:
        done = folder / f"{key}.txt"
        with FileLock(str(folder / f"{key}.lock")):
            if not done.exists():
                tmp = done.with_suffix(".tmp")
                tmp.write_text(make())
                tmp.replace(done)
            return done.read_text()

    get.folder = folder
    return get


@pytest.fixture(scope="session")
def style_adapter(once_per_run):
    """style name -> an adapter trained on samples/styles/NAME by `sdlora train`'s DEFAULT settings, once
    per run (the style tests and the mixing test share them, whichever worker asks first)."""
    from pathlib import Path

    from sdlora.training.config import TrainConfig
    from sdlora.training.loop import train

    styles = Path(__file__).resolve().parents[1] / "samples" / "styles"

    def get(style: str) -> Path:
        def make() -> str:
            cfg = TrainConfig(data_dir=str(styles / style), out_dir=str(once_per_run.folder / style), name=style)
            return str(train(cfg, progress=False).adapter)

        return Path(once_per_run(f"{style}-adapter", make))

    return get
