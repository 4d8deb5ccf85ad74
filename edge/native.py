"""The peer users run: llama.cpp's own programs (`llama-bench`, `llama-completion`), not llama.cpp inside Python.

They are built once, on demand, from the llama.cpp source that the installed llama-cpp-python vendors (its
source distribution on the package index carries `vendor/llama.cpp`: the same kernels edge calls), into the
cache dir; or taken from `--llama-bin DIR` or PATH. `make chat` never needs them.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from edge.dirs import cache_dir
from edge.errors import EdgeError
from edge.progress import Bar

PROGRAMS = ("llama-bench", "llama-completion")
# llama.cpp's AMX kernels crash on CPUs that report AMX inside VMs; the Makefile builds llama-cpp-python the same way
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"


def vendored_version() -> str:
    """The installed llama-cpp-python's version: the source the native programs are built from."""
    try:
        return importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        raise EdgeError("llama-cpp-python is not installed; run `make install` (or give built llama.cpp programs "
                        "with --llama-bin DIR)") from None


# --gpu's device (ggml's name for it) -> the backend the programs are built with, as the Makefile's `make gpu`
BACKENDS = {"CUDA": ("cuda", "-DGGML_CUDA=on"), "Vulkan": ("vulkan", "-DGGML_VULKAN=on"),
            "MTL": ("metal", "-DGGML_METAL=on")}


def backend_of(device: str) -> str:
    """The GPU backend of a device of ggml's registry (CUDA0 -> cuda), "" for the CPU."""
    return next((name for prefix, (name, _) in BACKENDS.items() if device.startswith(prefix)), "")


def build_dir(version: str, backend: str = "") -> Path:
    return cache_dir() / "llama.cpp" / (f"{version}-{backend}" if backend else version)


def _complete(d: Path) -> bool:
    return all(os.access(d / p, os.X_OK) for p in PROGRAMS)


def find(llama_bin: str | None = None, backend: str = "") -> Path | None:
    """The directory holding both programs: --llama-bin, else this version's build (with this GPU backend) in the
    cache dir, else (CPU only) PATH."""
    if llama_bin:
        d = Path(llama_bin).expanduser()
        if not _complete(d):
            raise EdgeError(f"--llama-bin {llama_bin}: needs executable {' and '.join(PROGRAMS)} in that directory")
        return d
    built = build_dir(vendored_version(), backend) / "bin"
    if _complete(built):
        return built
    if backend:
        return None
    found = [shutil.which(p) for p in PROGRAMS]
    if all(found) and len({Path(f).parent for f in found}) == 1:
        return Path(found[0]).parent
    return None


def ensure(llama_bin: str | None = None, jobs: int | None = None, quiet: bool = False, backend: str = "") -> Path:
    """The programs' directory, building them first when they are nowhere (minutes; progress on stderr)."""
    return find(llama_bin, backend) or build(vendored_version(), jobs, quiet, backend)


def _say(quiet: bool, text: str, end: str = "\n") -> None:
    if not quiet:
        sys.stderr.write(text + end)
        sys.stderr.flush()


def _fetch_source(version: str, work: Path, quiet: bool) -> Path:
    """vendor/llama.cpp of llama-cpp-python `version`'s source distribution, unpacked under work."""
    _say(quiet, f"llama.cpp: downloading llama-cpp-python {version}'s source (about 77MB)")
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                           "--dest", str(work), f"llama-cpp-python=={version}"], capture_output=True, text=True)
    archives = sorted(work.glob("llama_cpp_python-*.tar.gz"))
    if proc.returncode or not archives:
        last = (proc.stderr.strip().splitlines() or ["no archive"])[-1]
        raise EdgeError(f"cannot download llama-cpp-python {version}'s source from the package index ({last}); "
                        "connect to the network, or give built llama.cpp programs with --llama-bin DIR")
    prefix = f"{archives[0].name[:-len('.tar.gz')]}/vendor/llama.cpp/"
    with tarfile.open(archives[0]) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
        if not members:
            raise EdgeError(f"{archives[0].name}: carries no vendor/llama.cpp; give built llama.cpp programs with "
                            "--llama-bin DIR")
        tar.extractall(work, members=members, filter="data")
    return work / prefix


def build(version: str, jobs: int | None = None, quiet: bool = False, backend: str = "") -> Path:
    """Build llama-bench and llama-completion for `version` into the cache dir, with a GPU backend (cuda, vulkan,
    metal; the extra CMAKE_ARGS `make gpu` was given, from the environment); returns their directory.

    Written into a temporary directory and renamed at the end: an interrupted build leaves nothing that is
    taken for a finished one, and the next call starts over."""
    if not shutil.which("cmake") or not (shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")):
        raise EdgeError("building llama.cpp needs cmake and a C++ compiler (apt install cmake g++, or brew install "
                        "cmake); or give built llama.cpp programs with --llama-bin DIR")
    final = build_dir(version, backend)
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"{version}.", dir=final.parent) as tmp:
        work = Path(tmp)
        src = _fetch_source(version, work, quiet)
        flags = []
        if platform.machine() in ("x86_64", "AMD64"):
            flags = [f"-DCMAKE_C_FLAGS={NO_AMX}", f"-DCMAKE_CXX_FLAGS={NO_AMX}"]
        if backend:
            flags += [dict(BACKENDS.values())[backend], *shlex.split(os.environ.get("CMAKE_ARGS", ""))]
        gen = ["-G", "Ninja"] if shutil.which("ninja") else []
        configure = ["cmake", "-S", str(src), "-B", str(work / "build"), *gen, "-DCMAKE_BUILD_TYPE=Release",
                     "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                     "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", *flags]
        _say(quiet, "llama.cpp: configuring")
        _checked(subprocess.run(configure, capture_output=True, text=True), "configure")
        jobs = jobs or os.cpu_count() or 2
        cmd = ["cmake", "--build", str(work / "build"), "--config", "Release", "-j", str(jobs), "--target", *PROGRAMS]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        tail: list[str] = []
        step = re.compile(r"^\[\s*(\d+)(?:/(\d+)|%)\]")  # ninja "[12/80]", make "[ 45%]"
        bar = Bar(1000, "llama.cpp: building", quiet, counts_bytes=False)
        for line in proc.stdout:
            tail = (tail + [line.rstrip()])[-20:]
            m = step.match(line)
            if m:
                bar.update(int(1000 * int(m.group(1)) / (int(m.group(2)) if m.group(2) else 100)))
        bar.close()
        _checked(subprocess.CompletedProcess(cmd, proc.wait(), "\n".join(tail), ""), "build")
        (work / "bin").mkdir()
        for p in PROGRAMS:
            shutil.copy2(work / "build" / "bin" / p, work / "bin" / p)
        shutil.rmtree(final, ignore_errors=True)
        final.mkdir()
        os.rename(work / "bin", final / "bin")
    _say(quiet, f"llama.cpp: built {', '.join(PROGRAMS)} in {final / 'bin'}")
    return final / "bin"


def _checked(proc: subprocess.CompletedProcess, what: str) -> None:
    if proc.returncode:
        lines = [ln for ln in (proc.stdout + "\n" + (proc.stderr or "")).splitlines() if ln.strip()]
        err = next((ln for ln in reversed(lines) if "error" in ln.lower()), lines[-1] if lines else "failed")
        raise EdgeError(f"llama.cpp {what} failed: {err.strip()[:300]}; give built llama.cpp programs with "
                        "--llama-bin DIR")
