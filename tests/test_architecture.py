"""The import rules of README.md's Architecture section, read from the source (ast) of every module of the
product packages: what each layer may import at module level, and what only inside a function (lazily).

spec -> backends -> conversion -> CLI: opt_spec imports no framework and no other optkit package; a backend
imports opt_spec and its own framework only; conversion imports opt_spec and no backend or framework (it
reads the frameworks' formats with h5py and its own msgpack reader); the CLI imports the backends, the
frameworks and conversion only inside functions, so `optkit --help` loads none of them.
"""

import ast
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("opt_spec", "opt_torch", "opt_tf", "opt_flax", "conversion", "optkit_cli")
BACKENDS = ("opt_torch", "opt_tf", "opt_flax")
# Each backend's framework family; a backend may import its own, nothing else may import any at module level.
FRAMEWORKS = {
    "opt_torch": {"torch", "accelerate", "peft"},
    "opt_tf": {"tensorflow", "keras", "tf_keras"},
    "opt_flax": {"jax", "jaxlib", "flax", "optax", "orbax"},
}
ALL_FRAMEWORKS = set().union(*FRAMEWORKS.values()) | {"transformers"}  # Hugging Face's: a test-only reference
# What the spec may import besides the standard library: NumPy (and its dtypes), and optional helpers lazily.
SPEC_MODULE_LEVEL = {"numpy", "ml_dtypes"}
SPEC_LAZY = SPEC_MODULE_LEVEL | {"tokenizers", "huggingface_hub", "httpx"}


def imports(package: str) -> list[tuple[str, int, str, bool]]:
    """(file, line, top-level module imported, lazy: inside a function) for every import of the package;
    relative imports are resolved to the package itself."""
    found = []
    for folder, _, files in os.walk(os.path.join(ROOT, package)):
        for name in sorted(f for f in files if f.endswith(".py")):
            path = os.path.join(folder, name)
            tree = ast.parse(open(path, encoding="utf-8").read(), path)
            rel = os.path.relpath(path, ROOT)

            def visit(node, lazy):
                for child in ast.iter_child_nodes(node):
                    inner = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                    if isinstance(child, ast.Import):
                        found.extend((rel, child.lineno, a.name.split(".")[0], lazy) for a in child.names)
                    elif isinstance(child, ast.ImportFrom):
                        top = package if child.level else child.module.split(".")[0]
                        found.append((rel, child.lineno, top, lazy))
                    visit(child, inner)

            visit(tree, False)
    return found


def broken(package: str, allowed) -> list[str]:
    """The imports that `allowed(module, lazy)` refuses, as 'file:line imports module'."""
    return [f"{f}:{line} imports {mod}{' (lazily)' if lazy else ''}"
            for f, line, mod, lazy in imports(package) if not allowed(mod, lazy)]


def stdlib(module: str) -> bool:
    return module in sys.stdlib_module_names or module == "__future__"


def test_every_product_package_is_read():
    for package in PACKAGES:
        assert len({f for f, *_ in imports(package)}) >= 3, package  # the walk finds the modules


def test_the_spec_imports_no_framework_and_no_other_layer():
    def allowed(mod, lazy):
        return stdlib(mod) or mod == "opt_spec" or mod in (SPEC_LAZY if lazy else SPEC_MODULE_LEVEL)
    assert broken("opt_spec", allowed) == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_backend_imports_the_spec_and_its_own_framework_only(backend):
    own = FRAMEWORKS[backend]

    def allowed(mod, lazy):
        return stdlib(mod) or mod in {backend, "opt_spec", "numpy", "ml_dtypes"} or mod in own
    assert broken(backend, allowed) == []


def test_conversion_imports_no_backend_and_no_framework():
    """conversion reads every framework's format without the framework: safetensors and PyTorch pickles
    through opt_spec, Keras/TF HDF5 through h5py, Flax msgpack through its own reader."""
    def allowed(mod, lazy):
        return stdlib(mod) or mod in {"conversion", "opt_spec", "numpy", "ml_dtypes"} or \
            (lazy and mod in {"h5py", "tqdm"})
    assert broken("conversion", allowed) == []


def test_the_cli_imports_backends_frameworks_and_conversion_only_lazily():
    later = set(BACKENDS) | ALL_FRAMEWORKS | {"conversion", "tqdm", "tokenizers", "huggingface_hub"}

    def allowed(mod, lazy):
        return stdlib(mod) or mod in {"optkit_cli", "opt_spec", "numpy"} or (lazy and mod in later)
    assert broken("optkit_cli", allowed) == []


def test_the_rules_can_fail(tmp_path, monkeypatch):
    """The checker sees a module-level framework import and tells it from a lazy one."""
    package = tmp_path / "opt_spec"
    package.mkdir()
    (package / "bad.py").write_text("import numpy\nimport torch\n\ndef f():\n    import jax\n    from . import x\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", str(tmp_path))
    assert imports("opt_spec") == [("opt_spec/bad.py", 1, "numpy", False), ("opt_spec/bad.py", 2, "torch", False),
                                   ("opt_spec/bad.py", 5, "jax", True), ("opt_spec/bad.py", 6, "opt_spec", True)]
    assert broken("opt_spec", lambda mod, lazy: mod == "numpy" or lazy) == ["opt_spec/bad.py:2 imports torch"]
