"""Every torch.load in the package refuses pickled code: weights_only=True, checked on the source text."""

from __future__ import annotations

import ast
from pathlib import Path

import llamita

PACKAGE = Path(llamita.__file__).parent


def torch_load_calls() -> list[tuple[Path, ast.Call]]:
    calls = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "load"
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "torch"
            ):
                calls.append((path, node))
    return calls


def test_every_torch_load_is_weights_only():
    calls = torch_load_calls()
    assert calls, "expected torch.load calls in the package (checkpoint RNG state, HF .bin files)"
    for path, call in calls:
        flag = {kw.arg: kw.value for kw in call.keywords}.get("weights_only")
        where = f"{path.relative_to(PACKAGE.parent)}:{call.lineno}"
        assert isinstance(flag, ast.Constant) and flag.value is True, f"{where}: torch.load without weights_only=True"


def test_no_other_unpickling_in_the_package():
    """Unpickling or unsafe YAML under another name would bypass the check above (importing pickle for its
    exception type is fine)."""
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        for banned in (
            "pickle.load",
            "Unpickler(",
            "dill",
            "from torch import load",
            "yaml.load(",
            "yaml.unsafe_load",
            "yaml.full_load",
        ):
            assert banned not in text, f"{path}: {banned}"
