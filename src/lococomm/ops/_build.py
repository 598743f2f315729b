"""Finding, building and loading the C++ (and CUDA) kernel extensions.

Order of preference for the CPU kernels:
  1. ``lococomm._C``, built ahead of time by ``LOCOCOMM_BUILD_EXT=1 pip install .`` (setup.py),
     used if its ``ABI_VERSION`` matches;
  2. a JIT build with ``torch.utils.cpp_extension.load`` from ``csrc/``, cached in
     ``$LOCOCOMM_BUILD_DIR`` (default ``~/.cache/lococomm``) under a directory named by a hash of
     the sources, compiler flags, torch and Python versions and the CPU model, so it compiles at
     most once per machine; later processes import the cached ``.so`` directly (milliseconds).
     Concurrent first builds (several test or worker processes) are serialised by an ``flock``
     on the cache directory, which the kernel releases even if the builder dies; the lock-free
     fast path imports a ``.so`` only once its ``.ok`` marker exists (written after the build
     and a successful import), never a file the linker is still writing. Any change to a
     source or header (HEADERS below) changes the hash, hence a rebuild;
  3. otherwise the PyTorch reference in ``ops/reference.py``, after ONE warning per process.

``LOCOCOMM_OPS_BACKEND=torch`` skips the extensions entirely (no warning). The CUDA extension
is only considered when ``torch.cuda.is_available()``.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import logging
import os
import platform
import shutil
import sys
import threading
import warnings
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

ABI_VERSION = 8
CPU_SOURCES = ("bindings.cpp", "quantize.cpp", "topk.cpp", "outer.cpp", "ring.cpp", "heal_stream.cpp")
CUDA_SOURCES = ("cuda_bindings.cpp", "cuda/quantize.cu")
HEADERS = ("common.h", "kernels.h", "poll_wait.h")
CUDA_HEADERS = ("cuda/kernels_cuda.h",)
# -ffp-contract=off: no FMA contraction, so every kernel rounds exactly like its torch reference.
# -fno-math-errno / -fno-trapping-math never change a result; they only let loops vectorise.
CPU_CFLAGS = (
    "-O3",
    "-march=native",
    "-fopenmp",
    "-ffp-contract=off",
    "-fno-math-errno",
    "-fno-trapping-math",
)
CUDA_CFLAGS = ("-O3", "--fmad=false")

_lock = threading.Lock()
_modules: dict[str, ModuleType | None] = {}
_reasons: dict[str, str] = {}
_warned = False
_not_prebuilt: set[str] = set()  # kinds load_if_built found neither prebuilt nor cached


def forced_reference() -> bool:
    """True when LOCOCOMM_OPS_BACKEND=torch asks for the reference kernels only."""
    return os.environ.get("LOCOCOMM_OPS_BACKEND", "").strip().lower() == "torch"


def csrc_dir() -> Path | None:
    """The kernel sources: $LOCOCOMM_CSRC, the repository's csrc/, or a copy in the package."""
    here = Path(__file__).resolve()
    candidates = []
    if os.environ.get("LOCOCOMM_CSRC"):
        candidates.append(Path(os.environ["LOCOCOMM_CSRC"]))
    candidates += [here.parents[3] / "csrc", here.parents[1] / "_csrc"]
    for c in candidates:
        if (c / "bindings.cpp").is_file():
            return c
    return None


def cache_root() -> Path:
    env = os.environ.get("LOCOCOMM_BUILD_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "lococomm"


def _cpu_fingerprint() -> str:
    """Model and feature flags of this CPU: a -march=native build must not move to another."""
    text = platform.processor() or ""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("model name", "flags", "Features")):
                    text += line
                if line.strip() == "":  # first processor only
                    break
    return text


def _tag(kind: str, src: Path, sources: tuple[str, ...], flags: tuple[str, ...]) -> str:
    h = hashlib.sha256()
    headers = HEADERS if kind == "cpu" else HEADERS + CUDA_HEADERS
    for rel in sorted(sources + headers):
        h.update(rel.encode())
        h.update((src / rel).read_bytes())
    h.update(
        repr((kind, flags, torch.__version__, sys.version_info[:2], platform.machine())).encode()
    )
    if kind == "cpu":
        h.update(_cpu_fingerprint().encode())
    else:
        h.update(str(torch.version.cuda).encode())
    return h.hexdigest()[:16]


