"""Training: data (scan, captions, buckets, sampling); the accelerate loop and checkpoints come next."""
