import os

# Set before anything imports huggingface_hub or gradio: no network, no telemetry.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest  # noqa: E402
import torch  # noqa: E402


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
def style_adapter(tmp_path_factory):
    """style name -> an adapter trained on samples/styles/NAME by `sdlora train`'s DEFAULT settings, once
    per session (the style tests and the mixing test share them)."""
    from pathlib import Path

    from sdlora.training.config import TrainConfig
    from sdlora.training.loop import train

    styles = Path(__file__).resolve().parents[1] / "samples" / "styles"
    trained: dict[str, Path] = {}

    def get(style: str) -> Path:
        if style not in trained:
            out = tmp_path_factory.mktemp(f"style-{style}")
            cfg = TrainConfig(data_dir=str(styles / style), out_dir=str(out), name=style)
            trained[style] = train(cfg, progress=False).adapter
        return trained[style]

    return get
