"""Count, per generated token, the calls that read a tensor's values on the host: on a GPU each one waits for
every queued kernel (a host-device synchronisation), which a 7B decoding step cannot afford by the hundred.

    python -m flexattn.bench.syncs [--layers 32 --selection-layer 8] [--tokens 8]

Counted with a torch function mode on the CPU, so it needs no GPU: `.tolist()`, `.item()`, `int()` / `float()` /
`bool()` of a tensor, `.cpu()`, `.numpy()`, `nonzero`, `unique`, `masked_select`, `equal` and indexing with a
boolean mask. Some of those tensors live on the host even on a GPU run (A-VL's positions, the crop bookkeeping), so
the counts bound the GPU's synchronisations from above. The model is tiny but has the 7B's depth and selection
layer: the count depends on the control flow (layers, passes), not on widths.
"""

from __future__ import annotations

import argparse
from collections import Counter

import torch
from torch.overrides import TorchFunctionMode

from ..image import ImageProcessor
from ..loading import LoadedModel
from ..modeling import FlexLlavaForConditionalGeneration
from ..pipeline import FlexVLM
from ..presets import tiny_config, word_tokenizer
from ..synthetic import make_sample

HOST_READS = frozenset({"tolist", "item", "__int__", "__float__", "__bool__", "__index__", "cpu", "numpy",
                        "nonzero", "argwhere", "unique", "unique_consecutive", "masked_select", "equal"})


class HostReads(TorchFunctionMode):
    """Counts, by name, the torch calls made under it that read tensor values on the host."""

    def __init__(self):
        super().__init__()
        self.counts: Counter = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_READS or (name in ("__getitem__", "__setitem__") and _bool_index(args[1:2])):
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def _bool_index(index) -> bool:
    parts = index[0] if index and isinstance(index[0], tuple) else index
    return any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts)


def deep_tiny_vlm(layers: int = 32, selection_layer: int = 8, seed: int = 0) -> FlexVLM:
    """A tiny random FlexAttention LLaVA with the given depth; EOS can never win, so answers run to their limit."""
    torch.manual_seed(seed)
    model = FlexLlavaForConditionalGeneration(tiny_config(num_layers=layers, selection_layer=selection_layer,
                                                          lowres_size=56, threshold=100)).eval()
    model.set_attn_implementation({"text_config": "flexattn", "vision_config": "sdpa"})
    with torch.no_grad():
        model.lm_head.weight[2].zero_()
    tokenizer = word_tokenizer("what letter is on the red circle ?".split(), model.config.text_config.vocab_size)
    return FlexVLM(LoadedModel(model, tokenizer, ImageProcessor(), "deep-tiny", "transformers", False))


def reads_per_token(vlm: FlexVLM, mode: str, trace: bool, tokens: int = 8, avl: bool = False) -> float:
    """Host reads per decoding step: the difference between answers of 1 + `tokens` and 1 token, per token."""
    image = make_sample(0, "attribute").image
    vlm.clear_cache()  # every measurement projects HR keys/values afresh
    vlm.prepare(image)  # encode outside the count: this is about decoding
    counts = []
    for n in (1, 1 + tokens):
        with HostReads() as reads:
            vlm.answer(image, "what letter is on the red circle ?", mode=mode, max_new_tokens=n, trace=trace,
                       reuse_prefix=False, avl=avl or None)
        counts.append(reads.total)
    return (counts[1] - counts[0]) / tokens


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--selection-layer", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=8)
    args = parser.parse_args(argv)
    vlm = deep_tiny_vlm(args.layers, args.selection_layer)
    print(f"host reads per decoding step ({args.layers} layers, selection layer {args.selection_layer}):")
    for mode in ("lowres", "flex", "select_all"):
        for avl in (False, True):
            cells = [f"trace {'on' if trace else 'off'} {reads_per_token(vlm, mode, trace, args.tokens, avl):6.1f}"
                     for trace in (False, True)]
            print(f"  {mode:<10} A-VL {'on ' if avl else 'off'}  " + "  ".join(cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
