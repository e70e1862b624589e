"""Solver checkpoints (cnncore.checkpoint): exact resumes, the file's entries, and every
refusal (another model, configuration or rule; an unreadable file; an unwritable folder)."""

import json
import re

import numpy as np
import pytest
from solver_helpers import (
    ITERATIONS_PER_EPOCH,
    ConfiguredNet,
    ParamsOnlyNet,
    TwoLayerNet,
    assert_same_run,
    make_data,
    make_solver,
)

from cnncore import checkpoint
from cnncore.cnn import ThreeLayerConvNet
from cnncore.npz_io import NpzFileError, read_npz, write_npz_atomically
from cnncore.solver import Solver

@pytest.mark.parametrize("model_class", [TwoLayerNet, ParamsOnlyNet])
@pytest.mark.parametrize("resume", ["resume_from", "load_checkpoint"])
def test_resumed_run_matches_uninterrupted_run_bit_for_bit(tmp_path, model_class, resume):
    straight = make_solver(model_class(), num_epochs=4)
    straight.train()

    path = tmp_path / "run.npz"
    make_solver(model_class(), num_epochs=2, checkpoint_path=path).train()
    # A fresh model with other weights: everything must come from the file.
    if resume == "resume_from":
        resumed = make_solver(model_class(seed=99), num_epochs=4, resume_from=path)
    else:
        resumed = make_solver(model_class(seed=99), num_epochs=4, seed=123)
        resumed.load_checkpoint(path)
    assert resumed.epoch == 2
    resumed.train()

    assert_same_run(straight, resumed)
    for name, config in straight.optim_configs.items():
        assert config["t"] == resumed.optim_configs[name]["t"]
        np.testing.assert_array_equal(config["m"], resumed.optim_configs[name]["m"])
        assert config["learning_rate"] == resumed.optim_configs[name]["learning_rate"]


def test_checkpoint_loads_without_pickle_and_holds_the_state(tmp_path):
    path = tmp_path / "ckpt.npz"
    solver = make_solver(num_epochs=2, checkpoint_path=path)
    solver.train()
    with np.load(path, allow_pickle=False) as f:
        files = set(f.files)
        assert f["epoch"].item() == 2
        assert f["iteration"].item() == 2 * ITERATIONS_PER_EPOCH
        assert f["learning_rate"].item() == pytest.approx(1e-2 * 0.9**2)
        assert f["optim/W1/t"].dtype == np.int64 and f["optim/W1/t"].shape == ()
        assert len(f["loss_history"]) == 2 * ITERATIONS_PER_EPOCH
    expected = {"format", "manifest", "update_rule", "epoch", "iteration", "learning_rate",
                "best_val_acc", "loss_history", "train_acc_history", "val_acc_history",
                "rng_state", "model/input_mean", "best_state/input_mean", "best_params/W1",
                "optim/W1/m", "optim/W1/v", "optim/W1/beta1"}
    assert expected <= files
    assert "best_params/input_mean" not in files


def test_checkpoint_is_written_atomically_without_leftovers(tmp_path):
    path = tmp_path / "sub" / "ckpt.npz"
    make_solver(num_epochs=3, checkpoint_path=str(path)).train()
    assert [p.name for p in path.parent.iterdir()] == ["ckpt.npz"]


def test_checkpoint_name_writes_one_file_per_epoch(tmp_path):
    make_solver(num_epochs=2, checkpoint_name=str(tmp_path / "net")).train()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["net_epoch_1.npz", "net_epoch_2.npz"]


def test_checkpoint_for_another_architecture_is_rejected(tmp_path):
    path = tmp_path / "ckpt.npz"
    make_solver(num_epochs=1, checkpoint_path=path).train()
    with pytest.raises(ValueError, match=r"does not match the model: W1 has shape \(4, 16\)"):
        make_solver(TwoLayerNet(hidden_dim=8), resume_from=path)


def _trained_net():
    model = TwoLayerNet()
    data = make_data()
    model.loss(data["X_train"][:2], data["y_train"][:2])  # creates the buffer
    return model


def _net_without_b2():
    model = TwoLayerNet()
    del model.params["b2"]
    return model


@pytest.mark.parametrize("make_model, message", [
    (_trained_net, r"missing from the checkpoint: \['input_mean'\]"),
    (_net_without_b2, r"parameters not in the model: \['b2'\]"),
])
def test_checkpoint_with_other_names_is_rejected(tmp_path, make_model, message):
    path = tmp_path / "ckpt.npz"
    make_solver(ParamsOnlyNet(), num_epochs=1, checkpoint_path=path).train()
    with pytest.raises(ValueError, match=message):
        make_solver(make_model(), resume_from=path)


def test_checkpoint_with_another_update_rule_is_rejected(tmp_path):
    path = tmp_path / "ckpt.npz"
    make_solver(num_epochs=1, checkpoint_path=path).train()
    with pytest.raises(ValueError, match="update_rule 'adam'"):
        make_solver(update_rule="sgd", resume_from=path)


