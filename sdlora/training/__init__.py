"""Training: data (scan, captions, buckets, sampling), the loss, checkpoints, and the loop that wires them."""
