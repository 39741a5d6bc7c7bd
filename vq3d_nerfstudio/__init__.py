"""VQ3D for nerfstudio: one photo to a NeRF in a forward pass (stage 1), and class-conditional
generation of new scenes over its tokens (stage 2). The README's "Code map" says what each folder is."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

#: Modules moved when the package was split into layers. A run's ``config.yml`` names its config
#: classes by module path and nerfstudio loads it with yaml's object constructor, so runs saved
#: before the move still load: the old names import as aliases of the new modules (same classes).
#: Removal: at version 0.2.0, when runs saved before the move (commit 13128e1, 2026-12-02) no longer
#: need to load; drop tests/test_layers.py::test_a_run_saved_before_the_layers_still_loads with it.
MOVED_MODULES = {
    "vq3d_nerfstudio.model": "vq3d_nerfstudio.stage1.model",
    "vq3d_nerfstudio.pipeline": "vq3d_nerfstudio.ns.pipeline",
    "vq3d_nerfstudio.trainer": "vq3d_nerfstudio.ns.trainer",
    "vq3d_nerfstudio.schedulers": "vq3d_nerfstudio.ns.schedulers",
    "vq3d_nerfstudio.method_configs": "vq3d_nerfstudio.ns.method_configs",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports an old module path of :data:`MOVED_MODULES` as a module holding the new one's objects."""

    def find_spec(self, fullname, path=None, target=None):
        return importlib.util.spec_from_loader(fullname, self) if fullname in MOVED_MODULES else None

    def create_module(self, spec):
        return None  # the default module object

    def exec_module(self, module) -> None:
        moved = importlib.import_module(MOVED_MODULES[module.__name__])
        module.__dict__.update({k: v for k, v in vars(moved).items() if not k.startswith("__")})


if not any(isinstance(finder, _MovedModules) for finder in sys.meta_path):
    sys.meta_path.append(_MovedModules())
