"""How the house is built (issue 14's rules), checked on the source: no file over 400 lines, no function
over 80, diffusers imported by pipelines.py alone (the CLI only quiets its logger), bitsandbytes by
quant/layers.py alone (tests/test_errors.py)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for d in ("sdlora", "webui", "train_scripts") for p in (ROOT / d).rglob("*.py"))


def _imports(tree) -> list[str]:
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    return names + [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0]


def test_no_file_over_400_lines_and_no_function_over_80():
    assert len(SOURCES) > 40
    long_files = {str(p.relative_to(ROOT)): n for p in SOURCES if (n := p.read_text().count("\n")) > 400}
    long_functions = {}
    for p in SOURCES:
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                long_functions[f"{p.relative_to(ROOT)}:{node.name}"] = node.end_lineno - node.lineno + 1
    assert long_files == {} and long_functions == {}


def test_diffusers_is_known_in_pipelines_only():
    importers = {}
    for p in SOURCES:
        if p.parent.name == "train_scripts":
            continue  # the build scripts train the embedded base's parts with diffusers' models
        mods = sorted({m for m in _imports(ast.parse(p.read_text())) if m.split(".")[0] == "diffusers"})
        if mods:
            importers[str(p.relative_to(ROOT))] = mods
    assert importers == {"sdlora/pipelines.py": importers["sdlora/pipelines.py"],
                         "sdlora/cli.py": ["diffusers.utils.logging"]}
