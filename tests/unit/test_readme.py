"""The README's examples work: its recipe parses into the passes it describes."""

from __future__ import annotations

import re
from pathlib import Path

from host_tools.compress import FineTune, MagnitudePruning, StaticInt8Quantization
from host_tools.compress.passes.accuracy_guard import AccuracyGuard
from host_tools.compress.recipe import parse_recipe

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_recipe_parses() -> None:
    blocks = re.findall(r"```toml\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    recipes = [b for b in blocks if "[[step]]" in b]
    assert len(recipes) == 1
    passes = parse_recipe(recipes[0], source="README.md")
    assert [type(p) for p in passes] == [MagnitudePruning, FineTune, AccuracyGuard]
    assert passes[0].sparsity == 0.9
    assert isinstance(passes[2].inner, StaticInt8Quantization) and passes[2].max_drop == 0.005
