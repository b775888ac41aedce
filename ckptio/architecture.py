"""Policy architectures: config objects that build modules, their JSON form, and the import allow-list.

An architecture is any dataclass (or pydantic model) with a ``make_policy(env_metadata)`` method.
Its JSON form is ``{"class_path": "pkg.mod.Class", "config": {...}}``. Turning that JSON back into
an object means importing ``pkg.mod``, which runs code, so class paths read from files are only
imported when their module lies under a prefix on the allow-list.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import sys
import threading
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from .errors import ArchitectureError, CheckpointError, CheckpointSecurityError, CheckpointWarning

__all__ = [
    "ArchitectureRecord",
    "PolicyArchitecture",
    "allow_architecture_modules",
    "allowed_architecture_modules",
    "architecture_from_json",
    "architecture_or_record",
    "architecture_to_json",
    "architectures_equal",
    "class_path_of",
    "register_architecture",
]


@runtime_checkable
class PolicyArchitecture(Protocol):
    """Anything that builds a policy module from environment metadata."""

    def make_policy(self, env_metadata: Any) -> torch.nn.Module: ...


_lock = threading.Lock()
_allowed_prefixes: set[str] = {"ckptio"}
_registered: dict[str, type] = {}


_warned_main: set[str] = set()


def class_path_of(obj_or_cls: Any, *, registering: bool = False) -> str:
    """Dotted import path of an architecture's class: the one another process can import."""
    cls = obj_or_cls if isinstance(obj_or_cls, type) else type(obj_or_cls)
    if "<locals>" in cls.__qualname__:
        raise ArchitectureError(f"{cls.__qualname__} is defined inside a function; it cannot be imported by path")
    module = cls.__module__
    if module == "__main__":
        # a script run with -m has its importable name in its spec; one run by path has none
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        if spec is not None and spec.name and spec.name != "__main__":
            module = spec.name
        elif not registering and cls not in _registered.values() and cls.__qualname__ not in _warned_main:
            # a class the script registered is rebuilt by the processes that run this script (its ranks, its
            # restarts), which register it too: said once the user chose it, it is noise on every run
            _warned_main.add(cls.__qualname__)
            warnings.warn(
                f"architecture {cls.__qualname__} is defined in the script being run (__main__): no other process "
                "can import it to rebuild the policy. Move it into a module, run the script with python -m, or, where "
                "only this script rebuilds it, register it (@ckptio.register_architecture)",
                CheckpointWarning,
                stacklevel=3,
            )
    return f"{module}.{cls.__qualname__}"


def register_architecture(cls: type) -> type:
    """Allow this class to be rebuilt from its class path (usable as a decorator). A class of the script being run
    (``__main__``) is then rebuilt by the processes that run the same script, without a warning."""
    with _lock:
        _registered[class_path_of(cls, registering=True)] = cls
    return cls


def allow_architecture_modules(*prefixes: str) -> None:
    """Allow classes from modules under these dotted prefixes (e.g. ``"mypkg.policies"``)."""
    for p in prefixes:
        if not p or p.startswith(".") or p.endswith("."):
            raise ValueError(f"invalid module prefix {p!r}")
    with _lock:
        _allowed_prefixes.update(prefixes)


def allowed_architecture_modules() -> frozenset[str]:
    with _lock:
        return frozenset(_allowed_prefixes)


