"""The README's two commands: CI runs the test command verbatim, the main command's flagfile exists."""

import os
import re

ROOT = os.path.join(os.path.dirname(__file__), "..")


def _readme_commands():
    with open(os.path.join(ROOT, "README.md")) as f:
        return re.findall(r"^    \$ (.+)$", f.read(), flags=re.M)


def test_ci_runs_the_readme_test_command():
    main_command, test_command = _readme_commands()
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci_lines = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    assert test_command in ci_lines


def test_main_command_uses_an_existing_flagfile():
    main_command, _ = _readme_commands()
    flagfile = re.search(r"--flagfile=(\S+)", main_command).group(1)
    assert os.path.exists(os.path.join(ROOT, flagfile))


def test_module_map_lists_every_module_once():
    with open(os.path.join(ROOT, "README.md")) as f:
        mapped = re.findall(r"^\| `simclr_tf/(\w+)\.py` \|", f.read(), flags=re.M)
    modules = sorted(name[:-3] for name in os.listdir(os.path.join(ROOT, "simclr_tf"))
                     if name.endswith(".py") and name != "__init__.py")
    assert sorted(mapped) == modules
