"""PolicyArtifact: what loading a checkpoint gives you, and the module it turns into."""

from __future__ import annotations

import contextlib
import json
import math
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .architecture import architecture_to_json
from .errors import ArchitectureError, InvalidArtifactError, StateDictMismatchError
from .formats import LazyTensors

__all__ = ["MockArchitecture", "MockPolicy", "PolicyArtifact", "env_dims"]


def env_dims(env_metadata: Any) -> tuple[int, int]:
    """(observation size, action count) from a dict or object with obs/action fields."""

    def get(*names: str) -> Any:
        for n in names:
            if isinstance(env_metadata, Mapping) and n in env_metadata:
                return env_metadata[n]
            if hasattr(env_metadata, n):
                return getattr(env_metadata, n)
        raise ArchitectureError(f"env metadata {env_metadata!r} has none of {names}")

    obs = get("obs_dim", "observation_dim", "observation_shape", "obs_shape")
    act = get("num_actions", "action_dim", "n_actions")
    obs_n = math.prod(obs) if isinstance(obs, (tuple, list)) else int(obs)
    return int(obs_n), int(act)


class MockPolicy(torch.nn.Module):
    """A parameter-free policy producing valid zero logits and values for any env metadata."""

    def __init__(self, env_metadata: Any = None):
        super().__init__()
        self.obs_dim, self.num_actions = env_dims(env_metadata) if env_metadata is not None else (1, 1)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.zeros(obs.shape[0], self.num_actions, dtype=torch.float32, device=obs.device)


@dataclass(frozen=True)
class MockArchitecture:
    """Architecture of MockPolicy (what ``mock://`` URIs load)."""

    name: str = "mock"

    def make_policy(self, env_metadata: Any) -> torch.nn.Module:
        return MockPolicy(env_metadata)


def _shape_diff(
    module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor]
) -> tuple[list[str], list[str], list[str]]:
    expected = module.state_dict(keep_vars=True)
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape)
    ]
    return missing, unexpected, shapes


def _describe(missing: list[str], unexpected: list[str], shapes: list[str], limit: int = 20) -> str:
    lines = []
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
        if items:
            shown = "\n    ".join(items[:limit]) + (
                f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
            )
            lines.append(f"  {title} ({len(items)}):\n    {shown}")
    return "\n".join(lines)


def tied_groups(module: torch.nn.Module) -> list[list[str]]:
    """Names of parameters/buffers that are one tensor object (tied weights), each group in state-dict order."""
    groups: dict[int, list[str]] = {}
    for name, t in (*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)):
        groups.setdefault(id(t), []).append(name)
    return [g for g in groups.values() if len(g) > 1]


def _fitted(
    module: torch.nn.Module, sd: Mapping[str, torch.Tensor], groups: list[list[str]]
) -> Mapping[str, torch.Tensor]:
    """``sd`` as ``module`` takes it. Each tensor in the module's own dtype, as load_state_dict's copy gives it
    (so building on meta with assign=True gives the same module as the copying path). A tie stored once under
    one of its names (safetensors' save_model stores it so, without saying which) filled in under the others."""
    out: dict[str, torch.Tensor] | None = None
    for names in groups:
        present = next((n for n in names if n in sd), None)
        if present is not None and any(n not in sd for n in names):
            out = dict(sd) if out is None else out
            for n in names:
                out.setdefault(n, sd[present])
    expected = module.state_dict(keep_vars=True)
    for key, t in (out or sd).items():
        own = expected.get(key)
        if own is not None and t.dtype != own.dtype:
            out = dict(sd) if out is None else out
            out[key] = t.to(own.dtype)
    return sd if out is None else out


def _retie(module: torch.nn.Module, groups: list[list[str]]) -> None:
    # load_state_dict(assign=True) wraps each key in its own Parameter, which unties weights.
    for names in groups:
        try:
            first = module.get_parameter(names[0])
        except AttributeError:
            first = module.get_buffer(names[0])
        for name in names[1:]:
            owner, _, attr = name.rpartition(".")
            setattr(module.get_submodule(owner), attr, first)


_init_lock = threading.Lock()


@contextlib.contextmanager
def _skip_weight_init() -> Iterator[None]:
    """Make ``torch.nn.init``'s in-place initialisers no-ops while a module is built on meta.

    On the meta device they compute nothing, yet cost most of the construction time of a large
    module. They are process-global functions, so a module built on another thread meanwhile
    would also skip them: instantiate is meant for load time, not concurrent construction.
    """
    names = [n for n in vars(torch.nn.init) if n.endswith("_") and not n.startswith("_")]
    saved = {n: getattr(torch.nn.init, n) for n in names}

    def keep(tensor: Any, *args: Any, **kwargs: Any) -> Any:
        return tensor

    with _init_lock:
        for n in names:
            setattr(torch.nn.init, n, keep)
        try:
            yield
        finally:
            for n, fn in saved.items():
                setattr(torch.nn.init, n, fn)


def _has_meta(module: torch.nn.Module) -> bool:
    return any(t.is_meta for t in module.parameters()) or any(t.is_meta for t in module.buffers())