def test_file_that_is_not_a_checkpoint_is_rejected(tmp_path):
    path = tmp_path / "other.npz"
    np.savez(path, W1=np.zeros(3))
    with pytest.raises(ValueError, match="not a Solver checkpoint"):
        make_solver(resume_from=path)




# --------------------------------------------------------------- the format

def test_checkpoint_records_the_format_and_the_model_config_as_json(tmp_path):
    path = tmp_path / "ckpt.npz"
    model = ConfiguredNet(normalization="groupnorm", num_groups=4)
    make_solver(model, num_epochs=1, checkpoint_path=path).train()
    entries = read_npz(path)
    assert entries["format"].item() == checkpoint.CHECKPOINT_FORMAT == 2
    assert json.loads(entries["model_config"].item()) == model.config


def test_checkpoint_of_a_model_without_config_has_no_model_config_entry(tmp_path):
    path = tmp_path / "ckpt.npz"
    make_solver(num_epochs=1, checkpoint_path=path).train()
    assert "model_config" not in read_npz(path)


@pytest.mark.parametrize("other", [1, 3], ids=["previous", "newer"])
def test_checkpoint_of_another_format_is_refused_naming_both_formats(tmp_path, other):
    """A newer file is no more readable than an older one: its layout is not this Solver's."""
    path = tmp_path / "ckpt.npz"
    make_solver(num_epochs=1, checkpoint_path=path).train()
    write_npz_atomically(path, {**read_npz(path), "format": np.asarray(other)})
    with pytest.raises(ValueError, match=rf"has format {other}; this Solver reads format 2"):
        make_solver(resume_from=path)
    with pytest.raises(ValueError, match=rf"has format {other}; this Solver reads format 2"):
        checkpoint.load(path)


def test_lr_steps_survive_a_resume_bit_for_bit(tmp_path):
    # Steps after updates round(0.3 * 24) = 7 and round(0.6 * 24) = 14: one before the
    # epoch-2 checkpoint, one after it.
    options = dict(num_epochs=4, lr_steps=(0.3, 0.6), lr_step_factor=0.1)
    straight = make_solver(checkpoint_name=str(tmp_path / "run"), **options)
    straight.train()
    resumed = make_solver(TwoLayerNet(seed=99), resume_from=tmp_path / "run_epoch_2.npz", **options)
    resumed.train()
    assert_same_run(straight, resumed)
    assert straight._learning_rate() == resumed._learning_rate()
    # Both steps and four decays taken; multiplied in another order here, so a few ulps apart.
    assert resumed._learning_rate() == pytest.approx(1e-2 * 0.9**4 * 0.1 * 0.1, rel=1e-14)


# ------------------------------------------------------- another model configuration

def _params_of(model):
    return {k: v.copy() for k, v in model.params.items()}


def _assert_unchanged(model, before):
    for name, value in before.items():
        np.testing.assert_array_equal(model.params[name], value, err_msg=name)


def test_resume_into_a_model_configured_otherwise_is_refused_listing_the_differing_keys(tmp_path):
    path = tmp_path / "ckpt.npz"
    make_solver(ConfiguredNet("batchnorm", num_groups=2), num_epochs=1, checkpoint_path=path).train()
    model = ConfiguredNet("groupnorm", num_groups=4, seed=5)  # same shapes: only the config tells
    before = _params_of(model)
    with pytest.raises(ValueError, match=rf"checkpoint {path} was saved from a model configured otherwise: "
                                         r"normalization: 'batchnorm' in the checkpoint, 'groupnorm' in the model; "
                                         r"num_groups: 2 in the checkpoint, 4 in the model$"):
        make_solver(model, resume_from=path)
    _assert_unchanged(model, before)


