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
    "TRANSFORMERS_CONFIG_CLASS",
    "TransformersArchitecture",
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


# an HF folder's architecture: AutoConfig builds the config class its model_type names
TRANSFORMERS_CONFIG_CLASS = "transformers.AutoConfig"
# what a transformers config carries that says nothing of the architecture: compared without them
_TRANSFORMERS_VOLATILE = ("transformers_version", "dtype", "torch_dtype", "_name_or_path")


@dataclass(frozen=True)
class TransformersArchitecture:
    """A transformers config as an architecture: ``make_policy`` builds the model class its ``architectures``
    names (``AutoModel`` where it names none). ``class_path`` is the config's class (``transformers.AutoConfig``
    for a folder's config.json); it and the model class are imported only through the allow-list."""

    class_path: str
    config: dict[str, Any]
    allow: tuple[str, ...] = field(default=(), compare=False, repr=False)

    @classmethod
    def of(cls, model_or_config: Any, model_class: str | None = None) -> TransformersArchitecture:
        """From a transformers model (its config and class) or a ``PretrainedConfig`` (and the model class name to
        build, where its ``architectures`` names none), in the form ``save_pretrained`` writes config.json."""
        config = getattr(model_or_config, "config", model_or_config)
        doc = json.loads(config.to_json_string(use_diff=True))
        doc["model_type"] = config.model_type
        if config is not model_or_config:
            doc["architectures"] = [type(model_or_config).__name__]
        elif model_class is not None:
            doc["architectures"] = [model_class]
        return cls(TRANSFORMERS_CONFIG_CLASS, doc)

    def hf_config(self) -> Any:
        """The transformers config object (its class imported through the allow-list)."""
        config_cls = _resolve_class(self.class_path, self.allow)
        data = dict(self.config)
        try:
            if hasattr(config_cls, "for_model"):  # AutoConfig: the class its model_type names
                return config_cls.for_model(data.pop("model_type"), **data)
            return config_cls.from_dict(data)
        except Exception as e:  # transformers raises ValueError, KeyError, TypeError
            raise ArchitectureError(f"cannot build {self.class_path} from its config: {e}") from e

    def make_policy(self, env_metadata: Any = None) -> torch.nn.Module:
        config = self.hf_config()
        names = getattr(config, "architectures", None) or []
        package = self.class_path.split(".")[0]
        model_cls = _resolve_class(f"{package}.{names[0]}" if names else f"{package}.AutoModel", self.allow)
        if not names:
            return model_cls.from_config(config)
        return model_cls(config)


def _is_transformers_config(cls: type) -> bool:
    return cls.__module__.split(".")[0] == "transformers" and (hasattr(cls, "for_model") or hasattr(cls, "from_dict"))


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
    if isinstance(arch, (ArchitectureRecord, TransformersArchitecture)):
        return {"class_path": arch.class_path, "config": arch.config}
    if not hasattr(arch, "make_policy") and _is_transformers_config(type(arch)) and hasattr(arch, "to_dict"):
        return architecture_to_json(TransformersArchitecture.of(arch))
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
    if not hasattr(cls, "make_policy") and _is_transformers_config(cls):
        arch = TransformersArchitecture(data["class_path"], config, tuple(allow))
        arch.hf_config()  # a config transformers refuses is refused here, as any other architecture's
        return arch
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
    return ja["class_path"] == jb["class_path"] and json.dumps(_comparable(ja), sort_keys=True) == json.dumps(
        _comparable(jb), sort_keys=True
    )


def _comparable(record: dict[str, Any]) -> Any:
    config = record["config"]
    if record["class_path"] == TRANSFORMERS_CONFIG_CLASS and isinstance(config, dict):
        return {k: v for k, v in config.items() if k not in _TRANSFORMERS_VOLATILE}
    return config
