"""Text-encoder outputs for the captions a step trains on, cached when the encoders are frozen.

Captions change from step to step (dropout, shuffled tags), so the cache is filled on demand,
one caption at a time: a caption always gets the same embedding, whatever batch it is in.

SD1/SD2: the encoder's last hidden states (77, dim). SDXL, as its pipeline and diffusers' SDXL
training scripts (train_dreambooth_lora_sdxl.py, encode_prompt) compute them: each encoder's
penultimate hidden states, concatenated on the feature axis (77, dim1 + dim2), and the second
encoder's pooled, projected embedding (proj,), which the UNet takes with the time ids.
"""

from __future__ import annotations

import torch


class TextEmbeddings:
    def __init__(self, pipe, trainable: bool, device):
        self.trainable, self.device = trainable, device
        self.encoders = [(pipe.tokenizer, pipe.text_encoder)]
        if getattr(pipe, "text_encoder_2", None) is not None:
            self.encoders.append((pipe.tokenizer_2, pipe.text_encoder_2))
        self.sdxl = len(self.encoders) == 2
        self.cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}  # caption -> (hidden, pooled), fp32
        self.base_cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}  # the same, no adapter applied

    def _ids(self, tokenizer, captions: list[str]) -> torch.Tensor:
        return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids.to(self.device)  # (B, 77)

    def _encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.sdxl:
            tokenizer, encoder = self.encoders[0]
            return encoder(self._ids(tokenizer, captions))[0], None  # (B, 77, dim)
        hidden, pooled = [], None
        for tokenizer, encoder in self.encoders:
            out = encoder(self._ids(tokenizer, captions), output_hidden_states=True, return_dict=False)
            hidden.append(out[-1][-2])  # (B, 77, dim_i): the penultimate layer
            pooled = out[0]  # the last encoder's: CLIPTextModelWithProjection's text_embeds (B, proj)
        return torch.cat(hidden, dim=-1), pooled

    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, 77, dim) hidden states and (B, proj) pooled embeddings (None for SD1/SD2): with gradients
        when an encoder trains, else from the cache."""
        if self.trainable:
            return self._encode(captions)
        return self._cached(self.cache, captions)

    def base(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """As __call__, but the encoders as the base has them, whether or not adapters train on them (blank
        prompt preservation's target): call it outside any mix. Cached: the base's outputs never change."""
        return self._cached(self.base_cache if self.trainable else self.cache, captions)

    def _cached(self, cache: dict, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        with torch.no_grad():
            for caption in captions:
                if caption not in cache:
                    hidden, pooled = self._encode([caption])
                    cache[caption] = (hidden[0].float(), None if pooled is None else pooled[0].float())
        hidden = torch.stack([cache[c][0] for c in captions])
        pooled = torch.stack([cache[c][1] for c in captions]) if self.sdxl else None
        return hidden, pooled


def unet_conditioning(hidden: torch.Tensor, pooled: torch.Tensor | None, time_ids: torch.Tensor | None) -> dict:
    """The UNet's keyword arguments beyond (sample, timestep): the hidden states, and for SDXL the
    added conditions, pooled embedding (B, proj) and time ids (B, 6)."""
    kwargs = {"encoder_hidden_states": hidden}
    if pooled is not None:
        kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids.to(hidden.device, hidden.dtype)}
    return kwargs
