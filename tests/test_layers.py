"""The package's layering (README "Code map"): each folder imports only the layers below it, nothing
imports the command-line scripts, and there are no import cycles between modules."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "vq3d_nerfstudio"

#: Layer of each top-level module or folder, lowest first; a module may import its own layer and below.
LAYERS = {
    "errors": 0, "checks": 0, "files": 0, "geometry": 0, "model_index": 0, "interrupts": 0,
    "stage1": 1,
    "data": 2,
    "evaluation": 3, "export": 3,
    "stage2": 4,
    "ns": 5,
    "scripts": 6,
}

#: Where a function may import the package's own modules: the commands, which load torch, nerfstudio
#: and the model only inside ``main()`` so that ``vq3d --help`` and option errors answer at once
#: (``scripts/common.py`` says so). Everywhere else imports sit at the top of the module.
LAZY_IMPORTS_ALLOWED_IN = ("vq3d_nerfstudio.scripts",)


def modules():
    """``{module name: (path, set of imported vq3d_nerfstudio modules, function-level ones)}``."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        tree = ast.parse(path.read_text())
        imports, lazy = set(), set()
        top_level = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            targets = [t for t in targets if t.startswith("vq3d_nerfstudio.") and module_path(t)]
            if not targets:
                continue
            imports.update(module_path(t) for t in targets)
            if id(node) not in top_level and not _in_type_checking(tree, node):
                lazy.update(module_path(t) for t in targets)
        found[name] = (path, imports, lazy)
    return found


def module_path(dotted: str):
    """The module a dotted import names (a module, or a name inside one), or None."""
    parts = dotted.split(".")
    while parts:
        candidate = PACKAGE.parent.joinpath(*parts)
        if candidate.with_suffix(".py").is_file() or (candidate / "__init__.py").is_file():
            return ".".join(parts)
        parts = parts[:-1]
    return None


def _in_type_checking(tree, node) -> bool:
    for top in tree.body:
        if isinstance(top, ast.If) and "TYPE_CHECKING" in ast.unparse(top.test):
            if any(child is node for child in ast.walk(top)):
                return True
    return False


def layer(module: str):
    parts = module.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


def test_every_module_is_in_a_layer():
    unplaced = [m for m in modules() if m != "vq3d_nerfstudio" and layer(m) is None]
    assert not unplaced, f"add these to LAYERS (and the README's code map): {unplaced}"


def test_imports_go_downward_only():
    upward = [
        f"{m} (layer {layer(m)}) imports {t} (layer {layer(t)})"
        for m, (_, imports, _) in modules().items() if m != "vq3d_nerfstudio"
        for t in imports if t != "vq3d_nerfstudio" and layer(t) > layer(m)
    ]
    assert not upward, "\n".join(upward)


def test_stage1_is_the_paper_alone():
    """The model code needs no data loading, nerfstudio glue or commands."""
    bad = [f"{m} imports {t}" for m, (_, imports, _) in modules().items() if m.startswith("vq3d_nerfstudio.stage1")
           for t in imports if t.split(".")[1] in ("data", "ns", "scripts", "stage2", "evaluation", "export")]
    assert not bad, "\n".join(bad)


def test_nothing_imports_the_scripts():
    bad = [f"{m} imports {t}" for m, (_, imports, _) in modules().items() if not m.startswith("vq3d_nerfstudio.scripts")
           for t in imports if t.startswith("vq3d_nerfstudio.scripts")]
    assert not bad, "\n".join(bad)


def test_own_modules_are_imported_at_the_top():
    """Function-level imports of the package's own modules papered over an inverted layering; with
    the layers in order none is needed outside the commands."""
    lazy = [f"{m} imports {sorted(names)} inside a function" for m, (_, _, names) in modules_cache.items()
            if names and not m.startswith(LAZY_IMPORTS_ALLOWED_IN)]
    assert not lazy, "\n".join(lazy)


def test_no_import_cycles():
    graph = {m: {t for t in imports if t != m and t in modules_cache} for m, (_, imports, _) in modules_cache.items()}
    # Package __init__ modules are imported by their children implicitly; they import nothing here.
    state, stack, cycles = {}, [], []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "\n".join(cycles)


@pytest.mark.parametrize("path", ["vq3d_nerfstudio/errors.py", "vq3d_nerfstudio/stage1/field.py"])
def test_the_checker_sees_imports(path):
    """The AST walk finds a module's imports (a checker that saw none would pass everything)."""
    name = path[:-3].replace("/", ".")
    assert name in modules_cache
    if name.endswith("field"):
        assert "vq3d_nerfstudio.stage1.triplane" in modules_cache[name][1]


