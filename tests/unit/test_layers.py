"""The layers point down. Read from the source (no import runs): a module imports only
modules of its own layer or of layers below it, and no modules import each other in a
circle. A new upward import or circle fails here, naming the edge."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# bottom first; a module belongs to the first layer with a prefix of its name
LAYERS: list[tuple[str, ...]] = [
    ("sheep.errors", "sheep.units", "sheep.oid", "sheep.zeros", "sheep.malloc",
     "sheep.output", "sheep.framing", "sheep.tcp", "sheep.children", "sheep.futures",
     "sheep.clock", "sheep.fdlimit", "sheep.names", "sheep.netaddr", "sheep.netpeer",
     "sheep.security"),  # the CA, identities, dog's config: every plane authenticates
    # one node's store; the ring, membership and etcd; the wire protocols' cores
    ("sheep.store", "sheep.cluster", "sheep.etcd_server", "sheep.etcd_users", "sheep.dataplane",
     "sheep.gateway.scsi", "sheep.gateway.nbd.wire", "sheep.gateway.nbd.handshake",
     "sheep.gateway.nbd.tls",
     "sheep.gateway.nbd.transmission", "sheep.gateway.iscsi.wire", "sheep.gateway.iscsi.text",
     "sheep.gateway.iscsi.login", "sheep.gateway.iscsi.session",
     "sheep.gateway.iscsi.connection", "sheep.gateway.iscsi.sense"),
    ("sheep.objclient",),
    ("sheep.vdi",),
    ("sheep.gateway", "sheep.control"),
    ("sheep.node",),
    ("sheep.localcluster",),  # launches etcd and `sheep run` daemons; sheep up, bench, tests
    ("qemu_driver",),
    ("sheep.embedded", "sheep.cli", "sheep.__main__"),
]


def modules() -> dict[str, Path]:
    found = {}
    for path in [*ROOT.glob("sheep/**/*.py"), *ROOT.glob("qemu_driver/*.py")]:
        if path.name.endswith("_pb2.py") or path.name.endswith("_pb2_grpc.py"):
            continue  # generated
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> Iterator[str]:
    """The modules of ours that `name` imports, wherever in the file (a function's lazy
    import is an import too); `from P import m` of a module m counts as P.m."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name in known)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join([*base, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            for alias in node.names:
                if f"{source}.{alias.name}" in known:
                    yield f"{source}.{alias.name}"
                elif source in known:
                    yield source


def layer(name: str) -> int:
    if name in ("sheep", "qemu_driver"):  # the bare packages: a docstring, no imports
        return 0
    for i, prefixes in enumerate(LAYERS):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(f"{name} is in no layer: add it to LAYERS")


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: set(imports(name, path, known)) - {name} for name, path in known.items()}


def test_every_module_has_a_layer() -> None:
    for name in modules():
        layer(name)


def test_no_module_imports_from_a_layer_above_its_own() -> None:
    upward = sorted(f"{a} -> {b}" for a, deps in graph().items() for b in deps
                    if layer(b) > layer(a))
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_no_modules_import_each_other_in_a_circle() -> None:
    edges = graph()
    circles = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(edges[node]):
            if state.get(dep) == 1:
                circles.append(" -> ".join([*path[path.index(dep):], dep]))
            elif dep not in state:
                visit(dep, [*path, dep])
        state[node] = 2

    for start in sorted(edges):
        if start not in state:
            visit(start, [start])
    assert not circles, "import circles:\n" + "\n".join(circles)
