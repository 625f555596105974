"""setup.py's optional accelerator build: a compiler warning never fails it, a failure is one
warning (or fatal when TRADEBUS_REQUIRE_ACCELERATORS is set). Real compiler, real files."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# a module that compiles with a warning under -Wall (an unused variable)
WARNED_MODULE = """
#include <Python.h>
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "warned", NULL, -1, NULL};
PyMODINIT_FUNC PyInit_warned(void) {
    int unused = 1;
    return PyModule_Create(&module);
}
"""

BUILD = """
import sys
sys.path.insert(0, {root!r})
from setuptools import Distribution, Extension
import setup
source = sys.argv[1]
extension = Extension(
    "warned", [source], optional=True, extra_compile_args=[*setup.COMPILE_ARGS, "-Wall"]
)
distribution = Distribution({{"ext_modules": [extension]}})
distribution.cmdclass["build_ext"] = setup.OptionalBuildExt
command = distribution.get_command_obj("build_ext")
command.inplace = True
distribution.run_command("build_ext")
"""


def _build(directory: Path, source: str, **environment: str) -> subprocess.CompletedProcess[str]:
    # .ci/run exports TRADEBUS_REQUIRE_ACCELERATORS for the whole run; each test states its own
    inherited = {k: v for k, v in os.environ.items() if k != "TRADEBUS_REQUIRE_ACCELERATORS"}
    return subprocess.run(
        [sys.executable, "-c", BUILD.format(root=str(ROOT)), source],
        cwd=directory,
        env={**inherited, **environment},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.skipif(sys.platform == "win32", reason="gcc-style flags")
def test_a_compiler_warning_does_not_fail_the_optional_build(tmp_path: Path) -> None:
    (tmp_path / "warned.c").write_text(WARNED_MODULE)
    built = _build(tmp_path, "warned.c")
    assert built.returncode == 0, built.stderr
    assert "unused" in built.stderr  # the compiler did warn
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    assert (tmp_path / f"warned{suffix}").exists(), built.stderr


def test_a_failed_optional_build_is_one_warning_or_fatal_when_required(tmp_path: Path) -> None:
    (tmp_path / "broken.c").write_text("this is not C\n")
    built = _build(tmp_path, "broken.c")
    assert built.returncode == 0, built.stderr
    assert "WARNING: the optional accelerator warned was not built" in built.stderr
    required = _build(tmp_path, "broken.c", TRADEBUS_REQUIRE_ACCELERATORS="1")
    assert required.returncode != 0