modules_cache = modules()

#: Functions outside ``scripts/`` that may end the process with ``SystemExit``: the first code of
#: ours that a nerfstudio command runs, where nothing of ours sits above to catch a ``Vq3dError``.
#: Everything else raises the ``Vq3dError`` family and lets an entry point print it.
ERROR_BOUNDARIES = {
    # ns-train calls it first of all (before making the run folder): bad options, image sizes
    ("vq3d_nerfstudio.ns.trainer", "Vq3dTrainerConfig.save_config"),
    # ns-train's set-up: building the pipeline and preparing the model (removes the empty run folder)
    ("vq3d_nerfstudio.ns.trainer", "Vq3dTrainer.setup"),
    # ns-train's loop: a strict bad file, a full disk at a checkpoint save
    ("vq3d_nerfstudio.ns.trainer", "Vq3dTrainer.train"),
    # ns-render, ns-export, ns-viewer, ns-eval (and eval_setup everywhere) build the pipeline first
    ("vq3d_nerfstudio.ns.pipeline", "Vq3dPipeline.__init__"),
    # eval_setup and ns-train --load-dir load a checkpoint through it
    ("vq3d_nerfstudio.ns.pipeline", "Vq3dPipeline.load_pipeline"),
}


def system_exits(path: Path):
    """``(qualified function name, line)`` of every ``SystemExit`` named in a module (a raise, a
    call, an ``except SystemExit``): the scan the test below relies on."""
    found = []

    def walk(node, scope):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                walk(child, scope + (child.name,))
                continue
            if isinstance(child, ast.Name) and child.id == "SystemExit":
                found.append((".".join(scope), child.lineno))
            walk(child, scope)

    walk(ast.parse(path.read_text()), ())
    return found


def test_system_exit_scan_finds_raises_and_calls(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("class A:\n    def f(self):\n        raise SystemExit('x')\n\n"
                      "def g():\n    e = SystemExit(1)\n    return e\n\ndef h():\n    raise ValueError('x')\n")
    assert system_exits(source) == [("A.f", 3), ("g", 6)]


def test_no_system_exit_outside_entry_points():
    """Library layers raise the ``Vq3dError`` family; only the commands (``scripts/``) and the
    boundaries listed in :data:`ERROR_BOUNDARIES` turn it into the printed line and the exit."""
    bad, used = [], set()
    for name, (path, _, _) in modules_cache.items():
        if name.startswith("vq3d_nerfstudio.scripts"):
            continue
        for function, line in system_exits(path):
            if (name, function) in ERROR_BOUNDARIES:
                used.add((name, function))
            else:
                bad.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({function or 'module level'})")
    assert not bad, "raise a Vq3dError here instead (the entry point prints it):\n" + "\n".join(bad)
    assert used == ERROR_BOUNDARIES, f"boundaries that no longer exit: {ERROR_BOUNDARIES - used}"


def test_the_command_line_parses_before_loading_torch():
    """``vq3d --help`` and option errors answer before torch and nerfstudio load (scripts/common.py)."""
    import subprocess
    import sys

    code = "import sys, vq3d_nerfstudio.scripts.cli; print(sorted(m for m in ('torch', 'nerfstudio') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_a_run_saved_before_the_layers_still_loads():
    """A run's config.yml names its classes by module path; runs written before the package was
    split into layers use the old paths, which must resolve to the same classes."""
    import yaml

    from vq3d_nerfstudio import MOVED_MODULES
    from vq3d_nerfstudio.ns.method_configs import build_trainer_config

    text = yaml.dump(build_trainer_config("vq3d-tiny"))
    old_text = text
    for old, new in MOVED_MODULES.items():
        old_text = old_text.replace(f"{new}.", f"{old}.")
    assert old_text != text and "vq3d_nerfstudio.stage1.model." not in old_text
    loaded = yaml.load(old_text, Loader=yaml.Loader)
    fresh = yaml.load(text, Loader=yaml.Loader)
    assert type(loaded) is type(fresh) and type(loaded.pipeline.model) is type(fresh.pipeline.model)
    assert loaded.pipeline.model._target is fresh.pipeline.model._target
    assert loaded.pipeline.model.coarse_samples_per_ray == fresh.pipeline.model.coarse_samples_per_ray
