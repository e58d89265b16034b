"""The embedded base's tokenizer: CLIP's byte-level BPE with every caption word one token."""

from __future__ import annotations

import json
from pathlib import Path

MAX_TOKENS = 77  # as in every SD text encoder, so prompts pad the way users expect


def build_tokenizer(words: list[str]):
    """A CLIP byte-level BPE tokenizer in which each word of `words` is one token.

    The vocabulary starts with the 256 byte symbols and their end-of-word forms (so any text
    still tokenizes, as in CLIP), then one merge chain per word, then the two special tokens.
    Merges are added until the real tokenizer returns each word whole.
    """
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    for c in alphabet:
        vocab[c + "</w>"] = len(vocab)
    merges: list[tuple[str, str]] = []

    def make():
        v = dict(vocab)
        v["<|startoftext|>"] = len(v)
        v["<|endoftext|>"] = len(v)
        return CLIPTokenizer(vocab=v, merges=list(merges), model_max_length=MAX_TOKENS)

    for word in words:
        for _ in range(4 * len(word)):
            pieces = make().tokenize(word)
            if len(pieces) == 1:
                break
            left, right = pieces[0], pieces[1]
            merges.append((left, right))
            vocab.setdefault(left + right, len(vocab))
        else:
            raise RuntimeError(f"could not make {word!r} a single token")
    return make()


def write_classic_tokenizer_files(tokenizer, folder: Path) -> None:
    """vocab.json and merges.txt beside tokenizer.json, for tools that read only the classic pair."""
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    (folder / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False) + "\n")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
