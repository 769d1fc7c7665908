"""scripts/lr_spatial_probe.py: the position codes and the split attention loss (TRAINING.md item 25)."""

import torch

from .conftest import load_script


def test_ordered_code_makes_left_of_linear():
    probe = load_script("lr_spatial_probe")
    code = probe.position_code("ordered", 1.0, 8, 128).view(8, 8, 128)  # (row, column, channel)
    step = code[:, 1:] - code[:, :-1]  # one column to the right
    # the same vector everywhere: projected on it, a token's value is its column, whatever its row
    assert torch.allclose(step, step[0, 0].expand_as(step), atol=1e-5) and step[0, 0].norm() > 1
    assert not torch.allclose(code[0], code[7])  # the rows differ too
    assert probe.position_code("none", 1.0, 8, 128).abs().max() == 0


def test_random_code_is_not_ordered():
    probe = load_script("lr_spatial_probe")
    code = probe.position_code("random", 1.0, 8, 128).view(8, 8, 128)
    step = code[:, 1:] - code[:, :-1]
    assert torch.allclose(step[:, 0], step[0, 0].expand_as(step[:, 0]), atol=1e-5)  # the column part repeats by row
    assert not torch.allclose(step[0, 1], step[0, 0], atol=0.5)  # but steps between columns differ


def test_split_attention_loss_sends_layers_to_each_named_shape():
    probe = load_script("lr_spatial_probe")
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
