"""The import layers, checked on the source: every import statement of every module (those inside
functions and under TYPE_CHECKING too) is read with `ast`, nothing is imported.

Packages, lowest first: common (pure helpers) < phantom (synthetic studies) < inference <
training; node sits on common and inference (and phantom, for its demo) and never on training.
Inside node, a part imports only parts of a lower layer (NODE_LAYERS): parts of one layer
(receive, assemble, route, encode, send) do not import each other, so the receiver works
without routing, routing without the receiver, and the configuration is the bottom of it all.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PRODUCT = ("common", "phantom", "inference", "training", "node")
NOT_PRODUCT = ("tests", "benchmarks")
FORBIDDEN = {  # package -> packages it must not import
    "common": {"phantom", "inference", "training", "node"},
    "phantom": {"inference", "training", "node"},
    "inference": {"phantom", "training", "node"},
    "training": {"node"},
    "node": {"training"},
}
NODE_LAYERS = {  # node's parts: a part imports only parts of a lower layer
    "node.config": 0, "node.routing_tags": 0, "node.deflate": 0, "node.metrics": 0, "node.highdicom_internals": 0,
    "node.store": 1, "node.transport": 1,
    "node.receive": 2, "node.assemble": 2, "node.route": 2, "node.encode": 2, "node.send": 2, "node.deid": 2,
    "node.jobs": 3,
    "node.retention": 4, "node.liveconfig": 4,
    "node.console": 5,
    "node.service": 6, "node.demo": 6,
    "node.cli": 7,
}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, module: str, root: Path = REPO) -> list[tuple[int, str]]:
    """(line, imported module) for every import in the file, relative ones resolved."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            # `from node import logs` imports node.logs: name the imported modules when they are
            where = root / Path(*name.split("."))
            found += [(node.lineno, f"{name}.{alias.name}") if (where / alias.name).is_dir()
                      or (where / f"{alias.name}.py").exists() else (node.lineno, name) for alias in node.names]
    return list(dict.fromkeys(found))  # `from x import a, b`: once


def node_part(module: str) -> str:
    return ".".join(module.split(".")[:2])


def violations(root: Path = REPO) -> list[str]:
    """Every import that breaks a layer rule, as 'file:line: importer -> imported (rule)'."""
    found = []
    for package in PRODUCT:
        for path in sorted((root / package).rglob("*.py")):
            module = module_name(path, root)
            where = f"{path.relative_to(root)}"
            if package == "node" and module != "node" and node_part(module) not in NODE_LAYERS:
                found.append(f"{where}: {node_part(module)} has no layer in tests/test_layers.py NODE_LAYERS")
            for line, imported in imports(path, module, root):
                top = imported.split(".")[0]
                if top in NOT_PRODUCT:
                    found.append(f"{where}:{line}: {module} -> {imported} (product code imports no {top})")
                elif top in FORBIDDEN[package]:
                    found.append(f"{where}:{line}: {module} -> {imported} ({package} imports no {top})")
                elif package == "node" == top and module != "node" and imported != "node":
                    source, target = node_part(module), node_part(imported)
                    if source == target or source not in NODE_LAYERS:
                        continue
                    if target not in NODE_LAYERS:
                        found.append(f"{where}:{line}: {module} -> {imported} ({target} has no layer)")
                    elif NODE_LAYERS[target] >= NODE_LAYERS[source]:
                        found.append(f"{where}:{line}: {module} -> {imported} ({source}, layer {NODE_LAYERS[source]},"
                                     f" imports only lower layers; {target} is layer {NODE_LAYERS[target]})")
    return found


def test_every_import_keeps_to_the_layers():
    assert violations() == []


@pytest.mark.parametrize("importer, source, rule", [
    ("node/route/study.py", "from node.receive.tags import ROUTING_KEYWORDS\n", "node.route, layer 2"),
    ("node/config.py", "from node.encode.seg import build_seg\n", "node.config, layer 0"),
    ("node/demo.py", "from training.data.synthetic import make_dicom_study\n", "node imports no training"),
    ("node/receive/scp.py", "def f():\n    from node.jobs.runner import JobRunner\n", "node.receive, layer 2"),
    ("common/logs.py", "import node.config\n", "common imports no node"),
    ("inference/volume.py", "from node import config\n", "inference imports no node"),
    ("training/train.py", "from node.encode.seg import build_seg\n", "training imports no node"),
    ("node/send/outbox.py", "from tests.peers import storescu\n", "product code imports no tests"),
    ("inference/pipeline.py", "from benchmarks import results\n", "product code imports no benchmarks"),
    ("node/store/index.py", "from ..route import study\n", "node.store, layer 1"),
])
def test_the_check_catches_each_kind_of_violation(importer, source, rule, tmp_path):
    """A copy of the product packages with one forbidden import added is refused, naming the rule
    (the first three are the ones this tree had: route -> receive, config -> encode, demo -> training)."""
    for package in PRODUCT:
        for path in (REPO / package).rglob("*.py"):
            target = tmp_path / path.relative_to(REPO)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(path.read_text())
    (tmp_path / importer).write_text((tmp_path / importer).read_text() + "\n" + source)
    found = violations(tmp_path)
    assert len(found) == 1 and found[0].startswith(importer) and rule in found[0], found
