"""The shape of the code: import directions, no import cycles, one interface per model family.

The import graph is read from the source (every `import` statement, at module level or inside
a function), so a cycle hidden behind a function-level import counts as a cycle too. The
implicit import of a parent package (importing a.b runs a/__init__.py) is not an edge.
"""

import ast
import inspect
import random
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("finetune", "data_prep")
ENTRY_POINTS = ("finetune.cli", "finetune.train", "finetune.evaluate", "finetune.predict", "finetune.serve",
                "finetune.hub", "finetune.demo", "finetune.validate")


def _modules() -> dict[str, Path]:
    found = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Modules of this project that `name` imports, anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import mod` is an edge to pkg.mod when that is a module, else to pkg.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        out |= {t for t in targets if t in MODULES and t != name}
    return out


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _reachable(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in GRAPH[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_no_import_cycles():
    # The graph sees function-level and relative imports (else this test could pass vacuously).
    assert GRAPH["finetune.models.deepseek_ocr"] >= {"finetune.models.deepseek_ocr.modeling",
                                                     "finetune.models.deepseek_ocr.processor"}
    assert "finetune.models.deepseek_ocr.checkpoint" in GRAPH["finetune.models.deepseek_ocr.modeling"]
    cycles = sorted(name for name in GRAPH if name in _reachable(name))
    assert cycles == [], f"modules on an import cycle: {cycles}"


def test_import_directions():
    for name, deps in GRAPH.items():
        if name.startswith("data_prep"):
            assert not {d for d in deps if d.startswith("finetune")}, f"{name} imports finetune: {deps}"
        if name.startswith("finetune.models"):
            assert not deps & set(ENTRY_POINTS), f"model family module {name} imports an entry point"
    # metrics import no model code (directly or through anything they import)
    assert not {d for d in _reachable("finetune.metrics") if d.startswith("finetune.models")}


def test_every_family_implements_the_interface():
    from finetune.models.family import ModelFamily
    from finetune.models.registry import FAMILIES

    assert [f.MODEL_TYPE for f in FAMILIES] == ["deepseek_ocr", "deepseek_ocr2"]
    for family in FAMILIES:
        assert isinstance(family, ModelFamily)
        assert not inspect.isabstract(type(family))
        for const in ("MODEL_TYPE", "CONFIG_MODEL_TYPES", "MODES", "LAYOUT"):
            assert getattr(family, const), f"{family}: {const} is empty"
    # A model_type read by two families is told apart by architectures, which name one family each.
    for t in {t for f in FAMILIES for t in f.CONFIG_MODEL_TYPES}:
        readers = [f for f in FAMILIES if t in f.CONFIG_MODEL_TYPES]
        if len(readers) > 1:
            names = [a for f in readers for a in f.ARCHITECTURES]
            assert all(f.ARCHITECTURES for f in readers) and len(names) == len(set(names)), t


def test_registry_detects_the_family_from_config_json(tmp_path):
    import json

    from finetune.models import BUILTIN_DIR, ModelNameError
    from finetune.models.registry import family_for_config, family_named

    for name, family in [("tiny-random-deepseek-ocr", "deepseek_ocr"), ("tiny-random-deepseek-ocr-2", "deepseek_ocr2")]:
        raw = json.loads((BUILTIN_DIR / name / "config.json").read_text())
        assert family_for_config(raw, name).MODEL_TYPE == family
        assert family_named(family).MODEL_TYPE == family
    with pytest.raises(ModelNameError, match=r"x/config.json: model_type 'llama' is not supported by ocrtune "
                                             r"\(supported: deepseek_vl_v2 \(deepseek_ocr\), deepseek_ocr2"):
        family_for_config({"model_type": "llama"}, "x/config.json")
    # deepseek_vl_v2 without CLIP-L and without OCR-2's architecture (DeepSeek-VL2, say): neither family
    with pytest.raises(ModelNameError, match="is not DeepSeek-OCR \\(v1\\)"):
        family_for_config({"model_type": "deepseek_vl_v2", "vision_config": {"width": {"sam_vit_b": 768}}}, "y")


@pytest.mark.integration
def test_every_module_imports_first_in_a_fresh_interpreter():
    """Each module of finetune.models imported first in a fresh interpreter, then all the
    others in a random order: an order-dependent import (a cycle that only some orders
    survive) fails here."""
    models = sorted(n for n in MODULES if n.startswith("finetune.models"))
    rng = random.Random(0)
    script = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    for first in models:
        rest = [m for m in models if m != first]
        rng.shuffle(rest)
        proc = subprocess.run([sys.executable, "-c", script, first, *rest], cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 0, f"importing {first} first, then {rest}:\n{proc.stderr[-2000:]}"
