"""Teacher-forced training forward == cached greedy decoding, row for row: the training path is the inference
semantics, batched."""

import pytest
import torch

from flexattn.attention import select_hr_tokens
from flexattn.image import box_cells
from flexattn.training import (
    attention_loss, collate, forward_loss, reading_loss, selection_loss, target_masks,
    teacher_forced,
)

from .conftest import make_vlm, random_image


def box_cells_t(box, size, grid) -> torch.Tensor:
    return torch.from_numpy(box_cells(box, size, grid))

QUESTIONS = ["what letter is on the red circle ?", "which colour is this ?"]


def test_teacher_forced_rows_reproduce_cached_decoding():
    vlm = make_vlm(seed=8, num_layers=4, selection_layer=1, lowres_size=84, threshold=100)
    images = [random_image(90, 60, seed=1), random_image(60, 90, seed=2)]
    decoded, prepared = [], []
    for image, question, n in zip(images, QUESTIONS, (5, 3)):
        got = vlm.answer(image, question, mode="flex", max_new_tokens=n)
        decoded.append(got.token_ids)
        prepared.append(vlm.prepare(image))
    words = [[vlm.tokenizer.decode([t]).strip() for t in ids] for ids in decoded]
    examples = [(q, " ".join(w)) for q, w in zip(QUESTIONS, words)]
    batch = collate(vlm.tokenizer, examples, lr_grid=prepared[0].lr_grid)
    lr = torch.stack([p.lr_features for p in prepared])
    hr = torch.stack([p.hr_features for p in prepared])
    sizes = [p.views.original_size for p in prepared]
    with torch.no_grad():
        loss, stats = forward_loss(vlm.model, batch, lr, hr, vlm.settings, sizes)
        logits, _ = teacher_forced(vlm.model, batch, lr, hr, vlm.settings, sizes)  # forward_loss's own forward
    for i, ids in enumerate(decoded):
        rows = batch.rows[i][batch.row_valid[i]]
        predicted = logits[i, rows].argmax(-1).tolist()
        assert predicted[: len(ids)] == ids  # the rows predicting each answer token pick the decoded token
    assert torch.isfinite(loss) and stats["ce"] > 0


def test_each_layer_is_scored_against_its_own_targets():
    """forward_loss maps layers to named cells: layers before selection, early and late selecting layers each get
    their own; a layer with attention elsewhere costs, a layer without targets costs nothing."""
    vlm = make_vlm(seed=12, num_layers=4, selection_layer=1, lowres_size=56, threshold=60)
    prepared = vlm.prepare(random_image(70, 70, seed=7))
    g = prepared.lr_grid
    batch = collate(vlm.tokenizer, [(QUESTIONS[0], "red")], g,
                    cells={"a": [[box_cells_t((0, 0, 30, 30), (70, 70), g)] * 2],
                           "b": [[box_cells_t((40, 40, 70, 70), (70, 70), g)] * 2], "none": [[None, None]]})
    assert not batch.cells["none"].any() and batch.cells["a"][0, 0].any() and batch.cells["b"][0, 1].any()
    lr, hr, sizes = prepared.lr_features[None], prepared.hr_features[None], [(70, 70)]
    with torch.no_grad():
        _, state = teacher_forced(vlm.model, batch, lr, hr, vlm.settings, sizes, keep_lr_maps=True, lr_maps_from=0)
        maps = dict(state.hooks.lr_maps)
        assert sorted(maps) == [0, 1, 2, 3]  # maps from layer 0 on, before the selection layer too

        def aux(attend):
            return forward_loss(vlm.model, batch, lr, hr, vlm.settings, sizes, attend=attend, aux_weight=1.0)[1]

        one = {layer: attention_loss([(layer, maps[layer])], batch.cells[name])
               for layer, name in ((0, "a"), (2, "b"), (3, "a"))}
        got = aux({0: "a", 2: "b", 3: "a"})["aux"]
        assert got == pytest.approx(float(sum(one.values()) / 3), rel=1e-5)  # the mean of each layer's own loss
        assert aux({0: "a", 2: "none"})["aux"] == pytest.approx(float(one[0]), rel=1e-5)  # no targets: no term
        assert "aux" not in aux({2: "none"})


