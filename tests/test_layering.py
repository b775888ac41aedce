"""Data flows one way through the package: no module imports one above it, none imports another's private names."""

import ast
import pathlib

import ckptio

PACKAGE = pathlib.Path(ckptio.__file__).parent
# top to bottom, as the map in ckptio/__init__.py lists them; a module may import only those below it
ORDER = [
    "cli", "checkpointer", "node_fetch", "async_save", "lease", "mirror", "upload", "sharded", "manager", "tools", "dcp",
    "discovery",
    "layout", "hf", "artifact", "architecture", "trainer_state", "formats", "config", "cache", "storage", "ranks", "errors",
    "version",
]  # fmt: skip


def _imports(module: str) -> list[tuple[str, list[str]]]:
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.append((node.module, [a.name for a in node.names]))
            else:  # from . import x
                found += [(a.name, []) for a in node.names]
    return found


def test_every_module_is_on_the_map():
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__", "__main__"}
    assert modules == set(ORDER)


def test_no_module_imports_upward_or_private_names():
    for module in ORDER:
        for target, names in _imports(module):
            assert ORDER.index(target) > ORDER.index(module), f"{module} imports {target}, which is above it"
            private = [n for n in names if n.startswith("_") and not n.endswith("__")]
            assert not private, f"{module} imports private names {private} from {target}"


def test_the_integrations_use_the_public_api_only():
    """ckptio/integrations sit above the package, as launch/ does: ``import ckptio`` and its exported names."""
    for path in sorted((PACKAGE / "integrations").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                assert node.level == 0 and not (node.module or "").startswith("ckptio"), (path.name, node.module)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "ckptio":
                assert node.attr in ckptio.__all__, f"{path.name} uses ckptio.{node.attr}, which is not exported"