@dataclass(eq=False)
class PolicyArtifact:
    """A loaded checkpoint: a ready ``policy`` module, or an architecture plus a state dict.

    ``instantiate(env_metadata)`` turns the second form into a module once and caches it.
    """

    policy: torch.nn.Module | None = None
    policy_architecture: Any = None
    state_dict: Mapping[str, torch.Tensor] | None = None
    training_metrics: dict[str, Any] | None = None
    source: str = "<memory>"
    epoch: int | None = None
    _module: torch.nn.Module | None = field(default=None, init=False, repr=False)

    def __repr__(self) -> str:
        # a checkpoint's repr names it; printing every tensor of a large policy helps nobody
        if self.policy is not None:
            return f"PolicyArtifact(source={self.source!r}, policy={type(self.policy).__name__})"
        assert self.state_dict is not None
        arch = type(self.policy_architecture).__name__ if self.policy_architecture is not None else None
        metrics = sorted(self.training_metrics) if self.training_metrics is not None else None
        return (
            f"PolicyArtifact(source={self.source!r}, epoch={self.epoch}, tensors={len(self.state_dict)}, "
            f"architecture={arch}, metrics={metrics}, instantiated={self._module is not None})"
        )

    def __post_init__(self) -> None:
        if (self.policy is None) == (self.state_dict is None):
            raise InvalidArtifactError(
                f"{self.source}: a PolicyArtifact holds either a policy module or a state dict, exactly one"
            )
        if self.policy is not None:
            if not isinstance(self.policy, torch.nn.Module):
                raise InvalidArtifactError(
                    f"{self.source}: policy must be a torch.nn.Module, got {type(self.policy).__name__}"
                )
            if self.training_metrics is not None:
                raise InvalidArtifactError(f"{self.source}: training_metrics only go with the state-dict form")
            self._module = self.policy
        else:
            assert self.state_dict is not None
            lazy = isinstance(self.state_dict, LazyTensors)  # tensors by construction; don't materialize
            bad = [] if lazy else [k for k, v in self.state_dict.items() if not isinstance(v, torch.Tensor)]
            if bad:
                raise InvalidArtifactError(f"{self.source}: state dict values must be tensors; not for {bad[:5]}")
            if self.policy_architecture is not None and not hasattr(self.policy_architecture, "make_policy"):
                raise InvalidArtifactError(f"{self.source}: policy_architecture has no make_policy(env_metadata)")
        if self.training_metrics is not None:
            try:
                json.dumps(self.training_metrics, allow_nan=True)
            except (TypeError, ValueError) as e:
                raise InvalidArtifactError(f"{self.source}: training_metrics are not JSON-serializable: {e}") from e

    def instantiate(
        self,
        env_metadata: Any = None,
        *,
        strict: bool = True,
        device: torch.device | str | None = None,
        policy_architecture: Any = None,
    ) -> torch.nn.Module:
        """Build (once) and return the module, with the weights loaded; later calls return the same object."""
        if self._module is not None:
            return self._module if device is None else self._module.to(device)
        arch = policy_architecture if policy_architecture is not None else self.policy_architecture
        if arch is None:
            raise ArchitectureError(
                f"{self.source}: the checkpoint carries no architecture (no header entry, manifest or sidecar); "
                "pass one: artifact.instantiate(env_metadata, policy_architecture=MyArch(...))"
            )
        assert self.state_dict is not None
        module = self._build(arch, env_metadata, strict)
        if device is not None:
            module = module.to(device)
        self._module = module
        if self.policy_architecture is None:
            self.policy_architecture = arch
        return module

    def _build(self, arch: Any, env_metadata: Any, strict: bool) -> torch.nn.Module:
        sd = self.state_dict
        assert sd is not None
        # Building on the meta device skips allocating and randomly initialising weights that the
        # checkpoint replaces; assign=True then adopts the (memory-mapped) tensors without a copy.
        try:
            with torch.device("meta"), _skip_weight_init():
                module = arch.make_policy(env_metadata)
        except Exception:
            module = None
        if module is not None:
            groups = tied_groups(module)
            fitted = _fitted(module, sd, groups)
            self._check(module, fitted, strict)
            module.load_state_dict(fitted, strict=strict, assign=True)
            _retie(module, groups)
            if not _has_meta(module):
                return module
        # Modules that cannot be built on meta, or that keep non-persistent buffers, take the
        # plain path: real construction and a copying load.
        module = arch.make_policy(env_metadata)
        if not isinstance(module, torch.nn.Module):
            raise ArchitectureError(
                f"{self.source}: make_policy returned {type(module).__name__}, not a torch.nn.Module"
            )
        fitted = _fitted(module, sd, tied_groups(module))
        self._check(module, fitted, strict)
        module.load_state_dict(fitted, strict=strict)
        return module

    def _check(self, module: torch.nn.Module, sd: Mapping[str, torch.Tensor], strict: bool) -> None:
        missing, unexpected, shapes = _shape_diff(module, sd)
        if shapes or (strict and (missing or unexpected)):
            raise StateDictMismatchError(
                f"{self.source}: checkpoint does not fit {type(module).__qualname__}:\n{_describe(missing, unexpected, shapes)}"
            )

    def architecture_json(self) -> dict[str, Any] | None:
        return None if self.policy_architecture is None else architecture_to_json(self.policy_architecture)
