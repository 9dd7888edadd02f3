"""The package declares what its modules import: installed from its wheel into a clean virtual
environment, alone or with one extra, every module meant for that installation imports, and every
third-party module it imports (also inside functions) can be found.

Installing each extra into an environment of its own would cost a torch installation per extra.
Instead the package alone is installed and checked first; then every extra is installed at once,
and each extra is checked with the modules that the others brought hidden: what it may see are the
distributions ``implicit-layers[<extra>]`` requires, followed through the installed metadata.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from conftest import REPO

PACKAGE = REPO / "code" / "implicit_layers"
TORCH_VERSION = "2.13.0"
# The extra each module needs; modules not named here need the package alone.
EXTRA_OF = {"torch": "torch", "jax": "jax", "datasets": "data", "plotting": "plot", "notebook": "notebook"}
# What each extra brings that the package alone must not find, so the environment is clean.
MARKER_OF = {"torch": "torch", "jax": "jax", "data": "sklearn", "plot": "matplotlib", "notebook": "IPython"}

# Run in the clean environment: hides the top-level modules named in argv[2], then imports the
# modules of argv[1] and looks up the third-party modules each one imports.
CHECK = """
import importlib, importlib.util, json, sys
hidden = set(json.loads(sys.argv[2]))

class Hide:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in hidden:
            raise ModuleNotFoundError(f"No module named {name!r} (hidden: another extra installs it)")

sys.meta_path.insert(0, Hide())
problems = []
for module, imports in json.loads(sys.argv[1]).items():
    try:
        importlib.import_module(module)
    except Exception as error:
        problems.append(f"import {module}: {type(error).__name__}: {error}")
    for name in imports:
        try:
            spec = importlib.util.find_spec(name)
        except ModuleNotFoundError:
            spec = None
        if spec is None:
            problems.append(f"{module} imports {name}, which is not installed")
print(json.dumps(problems))
"""


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def catches_import_error(node: ast.Try) -> bool:
    names = []
    for handler in node.handlers:
        kinds = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
        names += [kind.id for kind in kinds if isinstance(kind, ast.Name)]
    return bool({"ImportError", "ModuleNotFoundError"} & set(names))


def third_party_imports(path: Path) -> set[str]:
    """Top-level names of the non-standard modules ``path`` imports anywhere, except those
    imported under ``try`` ... ``except ImportError`` (optional by construction)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    optional = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.Try) and catches_import_error(node)
        for statement in node.body
        for inner in ast.walk(statement)
    }
    names = set()
    for node in ast.walk(tree):
        if id(node) in optional:
            continue
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"implicit_layers", "__future__"}


def modules_by_extra() -> dict[str | None, dict[str, list[str]]]:
    grouped: dict[str | None, dict[str, list[str]]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        extra = EXTRA_OF.get(name.split(".")[1]) if "." in name else None
        grouped.setdefault(extra, {})[name] = sorted(third_party_imports(path))
    return grouped


def test_extras_the_modules_need_are_declared():
    pyproject = tomllib.loads((REPO / "code" / "pyproject.toml").read_text())
    declared = set(pyproject["project"]["optional-dependencies"])
    needed = set(modules_by_extra()) - {None}
    assert needed == set(MARKER_OF)
    assert needed <= declared, f"undeclared extras: {needed - declared}"


@pytest.fixture(scope="module")
def clean_environment(tmp_path_factory):
    """A virtual environment without pip or system packages, and the package's wheel."""
    root = tmp_path_factory.mktemp("packaging")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root / "venv")], check=True)
    # Built from a copy: setuptools writes a build/ folder next to the project it builds.
    source = root / "code"
    shutil.copytree(REPO / "code", source, ignore=shutil.ignore_patterns("tests", "build", "*.egg-info", "__pycache__"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(root), str(source)],
        check=True,
    )
    (wheel,) = root.glob("implicit_layers-*.whl")
    return root / "venv" / "bin" / "python", wheel


def pip(python: Path, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), *args], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def problems(python: Path, modules: dict[str, list[str]], hidden: set[str] = frozenset()) -> list[str]:
    result = subprocess.run(
        [str(python), "-c", CHECK, json.dumps(modules), json.dumps(sorted(hidden))], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def importable(python: Path, names: list[str]) -> list[str]:
    code = "import importlib.util, sys; print(*(n for n in sys.argv[1:] if importlib.util.find_spec(n)))"
    return subprocess.run([str(python), "-c", code, *names], capture_output=True, text=True, check=True).stdout.split()


def top_level_names(distribution: importlib.metadata.Distribution) -> set[str]:
    listed = distribution.read_text("top_level.txt")
    if listed:
        return set(listed.split())
    names = set()
    for file in distribution.files or []:
        first = file.parts[0]
        if len(file.parts) == 1 and file.suffix in {".py", ".so"}:
            names.add(first.split(".")[0])
        elif len(file.parts) > 1 and not first.endswith((".dist-info", ".data")) and first not in {"..", "__pycache__"}:
            names.add(first)
    return names


def required_distributions(distributions: dict[str, importlib.metadata.Distribution], extra: str) -> set[str]:
    """Canonical names of the installed distributions that ``implicit-layers[extra]`` pulls in."""
    needed, todo = set(), [Requirement(f"implicit-layers[{extra}]")]
    while todo:
        requirement = todo.pop()
        name = canonicalize_name(requirement.name)
        if name in needed or name not in distributions:
            continue  # a dependency for another platform or Python is not installed
        needed.add(name)
        for line in distributions[name].requires or []:
            dependency = Requirement(line)
            wanted = requirement.extras or {""}
            if dependency.marker is None or any(dependency.marker.evaluate({"extra": x}) for x in wanted):
                todo.append(dependency)
    return needed


def test_package_alone_and_with_each_extra_in_a_clean_environment(clean_environment):
    python, wheel = clean_environment
    grouped = modules_by_extra()
    extras = sorted(set(grouped) - {None})
    pip(python, "install", "--quiet", "--no-compile", str(wheel))
    assert problems(python, grouped[None]) == []
    assert importable(python, list(MARKER_OF.values())) == [], "the environment is not clean"

    # Pinned first, from the CPU index where one is set, so pip never picks a CUDA build.
    index = ["--index-url", os.environ["TORCH_INDEX_URL"]] if os.environ.get("TORCH_INDEX_URL") else []
    pip(python, "install", "--quiet", "--no-compile", f"torch=={TORCH_VERSION}", *index)
    pip(python, "install", "--quiet", "--no-compile", f"{wheel}[{','.join(extras)}]")
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    distributions = {
        canonicalize_name(d.metadata["Name"]): d for d in importlib.metadata.distributions(path=[site])
    }
    for extra in extras:
        visible = required_distributions(distributions, extra)
        assert MARKER_OF[extra] in set().union(*(top_level_names(distributions[d]) for d in visible))
        hidden = set().union(*(top_level_names(d) for name, d in distributions.items() if name not in visible))
        assert problems(python, grouped[extra], hidden) == [], f"with the extra {extra!r} alone"
