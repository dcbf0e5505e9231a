"""The package's import layers (docs/architecture.md): read from the source with `ast`, three rules.

1. A module imports only from its own layer or below: the math, then parts, kinds, runs, the app.
2. No module imports another module's private name (one starting with "_").
3. No function-level import of the package's own modules, except the deferrals listed in DEFERRED, each for a named
   reason (an optional extra, or keeping the command line's start instant).
"""

from __future__ import annotations

import ast
from pathlib import Path


PACKAGE = Path(__file__).resolve().parents[1] / "diffuse"
LAYERS = {  # the first name of a module's path inside the package -> its layer
    **dict.fromkeys(["schedule", "denoiser", "condition", "guidance", "losses", "likelihood", "samplers", "augment",
                     "mixture", "version"], 0),
    **dict.fromkeys(["nets", "data", "generate", "tasks", "ema", "distributed", "precision", "checkpoint", "segmentation",
                     "trackers", "metrics", "video_metrics", "visualize", "footprint", "speed"], 1),
    **dict.fromkeys(["kinds", "stages", "config", "pretrained", "export"], 2),
    **dict.fromkeys(["runs", "train"], 3),
    **dict.fromkeys(["app", "__main__"], 4),
}
DEFERRED: dict[tuple[str, str], str] = {  # (importer, imported) -> why the import waits for the function that needs it
    ("diffuse.app.cli", "diffuse.app.commands"): "the command implementations load after the flags parse, so `diffuse --help` "
                                             "and a mistyped flag answer without them",
}


def modules() -> dict[str, ast.Module]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = ast.parse(path.read_text(), str(path))
    return out


def imports(name: str, tree: ast.Module, is_package: bool):
    """(imported module, imported names, inside a function) for every import of a diffuse module in `tree`."""
    functions = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                 for n in ast.walk(f) if n is not f}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = name.split(".") if is_package else name.split(".")[:-1]
            module = (".".join(base[:len(base) - node.level + 1]) + ("." + node.module if node.module else "")
                      if node.level else node.module or "")
            found = [(module, [a.name for a in node.names])]
            if not node.module:  # `from . import tasks`: the submodules themselves
                found = [(f"{module}.{a.name}", []) for a in node.names]
        elif isinstance(node, ast.Import):
            found = [(a.name, []) for a in node.names]
        else:
            continue
        for module, names in found:
            if module == "diffuse" or module.startswith("diffuse."):
                yield module, names, id(node) in functions


def layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS[parts[1]] if len(parts) > 1 else 0


def test_every_module_has_a_layer():
    assert [m for m in modules() if m != "diffuse" and m.split(".")[1] not in LAYERS] == []


def violations(trees: dict[str, ast.Module] | None = None, packages: frozenset = frozenset()):
    found = {"upward": [], "private": [], "deferred": []}
    for name, tree in (modules() if trees is None else trees).items():
        is_package = name in packages or (PACKAGE.parent / name.replace(".", "/") / "__init__.py").is_file()
        for module, names, in_function in imports(name, tree, is_package):
            if module != "diffuse" and name != "diffuse" and layer(module) > layer(name):
                found["upward"].append(f"{name} (layer {layer(name)}) imports {module} (layer {layer(module)})")
            found["private"] += [f"{name} imports {module}.{n}" for n in names if n.startswith("_") and n != "__version__"]
            if in_function and (name, module) not in DEFERRED:
                found["deferred"].append(f"{name} imports {module} inside a function")
    return found


def test_the_rules_catch_what_they_forbid():
    src = "from .nets.unet import _norm\nfrom . import train\ndef f():\n    from .samplers import ddim\n"
    v = violations({"diffuse.schedule": ast.parse(src)})
    assert v["upward"] == ["diffuse.schedule (layer 0) imports diffuse.nets.unet (layer 1)",
                           "diffuse.schedule (layer 0) imports diffuse.train (layer 3)"]
    assert v["private"] == ["diffuse.schedule imports diffuse.nets.unet._norm"]
    assert v["deferred"] == ["diffuse.schedule imports diffuse.samplers inside a function"]


def test_no_module_imports_from_a_layer_above():
    assert violations()["upward"] == []


def test_no_module_imports_a_private_name():
    assert violations()["private"] == []


def test_no_function_level_imports_but_the_named_deferrals():
    assert violations()["deferred"] == []