def _is_allowed(module: str, extra: Iterable[str]) -> bool:
    prefixes = allowed_architecture_modules() | set(extra)
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _config_of(arch: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(arch) and not isinstance(arch, type):
        return dataclasses.asdict(arch)
    if hasattr(arch, "model_dump"):  # pydantic v2
        return arch.model_dump(mode="json")
    if hasattr(arch, "dict") and hasattr(arch, "__fields__"):  # pydantic v1
        return arch.dict()
    raise ArchitectureError(
        f"architecture {type(arch).__qualname__} must be a dataclass or a pydantic model to be serialized"
    )


@dataclass(frozen=True)
class ArchitectureRecord:
    """A checkpoint's architecture record whose class is not built here (outside the allow-list, or not
    importable): readable as it is; ``make_policy`` raises why, since building is where classes are imported."""

    class_path: str | None
    config: Any
    source: str
    reason: CheckpointError = field(compare=False, repr=False)

    def make_policy(self, env_metadata: Any) -> torch.nn.Module:
        raise type(self.reason)(str(self.reason))


def architecture_or_record(data: Any, allow: Iterable[str] = (), source: str = "<json>") -> Any:
    """The architecture built through the allow-list, or, where it cannot be, its record (building raises)."""
    try:
        return architecture_from_json(data, allow=allow, source=source)
    except (ArchitectureError, CheckpointSecurityError) as e:
        try:
            record = json.loads(data) if isinstance(data, (str, bytes)) else data
        except ValueError:
            record = None
        record = record if isinstance(record, dict) else {}
        class_path = record.get("class_path")
        return ArchitectureRecord(class_path if isinstance(class_path, str) else None, record.get("config"), source, e)


def architecture_to_json(arch: Any) -> dict[str, Any]:
    """``{"class_path", "config"}`` for an architecture (its class is not added to the allow-list)."""
    if isinstance(arch, ArchitectureRecord):
        return {"class_path": arch.class_path, "config": arch.config}
    if not hasattr(arch, "make_policy"):
        raise ArchitectureError(f"{type(arch).__qualname__} has no make_policy(env_metadata) method")
    config = _config_of(arch)
    try:
        json.dumps(config)
    except (TypeError, ValueError) as e:
        raise ArchitectureError(f"config of {type(arch).__qualname__} is not JSON-serializable: {e}") from e
    return {"class_path": class_path_of(arch), "config": config}


def _resolve_class(class_path: str, allow: Iterable[str]) -> type:
    with _lock:
        cls = _registered.get(class_path)
    if cls is not None:
        return cls
    module_name, _, qualname = class_path.rpartition(".")
    if not module_name or not qualname:
        raise ArchitectureError(f"class_path {class_path!r} is not of the form 'package.module.Class'")
    if not _is_allowed(module_name, allow):
        raise CheckpointSecurityError(
            f"refusing to import {class_path!r}: module {module_name!r} is not on the architecture allow-list "
            f"({sorted(allowed_architecture_modules() | set(allow))}); call "
            f"ckptio.allow_architecture_modules({module_name.split('.')[0]!r}) or ckptio.register_architecture(cls) "
            "if you trust it"
        )
    try:
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise ArchitectureError(f"cannot import architecture class {class_path!r}: {e}") from e
    if not isinstance(obj, type):
        raise ArchitectureError(f"{class_path!r} is not a class")
    return obj


def architecture_from_json(data: Any, allow: Iterable[str] = (), source: str = "<json>") -> Any:
    """Rebuild an architecture from its JSON form, importing only allow-listed modules."""
    if isinstance(data, (str, bytes)):
        try:
            data = json.loads(data)
        except ValueError as e:
            raise ArchitectureError(f"{source}: architecture is not valid JSON: {e}") from e
    if not isinstance(data, dict) or not isinstance(data.get("class_path"), str) or "config" not in data:
        raise ArchitectureError(f"{source}: architecture must be an object with 'class_path' and 'config'")
    config = data["config"]
    if not isinstance(config, dict):
        raise ArchitectureError(f"{source}: architecture 'config' must be an object")
    try:
        cls = _resolve_class(data["class_path"], allow)
    except ArchitectureError as e:
        raise type(e)(f"{source}: {e}") from e
    try:
        if hasattr(cls, "model_validate"):
            arch = cls.model_validate(config)
        else:
            arch = cls(**config)
    except Exception as e:  # user constructors raise anything
        raise ArchitectureError(f"{source}: cannot build {data['class_path']} from its config: {e}") from e
    if not hasattr(arch, "make_policy"):
        raise ArchitectureError(f"{source}: {data['class_path']} has no make_policy(env_metadata) method")
    return arch


def architectures_equal(a: Any, b: Any) -> bool:
    """Same class path and same config (compared in JSON form)."""
    ja = a if isinstance(a, dict) else architecture_to_json(a)
    jb = b if isinstance(b, dict) else architecture_to_json(b)
    return ja["class_path"] == jb["class_path"] and json.dumps(ja["config"], sort_keys=True) == json.dumps(
        jb["config"], sort_keys=True
    )
