"""A torchtitan checkpoint manager over ckptio: ``checkpoint=CkptioCheckpointManager.Config(enable=True, ...)``.

torchtitan (0.3 and later) builds its checkpointer from the job config's ``checkpoint`` entry, any
``BaseCheckpointManager.Config``. This one gives a torchtitan job ckptio's guarantees: one standard safetensors
file per step written by the master alone (the FSDP2/DTensor model gathered a tensor at a time), the optimizer and
the rest of the job's state (schedulers, data loader, train state) in its trainer-state sidecar, atomic commits,
one writer per run, background uploads to ``remote_uri``, and resumes at any world size that read the store once.

One model part and one optimizer (no pipeline parallelism yet); ``load(step)`` resumes the newest checkpoint only.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torchtitan.components.checkpointer import DATALOADER, LR_SCHEDULER, OPTIMIZER, BaseCheckpointManager
from torchtitan.components.checkpointer.utils import canonical_fqn
from torchtitan.tools import filesystem

import ckptio

__all__ = ["CkptioCheckpointManager", "TorchtitanModel"]

log = logging.getLogger("ckptio")

_BYTES = "ckptio.bytes"  # a data loader's state holds bytes (its own pickles): kept as a uint8 tensor


@dataclass(frozen=True)
class TorchtitanModel:
    """A torchtitan run's architecture record: the model's class and a digest of its parameter names, shapes and
    dtypes. A run resumed into another model is refused; torchtitan, not ckptio, builds the model from its config."""

    model_class: str
    parameters: str

    @classmethod
    def of(cls, model: torch.nn.Module) -> TorchtitanModel:
        described = sorted(f"{canonical_fqn(k)}:{tuple(v.shape)}:{v.dtype}" for k, v in model.state_dict().items())
        return cls(
            f"{type(model).__module__}.{type(model).__qualname__}",
            hashlib.sha256("\n".join(described).encode()).hexdigest()[:16],
        )

    def make_policy(self, env_metadata: Any) -> torch.nn.Module:
        raise ckptio.ArchitectureError(
            f"{self.model_class} is built by torchtitan from its job config; fill it with Checkpointer.load_into"
        )


def _encode(obj: Any) -> Any:
    if isinstance(obj, (bytes, bytearray)):
        return {
            _BYTES: torch.frombuffer(bytearray(obj), dtype=torch.uint8) if obj else torch.empty(0, dtype=torch.uint8)
        }
    if isinstance(obj, dict):
        return {k: _encode(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_encode(v) for v in obj]
    return obj


def _decode(obj: Any) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {_BYTES}:
            return obj[_BYTES].numpy().tobytes()
        return {k: _decode(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v) for v in obj]
    return obj


class CkptioCheckpointManager(BaseCheckpointManager):
    """torchtitan's checkpoint manager contract, kept by a ckptio ``Checkpointer`` on ``{dump_folder}/{folder}``."""

    @dataclass(kw_only=True, slots=True)
    class Config(BaseCheckpointManager.Config):
        async_save: bool = False
        """Save returns once the state is copied to CPU; the write runs in the background."""

        remote_uri: str | None = None
        """Object storage (s3://, gs://) that receives a copy of every checkpoint from background threads."""

        storage_options: dict[str, Any] = field(default_factory=dict)
        remote_storage_options: dict[str, Any] = field(default_factory=dict)

    def __init__(
        self,
        config: Config,
        *,
        dataloader: Any,
        model_parts: list[torch.nn.Module],
        optimizers: Any,
        lr_schedulers: Any,
        states: dict[str, Any],
        sd_adapter: Any,
        base_folder: str = "",
    ) -> None:
        self.enable = config.enable
        if not self.enable:
            return
        self.save_future = None
        if len(model_parts) != 1 or len(optimizers.optimizers) != 1:
            raise ckptio.InvalidArgumentError(
                f"CkptioCheckpointManager takes one model part and one optimizer (got {len(model_parts)} and "
                f"{len(optimizers.optimizers)}): pipeline parallelism and several optimizers are not supported yet"
            )
        if config.last_save_in_hf:
            raise ckptio.InvalidArgumentError(
                "checkpoint.last_save_in_hf: export the last checkpoint with `ckptio export --hf` instead"
            )
        self.config = config
        self.model, self.optimizer = model_parts[0], optimizers.optimizers[0]
        self.sd_adapter = sd_adapter
        # what else a resume restores, by torchtitan's names: its schedulers, data loader, train state, ...
        self.others = {LR_SCHEDULER: lr_schedulers, DATALOADER: dataloader, **states}
        self.folder = filesystem.join(base_folder, config.folder)
        initial = None if config.initial_load_in_hf else config.initial_load_path
        self.checkpointer = ckptio.Checkpointer(
            self.folder,
            TorchtitanModel.of(self.model),
            ckptio.CheckpointConfig(
                run_name="step", keep_last=config.keep_latest_k or None, async_save=config.async_save,
                remote_uri=config.remote_uri, storage_options=dict(config.storage_options),
                remote_storage_options=dict(config.remote_storage_options), initial_load=initial,
            ),
        )  # fmt: skip

    def __del__(self) -> None:
        self.close()

    # -- save ----------------------------------------------------------------------------------
    def _should_save(self, curr_step: int, last_step: bool) -> bool:
        if self.config.load_only:
            return False
        if curr_step == 1 and self.config.enable_first_step_checkpoint:
            return True
        return last_step or curr_step % self.config.interval == 0

    def _states(self) -> dict[str, Any]:
        """The job's other states: the same on every rank, except the data loader's, kept per rank."""
        out: dict[str, Any] = {}
        for key, obj in self.others.items():
            if obj is None:
                continue
            state = obj.state_dict()
            if key == DATALOADER and dist.is_initialized() and dist.get_world_size() > 1:
                gathered: list[Any] = [None] * dist.get_world_size()
                dist.all_gather_object(gathered, state)
                state = {"per_rank": gathered}
            elif key == DATALOADER:
                state = {"per_rank": [state]}
            out[key] = _encode(state)
        return out

    def _save(self, curr_step: int, last_step: bool = False) -> bool:
        if not self._should_save(curr_step, last_step):
            return False
        # the last step's checkpoint is a full one too: it resumes, and ckptio export gives the model alone
        self.checkpointer.save(
            self.model, curr_step, {"step": curr_step}, trainer_state=self._states(), force=True,
            optimizer=self.optimizer,
        )  # fmt: skip
        if self.config.async_save:  # what maybe_wait_for_saving waits for: the write ckptio runs in the background
            self.save_future = concurrent.futures.Future()
        return True

    def _maybe_wait_for_staging(self) -> None:
        # an async save's snapshot is taken before save() returns: nothing is left staging
        return None

    def _wait_for_saving(self) -> None:
        self.checkpointer.wait()
        self.save_future = None

    # -- load ----------------------------------------------------------------------------------
    def _load(self, step: int = -1) -> bool:
        if step != -1:
            raise ckptio.InvalidArgumentError(
                f"checkpoint.load_step={step}: CkptioCheckpointManager resumes the newest checkpoint of "
                f"{self.folder}; keep the one you want newest (keep_latest_k) or start from it with initial_load_path"
            )
        exclude = set(self.config.exclude_from_loading)
        optimizer = None if OPTIMIZER in exclude else self.optimizer
        if self.checkpointer.load_into(self.model, optimizer, restore_rng=False):
            if self.checkpointer.resumed_from is not None:
                self._restore(self.checkpointer.trainer_state or {}, exclude)
            return True
        if self.config.initial_load_in_hf and self.config.initial_load_path:
            return self._load_hf(self.config.initial_load_path)
        return False

    def _restore(self, saved: dict[str, Any], exclude: set[str]) -> None:
        for key, obj in self.others.items():
            if obj is None or key in exclude or key not in saved:
                continue
            state = _decode(saved[key])
            if key == DATALOADER:
                per_rank = state["per_rank"]
                world = dist.get_world_size() if dist.is_initialized() else 1
                if len(per_rank) != world:
                    log.warning(
                        "data loader state saved at %d ranks, this job has %d: not restored", len(per_rank), world
                    )
                    continue
                state = per_rank[dist.get_rank() if dist.is_initialized() else 0]
            obj.load_state_dict(state)

    def _load_hf(self, path: str) -> bool:
        """A new run from a Hugging Face folder: its names mapped by the model's state-dict adapter, each rank
        taking its part of the mapped tensors."""
        if self.sd_adapter is None:
            raise ckptio.InvalidArgumentError("checkpoint.initial_load_in_hf needs the model's state-dict adapter")
        artifact = ckptio.load_from_uri(path)
        state = self.sd_adapter.from_hf(dict(artifact.state_dict or {}))
        set_model_state_dict(self.model, state, options=StateDictOptions(full_state_dict=True, strict=True))
        return True

    def _close(self) -> None:
        # once: torchtitan's Trainer closes it, and __del__ again (at interpreter exit, with modules torn down)
        checkpointer = self.__dict__.pop("checkpointer", None)
        if checkpointer is not None:
            checkpointer.close()
