"""Pytest set-up for the whole repository: doctests write their temporary files under pytest's own ``tmp_path``.

The docstrings' examples call ``tempfile.mkdtemp()`` as a reader would; while a doctest runs, Python's temporary
directory is pointed at the test's ``tmp_path``, which pytest deletes (see ``tmp_path_retention_policy`` in
pyproject.toml), so the suite leaves nothing behind in the system's temporary directory.
"""

from __future__ import annotations

import tempfile

import pytest


@pytest.fixture(autouse=True)
def _doctest_temporary_files(request):
    if not isinstance(request.node, pytest.DoctestItem):
        yield
        return
    tmp_path = request.getfixturevalue("tmp_path")
    saved = tempfile.tempdir
    tempfile.tempdir = str(tmp_path)
    try:
        yield
    finally:
        tempfile.tempdir = saved