def test_attention_loss_prefers_attention_on_target():
    target = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    target[0, 0, 1, 2] = True
    on = torch.full((1, 1, 4, 4), 0.01)
    on[0, 0, 1, 2] = 1.0
    off = torch.full((1, 1, 4, 4), 0.01)
    off[0, 0, 3, 3] = 1.0
    assert attention_loss([(2, on)], target) < attention_loss([(2, off)], target)


def test_selection_loss_asks_for_the_whole_target_above_the_threshold():
    """A map that puts most attention on one target cell pleases the attention loss; the selection loss prefers the
    map whose thresholded selection (the inference rule) is exactly the target, and its gradient moves toward it."""
    target = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    target[0, 0, 1, 1:3] = True
    peaked = torch.full((1, 1, 4, 4), 0.01)
    peaked[0, 0, 1, 1], peaked[0, 0, 1, 2] = 1.0, 0.05
    covering = torch.full((1, 1, 4, 4), 0.01)
    covering[0, 0, 1, 1:3] = 0.5
    threshold = 64.0

    def selected(lr_map):  # the inference rule, identity pooling
        return select_hr_tokens(lr_map[0], (4, 4), threshold, 4, 4).reshape(4, 4)

    assert torch.equal(selected(covering), target[0, 0]) and not torch.equal(selected(peaked), target[0, 0])
    assert attention_loss([(2, peaked)], target) < attention_loss([(2, covering)], target)
    assert selection_loss([(2, covering)], target, threshold) < selection_loss([(2, peaked)], target, threshold)
    peaked.requires_grad_(True)
    selection_loss([(2, peaked)], target, threshold).backward()
    assert peaked.grad[0, 0, 1, 2] < 0  # raise the missed target cell


def test_reading_loss_prefers_attention_on_the_glyph_among_selected_tokens():
    """Row 0 sees its glyph (token 1) and another (token 2); row 1's mask left its glyph out, so the loss cannot
    move it and skips the row."""
    read = torch.zeros(1, 2, 4, dtype=torch.bool)
    read[0, 0, 1] = read[0, 1, 3] = True
    on = torch.tensor([[[[0.0, 0.6, 0.1, 0.0], [0.0, 0.3, 0.3, 0.0]]]]).expand(1, 2, 2, 4)  # (B, H, R, G*G)
    off = torch.tensor([[[[0.0, 0.1, 0.6, 0.0], [0.0, 0.3, 0.3, 0.0]]]]).expand(1, 2, 2, 4)
    assert reading_loss([(3, on)], read) < reading_loss([(3, off)], read)
    assert reading_loss([(3, on)], read) == pytest.approx(-torch.log(torch.tensor(0.6 + 1e-6)).item(), abs=1e-5)


def test_box_cells_account_for_square_padding():
    # 200x100 image padded to 200x200: y offset 50; LR grid 4 -> 50 px cells.
    cells = box_cells_t((0, 0, 40, 40), (200, 100), 4)
    assert cells.nonzero().tolist() == [[1, 0]]
    cells = box_cells_t((120, 60, 190, 99), (200, 100), 4)
    assert cells.nonzero().tolist() == [[2, 2], [2, 3]]


