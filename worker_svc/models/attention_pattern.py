"""Per-layer attention patterns declared by HF configs: which layers attend through a
sliding window and which see the whole context.

The configs spell it several ways:

- ``layer_types`` (Gemma 2/3, Qwen2, Ministral ... as transformers normalises them):
  ``"sliding_attention"`` layers use ``sliding_window``, ``"full_attention"`` layers do not;
- Qwen2's ``use_sliding_window`` + ``max_window_layers`` (configs without ``layer_types``):
  layers from ``max_window_layers`` on use the window;
- Gemma's ``sliding_window_pattern`` (older Gemma 3 configs): every ``pattern``-th layer is
  global, the rest local;
- a bare ``sliding_window`` (Mistral): the window on every layer.
"""

from __future__ import annotations

SLIDING = "sliding_attention"
FULL = "full_attention"
_LAYER_TYPES = (SLIDING, FULL)


def layer_types_of(config) -> list[str]:
    """Each layer's attention type (``"sliding_attention"`` or ``"full_attention"``).

    Raises:
        ValueError: ``layer_types`` has the wrong length or a type gridllm cannot run.
    """
    num_layers = config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        layer_types = list(layer_types)
        if len(layer_types) != num_layers:
            raise ValueError(f"layer_types has {len(layer_types)} entries but the model has "
                             f"num_hidden_layers={num_layers}.")
        bad = sorted({t for t in layer_types if t not in _LAYER_TYPES})
        if bad:
            raise ValueError(f"layer_types must hold only {_LAYER_TYPES}, got {bad}.")
        return layer_types
    if window is None:
        return [FULL] * num_layers
    if hasattr(config, "use_sliding_window"):
        if not config.use_sliding_window:
            return [FULL] * num_layers
        first = getattr(config, "max_window_layers", 0) or 0
        return [SLIDING if i >= first else FULL for i in range(num_layers)]
    pattern = getattr(config, "sliding_window_pattern", None)
    if pattern:
        return [SLIDING if (i + 1) % pattern else FULL for i in range(num_layers)]
    return [SLIDING] * num_layers


def layer_sliding_windows(config) -> list[int | None]:
    """Each layer's attention window in tokens (None: full causal attention).

    A query at position ``q`` of a windowed layer sees keys at ``k`` with ``q - k < window``,
    as transformers masks them.

    Raises:
        ValueError: a windowed layer without a positive ``sliding_window``, or bad
            ``layer_types``.
    """
    window = getattr(config, "sliding_window", None)
    layer_types = layer_types_of(config)
    if window is None:
        # transformers drops the window when it is switched off (Qwen2's use_sliding_window).
        return [None] * len(layer_types)
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise ValueError(f"sliding_window must be a positive integer, got {window!r}.")
    return [window if t == SLIDING else None for t in layer_types]
