"""Text-encoder outputs for the captions a step trains on, cached when the encoder is frozen.

Captions change from step to step (dropout, shuffled tags), so the cache is filled on demand,
one caption at a time: a caption always gets the same embedding, whatever batch it is in.
"""

from __future__ import annotations

import torch


class TextEmbeddings:
    def __init__(self, pipe, trainable: bool, device):
        self.pipe, self.trainable, self.device = pipe, trainable, device
        self.cache: dict[str, torch.Tensor] = {}  # caption -> (77, dim), fp32, on `device`

    def _encode(self, captions: list[str]) -> torch.Tensor:
        tok = self.pipe.tokenizer
        ids = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(self.device)
        return self.pipe.text_encoder(ids)[0]  # (B, 77, dim)

    def __call__(self, captions: list[str]) -> torch.Tensor:
        """(B, 77, dim) hidden states: with gradients when the encoder trains, else from the cache."""
        if self.trainable:
            return self._encode(captions)
        with torch.no_grad():
            for caption in captions:
                if caption not in self.cache:
                    self.cache[caption] = self._encode([caption])[0].float()
        return torch.stack([self.cache[c] for c in captions])
