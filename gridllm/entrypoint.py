"""``python -m gridllm.entrypoint COMMAND...``: the container image's entrypoint.

Runs two checks that turn a misconfigured container into one clear line, then ``exec``s the
command unchanged (it keeps the PID, so signals and the drain on SIGTERM work as without it):

- the model of ``--model NAME`` must be loadable here: a preset whose package is installed,
  a ``random:<preset>``, an HF directory with ``config.json`` and weights, or a ``.gguf``
  file. Otherwise it exits 2 naming the model and what the models directory holds, instead
  of a worker crash-looping on a traceback or a router serving without a tokenizer.
- with ``GRIDLLM_GPU_LOCK_DIR`` set (docker compose, where every ``--scale worker=N``
  replica sees every GPU) and no ``CUDA_VISIBLE_DEVICES``, it claims the first free GPU with
  an exclusive ``flock`` on ``<dir>/gpu-<i>.lock`` in a volume the replicas share and sets
  ``CUDA_VISIBLE_DEVICES=<i>``. The lock's descriptor is inherited across ``exec``, so it is
  held exactly as long as the service runs and is released when it dies, however it dies.
  A worker given ``--tensor-parallel-size T`` claims T GPUs (``CUDA_VISIBLE_DEVICES=<i>,<j>``):
  its ranks run on them, one each.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import socket
import sys

from gridllm.common.logger import configure_logging

# Named, not __name__: run with -m it would log as "__main__".
logger = logging.getLogger("gridllm.entrypoint")

EXIT_CONFIG_ERROR = 2
# Where the image expects models: a read-only volume (compose) or a PersistentVolume (k8s).
DEFAULT_MODELS_DIR = "/models"
_MAX_LISTED = 20


def model_arg(argv: list[str]) -> str | None:
    """The value of ``--model`` (``--model X`` or ``--model=X``) in a command line."""
    return _flag_value(argv, "--model")


def num_gpus_arg(argv: list[str]) -> int:
    """GPUs the command needs: its ``--tensor-parallel-size`` (1 without it).

    Raises:
        ValueError: a value that is not a positive count (naming the flag).
    """
    value = _flag_value(argv, "--tensor-parallel-size")
    if value is None:
        return 1
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"--tensor-parallel-size: expected a count of at least 1, "
                         f"got {value!r}")
    return int(value)


def _flag_value(argv: list[str], flag: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(f"{flag}="):
            return arg.split("=", 1)[1]
    return None


def _listing(directory: str) -> str:
    if not os.path.isdir(directory):
        return f"{directory} does not exist (is the models volume mounted?)"
    names = sorted(os.listdir(directory))
    if not names:
        return f"{directory} is empty (is the models volume mounted?)"
    shown = ", ".join(names[:_MAX_LISTED])
    more = f" and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else ""
    return f"{directory} holds: {shown}{more}"


def check_model(name: str, models_dir: str = DEFAULT_MODELS_DIR) -> None:
    """Raise ValueError, naming the model and the way out, unless ``name`` loads here.

    Args:
        name: what ``--model`` was given.
        models_dir: listed in the message when ``name`` is a path that does not exist
            directly under another directory.
    """
    from gridllm.common.presets import check_model as check_any_model

    try:
        check_any_model(name, "--model")
    except ValueError as exc:
        if not name or os.path.exists(name) or name.startswith("random:"):
            raise
        parent = os.path.dirname(name.rstrip("/")) or models_dir
        raise ValueError(f"{exc} {_listing(parent)}") from None


def count_gpus(dev_dir: str = "/dev") -> int:
    """NVIDIA GPUs visible in this container: ``GRIDLLM_NUM_GPUS``, else ``/dev/nvidia<N>``."""
    configured = os.environ.get("GRIDLLM_NUM_GPUS", "")
    if configured:
        if not configured.isdigit():
            raise ValueError(f"GRIDLLM_NUM_GPUS: expected a count, got {configured!r}")
        return int(configured)
    pattern = re.compile(r"nvidia\d+$")
    return sum(1 for n in os.listdir(dev_dir) if pattern.match(n)) if os.path.isdir(
        dev_dir) else 0


def claim_gpu(lock_dir: str, num_gpus: int) -> tuple[int, int]:
    """Lock the first free GPU slot.

    Returns:
        ``(gpu index, file descriptor holding the lock)``; the descriptor is inheritable.
    Raises:
        RuntimeError: every slot is held (more replicas than GPUs), or there are no GPUs.
    """
    indices, fds = claim_gpus(lock_dir, num_gpus, 1)
    return indices[0], fds[0]


def claim_gpus(lock_dir: str, num_gpus: int, count: int) -> tuple[list[int], list[int]]:
    """Lock the first ``count`` free GPU slots (all or none).

    Returns:
        ``(gpu indices, file descriptors holding the locks)``; the descriptors are
        inheritable.
    Raises:
        RuntimeError: fewer than ``count`` slots are free (more replicas than GPUs), or
            there are no GPUs.
    """
    if num_gpus <= 0:
        raise RuntimeError("GRIDLLM_GPU_LOCK_DIR is set but this container sees no GPU "
                           "(no /dev/nvidia<N>; set GRIDLLM_NUM_GPUS or reserve GPUs)")
    os.makedirs(lock_dir, exist_ok=True)
    indices: list[int] = []
    fds: list[int] = []
    for index in range(num_gpus):
        if len(indices) == count:
            break
        fd = os.open(os.path.join(lock_dir, f"gpu-{index}.lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        # Who holds it, for an operator reading the volume.
        os.ftruncate(fd, 0)
        os.write(fd, f"{socket.gethostname()} pid {os.getpid()}\n".encode())
        os.set_inheritable(fd, True)
        indices.append(index)
        fds.append(fd)
    if len(indices) == count:
        return indices, fds
    for fd in fds:  # closing releases the lock: another replica may take them
        os.close(fd)
    if count == 1:
        raise RuntimeError(f"all {num_gpus} GPUs are claimed by other worker replicas (locks "
                           f"in {lock_dir}): scale the workers to at most {num_gpus}")
    raise RuntimeError(f"{count} GPUs needed (--tensor-parallel-size {count}) but only "
                       f"{len(indices)} of {num_gpus} are free (locks in {lock_dir}): scale "
                       f"the workers to at most {num_gpus // count}")


def prepare(argv: list[str], env: dict[str, str]) -> list[int]:
    """Run the checks for ``argv``; set ``CUDA_VISIBLE_DEVICES`` in ``env`` if GPUs are claimed.

    Returns:
        The descriptors holding the GPU locks (empty when no GPU was claimed).
    Raises:
        ValueError, RuntimeError: the container cannot start as configured.
    """
    model = model_arg(argv)
    if model is not None:
        check_model(model, env.get("GRIDLLM_MODELS_DIR") or DEFAULT_MODELS_DIR)
    num_needed = num_gpus_arg(argv)
    lock_dir = env.get("GRIDLLM_GPU_LOCK_DIR", "")
    if not lock_dir:
        return []
    if env.get("CUDA_VISIBLE_DEVICES", "") != "":
        logger.info("CUDA_VISIBLE_DEVICES=%s given; no GPU claimed", env["CUDA_VISIBLE_DEVICES"])
        return []
    indices, fds = claim_gpus(lock_dir, count_gpus(), num_needed)
    env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, indices))
    logger.info("claimed GPU(s) %s (lock %s)", env["CUDA_VISIBLE_DEVICES"], lock_dir)
    return fds


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    configure_logging()
    if not argv:
        logger.error("usage: python -m gridllm.entrypoint COMMAND [ARGS...]")
        return EXIT_CONFIG_ERROR
    env = dict(os.environ)
    try:
        prepare(argv, env)
    except (ValueError, RuntimeError) as exc:
        logger.error("cannot start %s: %s", " ".join(argv[:3]), exc)
        return EXIT_CONFIG_ERROR
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(argv[0], argv, env)
    return 0  # not reached: exec replaced this process


if __name__ == "__main__":
    sys.exit(main())
