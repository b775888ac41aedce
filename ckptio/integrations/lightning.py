"""Lightning's ``CheckpointIO`` over ckptio: ``Trainer(plugins=[CkptioCheckpointIO()])``.

Each path Lightning names (``last.ckpt``, ``epoch=3-step=120.ckpt``) becomes a small ckptio run directory: the
LightningModule's ``state_dict`` as safetensors, everything else in Lightning's checkpoint dict (loops, callbacks,
optimizer and scheduler states, hyperparameters) as a trainer-state sidecar of tensors and JSON. Never pickle;
every file appears by atomic rename; any fsspec URI. Works under ``AsyncCheckpointIO`` (a thread per save).
"""

from __future__ import annotations

import pickle
import posixpath
from collections.abc import Mapping
from typing import Any

import fsspec
import torch
from lightning.fabric.plugins import CheckpointIO

import ckptio

__all__ = ["CkptioCheckpointIO"]

RUN_NAME = "lightning"
# what is kept apart from the trainer state: the model's weights, the checkpoint file itself
_WEIGHTS = "state_dict"


class CkptioCheckpointIO(CheckpointIO):
    """Saves Lightning checkpoints as ckptio checkpoints (one directory per path); loads them, and legacy
    ``.ckpt`` files (``torch.load`` with ``weights_only=True`` unless Lightning is told otherwise)."""

    def __init__(self, storage_options: Mapping[str, Any] | None = None):
        self.storage_options = dict(storage_options or {})

    def _manager(self, path: Any) -> ckptio.CheckpointManager:
        # keep_last=1: a path is one checkpoint; a newer save to it replaces the older after it committed
        return ckptio.CheckpointManager(str(path), run_name=RUN_NAME, keep_last=1, storage_options=self.storage_options)

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise ckptio.InvalidArgumentError(
                f"{path}: storage_options go to CkptioCheckpointIO(storage_options=...), not to each save"
            )
        weights = checkpoint.get(_WEIGHTS)
        if not isinstance(weights, Mapping):
            raise ckptio.InvalidArgumentError(f"{path}: a Lightning checkpoint without a '{_WEIGHTS}' dict")
        rest = {k: v for k, v in checkpoint.items() if k != _WEIGHTS}
        step = int(checkpoint.get("global_step", 0))
        metrics = {k: checkpoint[k] for k in ("epoch", "global_step") if isinstance(checkpoint.get(k), int)}
        self._manager(path).save_checkpoint(dict(weights), step, metrics, trainer_state=rest)

    def load_checkpoint(
        self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        fs, where = fsspec.core.url_to_fs(str(path), **self.storage_options)
        if fs.isfile(where):  # a .ckpt another plugin wrote: torch's format, loaded without full trust by default
            with fs.open(where, "rb") as f:
                try:
                    return torch.load(f, map_location=map_location, weights_only=weights_only is not False)
                except pickle.UnpicklingError as e:
                    raise ckptio.CheckpointSecurityError(
                        f"{path}: holds objects a weights-only load refuses ({str(e).splitlines()[-1]}); if you "
                        "trust it, load it with weights_only=False"
                    ) from None
        manager = self._manager(path)
        info = manager.latest()
        artifact = ckptio.load_from_uri(info.uri, storage_options=self.storage_options)
        state = manager.load_trainer_state(info)
        if not isinstance(state, dict):
            raise ckptio.CheckpointFormatError(f"{info.uri}: saved without Lightning's trainer state")
        weights = dict(artifact.state_dict or {})
        if isinstance(map_location, (str, torch.device)):
            weights = {k: v.to(map_location) for k, v in weights.items()}
        return {**state, _WEIGHTS: weights}

    def remove_checkpoint(self, path: Any) -> None:
        fs, where = fsspec.core.url_to_fs(str(path), **self.storage_options)
        if fs.isdir(where):
            inside = {posixpath.basename(p.rstrip("/")) for p in fs.ls(where, detail=False)}
            if inside - {"checkpoints"}:  # never delete a directory this plugin did not write
                raise ckptio.InvalidArgumentError(f"{path}: not a checkpoint CkptioCheckpointIO wrote; left alone")
            fs.rm(where, recursive=True)
        elif fs.exists(where):
            fs.rm(where)
