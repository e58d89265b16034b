"""A run's logs in OUT_DIR/logs: loss.csv, val_loss.csv and TensorBoard events (tensorboard/).

A resumed run rewrites the CSVs from the history saved in its checkpoint, so rows a killed run
wrote after that checkpoint never appear twice. Only the main process writes."""

from __future__ import annotations

import csv
from pathlib import Path


class TrainLog:
    def __init__(self, log_dir: Path, loss_rows: list[list], val_losses: list[tuple[int, float]], enabled: bool = True):
        """loss_rows: [step, epoch, loss, lr] of the steps so far (epoch and lr "" where a checkpoint
        from before sdlora kept them did not know them)."""
        self.enabled = enabled
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        log_dir.mkdir(parents=True, exist_ok=True)
        self._loss_file = open(log_dir / "loss.csv", "w", newline="")
        self._loss = csv.writer(self._loss_file)
        self._loss.writerow(["step", "epoch", "loss", "lr"])
        self._loss.writerows([[s, e, f"{v:.6f}", f"{lr:.3e}" if lr != "" else ""] for s, e, v, lr in loss_rows])
        self._val_file = open(log_dir / "val_loss.csv", "w", newline="")
        self._val = csv.writer(self._val_file)
        self._val.writerow(["step", "val_loss"])
        self._val.writerows([[s, f"{v:.6f}"] for s, v in val_losses])
        self._tb = SummaryWriter(str(log_dir / "tensorboard"))

    def step(self, step: int, epoch: int, loss: float, lr: float) -> None:
        if self.enabled:
            self._loss.writerow([step, epoch, f"{loss:.6f}", f"{lr:.3e}"])
            self._tb.add_scalar("train/loss", loss, step)
            self._tb.add_scalar("train/lr", lr, step)

    def validation(self, step: int, val_loss: float) -> None:
        if self.enabled:
            self._val.writerow([step, f"{val_loss:.6f}"])
            self._tb.add_scalar("val/loss", val_loss, step)

    def picture(self, step: int, path: Path) -> None:
        if self.enabled:
            import numpy as np
            from PIL import Image

            self._tb.add_image("val/pictures", np.asarray(Image.open(path).convert("RGB")), step, dataformats="HWC")

    def flush(self) -> None:
        if self.enabled:
            self._loss_file.flush()
            self._val_file.flush()
            self._tb.flush()

    def close(self) -> None:
        if self.enabled:
            self._loss_file.close()
            self._val_file.close()
            self._tb.close()
