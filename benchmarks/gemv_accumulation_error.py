"""What accumulating a one-row e4m3 GEMV in 16-bit pairs would cost in accuracy (CPU).

A batch-1 FP8 GEMV that multiplies in packed 16-bit pairs (``HFMA2``) issues fewer
instructions a weight byte than one that converts every weight to float32, but its
partial sums are 16-bit. This measures that cost on real weights and activations: the
inputs of SmolLM2-135M's o and down projections (layer ``--layer``, a fixed prompt, one
float32 forward), its weights quantized per channel to e4m3 as ``quantization="fp8"`` does,
and per output the error against the exact (float64) product when each lane chains ``C``
fused multiply-adds in bfloat16 or float16 (rounded once per step, as ``fma.rn``) before
its sum is added in float32 - next to the error of rounding the exact output to bfloat16,
which every kernel pays.

    python benchmarks/gemv_accumulation_error.py [--chains 1 2 4 8 16] [--output r.json]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gridllm.bench.report import format_table, write_json  # noqa: E402

PROMPT = "The capital of France is Paris, and the capital of Italy is"


def layer_inputs(layer_idx: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{projection: (weight [N, K], inputs [T, K])}`` of one SmolLM2 decoder layer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from worker_svc.loader import resolve_model_path

    path = resolve_model_path("smollm2-135m")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    layer = model.model.layers[layer_idx]
    projections = {"o": layer.self_attn.o_proj, "down": layer.mlp.down_proj}
    captured: dict[str, torch.Tensor] = {}
    hooks = [module.register_forward_pre_hook(
        lambda _, args, name=name: captured.__setitem__(name, args[0][0].detach()))
        for name, module in projections.items()]
    with torch.no_grad():
        model(AutoTokenizer.from_pretrained(path)(PROMPT, return_tensors="pt").input_ids)
    for hook in hooks:
        hook.remove()
    return {name: (module.weight.detach(), captured[name])
            for name, module in projections.items()}


def chained(w: torch.Tensor, x: torch.Tensor, chain: int, dtype: torch.dtype) -> torch.Tensor:
    """``w @ x`` (float64 out) with each lane's ``chain`` consecutive products accumulated
    in ``dtype``, one rounding per fused multiply-add, the lanes then summed exactly."""
    rows, cols = w.shape
    products = (w.double() * x.double()).view(rows, cols // chain, chain)
    acc = torch.zeros(rows, cols // chain, dtype=torch.float64)
    for c in range(chain):
        acc = (acc + products[:, :, c]).to(dtype).double()
    return acc.sum(-1)


def main() -> None:
    from worker_svc.layers.quantization import quantize_per_row

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layer", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=4, help="prompt rows measured")
    parser.add_argument("--chains", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    rows, results = [], []
    for name, (weight, inputs) in layer_inputs(args.layer).items():
        q, scale = quantize_per_row(weight)
        w = q.float()
        for dtype in (torch.bfloat16, torch.float16):
            errors = {c: [] for c in args.chains}
            rounding = []
            for x in inputs[:args.tokens]:
                x = x.to(torch.bfloat16).float()  # the model's bf16 activations
                exact = (w.double() * x.double()).sum(-1) * scale[:, 0].double()
                rounding.append((exact.to(torch.bfloat16).double() - exact).abs().mean())
                for c in args.chains:
                    # float16 needs x scaled into its range: by a power of two, exact.
                    shift = 2.0 ** -float(torch.ceil(torch.log2(x.abs().max())))
                    got = chained(w, x * shift, c, dtype) / shift * scale[:, 0].double()
                    errors[c].append((got - exact).abs().mean())
            base = float(torch.stack(rounding).mean())
            result = {"projection": name, "dtype": str(dtype).replace("torch.", ""),
                      "output_rounding": base,
                      **{f"chain_{c}": float(torch.stack(e).mean()) / base
                         for c, e in errors.items()}}
            results.append(result)
            rows.append([name, result["dtype"], f"{base:.2e}"]
                        + [f"{result[f'chain_{c}']:.2f}x" for c in args.chains])
    print(f"SmolLM2-135M layer {args.layer}, e4m3 per-channel weights, {args.tokens} prompt "
          "rows: mean |error| of a chained GEMV over the mean |error| of rounding the exact "
          "output to bfloat16")
    print(format_table(rows, ["projection", "chain dtype", "bf16 output rounding"]
                       + [f"C={c}" for c in args.chains]))
    write_json(args.output, {"layer": args.layer, "results": results})


if __name__ == "__main__":
    main()
