"""The import graph runs one way: parallel/data -> layers/optim -> models -> pipeline/checkpoint/interop ->
training/inference/planner. Read from the source (ast), so a new upward import fails here."""

import ast
import pathlib

import megatron_lite

FLOOR = {"parallel": 1, "data": 1, "layers": 2, "optim": 2, "models": 3, "pipeline": 4, "checkpoint": 4,
         "interop": 4, "training": 5, "inference": 5, "planner": 5}
# The framework's machinery knows models only through the stage protocol (parallel/stage.py).
MODEL_FREE = ("optim", "pipeline", "checkpoint")


def _imports(path: pathlib.Path, package: list[str]):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield node.lineno, [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                yield node.lineno, [node.module or ""]
            else:
                base = package[: len(package) - (node.level - 1)]
                yield node.lineno, [".".join(["megatron_lite"] + base + ([node.module] if node.module else []))]


def test_no_module_imports_from_a_higher_layer():
    root = pathlib.Path(megatron_lite.__file__).parent
    upward, into_models = [], []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if len(parts) < 2:
            continue
        assert parts[0] in FLOOR, f"{parts[0]}/ has no layer in FLOOR: add it"
        for line, names in _imports(path, list(parts[:-1])):
            for name in names:
                p = name.split(".")
                if p[0] != "megatron_lite" or len(p) < 2 or p[1] not in FLOOR:
                    continue
                if FLOOR[p[1]] > FLOOR[parts[0]]:
                    upward.append(f"{path.relative_to(root)}:{line} imports {name}")
                if parts[0] in MODEL_FREE and p[1] == "models":
                    into_models.append(f"{path.relative_to(root)}:{line} imports {name}")
    assert not upward, "imports that run back up the layers:\n" + "\n".join(upward)
    assert not into_models, "framework code that reaches into models/:\n" + "\n".join(into_models)
