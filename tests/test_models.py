"""Named models: `edge pull` assembles a GGUF from package parts (resumable, sha256 checked), `edge models`
lists them, and a name works where a path does."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest

from edge import models
from edge.cli import main
from edge.errors import EdgeError


@pytest.fixture
def gemma_copy(monkeypatch, tmp_path, gemma3):
    """The Gemma 3 entry under another name, assembled into an empty cache dir from the installed parts."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    named = dataclasses.replace(models.CATALOGUE["gemma3-270m"], name="gemma-copy")
    monkeypatch.setitem(models.CATALOGUE, "gemma-copy", named)
    return named


def test_pull_resumes_after_an_interruption(monkeypatch, gemma_copy, gemma3):
    real = models.part_chunks
    seen = []

    def flaky(package, name, index, count):
        seen.append(index)
        if index == 2 and seen.count(2) == 1:
            raise EdgeError(f"{package}: cannot download part 3 (simulated)")
        yield from real(package, name, index, count)

    monkeypatch.setattr(models, "part_chunks", flaky)
    with pytest.raises(EdgeError, match="simulated"):
        models.pull("gemma-copy", quiet=True)
    target = gemma_copy.path()
    assert not target.exists() and target.with_name(target.name + ".partial").is_file()
    assert models.pull("gemma-copy", quiet=True) == target
    assert seen == [0, 1, 2, 2, 3]  # parts 1 and 2 were not read again
    assert target.stat().st_size == gemma3.stat().st_size
    with open(target, "rb") as f:
        assert hashlib.file_digest(f, "sha256").hexdigest() == gemma_copy.sha256
    assert not target.with_name(target.name + ".partial.json").exists()


def test_pull_refuses_parts_that_do_not_match(monkeypatch, gemma_copy):
    monkeypatch.setitem(models.CATALOGUE, "gemma-copy", dataclasses.replace(gemma_copy, sha256="0" * 64))
    with pytest.raises(EdgeError, match="differ from the ones edge knows"):
        models.pull("gemma-copy", quiet=True)
    assert not list(gemma_copy.path().parent.glob("*gguf*"))  # nothing left under the name or beside it


def test_names_and_their_errors(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "qwen2.5-coder-1.5b" in out and "1.1GB" in out and "smollm2-135m" in out
    assert main(["run", "qwen2.5-coder-1.5b", "-p", "hi"]) == 2
    assert "edge pull qwen2.5-coder-1.5b" in capsys.readouterr().err
    assert main(["pull", "no-such-model"]) == 2
    assert "edge models" in capsys.readouterr().err
    assert main(["run", "no-such-model", "-p", "hi"]) == 2
    err = capsys.readouterr().err
    assert "no such file or model name" in err and err.count("\n") == 1
    assert main(["run", "smollm2-135m", "--ram", "150MB", "-p", "hi"]) == 2  # no store yet
    assert "prepare it once with `edge convert` (seconds)" in capsys.readouterr().err
