"""Build the optional C extension ``tunkit._speedups``; everything else is in pyproject.toml.

The extension is never required: where no C compiler (or no Python headers)
is found, or the build fails for any other reason, setuptools says so and
installs the pure-Python package, which does the same work more slowly.
``TUNKIT_PURE_PYTHON=1`` at build time skips the extension altogether.
"""

from __future__ import annotations

import os

from setuptools import Extension, setup

_STRICT = ["-Wall", "-Wextra", "-Werror", "-O3", "-std=c11"]
# One extension module, a unit per concern; the units share _speedups/tunkit.h.
_UNITS = ["checksum", "split", "coalesce", "packet_io", "mmsg", "module"]

ext_modules = []
if os.environ.get("TUNKIT_PURE_PYTHON", "") in ("", "0"):
    ext_modules.append(
        Extension(
            "tunkit._speedups",
            sources=[f"src/tunkit/_speedups/{unit}.c" for unit in _UNITS],
            include_dirs=["src/tunkit/_speedups"],
            depends=["src/tunkit/_speedups/tunkit.h"],
            extra_compile_args=_STRICT + os.environ.get("TUNKIT_CFLAGS", "").split(),
            extra_link_args=os.environ.get("TUNKIT_LDFLAGS", "").split(),
            # A failed build is a warning, not an error: the pure modules stay.
            optional=True,
        )
    )

setup(ext_modules=ext_modules)
