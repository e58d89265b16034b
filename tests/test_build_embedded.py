"""The script that trains the embedded base: its tokenizer, and a short run end to end."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from train_scripts.shapes import VOCAB_WORDS

ROOT = Path(__file__).resolve().parents[1]


def test_tokenizer_has_every_caption_word_whole_and_still_spells_unknown_words():
    from train_scripts.build_embedded_base import build_tokenizer

    tok = build_tokenizer(VOCAB_WORDS)
    for word in VOCAB_WORDS:
        assert tok.tokenize(word) == [word + "</w>"], word
    assert len(tok.tokenize("qzx")) > 1  # unknown words fall back to byte symbols, as in CLIP
    ids = tok("a red circle", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and ids[0] == tok.bos_token_id and ids[4] == tok.eos_token_id


def test_shipped_tokenizer_matches_the_builder():
    from transformers import CLIPTokenizer

    from train_scripts.build_embedded_base import build_tokenizer

    shipped = CLIPTokenizer.from_pretrained(ROOT / "samples" / "embedded" / "tokenizer")
    built = build_tokenizer(VOCAB_WORDS)
    assert shipped.get_vocab() == built.get_vocab()


@pytest.mark.slow
def test_a_short_build_writes_a_loadable_base(tmp_path):
    out = tmp_path / "base"
    subprocess.run(
        [sys.executable, str(ROOT / "train_scripts" / "build_embedded_base.py"), "--out", str(out), "--images", "64",
         "--vae-steps", "2", "--vae-batch", "4", "--unet-steps", "2", "--unet-batch", "4", "--save-every", "2"],
        check=True, capture_output=True, timeout=600,
    )
    from sdlora.pipelines import load_base

    base = load_base(str(out))
    assert base.family == "sd1" and base.native_size == 64
    summary = json.loads((out / "BUILD.json").read_text())
    assert summary["steps_done"] == 2 and "colour_check" in summary
