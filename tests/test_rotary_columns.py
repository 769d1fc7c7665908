"""scripts/rotary_columns.py: the claim TRAINING.md item 19 rests on (rows visible to one head's rotary, columns not)."""

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "rotary_columns.py"


def _fit():
    spec = importlib.util.spec_from_file_location("rotary_columns", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.fit


def test_rotary_tables_show_rows_not_columns():
    fit = _fit()
    for lr_grid, head_dim, start in ((8, 32, 32), (24, 128, 35)):  # embedded model, 7B
        got = fit(lr_grid, 3, head_dim, start, 10000.0, 4.0)
        assert got["row"]["r2"] > 0.95 and got["row"]["ordered"] > 0.99
        assert got["column"]["r2"] < 0.5 and got["column"]["ordered"] < 0.8
