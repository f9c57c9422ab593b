"""Imports point down the layers: a module imports from its own layer or lower ones, never higher.
The graph is read from the source (ast), nothing is imported."""
import ast
from pathlib import Path


PACKAGE = Path(__file__).resolve().parents[2] / "cotmi_ds"

# The layer order, lowest first. Keys are paths under cotmi_ds/; the longest key that matches a file
# places it, so a package's __init__.py can be a registry below the package's own modules.
LAYERS = [
    # facts and registries: import nothing above them
    ("__init__.py", "errors.py", "files.py", "schema.py", "flags.py", "modes.py", "losses/__init__.py",
     "data/__init__.py", "data/arith.py"),
    ("distributed.py", "console.py"),  # processes and their output
    ("config.py",),
    ("data/", "model/", "losses/", "ds_configs/"),
    ("checkpoint/", "evaluation/"),
    ("training/",),
    ("cluster/", "teacher/"),
    ("cli.py", "__main__.py"),
]


def layer_of(rel: str, layers=LAYERS) -> int | None:
    matches = [(len(key), i) for i, keys in enumerate(layers) for key in keys
               if rel == key or (key.endswith("/") and rel.startswith(key))]
    return max(matches)[1] if matches else None


def module_file(dotted: str, package: Path) -> str | None:
    """cotmi_ds.a.b -> 'a/b.py' or 'a/b/__init__.py' (relative to the package); None if neither."""
    parts = dotted.split(".")[1:]
    for rel in ("/".join(parts) + ".py", "/".join(parts + ["__init__.py"])):
        if (package / rel.lstrip("/")).is_file():
            return rel.lstrip("/")
    return None


def imports(path: Path, package: Path):
    """(line, imported file) for every cotmi_ds import in ``path``, at any depth (lazy imports too)."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from pkg import mod` imports the module pkg/mod.py; `from mod import name`, mod itself
            targets = [f"{node.module}.{a.name}" if module_file(f"{node.module}.{a.name}", package)
                       else node.module for a in node.names]
        else:
            continue
        for target in targets:
            if target == "cotmi_ds" or target.startswith("cotmi_ds."):
                yield node.lineno, module_file(target, package)


def upward_imports(package: Path = PACKAGE, layers=LAYERS) -> list[str]:
    found = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package).as_posix()
        for line, target in imports(path, package):
            if target is not None and layer_of(target, layers) > layer_of(rel, layers):
                found.append(f"cotmi_ds/{rel}:{line} imports cotmi_ds/{target} from a higher layer")
    return found


def test_every_module_has_a_layer():
    unplaced = [p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py")
                if layer_of(p.relative_to(PACKAGE).as_posix()) is None]
    assert not unplaced, f"add these to LAYERS in {Path(__file__).name}: {unplaced}"


def test_no_module_imports_from_a_higher_layer():
    assert upward_imports() == []


def test_an_upward_import_is_found(tmp_path):
    """The check itself: config importing the trainer is reported, with its file and line."""
    pkg = tmp_path / "cotmi_ds"
    (pkg / "training").mkdir(parents=True)
    (pkg / "training" / "loop.py").write_text("from cotmi_ds.config import TrainConfig\n")
    (pkg / "config.py").write_text('"""doc"""\n\ndef f():\n    from cotmi_ds.training import loop\n')
    assert upward_imports(pkg) == ["cotmi_ds/config.py:4 imports cotmi_ds/training/loop.py from a higher layer"]


def test_deepspeed_is_imported_only_inside_the_functions_that_use_it():
    """Never at a module's import (see training/engine.py)."""
    at_import = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.parse(path.read_text()).body:
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            at_import += [f"{path.name}:{node.lineno}" for n in names if n.split(".")[0] == "deepspeed"]
    assert at_import == []


def test_usage_error_comes_from_errors_py():
    """Not through a module that happens to import it (config.py, say): one import path for everyone."""
    elsewhere = []
    for path in sorted([*PACKAGE.rglob("*.py"), *(PACKAGE.parent / "benchmarks").glob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.ImportFrom) and node.module != "cotmi_ds.errors"
                    and any(a.name == "UsageError" for a in node.names)):
                elsewhere.append(f"{path.name}:{node.lineno}")
    assert elsewhere == []
