"""Validation prompts in kohya's sample-prompt form, and kohya prompt files."""

import pytest


def test_kohya_prompt_lines_set_their_own_picture_settings(tmp_path):
    from sdlora.errors import SdloraError
    from sdlora.generate import GenerateSettings
    from sdlora.training.validation import parse_sample_prompt, read_prompt_file

    fields = parse_sample_prompt("a red circle, zdots --n blurry, dark --w 96 --h 64 --d 7 --s 12 --l 6.5 --ss euler_a")
    assert fields == {"prompts": ("a red circle, zdots",), "negative": "blurry, dark", "width": 96, "height": 64,
                      "seed": 7, "steps": 12, "guidance": 6.5, "scheduler": "euler_a"}
    GenerateSettings(**fields)  # what validation_grid builds from it
    assert parse_sample_prompt("a plain prompt") == {"prompts": ("a plain prompt",)}
    path = tmp_path / "prompts.txt"
    path.write_text("# samples\na red circle --d 1\n\na blue square --s 8\n")
    assert read_prompt_file(path) == ("a red circle --d 1", "a blue square --s 8")
    path.write_text("a red circle --q 3\n")
    with pytest.raises(SdloraError, match="prompts.txt, prompt 1: unknown option --q"):
        read_prompt_file(path)
    with pytest.raises(SdloraError, match="not a number"):
        parse_sample_prompt("a red circle --s many")
