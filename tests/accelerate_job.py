"""torchrun job (2 CPU processes): accelerate with use_ckptio. "save DIR": train 3 steps, save_state, train 4 more;
"load DIR": a new model, load_state, the same 4 steps. Rank 0 writes the final weights and optimizer state."""

import os
import sys

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors.torch import save_file
from torch.utils.data import DataLoader, TensorDataset

from ckptio.integrations.accelerate import use_ckptio


def main() -> None:
    mode, directory, out = sys.argv[1:4]
    accelerator = Accelerator(cpu=True)
    set_seed(0 if mode == "save" else 99)  # a loaded run starts from other weights: only load_state makes them equal
    model = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.ReLU(), torch.nn.Linear(12, 1))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(224, 6, generator=g)
    data = DataLoader(TensorDataset(x, x.mean(1, keepdim=True)), batch_size=8, shuffle=False)
    model, opt, data = accelerator.prepare(model, opt, data)
    use_ckptio(accelerator)
    batches = iter(data)

    def steps(n: int) -> None:
        for _ in range(n):
            xb, yb = next(batches)
            loss = torch.nn.functional.mse_loss(model(xb), yb)
            accelerator.backward(loss)
            opt.step()
            opt.zero_grad()

    if mode == "save":
        steps(3)
        accelerator.save_state(directory)
        accelerator.wait_for_everyone()
    else:
        accelerator.load_state(directory)
        for _ in range(3):  # the data position is the user's to keep: skip what the saved run consumed
            next(batches)
    steps(4)
    if accelerator.is_main_process:
        sd = accelerator.unwrap_model(model).state_dict()
        tensors = {f"model.{k}": v.contiguous() for k, v in sd.items()}
        for i, s in opt.state_dict()["state"].items():
            tensors.update({f"opt.{i}.{k}": v.reshape(-1) if v.dim() == 0 else v for k, v in s.items()})
        save_file(tensors, out)
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    os.environ.setdefault("ACCELERATE_USE_CPU", "1")
    main()
    # what the test reads is written; the interpreter's own teardown of accelerate's and gloo's threads aborted
    # now and then on this machine (SIGABRT, "terminate called without an active exception"), after main returned
    sys.stdout.flush()
    os._exit(0)
