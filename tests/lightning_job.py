"""torchrun job: a real Lightning Trainer (DDP, 2 CPU processes, gloo) saving through CkptioCheckpointIO.

argv: checkpoint dir, max epochs, "fresh" or "last" (fit(ckpt_path="last")), where rank 0 writes the final
weights, optimizer state and loop counters (safetensors + JSON); the epoch at whose end rank 0 SIGKILLs itself
(-1: never); "async" for AsyncCheckpointIO around the plugin.
"""

import json
import os
import signal
import sys

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import AsyncCheckpointIO
from safetensors.torch import save_file
from torch.utils.data import DataLoader, TensorDataset

from ckptio.integrations.lightning import CkptioCheckpointIO


class Regressor(L.LightningModule):
    def __init__(self, width: int = 16, lr: float = 0.01):
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, width), torch.nn.Tanh(), torch.nn.Linear(width, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("loss", loss, sync_dist=True)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)]


class KillAfter(L.Callback):
    """SIGKILL rank 0 as epoch ``epoch`` ends, before its checkpoint: a crash, not a clean stop (the epoch before's
    checkpoint, saved through AsyncCheckpointIO's thread, is waited for first)."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, module):
        if trainer.current_epoch == self.epoch and trainer.is_global_zero:
            trainer.strategy.checkpoint_io.teardown()  # an async save in flight lands first
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    ckpt_dir, max_epochs, mode, kill_after, use_async = sys.argv[1:6]
    L.seed_everything(0, workers=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g)
    data = TensorDataset(x, x.sum(dim=1, keepdim=True).sin())
    io = CkptioCheckpointIO()
    saving = ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=-1, every_n_epochs=1)
    trainer = L.Trainer(
        strategy="ddp", accelerator="cpu", devices=2, max_epochs=int(max_epochs), logger=False,
        enable_progress_bar=False, enable_model_summary=False, deterministic=True,
        plugins=[AsyncCheckpointIO(io) if use_async == "async" else io],
        callbacks=[saving, KillAfter(int(kill_after))],
    )  # fmt: skip
    model = Regressor()
    trainer.fit(model, DataLoader(data, batch_size=16, shuffle=True), ckpt_path=None if mode == "fresh" else "last")
    if trainer.is_global_zero:
        opt = trainer.optimizers[0].state_dict()
        tensors = {f"model.{k}": v.contiguous() for k, v in model.state_dict().items()}
        for i, s in opt["state"].items():
            tensors.update({f"opt.{i}.{k}": v for k, v in s.items()})
        save_file(tensors, os.path.join(ckpt_dir, "final.safetensors"))
        counters = {
            "global_step": trainer.global_step, "epoch": trainer.current_epoch,
            "lr": trainer.optimizers[0].param_groups[0]["lr"], "scheduler": trainer.lr_scheduler_configs[0].scheduler.state_dict(),
        }  # fmt: skip
        with open(os.path.join(ckpt_dir, "final.json"), "w") as f:
            json.dump(counters, f, sort_keys=True)


if __name__ == "__main__":
    main()
    # what the test reads is written; gloo's worker threads can abort a process whose interpreter tears its group
    # down meanwhile (as in dcp_job): leave without that teardown
    sys.stdout.flush()
    os._exit(0)
