"""Imported once, by the forkserver that forks the tensor-parallel followers, and nowhere
else: it loads what a follower needs (torch, the runner, transformers' config machinery) so
each fork starts warm, and makes the forkserver (and so every fork) ignore SIGTERM and
SIGINT.

Why ignore them: a signal sent to the worker's whole process group (a launcher stopping the
worker, Ctrl-C in a terminal) must reach rank 0 alone, which then drains and stops its
followers in order; a follower or forkserver that died of it first would look like a lost
rank. Followers still exit when rank 0 exits, and SIGKILL still kills them.
"""

from __future__ import annotations

import signal

# transformers.activations is most of what reading any model's config imports.
import transformers.activations  # noqa: F401

import worker_svc.ranks.follower  # noqa: F401

signal.signal(signal.SIGTERM, signal.SIG_IGN)
signal.signal(signal.SIGINT, signal.SIG_IGN)
