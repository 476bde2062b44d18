"""Library, inference and tooling code never imports an entry script: the scripts only parse flags and call
library code, and whatever needs their flags imports the parser modules."""
import ast
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRY_SCRIPTS = {"pretrain_qualiclip", "train_swin", "cross_dataset_test", "predict", "run_ablation"}


def python_files():
    for folder, subfolders, files in os.walk(REPO):
        subfolders[:] = [d for d in subfolders if not d.startswith((".", "__")) and d not in ("tests", "demo_data")]
        for name in files:
            if name.endswith(".py"):
                yield os.path.join(folder, name)


def imported_modules(path):
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.split(".")[0]


def test_the_scan_sees_the_code_and_catches_an_import(tmp_path):
    paths = {os.path.relpath(p, REPO) for p in python_files()}
    assert {"run_ablation.py", "iqa/scoring.py", "qualiclip_pretrain/args.py", "tools/analyze.py"} <= paths
    assert not any(p.startswith(("tests", ".venv")) for p in paths)
    offender = tmp_path / "offender.py"
    offender.write_text("import os\nfrom train_swin import main\nimport cross_dataset_test as c\n")
    assert set(imported_modules(str(offender))) & ENTRY_SCRIPTS == {"train_swin", "cross_dataset_test"}


def test_no_module_imports_an_entry_script():
    offenders = {os.path.relpath(p, REPO): sorted(set(imported_modules(p)) & ENTRY_SCRIPTS) for p in python_files()}
    assert {path: names for path, names in offenders.items() if names} == {}
