"""torchrun job: torchtitan's llama3 debug model under FSDP2 (gloo, CPU), its own optimizer and LR-scheduler
containers, trained a step at a time the way torchtitan's Trainer drives its checkpoint manager (load once, then
save(step, last_step) after each step), with the manager the job config selects: ckptio's or torchtitan's DCP one.

torchtitan's Trainer itself cannot train on CPU (FlexAttention has no CPU backward; varlen is CUDA-only), so the
inner attention is torchtitan's own ScaledDotProductAttention module: same parameters, a kernel CPUs run.

argv: manager (ckptio, ckptio-async or dcp), dump folder, total steps, kill step (rank 0 SIGKILLs itself once that step's
checkpoint is saved; -1 never), load step (-1 newest), output file (rank 0: final weights, optimizer, counters).
"""

import json
import os
import signal
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torchtitan.components.checkpointer import CheckpointManager
from torchtitan.components.optimizer import LRSchedulersContainer, default_adamw
from torchtitan.models.common.attention import ScaledDotProductAttention
from torchtitan.models.llama3 import model_registry

from ckptio.integrations.torchtitan import CkptioCheckpointManager


class TrainState:
    """What torchtitan's Trainer passes as states["train_state"]: its step and token count."""

    def __init__(self):
        self.step, self.ntokens_seen = 0, 0

    def state_dict(self):
        return {"step": self.step, "ntokens_seen": self.ntokens_seen}

    def load_state_dict(self, state):
        self.step, self.ntokens_seen = state["step"], state["ntokens_seen"]


def build_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = model_registry("debugmodel").model.build()
    for layer in model.layers.values():
        layer.attention.inner_attention = ScaledDotProductAttention(ScaledDotProductAttention.Config())
    for layer in model.layers.values():
        fully_shard(layer)
    fully_shard(model)
    return model


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def main() -> None:
    kind, dump, total, kill_at, load_step, out = sys.argv[1:7]
    total, kill_at, load_step = int(total), int(kill_at), int(load_step)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = build_model()
    optimizers = default_adamw(lr=8e-4).build(model_parts=[model])
    schedulers = LRSchedulersContainer.Config(warmup_steps=2, decay_ratio=0.8, decay_type="linear").build(
        optimizers=optimizers, training_steps=total + 2
    )
    train_state = TrainState()
    if kind == "dcp":
        config = CheckpointManager.Config(enable=True, folder="checkpoint", interval=2, last_save_model_only=False)
    else:
        config = CkptioCheckpointManager.Config(
            enable=True, folder="checkpoint", interval=2, last_save_model_only=False, async_save=kind == "ckptio-async"
        )
    checkpointer = config.build(
        dataloader=None, model_parts=[model], optimizers=optimizers, lr_schedulers=schedulers,
        states={"train_state": train_state}, sd_adapter=None, base_folder=dump,
    )  # fmt: skip
    checkpointer.load(step=load_step)
    start = train_state.step
    while train_state.step < total:
        train_state.step += 1
        g = torch.Generator().manual_seed(1000 * train_state.step + rank)
        tokens = torch.randint(0, 2048, (2, 33), generator=g)
        positions = torch.arange(32).repeat(2, 1)
        logits = model(tokens[:, :-1], positions)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
        loss.backward()
        optimizers.step()
        schedulers.step()
        optimizers.zero_grad()
        train_state.ntokens_seen += tokens.numel()
        checkpointer.save(train_state.step, last_step=train_state.step == total)
        checkpointer.maybe_wait_for_saving()
        if train_state.step == kill_at:
            dist.barrier()
            if rank == 0:
                os.kill(os.getpid(), signal.SIGKILL)
    # torch's get_model_state_dict cannot follow the fused QKV's renaming hooks: the model's own state dicts
    full = {f"model.{k}": _full(v) for k, v in model.state_dict().items()}
    full.update({f"opt.{k}": _full(v) for k, v in optimizers.state_dict().items() if isinstance(v, torch.Tensor)})
    if rank == 0:
        tensors = {k: v.reshape(-1) if v.dim() == 0 else v.contiguous() for k, v in full.items()}
        save_file(tensors, out)
        with open(out + ".json", "w") as f:
            json.dump(
                {**train_state.state_dict(), "start": start, "lr": optimizers.optimizers[0].param_groups[0]["lr"]}, f
            )
    checkpointer.close()
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)  # as in dcp_job: leave without the gloo group's destructor racing its worker threads


if __name__ == "__main__":
    main()
