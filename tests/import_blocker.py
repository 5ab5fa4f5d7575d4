"""The opening of subprocess scripts that must run as on a device: an import hook refuses the host packages.

The hook also records every refused import in `attempts`, so a script can report that nothing even tried.
"""

from __future__ import annotations

HOST_PACKAGES = ("torch", "edgepeft", "exporters", "onnx")


def blocking_prelude(who: str) -> str:
    """Script source that installs the hook; `who` names what must not need the host packages."""
    return f'''
import importlib.abc, importlib.util, json, sys
BLOCKED = {HOST_PACKAGES!r}
attempts = []

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            attempts.append(name)
            raise ImportError(f"{{name}} is blocked: {who} must not need it")
        return None

sys.meta_path.insert(0, Block())
'''
