"""`require`: an optional dependency that is missing, or installed but broken, is named with the fix."""
from __future__ import annotations

import sys

import pytest

from graphsurgeon.errors import MissingDependencyError
from graphsurgeon.optional import require


def test_a_missing_package_says_how_to_install_it():
    with pytest.raises(MissingDependencyError, match=r"'gs_no_such_package', which is not installed\. Fix: pip install gs_no_such_package"):
        require("gs_no_such_package", "the test")


def test_an_installed_package_that_fails_to_import_names_the_cause(tmp_path, monkeypatch):
    package = tmp_path / "gs_broken_package"
    package.mkdir()
    (package / "__init__.py").write_text("import gs_its_missing_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "gs_broken_package", raising=False)
    with pytest.raises(MissingDependencyError, match=r"installed but fails to import \(No module named 'gs_its_missing_dependency'\)"):
        require("gs_broken_package", "the test")
