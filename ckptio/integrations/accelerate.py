"""accelerate's ``save_state``/``load_state`` with the models written through ckptio.

``use_ckptio(accelerator)`` registers a save-state pre-hook that writes each prepared model (unwrapped: its own
parameter names) from the main process as a ckptio checkpoint under ``{output_dir}/ckptio/``, taking it off the list
accelerate would save itself, and a load-state pre-hook that fills each model back from there on every process.
The optimizer, scheduler, sampler and RNG files stay accelerate's own.
"""

from __future__ import annotations

import os
from typing import Any

import torch

import ckptio

__all__ = ["SUBDIR", "model_uri", "use_ckptio"]

SUBDIR = "ckptio"


def model_uri(directory: str, index: int = 0) -> str:
    """Where ``use_ckptio`` keeps model ``index`` of a ``save_state`` directory: a run directory ckptio reads."""
    return os.path.join(directory, SUBDIR, "model" if index == 0 else f"model_{index}")


def use_ckptio(accelerator: Any, policy_architecture: Any = None) -> tuple[Any, Any]:
    """Route ``accelerator.save_state``/``load_state`` models through ckptio; returns the two hook handles
    (``handle.remove()`` undoes it). ``policy_architecture`` (one model) goes into the checkpoint's manifest."""

    def save(models: list[torch.nn.Module], weights: list[dict[str, torch.Tensor]], output_dir: str) -> None:
        if accelerator.is_main_process:
            for i, model in enumerate(models):
                manager = ckptio.CheckpointManager(model_uri(output_dir, i), run_name="model", keep_last=1)
                arch = policy_architecture if i == 0 else None
                step = accelerator.save_iteration  # save_state counts its saves
                manager.save_checkpoint(accelerator.unwrap_model(model), step, policy_architecture=arch)
        weights.clear()  # accelerate saves what is left on the list: nothing

    def load(models: list[torch.nn.Module], input_dir: str) -> None:
        for i, model in enumerate(models):
            uri = model_uri(input_dir, i)
            artifact = ckptio.load_from_uri(uri)
            target = accelerator.unwrap_model(model)
            missing, unexpected = target.load_state_dict(dict(artifact.state_dict or {}), strict=False)
            if missing or unexpected:
                raise ckptio.StateDictMismatchError(
                    f"{artifact.source}: does not fit model {i} ({type(target).__name__}): missing {missing[:5]}, "
                    f"unexpected {unexpected[:5]}"
                )
        models.clear()  # loaded: accelerate looks for no model files of its own

    return accelerator.register_save_state_pre_hook(save), accelerator.register_load_state_pre_hook(load)
