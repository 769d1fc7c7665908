"""scripts/rotary_columns.py: what one head's rotary can tell of an HR token's place (TRAINING.md items 19 and 23)."""

import math

from .conftest import load_script


def test_plain_rope_shows_rows_not_columns():
    rc = load_script("rotary_columns")
    for lr_grid, head_dim, start in ((8, 32, 32), (24, 128, 35)):  # embedded geometry, 7B
        inv_freq = rc.inverse_frequencies(head_dim, {"rope_type": "default", "rope_theta": 10000.0})
        got = rc.fit(lr_grid, 3, inv_freq, start, 4.0)
        assert got["row"]["r2"] > 0.95 and got["row"]["ordered"] > 0.99
        assert got["column"]["r2"] < 0.5 and got["column"]["ordered"] < 0.8


def test_row_rope_has_a_period_of_one_lr_row():
    rc, te = load_script("rotary_columns"), load_script("train_embedded")
    inv_freq = rc.inverse_frequencies(32, te.ROPES["row"])
    periods = 2 * math.pi / inv_freq
    assert abs(periods[1] - te.LR_GRID) < 1e-3  # every LR row turns this pair a whole circle
    assert (periods[2:] > 150).all()  # the rest turn slowly over the ~100-token sequence
    got = rc.fit(te.LR_GRID, 3, inv_freq, 32, 4.0)
    assert got["column"]["r2"] > 0.6 and got["column"]["ordered"] > 0.85
    assert got["row"]["r2"] > 0.95
