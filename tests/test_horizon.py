"""core/horizon.py: the horizon grid is centred on the best short-horizon point; shifts pair seeds."""
from core import horizon


def _rows(param, swept, width, losses):
    return [{"parametrisation": param, "swept": swept, "width": width, "lr_mult": m, "final_val_loss": y}
            for m, y in losses]


def test_the_grid_is_centred_on_the_best_seed_mean_point():
    rows = _rows("SP", "adam", 128, [(0.25, 2.3), (0.5, 2.1), (0.5, 2.2), (1, 2.12), (1, 2.2), (2, float("nan"))])
    rows += _rows("muP", "adam", 128, [(4, 1.0)])  # another key: not read
    assert horizon.centre_mults(rows, "SP", "adam", 128) == [0.125, 0.25, 0.5, 1, 2]


def test_the_shift_is_the_paired_difference_per_seed():
    def verdict(xs):
        fits = {w: {s: {"x": x, "flag": ""} for s, x in by_seed.items()} for w, by_seed in xs.items()}
        return {"k": {"estimators": {"quad3": {"fits": fits}}}}
    short = verdict({32: {1: -7.0, 2: -7.2, 3: -6.8}, 128: {1: -7.0, 2: -7.1, 3: -6.9}})
    long = verdict({32: {1: -7.6, 2: -7.9, 3: -7.3}, 128: {1: -7.6, 2: -7.7, 3: -7.5}})
    r = horizon.shifts(short, long)["k"]["estimators"]["quad3"]
    assert abs(r["by_width"][32]["mean"] - (-(0.6 + 0.7 + 0.5) / 3)) < 1e-9
    assert abs(r["by_width"][128]["mean"] + 0.6) < 1e-9 and r["by_width"][128]["low"] < -0.6 < r["by_width"][128]["high"]
    # per seed, shift against log2 width (2 octaves): seed 1 0, seed 2 +0.1 / 2, seed 3 -0.1 / 2
    assert abs(r["slope_vs_log2_width"]["mean"]) < 1e-9 and r["slope_vs_log2_width"]["n"] == 3
