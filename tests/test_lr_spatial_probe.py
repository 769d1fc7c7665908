"""scripts/lr_spatial_probe.py: the position codes and the split attention loss (TRAINING.md item 25)."""

import importlib.util
import sys
from pathlib import Path

import torch

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _script(name):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)
    spec.loader.exec_module(module)
    return module


def test_ordered_code_makes_left_of_linear():
    probe = _script("lr_spatial_probe")
    code = probe.position_code("ordered", 1.0, 8, 128)
    cols, rows = torch.arange(64) % 8, torch.arange(64) // 8
    # one direction reads the column exactly, whatever the row: left < right is a linear test
    affine = torch.cat([code, torch.ones(64, 1)], 1)
    direction = torch.linalg.lstsq(affine, cols.float()[:, None]).solution
    assert torch.allclose((affine @ direction).squeeze(1), cols.float(), atol=1e-3)
    assert not torch.allclose(code[rows == 0], code[rows == 7])  # and the rows differ
    assert probe.position_code("none", 1.0, 8, 128).abs().max() == 0


def test_random_code_is_not_ordered():
    probe = _script("lr_spatial_probe")
    code = probe.position_code("random", 1.0, 8, 128)
    cols = torch.arange(64) % 8
    affine = torch.cat([code, torch.ones(64, 1)], 1)
    direction = torch.linalg.lstsq(affine[:32], cols[:32].float()[:, None]).solution  # fitted on rows 0-3
    err = ((affine[32:] @ direction).squeeze(1) - cols[32:].float()).abs().mean()
    assert err > 0.5  # a column direction fitted on some rows does not carry to the others


def test_split_attention_loss_sends_layers_to_each_named_shape():
    probe = _script("lr_spatial_probe")
    first, last = torch.zeros(1, 8, 8, dtype=torch.bool), torch.zeros(1, 8, 8, dtype=torch.bool)
    first[0, 2, 1], last[0, 5, 6] = True, True

    def maps(on_first_layers, on_last_layers):  # (layer, (B, R, g, g)) with all attention on one cell
        out = []
        for layer in (2, 3, 4, 5):
            m = torch.full((1, 2, 8, 8), 1e-9)
            m[0, 0] = (on_first_layers if layer < 4 else on_last_layers).float()
            out.append((layer, m))
        return out

    right = probe.attention_loss(maps(first[0], last[0]), first, last, "split")
    swapped = probe.attention_loss(maps(last[0], first[0]), first, last, "split")
    assert right < 1e-3 < 10 < swapped
    # "both" is satisfied either way round
    assert probe.attention_loss(maps(last[0], first[0]), first, last, "both") < 1e-3
