"""Mixing shown: two style adapters (dots and neon, as `make demo` trains them: the default settings) across and down an X/Y grid of
weights 0, 0.5, 1, through the web page's own code (Studio.xy_cells): the corners are the two styles and
plain, the middle is none of them."""

import shutil

import numpy as np
import pytest

from .style_judge import default_judge


@pytest.mark.slow
def test_the_corners_of_a_two_style_grid_are_each_style_and_plain_and_the_middle_is_a_blend(style_adapter, embedded,
                                                                                           tmp_path):
    from sdlora.library import AdapterLibrary
    from sdlora.pipelines import load_base
    from sdlora.studio import Studio

    library = tmp_path / "library"
    library.mkdir()
    for style in ("dots", "neon"):
        shutil.copy(style_adapter(style), library / f"{style}.safetensors")
    studio = Studio(load_base("embedded"), AdapterLibrary(library), tmp_path / "out")
    judge = default_judge()
    corners = {"dots": 0, "neon": 0, "plain": 0}
    for seed in range(5):
        rows = studio.xy_cells("a blue square, zdots, zneon", [], "dots", [0, 0.5, 1], "neon", [0, 0.5, 1],
                               seed=seed, steps=20)
        # rows[i][j]: neon weight [0, 0.5, 1][i], dots weight [0, 0.5, 1][j]
        verdicts = {"plain": judge.judge(rows[0][0]), "dots": judge.judge(rows[0][2]), "neon": judge.judge(rows[2][0])}
        corners.update({k: corners[k] + (v == k) for k, v in verdicts.items()})
        middle = np.asarray(rows[1][1], np.float32)
        for i, j in ((0, 0), (0, 2), (2, 0), (2, 2)):
            gap = np.abs(middle - np.asarray(rows[i][j], np.float32)).mean()
            assert gap > 8, f"seed {seed}: the middle is only {gap:.1f} levels from corner ({i}, {j})"
    assert all(v >= 4 for v in corners.values()), f"corners judged right, of 5 seeds: {corners}"
