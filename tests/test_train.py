"""The recipe (train.py): what each answer row is trained to select and read, the frozen position table, and
resumable stages."""

import numpy as np
import pytest
import torch

import train
from flexattn.synthetic import ask, build_tokenizer, make_sample


def _question(kind: str, seed: int = 3):
    sample = make_sample(seed, {"letter_of": "attribute", "colour_of": "attribute", "ctl_spatial": "spatial"}.get(kind, kind))
    rng = np.random.default_rng(seed)
    for _ in range(50):
        q = ask(sample.shapes, kind, rng)
        if q is not None:
            return sample.shapes, q
    raise AssertionError(f"no {kind} question for seed {seed}")


def test_rows_named_by_colour_look_at_their_shape_in_every_layer():
    for kind in ("letter_of", "multi"):
        shapes, q = _question(kind)
        cells, reads = train.row_targets(shapes, q)
        assert all(len(v) == len(q.targets) + 1 for v in (*cells.values(), reads))  # answer tokens, then EOS
        for k, token in enumerate(q.targets):
            box = train.cells_of([shapes[i].box for i in token], train.LR_GRID)
            assert cells["before"][k] is None
            assert all((cells[name][k] == box).all() for name in ("find", "attend", "select"))
            glyph = train.glyph_cells([shapes[token[0]]], train.LR_GRID * train.ZOOM)
            assert (reads[k] == glyph).all() and reads[k].sum() == 1  # the glyph of this token's shape, only
        assert (cells["select"][-1] == cells["select"][-2]).all()  # the EOS row keeps the last token's target


def test_left_right_rows_hold_the_reference_apart_and_select_both_shapes():
    for kind in ("spatial", "ctl_spatial"):
        shapes, q = _question(kind)
        cells, reads = train.row_targets(shapes, q)
        compared, reference = (shapes[i].box for i in q.targets[0])
        assert (cells["before"][0] == train.cells_of([reference], train.LR_GRID)).all()  # before selection
        assert (cells["attend"][0] == train.cells_of([compared], train.LR_GRID)).all()
        assert (cells["select"][0] == train.cells_of([compared, reference], train.LR_GRID)).all()
        if kind == "ctl_spatial":
            assert reads[0] is None and (cells["find"][0] == cells["attend"][0]).all()  # LR answers it


def test_rows_named_by_letter_find_every_glyph_first_then_their_shapes():
    for kind in ("colour_of", "spatial"):
        shapes, q = _question(kind)
        cells, reads = train.row_targets(shapes, q)
        named = q.by_letter[0]
        every_glyph = train.glyph_cells(shapes, train.LR_GRID)
        assert (cells["find"][0] == every_glyph).all() and every_glyph.sum() <= len(shapes)
        assert (cells["attend"][0] == train.cells_of([shapes[named].box], train.LR_GRID)).all()
        assert (reads[0] == train.glyph_cells([shapes[named]], train.LR_GRID * train.ZOOM)).all()


