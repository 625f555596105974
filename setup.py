"""The optional Cython accelerator bus._wire (bus/_wire.pyx); everything else is in pyproject.toml.

It calls libzmq through the declarations pyzmq publishes for Cython (``cimport`` of
``zmq.backend.cython.libzmq`` and of ``Socket`` from ``zmq.backend.cython._zmq``), which
need pyzmq's include directories (``zmq.get_includes()``: the .pxd files and two small
headers) and libzmq's ``zmq.h`` (pyzmq's wheels do not ship it: Debian's libzmq3-dev).

Linking: the module must call the libzmq instance pyzmq loaded, never a second copy. A
pyzmq wheel carries its libzmq as ``pyzmq.libs/libzmq-<hash>.so.<version>`` (auditwheel),
loaded by ``import zmq``. The module is linked to that file by name and given no run-time
search path: its DT_NEEDED is that unique soname, which the dynamic loader matches to the
library already loaded, and bus/transport.py imports zmq first. If pyzmq were replaced by
another build, that soname is not loaded and not found, the import fails and the pure
pyzmq path runs (bus.transport.ACCELERATED is False; the test suite fails on it). A pyzmq
built against the system's libzmq has no bundled copy: the module links that same
``libzmq.so``.

Optional: without a compiler, zmq.h or Cython the install still succeeds, prints one
warning saying what failed, and runs pyzmq's calls; ``TRADEBUS_REQUIRE_ACCELERATORS=1``
makes such a failure fail the install instead (CI). Warnings never fail the build.
"""

from __future__ import annotations

import glob
import os
import sys
from typing import Any

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

REQUIRE_VARIABLE = "TRADEBUS_REQUIRE_ACCELERATORS"


def _pyzmq_libzmq() -> dict[str, list[str]]:
    """Linker arguments naming the libzmq pyzmq itself loads."""
    import zmq

    package = os.path.dirname(os.path.abspath(zmq.__file__))
    for directory in (os.path.join(package, os.pardir, "pyzmq.libs"), *zmq.get_library_dirs()):
        bundled = sorted(glob.glob(os.path.join(directory, "libzmq*.so*")))
        if bundled:
            return {
                "library_dirs": [os.path.abspath(directory)],
                "libraries": [":" + os.path.basename(bundled[0])],
            }
    return {"library_dirs": [], "libraries": ["zmq"]}


class OptionalBuildExt(build_ext):
    """Cythonizes at build time and turns a failed optional build into one warning."""

    def build_extension(self, ext: Extension) -> None:
        if os.environ.get(REQUIRE_VARIABLE):
            ext.optional = False  # setuptools too would only warn about an optional one
        try:
            if any(source.endswith(".pyx") for source in ext.sources):
                self._cythonize(ext)
            super().build_extension(ext)
        except Exception as error:
            if not getattr(ext, "optional", False):
                raise
            print(
                f"WARNING: the optional accelerator {ext.name} was not built ({error}); "
                "tradebus works without it, only slower (see README, Set-up)",
                file=sys.stderr,
            )

    def _cythonize(self, ext: Extension) -> None:
        """The .pyx sources of ``ext`` as C, with pyzmq's declarations and its libzmq."""
        import zmq
        from Cython.Build import cythonize

        for key, values in _pyzmq_libzmq().items():
            getattr(ext, key).extend(values)
        ext.include_dirs.extend(zmq.get_includes())
        (built,) = cythonize(
            [ext],
            include_path=zmq.get_includes(),
            build_dir=self.build_temp,
            quiet=True,
            force=self.force,
        )
        ext.sources = built.sources


# no -Werror: a new compiler's new warning must not silently cost users the accelerator
COMPILE_ARGS = ["-O2"]
extensions: list[Any] = [
    Extension("bus._wire", ["bus/_wire.pyx"], optional=True, extra_compile_args=COMPILE_ARGS),
]

if __name__ == "__main__":  # setuptools runs this file as __main__; tests import it
    setup(ext_modules=extensions, cmdclass={"build_ext": OptionalBuildExt})
