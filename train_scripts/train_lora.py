"""Train an adapter: the same loop and flags as `sdlora train`, as a script for `accelerate launch`.

    accelerate launch train_scripts/train_lora.py --config my-style.toml
    accelerate launch --num_processes 2 train_scripts/train_lora.py --config my-style.toml --steps 500

The TOML file's top-level keys are TrainConfig's field names (data_dir, out_dir, rank, lr, ...);
flags override them. With several processes each trains on its share of every global batch.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sdlora.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
