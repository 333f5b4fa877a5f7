"""The architecture stays visible: import-linter checks setup.cfg's contracts (each layer imports
only from the layers below it; plugins, the example package included, import only the public
API), and a violation planted in a copy of the package breaks them."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("importlinter", reason="pip install import-linter (in vlcap's [test] extra)")

ROOT = Path(__file__).resolve().parents[1]


def lint(tree, config):
    """Run lint-imports on the vlcap package in ``tree`` with ``config``; (exit code, output)."""
    command = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
               "sys.exit(lint_imports_command())", "--config", str(config), "--no-cache"]
    env = {"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(command, cwd=tree, capture_output=True, text=True, env=env)
    return done.returncode, done.stdout + done.stderr


@pytest.fixture(scope="module")
def copy_of_vlcap(tmp_path_factory):
    tree = tmp_path_factory.mktemp("tree")
    shutil.copytree(ROOT / "vlcap", tree / "vlcap", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "setup.cfg", tree / "setup.cfg")
    return tree


def test_the_package_keeps_its_layers():
    code, output = lint(ROOT, ROOT / "setup.cfg")
    assert code == 0, output
    assert "Contracts: 2 kept, 0 broken." in output


def planted(tree, module, line):
    path = tree / module
    original = path.read_text()
    path.write_text(original + f"\n{line}\n")
    return path, original


@pytest.mark.parametrize("module, line, broken", [
    ("vlcap/core/model/gpt2.py", "import vlcap.core.train.trainer", "vlcap.core.model is not allowed to import vlcap.core.train"),
    ("vlcap/core/eval/evaluation.py", "from vlcap.core.infer import decoding", "vlcap.core.eval is not allowed to import vlcap.core.infer"),
    ("vlcap/core/errors.py", "import vlcap.apps.demo", "not allowed to import vlcap.apps"),
    ("vlcap/plugins/peft_lora/method.py", "from vlcap.core.model.peft import swap_linear", "vlcap.plugins is not allowed to import vlcap.core"),
])
def test_a_planted_violation_breaks_a_contract(copy_of_vlcap, module, line, broken):
    path, original = planted(copy_of_vlcap, module, line)
    try:
        code, output = lint(copy_of_vlcap, copy_of_vlcap / "setup.cfg")
    finally:
        path.write_text(original)
    assert code != 0 and broken in output, output


def test_the_example_package_uses_only_the_public_api(tmp_path):
    pytest.importorskip("vlcap_prompt_tuning", reason="pip install ./examples/vlcap-prompt-tuning")
    config = tmp_path / "example.ini"
    config.write_text("[importlinter]\nroot_packages =\n    vlcap\n    vlcap_prompt_tuning\n\n"
                      "[importlinter:contract:api]\nname = The example imports only vlcap's public API\n"
                      "type = forbidden\nsource_modules =\n    vlcap_prompt_tuning\nforbidden_modules =\n"
                      "    vlcap.core\n    vlcap.apps\n    vlcap.testing\n    vlcap.cli\nallow_indirect_imports = True\n")
    tree = tmp_path / "tree"
    shutil.copytree(ROOT / "vlcap", tree / "vlcap", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "examples/vlcap-prompt-tuning/vlcap_prompt_tuning", tree / "vlcap_prompt_tuning")
    code, output = lint(tree, config)
    assert code == 0, output