def _import_so(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@contextlib.contextmanager
def _file_lock(path: Path):
    """Exclusive inter-process lock (flock: released by the kernel if the holder dies)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no cross-process lock, torch's own baton remains
        yield
        return
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def _ninja_on_path():
    """torch's JIT needs `ninja` on PATH; a venv's bin/ is not on PATH unless activated."""
    old = os.environ.get("PATH", "")
    extra = [str(Path(sys.executable).parent)]
    with contextlib.suppress(ImportError, AttributeError):
        import ninja  # type: ignore[import-not-found]

        extra.append(str(ninja.BIN_DIR))
    if shutil.which("ninja") is None:
        os.environ["PATH"] = os.pathsep.join([*extra, old])
    try:
        yield
    finally:
        os.environ["PATH"] = old


def _jit_paths(kind: str) -> tuple[Path, str, Path, Path, Path]:
    """(sources dir, module name, build dir, .so, .ok marker) of the JIT build for `kind`."""
    src = csrc_dir()
    if src is None:
        raise RuntimeError("kernel sources (csrc/) not found; set LOCOCOMM_CSRC")
    sources = CPU_SOURCES if kind == "cpu" else CUDA_SOURCES
    flags = CPU_CFLAGS if kind == "cpu" else CUDA_CFLAGS
    tag = _tag(kind, src, sources, flags)
    name = f"lococomm_{kind}_{tag}"
    build = cache_root() / f"{kind}-{tag}"
    # The linker writes the .so in place, so its mere existence does not mean it is complete:
    # a marker, written (atomically) by the builder after a successful build and import, does.
    return src, name, build, build / f"{name}.so", build / f"{name}.ok"


def load_if_built(kind: str = "cpu") -> ModuleType | None:
    """Load the extension if that needs no compiler (ahead-of-time build, or a complete JIT
    build in the cache); None otherwise. For hot paths that must never wait for a build."""
    if forced_reference():
        return None
    if kind in _modules:
        return _modules[kind]
    if kind in _not_prebuilt:  # checked once: hashing the sources per call (per heal chunk) is waste
        return None
    if kind == "cpu":
        with contextlib.suppress(ImportError):
            if getattr(importlib.import_module("lococomm._C"), "ABI_VERSION", None) == ABI_VERSION:
                return get(kind)
    try:
        _, _, _, so, done = _jit_paths(kind)
    except Exception:
        so = done = None
    if so is not None and done is not None and done.is_file() and so.is_file():
        return get(kind)
    _not_prebuilt.add(kind)  # a later get() that builds still lands in _modules, checked first
    return None


def _jit(kind: str) -> ModuleType:
    from torch.utils import cpp_extension

    src, name, build, so, done = _jit_paths(kind)
    sources = CPU_SOURCES if kind == "cpu" else CUDA_SOURCES
    if done.is_file() and so.is_file():
        return _import_so(name, so)
    build.mkdir(parents=True, exist_ok=True)
    with _file_lock(build / ".lococomm-build.lock"):
        if so.is_file():  # built by another process (it released the lock: complete)
            mod = _import_so(name, so)
            _mark_done(done)
            return mod
        # We hold the exclusive lock: a leftover torch baton is from a builder that died.
        (build / "lock").unlink(missing_ok=True)
        log.info("lococomm: compiling %s kernels into %s (once per machine)", kind, build)
        kwargs = dict(
            name=name,
            sources=[str(src / s) for s in sources],
            extra_include_paths=[str(src)],
            build_directory=str(build),
            verbose=False,
        )
        with _ninja_on_path():
            if kind == "cpu":
                cpp_extension.load(
                    **kwargs, extra_cflags=list(CPU_CFLAGS), extra_ldflags=["-fopenmp"]
                )
            else:
                cpp_extension.load(
                    **kwargs, extra_cflags=["-O3"], extra_cuda_cflags=list(CUDA_CFLAGS)
                )
        mod = _import_so(name, so)
        _mark_done(done)
    return mod


def _mark_done(path: Path) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text("ok\n")
    os.replace(tmp, path)


def _load(kind: str) -> ModuleType | None:
    if kind == "cpu":
        with contextlib.suppress(ImportError):
            pre = importlib.import_module("lococomm._C")
            if getattr(pre, "ABI_VERSION", None) == ABI_VERSION:
                return pre
            log.info("lococomm._C has a different ABI version; using the JIT build")
    mod = _jit(kind)
    if getattr(mod, "ABI_VERSION", None) != ABI_VERSION:
        raise RuntimeError(f"built {kind} extension has ABI {getattr(mod, 'ABI_VERSION', None)}")
    return mod


def get(kind: str) -> ModuleType | None:
    """The loaded extension ("cpu" or "cuda"), or None when unavailable (warns once)."""
    global _warned
    if forced_reference():
        return None
    if kind in _modules:
        return _modules[kind]
    with _lock:
        if kind in _modules:
            return _modules[kind]
        mod = None
        if kind == "cuda" and not torch.cuda.is_available():
            _reasons[kind] = "CUDA is not available"
        else:
            try:
                mod = _load(kind)
            except Exception as exc:  # any build/import failure -> reference path
                _reasons[kind] = f"{type(exc).__name__}: {str(exc).strip()[-400:]}"
                if not _warned:
                    _warned = True
                    msg = (
                        f"lococomm: {kind} kernels unavailable ({_reasons[kind]}); "
                        "using the PyTorch reference kernels (same results, slower)"
                    )
                    warnings.warn(msg, RuntimeWarning, stacklevel=3)
                    log.warning(msg)
        _modules[kind] = mod
        return mod


def unavailable_reason(kind: str) -> str | None:
    """Why get(kind) returned None (None if it did not, or was not asked yet)."""
    return _reasons.get(kind)
