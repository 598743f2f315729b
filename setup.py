"""Build hooks of lococomm (metadata lives in pyproject.toml).

* Every build copies the kernel sources (csrc/) into the package as ``lococomm/_csrc`` so an
  installed (non-editable) lococomm can still JIT-compile its kernels on first use.
* ``LOCOCOMM_BUILD_EXT=1`` additionally compiles the C++ kernels ahead of time into
  ``lococomm._C`` (needs torch at build time: ``pip install --no-build-isolation``). The build
  uses ``-march=native`` unless ``LOCOCOMM_NATIVE=0`` (for binaries that move to other CPUs).
  The CUDA kernels are always JIT-compiled, on machines where CUDA is available.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
CPU_SOURCES = ["bindings.cpp", "quantize.cpp", "topk.cpp", "outer.cpp", "ring.cpp", "heal_stream.cpp"]


class BuildPyWithKernelSources(build_py):
    """Ships csrc/ inside the package (as lococomm/_csrc) for the JIT build."""

    def run(self) -> None:
        super().run()
        dest = Path(self.build_lib) / "lococomm" / "_csrc"
        if CSRC.is_dir():
            shutil.rmtree(dest, ignore_errors=True)
            shutil.copytree(CSRC, dest, ignore=shutil.ignore_patterns("*.o", "*.so"))


kwargs: dict = {"cmdclass": {"build_py": BuildPyWithKernelSources}}

if os.environ.get("LOCOCOMM_BUILD_EXT") == "1":
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    # Same flags as the JIT build (src/lococomm/ops/_build.py): -ffp-contract=off keeps the
    # kernels bit-identical to their torch references.
    flags = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math"]
    if os.environ.get("LOCOCOMM_NATIVE", "1") == "1":
        flags.append("-march=native")
    kwargs["ext_modules"] = [
        CppExtension(
            "lococomm._C",
            sources=[f"csrc/{s}" for s in CPU_SOURCES],
            include_dirs=[str(CSRC)],
            extra_compile_args=flags,
            extra_link_args=["-fopenmp"],
        )
    ]
    kwargs["cmdclass"]["build_ext"] = BuildExtension

setup(**kwargs)