def test_training_step_reduces_loss_and_trains_hr_projections():
    vlm = make_vlm(seed=9, num_layers=4, selection_layer=1, lowres_size=56, threshold=60)
    model = vlm.model.train()
    prepared = [vlm.prepare(random_image(70, 70, seed=s)) for s in (3, 4)]
    g = prepared[0].lr_grid
    glyph = box_cells_t((10, 10, 20, 20), (70, 70), g * vlm.settings.zoom)
    batch = collate(vlm.tokenizer, [(QUESTIONS[0], "red"), (QUESTIONS[1], "blue green")], g,
                    cells={"target": [[box_cells_t((0, 0, 30, 30), (70, 70), g)] * 2] * 2}, row_reads=[[glyph] * 2] * 2)
    assert batch.read_cells.shape == (2, batch.rows.shape[1], glyph.numel()) and batch.read_cells[1, 1].any()
    lr = torch.stack([p.lr_features for p in prepared]).detach()
    hr = torch.stack([p.hr_features for p in prepared]).detach()
    sizes = [(70, 70)] * 2
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    before = model.model.language_model.layers[3].self_attn.k_proj_hd.weight.detach().clone()
    losses = []
    for _ in range(8):
        loss, stats = forward_loss(model, batch, lr, hr, vlm.settings, sizes, attend={1: "target", 2: "target"},
                                   select={1: "target", 2: "target"}, aux_weight=0.5, select_weight=0.5,
                                   read_weight=0.5)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    assert losses[-1] < losses[0] and "aux" in stats and "sel" in stats and "read" in stats
    assert not torch.equal(before, model.model.language_model.layers[3].self_attn.k_proj_hd.weight)


def test_planted_target_masks_bound_what_rows_read():
    """target_masks turns each row's LR target cells into the HR mask a perfect selection gives; planted in flex,
    an empty mask is lowres and a full one is select_all, row for row."""
    vlm = make_vlm(seed=10, num_layers=4, selection_layer=1, lowres_size=56, threshold=60)
    prepared = [vlm.prepare(random_image(70, 70, seed=s)) for s in (5, 6)]
    g, zoom = prepared[0].lr_grid, vlm.settings.zoom
    target = box_cells_t((0, 0, 30, 30), (70, 70), g)
    batch = collate(vlm.tokenizer, [(QUESTIONS[0], "red"), (QUESTIONS[1], "blue green")], g,
                    cells={"target": [[target] * 2, [target] * 3]})
    masks = target_masks(batch, zoom, ["target"])
    G = g * zoom
    assert masks.shape == (2, batch.rows.shape[1], G * G)
    hr_target = masks[0, 0].reshape(G, G)
    assert torch.equal(hr_target, target.repeat_interleave(zoom, 0).repeat_interleave(zoom, 1))
    assert not masks[0, 2].any()  # padding row of the shorter answer: no target, no HR
    lr = torch.stack([p.lr_features for p in prepared])
    hr = torch.stack([p.hr_features for p in prepared])
    sizes = [(70, 70)] * 2
    with torch.no_grad():
        ce = {mode: forward_loss(vlm.model, batch, lr, hr, vlm.settings, sizes, mode=mode)[1]["ce"]
              for mode in ("lowres", "select_all")}
        none = forward_loss(vlm.model, batch, lr, hr, vlm.settings, sizes, planted_selection=torch.zeros_like(masks))
        full = forward_loss(vlm.model, batch, lr, hr, vlm.settings, sizes, planted_selection=torch.ones_like(masks))
        planted = forward_loss(vlm.model, batch, lr, hr, vlm.settings, sizes, planted_selection=masks)
    with torch.no_grad():  # what the reading loss sees: attention on exactly the planted tokens
        _, state = teacher_forced(vlm.model, batch, lr, hr, vlm.settings, sizes, keep_hr_maps=True,
                                  planted_selection=masks)
    assert [layer for layer, _ in state.hooks.hr_maps] == [2, 3]  # the layers after the selection layer
    for _, probs in state.hooks.hr_maps:
        assert probs.shape == (2, vlm.model.config.text_config.num_attention_heads, batch.rows.shape[1], G * G)
        assert (probs[:, :, 0] > 0).equal(masks[:, None, 0].expand_as(probs[:, :, 0]))
        assert bool((probs.sum(-1) < 1).all())  # the rest went to text and LR tokens
    assert none[1]["ce"] == pytest.approx(ce["lowres"], abs=1e-6)
    assert full[1]["ce"] == pytest.approx(ce["select_all"], abs=1e-6)
    assert planted[1]["ce"] not in (ce["lowres"], ce["select_all"])
