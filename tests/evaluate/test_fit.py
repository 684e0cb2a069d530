"""Over/underfitting verdicts from the curves."""

from tuneforge.evaluate.fit import diagnose


def rows(train_by_epoch, valid_by_epoch):
    out = []
    for epoch, (t, v) in enumerate(zip(train_by_epoch, valid_by_epoch), 1):
        out.append({"step": 2 * epoch - 1, "epoch": epoch, "train_loss": t})
        out.append({"step": 2 * epoch, "epoch": epoch, "train_loss": t, "valid_loss": v})
    return out


def test_valid_loss_turning_up_is_overfitting():
    assert diagnose(rows([3.0, 2.0, 1.0, 0.5], [3.0, 2.5, 2.7, 3.1]))["verdict"] == "overfitting"


def test_training_loss_that_barely_moves_is_underfitting():
    assert diagnose(rows([3.0, 2.95, 2.9], [3.0, 2.97, 2.95]))["verdict"] == "underfitting"


def test_valid_loss_still_falling_fast_is_underfitting():
    assert diagnose(rows([3.0, 2.0, 1.5], [3.0, 2.5, 2.0]))["verdict"] == "underfitting"


def test_flat_valid_loss_near_best_is_a_good_fit():
    assert diagnose(rows([3.0, 2.0, 1.8], [2.6, 2.3, 2.28]))["verdict"] == "good_fit"


def test_no_metrics_or_no_validation_is_unknown():
    assert diagnose([])["verdict"] == "unknown"
    only_train = [{"step": 1, "epoch": 1, "train_loss": 3.0}, {"step": 2, "epoch": 2, "train_loss": 2.0}]
    assert diagnose(only_train)["verdict"] == "unknown"


def test_a_loss_that_became_nan_is_divergence_not_a_good_fit():
    curves = rows([3.0, 2.0, 1.8], [2.6, 2.3, 2.28])
    curves[-1]["valid_loss"] = curves[-1]["train_loss"] = float("nan")  # (NaN compares false: looked flat)
    fit = diagnose(curves)
    assert fit["verdict"] == "diverged"
    assert fit["reason"] == "training loss became nan at step 6: try a lower learning rate"


def one_epoch(train_losses, valid_loss):
    """A one-epoch run's rows: a training loss per step, one validation pass at the end."""
    out = [{"step": s, "epoch": 1, "train_loss": t} for s, t in enumerate(train_losses, 1)]
    out[-1]["valid_loss"] = valid_loss
    return out


def test_a_one_epoch_run_is_judged_against_the_base_models_validation_loss():
    """One epoch has one validation pass: without the base model's loss (baseline.json) every such run,
    the commonest kind, was 'unknown'."""
    falling = one_epoch([3.0, 2.6, 2.2, 2.0], 2.4)
    assert diagnose(falling)["verdict"] == "unknown"
    fit = diagnose(falling, baseline=3.0)
    assert (fit["verdict"], fit["base_valid_loss"], fit["valid_losses"]) == ("underfitting", 3.0, [2.4])
    assert fit["reason"] == "validation loss was still falling fast at the end: more epochs may help"
    worse = diagnose(one_epoch([3.0, 2.0, 1.0, 0.5], 3.4), baseline=3.0)
    assert worse["verdict"] == "overfitting"
    assert worse["reason"].startswith("validation loss rose from the base model's 3.000 to 3.400")
    continued = diagnose(one_epoch([3.0, 2.0, 1.0, 0.5], 3.4), baseline=3.0, start="the earlier run's")
    assert continued["reason"].startswith("validation loss rose from the earlier run's 3.000 to 3.400")
    still = diagnose(one_epoch([3.0, 2.9, 2.9, 2.8], 2.95), baseline=3.0)
    assert still["verdict"] == "underfitting"
    assert still["reason"].startswith("validation loss stayed within 3% of the base model's 3.000")


def test_the_base_models_loss_leaves_a_multi_epoch_verdict_alone_when_training_moved_it():
    curves = rows([3.0, 2.0, 1.8], [2.6, 2.3, 2.28])
    assert diagnose(curves, baseline=3.1)["verdict"] == diagnose(curves)["verdict"] == "good_fit"
