"""The script that trains the embedded base: its tokenizer, and a short run end to end."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from train_scripts.shapes import VOCAB_WORDS

ROOT = Path(__file__).resolve().parents[1]


def test_tokenizer_has_every_caption_word_whole_and_still_spells_unknown_words():
    from train_scripts.base_tokenizer import build_tokenizer

    tok = build_tokenizer(VOCAB_WORDS)
    for word in VOCAB_WORDS:
        assert tok.tokenize(word) == [word + "</w>"], word
    assert len(tok.tokenize("qzx")) > 1  # unknown words fall back to byte symbols, as in CLIP
    ids = tok("a red circle", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and ids[0] == tok.bos_token_id and ids[4] == tok.eos_token_id


def test_shipped_tokenizer_matches_the_builder():
    from transformers import CLIPTokenizer

    from train_scripts.base_tokenizer import build_tokenizer

    shipped = CLIPTokenizer.from_pretrained(ROOT / "samples" / "embedded" / "tokenizer")
    built = build_tokenizer(VOCAB_WORDS)
    assert shipped.get_vocab() == built.get_vocab()


@pytest.mark.slow
def test_a_short_build_writes_a_loadable_base(tmp_path):
    out = tmp_path / "base"
    subprocess.run(
        [sys.executable, str(ROOT / "train_scripts" / "build_embedded_base.py"), "--out", str(out), "--images", "64",
         "--vae-steps", "2", "--vae-batch", "4", "--vae-images", "32", "--unet-steps", "2", "--unet-batch", "4", "--save-every", "2"],
        check=True, capture_output=True, timeout=600,
    )
    from sdlora.pipelines import load_base

    base = load_base(str(out))
    assert base.family == "sd1" and base.native_size == 64
    summary = json.loads((out / "BUILD.json").read_text())
    assert summary["steps_done"] == 2 and "colour_check" in summary and "binding_check" in summary
    assert summary["vae_images"] == 32 and "vae_psnr_corpus_held_out" in summary


def test_the_texture_corpus_is_seeded_and_never_draws_the_style_sets():
    """The VAE must be able to carry any style without having seen the sample sets: the corpus comes from
    its own generators, and no corpus picture equals a style-set picture."""
    import numpy as np
    from PIL import Image

    from train_scripts import texture_corpus

    a, b = texture_corpus.corpus(64, 0), texture_corpus.corpus(64, 0)
    assert a.shape == (64, 64, 64, 3) and a.dtype == np.uint8 and np.array_equal(a, b)
    assert not np.array_equal(a, texture_corpus.corpus(64, 1))
    styles = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in sorted((ROOT / "samples" / "styles").rglob("*.png"))])
    nearest = np.abs(a[:, None].astype(np.int16) - styles[None].astype(np.int16)).mean(axis=(2, 3, 4)).min()
    assert nearest > 1.0  # no corpus picture is (nearly) a style picture
    assert "make_samples" not in (ROOT / "train_scripts" / "texture_corpus.py").read_text()