class ExtendedNet(ConfiguredNet):
    """ConfiguredNet whose config has one more key (a field a later version of the model added)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.config = {**self.config, "use_fast": False}


@pytest.mark.parametrize("saved, resumed, sides", [
    (ExtendedNet, ConfiguredNet, "False in the checkpoint, '(absent)' in the model"),
    (ConfiguredNet, ExtendedNet, "'(absent)' in the checkpoint, False in the model"),
], ids=["only-in-the-checkpoint", "only-in-the-model"])
def test_a_config_key_on_one_side_only_is_a_difference(tmp_path, saved, resumed, sides):
    path = tmp_path / "ckpt.npz"
    make_solver(saved(), num_epochs=1, checkpoint_path=path).train()
    with pytest.raises(ValueError, match=re.escape(f"configured otherwise: use_fast: {sides}") + "$"):
        make_solver(resumed(), resume_from=path)


@pytest.mark.parametrize("saved, resumed, message", [
    (TwoLayerNet, ConfiguredNet, r"the model records a model configuration \(model.config\) and the checkpoint "
                                 r"does not"),
    (ConfiguredNet, TwoLayerNet, r"the checkpoint records a model configuration \(model.config\) and the model "
                                 r"does not"),
])
def test_resume_between_a_configured_and_an_unconfigured_model_is_refused(tmp_path, saved, resumed, message):
    path = tmp_path / "ckpt.npz"
    make_solver(saved(), num_epochs=1, checkpoint_path=path).train()
    with pytest.raises(ValueError, match=message):
        make_solver(resumed(), resume_from=path)


def test_three_layer_net_checkpoint_of_batchnorm_does_not_resume_into_groupnorm(tmp_path):
    rng = np.random.default_rng(0)
    data = {"X_train": rng.standard_normal((20, 1, 4, 4)), "y_train": rng.integers(0, 3, 20),
            "X_val": rng.standard_normal((10, 1, 4, 4)), "y_val": rng.integers(0, 3, 10)}

    def net(normalization, num_groups):
        return ThreeLayerConvNet(input_dim=(1, 4, 4), num_filters=4, filter_size=3, hidden_dim=5, num_classes=3,
                                 normalization=normalization, num_groups=num_groups, dtype=np.float64, seed=0)

    path = tmp_path / "net.npz"
    options = dict(num_epochs=1, batch_size=10, verbose=False, seed=0)
    Solver(net("batchnorm", 2), data, checkpoint_path=path, **options).train()
    with pytest.raises(ValueError, match=r"normalization: 'batchnorm' in the checkpoint, 'groupnorm' in the model"):
        Solver(net("groupnorm", 2), data, resume_from=path, **options)
    Solver(net("batchnorm", 2), data, resume_from=path, **options)  # the same configuration resumes


def test_checkpoint_with_optim_entries_its_rule_does_not_have_is_refused(tmp_path):
    path = tmp_path / "ckpt.npz"
    make_solver(num_epochs=1, checkpoint_path=path).train()
    state = checkpoint.load(path)
    state.optim_configs["W1"]["lr"] = 1.0
    with pytest.raises(ValueError, match=r"holds optim entries \['lr'\] that update_rule 'adam' does not have"):
        checkpoint.check_resumable(path, state, update_rule="adam", model_state=state.model_state,
                                   model_config=None)


# ------------------------------------------------------- unreadable files

@pytest.mark.parametrize("damage, problem", [
    (lambda good: b"", "is empty"),
    (lambda good: good[: len(good) // 2], "is not an .npz archive"),
    (lambda good: b"garbage " * 100, "is not an .npz archive"),
], ids=["empty", "truncated", "corrupt"])
def test_unreadable_checkpoint_raises_npz_file_error_naming_it_with_the_model_untouched(tmp_path, damage, problem):
    good = tmp_path / "good.npz"
    make_solver(num_epochs=1, checkpoint_path=good).train()
    bad = tmp_path / "bad.npz"
    bad.write_bytes(damage(good.read_bytes()))
    model = TwoLayerNet(seed=7)
    before = _params_of(model)
    with pytest.raises(NpzFileError, match=rf"checkpoint {bad} {problem}"):
        make_solver(model, resume_from=bad)
    _assert_unchanged(model, before)


def test_missing_checkpoint_raises_npz_file_error_naming_it(tmp_path):
    with pytest.raises(NpzFileError, match=rf"checkpoint {tmp_path / 'none.npz'} does not exist"):
        make_solver(resume_from=tmp_path / "none.npz")


# ------------------------------------------------------- unwritable folders

def test_checkpoint_path_that_cannot_be_written_is_refused_at_construction(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(ValueError, match=r"checkpoint_path '.*a-file/sub/ckpt.npz' cannot be written: its folder "
                                         r"'.*a-file/sub' cannot be created or written to"):
        make_solver(checkpoint_path=blocker / "sub" / "ckpt.npz")
    assert [p.name for p in tmp_path.iterdir()] == ["a-file"]


def test_checkpoint_name_whose_folder_cannot_be_written_is_refused_at_construction(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(ValueError, match=r"checkpoint_name '.*a-file/net_epoch_1.npz' cannot be written"):
        make_solver(checkpoint_name=str(blocker / "net"))


def test_checkpoint_path_that_is_a_folder_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"checkpoint_path '.*' is a folder; expected the path of a file"):
        make_solver(checkpoint_path=tmp_path)


def test_writable_checkpoint_folder_is_created_at_construction_and_left_empty(tmp_path):
    folder = tmp_path / "new" / "runs"
    make_solver(checkpoint_path=folder / "ckpt.npz")
    assert folder.is_dir() and list(folder.iterdir()) == []


def test_bad_resume_is_refused_before_the_checkpoint_folder_is_created(tmp_path):
    with pytest.raises(NpzFileError):
        make_solver(checkpoint_path=tmp_path / "new" / "ckpt.npz", resume_from=tmp_path / "none.npz")
    assert list(tmp_path.iterdir()) == []


def test_model_config_with_numpy_scalars_is_recorded_as_plain_json(tmp_path):
    model = ConfiguredNet()
    model.config["weight_scale"] = np.float32(0.5)
    path = tmp_path / "ckpt.npz"
    make_solver(model, num_epochs=1, checkpoint_path=path).train()
    assert json.loads(read_npz(path)["model_config"].item())["weight_scale"] == 0.5


def test_model_config_that_json_cannot_write_is_refused_at_construction():
    model = ConfiguredNet()
    model.config["activation"] = object()
    with pytest.raises(ValueError, match=r"model.config must be JSON-serialisable"):
        make_solver(model)
