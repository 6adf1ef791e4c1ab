"""The README stays true: every configuration key and exit code is documented, CI runs its test command."""

from __future__ import annotations

import os
import re

from supervisor.config import all_keys
from supervisor.errors import ExitCode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()


def test_readme_documents_every_configuration_key():
    missing = [k for k in all_keys() if f"`{k}`" not in README]
    assert not missing, f"README.md lacks configuration keys: {missing}"


def test_readme_documents_every_exit_code():
    table = README.split("## `ipsec-supervisor`", 1)[1]
    for code in ExitCode:
        assert re.search(rf"^\| {code.value} \|", table, re.M), f"exit code {code.value} ({code.name})"


def test_ci_runs_the_readme_test_command():
    assert "make test    # the whole test suite" in README
    assert re.search(r"^make test$", open(os.path.join(ROOT, ".ci", "run")).read(), re.M)