def test_tower_position_table_is_sine_cosine_and_stays_frozen():
    cfg = train.TowerConfig(hidden_size=32, intermediate_size=64, layers=1, heads=2)
    tower = train.make_tower(cfg)
    table = tower.embeddings.position_embedding.weight
    assert not table.requires_grad
    assert torch.equal(table[1:], train.sincos_table(train.LR_GRID, 32)) and not table[0].any()
    rows = train.sincos_table(train.LR_GRID, 32).reshape(train.LR_GRID, train.LR_GRID, 32)
    assert torch.equal(rows[:, 0, :16], rows[:, 5, :16])  # the first half encodes the row only,
    assert torch.equal(rows[0, :, 16:], rows[3, :, 16:])  # the second the column only
    assert len({tuple(v.tolist()) for v in rows.reshape(-1, 32)}) == train.LR_GRID**2  # every cell its own code


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny tower, a cache of 6 images from it, and an aligned-stage model over it."""
    root = tmp_path_factory.mktemp("recipe")
    cfg = train.TowerConfig(hidden_size=32, intermediate_size=64, layers=2, heads=2)
    tower = train.make_tower(cfg)
    tower.save_pretrained(root / "tower")
    heads = train.PatchHeads(32)
    torch.save(heads.state_dict(), root / "tower" / "patch_heads.pt")
    cache = train.cache_split(tower.eval(), start=0, n=6, batch_images=3)
    torch.save(cache, root / "cache.pt")
    cache = train.load_cache(root / "cache.pt")
    model = train.make_model(build_tokenizer(), str(root / "tower"))
    train.init_projector(model, str(root / "tower"), cache, n_images=6)
    model.copy_hr_projections_from_lowres()
    torch.save(model.state_dict(), root / "start.pt")
    return root, cache


def _train(root, cache, out, interrupt_at=None):
    tokenizer = build_tokenizer()
    model = train.make_model(tokenizer, str(root / "tower"))
    model.load_state_dict(torch.load(root / "start.pt", weights_only=True))
    phases = [train.Phase(3, {"letter_of": 1.0}, {"planted": 1.0}, read_weight=1.0),
              train.Phase(3, train.FLEX_MIX, {"flex": 0.5, "select_all": 0.5}, select_weight=0.5)]

    def stop():
        raise KeyboardInterrupt

    train.train_phases(model, tokenizer, cache, out, phases, batch_size=2, lr=1e-3, seed=5, warmup=2,
                       eval_fn=stop if interrupt_at else None, eval_every=interrupt_at or 0, checkpoint_every=2)
    return model


def test_an_interrupted_stage_resumes_where_it_stopped(tiny_run, tmp_path):
    root, cache = tiny_run
    straight = _train(root, cache, tmp_path / "straight")
    with pytest.raises(KeyboardInterrupt):  # stops after step 5, whose checkpoint (every 2 steps) is at 4
        _train(root, cache, tmp_path / "resumed", interrupt_at=5)
    assert (tmp_path / "resumed" / "resume.pt").is_file()
    resumed = _train(root, cache, tmp_path / "resumed")
    assert not (tmp_path / "resumed" / "resume.pt").exists()  # a finished stage leaves no checkpoint
    for (name, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), name
    attn = straight.model.language_model.layers[3].self_attn  # HR projections started as copies and were trained
    assert not torch.equal(attn.k_proj_hd.weight, attn.k_proj.weight)


def test_projector_starts_from_the_tower_heads_and_keeps_position(tiny_run):
    root, cache = tiny_run
    model = train.make_model(build_tokenizer(), str(root / "tower"))
    train.init_projector(model, str(root / "tower"), cache, n_images=6)
    proj = model.model.multi_modal_projector
    lr = cache["lr"].float()  # (6, 64, D)
    hidden = proj.act(proj.linear_1(lr))
    n_heads = len(train.LETTERS) + len(train.COLOURS) + len(train.SHAPES) + 3  # + a 'none' class per head
    column_logits = proj.linear_1(lr)[..., n_heads + train.LR_GRID :][..., : train.LR_GRID]
    assert (column_logits.argmax(-1) == torch.arange(64) % train.LR_GRID).float().mean() > 0.9
    rms = proj.linear_2(hidden).detach().pow(2).mean().sqrt()
    assert 0.5 < float(rms) < 2.0


def test_patch_labels_name_each_shape_at_its_centre():
    s = make_sample(5_000, "attribute")
    hr = train.patch_labels(s, train.HR_GRID)
    lr = train.patch_labels(s, 8)
    assert hr["letter"].shape == (train.HR_GRID, train.HR_GRID) and lr["colour"].shape == (8, 8)
    assert (hr["letter"] >= 0).sum() == len(s.shapes)
    for sh in s.shapes:
        r, c = sh.centre[1] // train.PATCH, sh.centre[0] // train.PATCH
        assert train.LETTERS[hr["letter"][r, c]] == sh.letter
        assert train.COLOURS[hr["colour"][r, c]] == sh.colour and train.SHAPES[hr["shape"][r, c]] == sh.kind
        r, c = sh.centre[1] // 42, sh.centre[0] // 42
        assert train.COLOURS[lr["colour"][r, c]] == sh.colour and train.SHAPES[lr["shape"][r, c]] == sh.kind
