"""KV cache groups: the layers of a model grouped by attention pattern (a hybrid KV layout).

Layers that attend alike share block tables: a model whose layers all have the same window
(or none) has one group, laid out as before (one cache tensor pair per layer). A model that
interleaves local sliding-window layers with global ones (Gemma 2/3, Qwen2's
``max_window_layers``) has several, so the scheduler can give back a local layer's blocks
once they slide out of its window while the global layers keep their whole history.

The groups share one pool of block ids, as vLLM's hybrid KV cache manager does: every group
has the same number of layers ``num_slots`` (the size of the smallest pattern's layer set;
a pattern with more layers splits into several groups of that size, the last one padded),
and the cache holds ``num_slots`` tensor pairs of ``num_blocks`` blocks. Layer ``k`` of
every group uses pair ``k``, so a block id stands for ``num_slots`` layers of KV and
whichever group holds it owns that memory: a pool sized for the dense layout holds
``num_layers / num_slots`` times as many ids, and a long request's local groups hold only
their window's worth of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVGroups:
    """How the attention layers map onto KV groups and cache tensors."""

    # Each group's window (None: full attention); full-attention groups first.
    windows: tuple[int | None, ...]
    # Per layer: its group.
    layer_groups: tuple[int, ...]
    # Per layer: the cache tensor pair it uses.
    layer_slots: tuple[int, ...]
    # Cache tensor pairs (layers per group).
    num_slots: int

    @property
    def num_groups(self) -> int:
        return len(self.windows)

    @property
    def limits_windows(self) -> tuple[int, ...]:
        """``ModelLimits.kv_group_windows``: empty for one group, else each window (0 for
        full attention)."""
        if self.num_groups == 1:
            return ()
        return tuple(w or 0 for w in self.windows)


def kv_groups_of(layer_windows: list[int | None]) -> KVGroups:
    """Group layers by window.

    Args:
        layer_windows: each attention layer's window (None: full attention), in order.
    """
    num_layers = len(layer_windows)
    if num_layers == 0:
        raise ValueError("layer_windows must name at least one layer.")
    distinct = sorted(set(layer_windows), key=lambda w: (w is not None, w or 0))
    if len(distinct) == 1:
        return KVGroups(windows=(distinct[0],), layer_groups=(0,) * num_layers,
                        layer_slots=tuple(range(num_layers)), num_slots=num_layers)
    by_window = {w: [i for i, lw in enumerate(layer_windows) if lw == w] for w in distinct}
    num_slots = min(len(layers) for layers in by_window.values())
    windows: list[int | None] = []
    layer_groups = [0] * num_layers
    layer_slots = [0] * num_layers
    for window in distinct:
        layers = by_window[window]
        for start in range(0, len(layers), num_slots):
            for slot, layer in enumerate(layers[start:start + num_slots]):
                layer_groups[layer] = len(windows)
                layer_slots[layer] = slot
            windows.append(window)
    return KVGroups(windows=tuple(windows), layer_groups=tuple(layer_groups),
                    layer_slots=tuple(layer_slots), num_slots=num_slots)


def attention_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's attention modules (those that declare a ``sliding_window``), in order."""
    return [m for m in model.modules() if hasattr(m, "sliding_window")]


def model_kv_groups(model: torch.nn.Module, num_layers: int) -> KVGroups:
    """The built model's groups, read from its layers (not the config, so an architecture
    that does not apply a window its config names is never grouped by it); each attention
    module learns its group (``kv_group``). A model whose attention modules cannot be
    told apart gets one full-attention group."""
    layers = attention_layers(model)
    if len(layers) != num_layers:
        return kv_groups_of([None] * num_layers)
    groups = kv_groups_of([m.sliding_window for m in layers])
    if groups.num_groups > 1:
        for module, group in zip(layers, groups.layer_groups, strict=True):
            module.kv_group = group
    return groups
