"""The option lists, each defined once: the settings check them, the CLI offers them, the page shows them.

Plain tuples with no imports, so the CLI's argument parser and the training settings can use them
without loading torch or bitsandbytes.
"""

QUANT_MODES = ("nf4", "fp4", "int8")  # bitsandbytes quantizations of a frozen base
BASE_QUANT = ("nf4", "fp4", "int8", "none")  # what a base can be loaded as; none: float
# Training adds "auto": NF4 for real bases, float for tiny ones (sdlora.training.quant_auto).
TRAIN_QUANT = ("auto",) + BASE_QUANT
TRAIN_METHODS = ("lora", "dora", "vera", "loha", "lokr")  # sdlora.adapters.registry.trainable_methods(), without torch
UNET_PRESETS = ("attn", "linear", "all")  # which UNet layers get adapters (sdlora.inject.unet_targets)
# adamw8bit/paged: bitsandbytes; prodigy, adamw_schedulefree, adafactor, came: their own packages
# (sdlora/training/optimizers.py)
OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit", "prodigy", "adamw_schedulefree", "adafactor", "came")
LR_SCHEDULES = ("constant", "cosine")  # both after the warm-up
MIXED_PRECISION = ("no", "fp16", "bf16")
PREDICTION_TYPES = ("epsilon", "v_prediction")  # what the UNet predicts: the noise, or the velocity v
FILE_FORMATS = ("sdlora", "kohya", "diffusers")
TIMESTEP_SAMPLINGS = ("uniform", "logit_normal")  # sdlora/training/timesteps.py
