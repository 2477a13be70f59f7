"""The layering of docs/design.md, checked on the source: each module imports only the crossent modules
its layer may touch, and nothing in the library imports the tooling (crossent.tools) or the integrations."""

import ast
import pathlib

import pytest

SRC = pathlib.Path(__file__).resolve().parents[1] / "src" / "crossent"

# module (dotted, under crossent) -> the crossent modules it may import (prefixes); docs/design.md's table
IMPL = ("options", "targets", "reduction", "impl.common", "config")
ALLOWED = {
    "__init__": ("functional", "modules", "targets", "diagnose", "config", "options"),
    "__main__": ("tools.cli",),
    "config": (),
    "errors": (),
    "options": ("config", "errors"),
    "targets": ("config", "options", "errors"),
    "reduction": ("options", "targets"),
    "impl": (),
    "impl.common": ("config",),
    "impl.reference": IMPL,
    "impl.chunked": IMPL,
    "impl.triton": IMPL + ("impl.triton",),
    "impl.triton.kernels": (),
    "impl.triton.linear_kernels": ("impl.triton.kernels",),  # kernels share @triton.jit helpers
    "impl.triton.launch": (),
    "impl.registry": ("impl", "config", "options"),
    "ops": ("impl", "options", "reduction", "targets", "config", "ops"),
    "distributed": ("options", "targets", "reduction", "impl.common", "config"),
    "functional": ("distributed", "config", "errors", "impl.common", "impl.registry", "ops", "options",
                   "reduction", "targets"),
    "modules": ("functional", "options"),
    "diagnose": ("targets", "options"),
    "integrations": ("functional", "distributed"),
    "tools": ("tools", "config", "impl.registry"),  # and the public API: `import crossent`
}


def _name(path: pathlib.Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = [p for p in rel.parts]
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: pathlib.Path):
    """The crossent modules ``path`` imports (dotted, without the ``crossent.`` prefix)."""
    mod = _name(path)
    package = mod.split(".") if path.name == "__init__.py" and mod != "__init__" else mod.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                names = [target] if node.module else [".".join(base + [a.name]) for a in node.names]
            elif node.module and (node.module == "crossent" or node.module.startswith("crossent.")):
                target = node.module[len("crossent."):] if node.module != "crossent" else ""
                names = [target] if target else [a.name for a in node.names]
            else:
                continue
            out.update(n.strip(".") for n in names if n.strip("."))
        elif isinstance(node, ast.Import):
            out.update(a.name[len("crossent."):] for a in node.names if a.name.startswith("crossent."))
    return mod, out


def _rule(mod: str):
    best = max((k for k in ALLOWED if mod == k or mod.startswith(k + ".")), key=len, default=None)
    assert best is not None, f"crossent.{mod} has no layer in ALLOWED (and docs/design.md): add it"
    return ALLOWED[best]


def _ok(imported: str, allowed) -> bool:
    return any(imported == a or imported.startswith(a + ".") for a in allowed)


FILES = sorted(p for p in SRC.rglob("*.py"))


@pytest.mark.parametrize("path", FILES, ids=[_name(p) for p in FILES])
def test_each_module_imports_only_what_its_layer_may(path):
    mod, imported = _imports(path)
    allowed = _rule(mod)
    bad = sorted(i for i in imported if not _ok(i, allowed) and not _ok(i, (mod,))
                 and not (mod.startswith("tools") and i in ("functional", "targets", "modules", "diagnose")))
    assert not bad, f"crossent.{mod} imports {bad}, outside its layer {allowed} (docs/design.md)"


def test_the_library_never_imports_the_tooling_or_the_integrations():
    for path in FILES:
        mod, imported = _imports(path)
        if mod.startswith(("tools", "integrations", "__main__")):
            continue
        assert not any(_ok(i, ("tools", "integrations")) for i in imported), (mod, imported)


def test_the_checker_sees_a_violation():
    """The checker is not blind: a module that reaches across its layer is caught."""
    assert not _ok("functional", _rule("impl.chunked"))
    assert _ok("impl.common", _rule("impl.chunked"))
