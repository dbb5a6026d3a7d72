"""The README's two commands are what CI runs."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```bash\n(.+?)\n```", text)[:2]


def test_readme_starts_with_install_and_test_commands():
    install, test = readme_commands()
    assert "pip install" in install and install.rstrip().endswith("lidc-cdam demo")
    assert test.rstrip().endswith("pytest")


def test_ci_installs_and_tests_as_the_readme_says():
    install, test = readme_commands()
    ci = (ROOT / ".ci" / "run").read_text()
    install_only = install.rsplit("&&", 1)[0].strip()
    assert install_only in ci, "the README's install command (without the demo) must be in .ci/run"
    assert test.strip() in ci, "the README's test command must be in .ci/run"
