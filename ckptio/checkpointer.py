"""Checkpointer: checkpointing orchestrated inside a (distributed) training loop.

The master rank writes; every rank loads; the master chooses which checkpoint everyone resumes
from. Persistence itself is the CheckpointManager's job.
"""

from __future__ import annotations

import datetime
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from . import ranks
from .architecture import architecture_from_json, architecture_to_json, architectures_equal
from .errors import ArchitectureError, CheckpointError, CheckpointNotFoundError
from .manager import CheckpointInfo, CheckpointManager
from .policy_io import MANIFEST_NAME
from .trainer_state import capture_rng_state, flatten, restore_rng_state, unflatten

__all__ = ["CheckpointConfig", "Checkpointer"]

log = logging.getLogger("ckptio")


@dataclass
class CheckpointConfig:
    """How a training run checkpoints."""

    checkpoint_format: str = "safetensors"
    epoch_interval: int = 1
    keep_last: int | None = None
    keep_best: tuple[str, str, int] | None = None
    storage_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.epoch_interval < 1:
            raise ValueError("epoch_interval must be >= 1")


class Checkpointer:
    """Rank-aware save/resume for one run directory (local path or URI)."""

    def __init__(
        self,
        run_dir_or_uri: str,
        policy_architecture: Any,
        config: CheckpointConfig | None = None,
        *,
        allow: Iterable[str] = (),
    ):
        self.config = config or CheckpointConfig()
        self._architecture = policy_architecture
        self._architecture_json = architecture_to_json(policy_architecture)
        self.allow = tuple(allow)
        self.manager = CheckpointManager(
            run_dir_or_uri,
            self.config.checkpoint_format,
            keep_last=self.config.keep_last,
            keep_best=self.config.keep_best,
            storage_options=self.config.storage_options,
        )
        self.resumed_from: CheckpointInfo | None = None
        self.trainer_state: Any = None
        self.start_epoch = 0
        self._registered = False

    @property
    def policy_architecture(self) -> Any:
        return self._architecture

    @property
    def rank(self) -> ranks.RankInfo:
        return ranks.rank_info()

    # -- manifest ------------------------------------------------------------------------------
    def _manifest_payload(self) -> bytes:
        from . import __version__

        doc = dict(self._architecture_json)
        doc["ckptio_version"] = __version__
        doc["created_at"] = datetime.datetime.now(datetime.timezone.utc).isoformat()
        return json.dumps(doc, indent=1, sort_keys=True).encode()

    def _check_manifest(self) -> str | None:
        """Write the manifest if absent; an error message if it describes another architecture."""
        storage = self.manager.storage
        try:
            storage.write_bytes(MANIFEST_NAME, self._manifest_payload(), exclusive=True)
            return None
        except FileExistsError:
            pass
        raw = storage.read_bytes(MANIFEST_NAME)
        try:
            existing = json.loads(raw)
        except ValueError as e:
            return f"{storage.url(MANIFEST_NAME)}: manifest is not valid JSON: {e}"
        if not isinstance(existing, dict) or not architectures_equal(existing, self._architecture_json):
            return (
                f"{storage.url(MANIFEST_NAME)}: this run was created with architecture "
                f"{json.dumps({k: existing.get(k) for k in ('class_path', 'config')} if isinstance(existing, dict) else existing)}"
                f" but this job uses {json.dumps(self._architecture_json)}; refusing to resume into a different model "
                "(use a new run directory)"
            )
        return None

    def register(self) -> None:
        """Master writes the write-once manifest; every rank raises if the run's architecture differs."""
        if self._registered:
            return
        error = None
        if self.rank.is_master:
            try:
                error = self._check_manifest()
            except CheckpointError as e:
                error = str(e)
        error = ranks.broadcast_object(error)
        if error:
            raise ArchitectureError(error)
        self._registered = True

    def manifest_architecture(self) -> Any:
        """The architecture the run's manifest names (imported through the allow-list)."""
        data = self.manager.storage.read_bytes(MANIFEST_NAME)
        return architecture_from_json(data, allow=self.allow, source=self.manager.storage.url(MANIFEST_NAME))

    # -- resume --------------------------------------------------------------------------------
    def _choose_latest(self) -> str | None:
        if not self.rank.is_master:
            return None
        try:
            return self.manager.latest().name
        except CheckpointNotFoundError:
            return None

    def load_or_create_policy(
        self, env_metadata: Any, *, device: torch.device | str | None = None, restore_rng: bool = True
    ) -> torch.nn.Module:
        """Every rank: the latest checkpoint's policy (the master's choice), or a fresh identical one."""
        self.register()
        chosen = ranks.broadcast_object(self._choose_latest())
        if chosen is None:
            # the master's seed, not a draw: creating the policy must not shift any rank's RNG stream
            seed = ranks.broadcast_object(torch.initial_seed() if self.rank.is_master else None)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                module = self._architecture.make_policy(env_metadata)
            self.resumed_from, self.trainer_state, self.start_epoch = None, None, 0
            return module.to(device) if device is not None else module
        info = next(i for i in self.manager.list_checkpoints() if i.name == chosen)
        artifact = self.manager.load_from_uri(info.uri, self._architecture, allow=self.allow)
        module = artifact.instantiate(env_metadata, device=device)
        self.resumed_from = info
        self.start_epoch = info.epoch + 1
        self.trainer_state = None
        raw = self.manager.read_trainer_state(info)
        if raw is not None:
            tree = unflatten(*raw, source=info.storage.url(info.base))
            self.trainer_state = tree.get("user")
            rng = tree.get("rng") or []
            me = self.rank.rank
            if restore_rng and len(rng) == self.rank.world_size and me < len(rng):
                restore_rng_state(rng[me])
            elif restore_rng and rng:
                log.warning(
                    "RNG states were saved for %d ranks, this job has %d: not restored", len(rng), self.rank.world_size
                )
        log.info("resumed from %s (epoch %d) on rank %d", info.uri, info.epoch, self.rank.rank)
        return module

    # -- save ----------------------------------------------------------------------------------
    def should_save(self, epoch: int) -> bool:
        return epoch % self.config.epoch_interval == 0

    def save(
        self,
        policy: torch.nn.Module | Mapping[str, torch.Tensor],
        epoch: int,
        training_metrics: Mapping[str, Any] | None = None,
        trainer_state: Any = None,
        force: bool = False,
    ) -> str | None:
        """Save on the master (others return None at once); honours epoch_interval unless forced.

        With ``trainer_state`` (optimizer state, step counters...), every rank's RNG state is
        gathered too, so call it on every rank. Returns the checkpoint URI on the master.
        """
        if not force and not self.should_save(epoch):
            return None
        tree = None
        if trainer_state is not None:
            rng = ranks.all_gather_object(capture_rng_state())
            tree = {"user": trainer_state, "epoch": epoch, "rng": rng}
        if not self.rank.is_master:
            return None
        if not self._registered:  # master-only path: no collective here
            error = self._check_manifest()
            if error:
                raise ArchitectureError(error)
            self._registered = True
        uri = self.manager.save_agent(
            policy,
            epoch,
            training_metrics,
            policy_architecture=self._architecture,
            trainer_state=flatten(tree) if tree is not None else None,
        )
        log.info("saved %s", uri)
        return uri

    def close(self) -> None:
        """Wait for background work (none in synchronous mode)."""

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
