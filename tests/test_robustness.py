"""Odd models, odd data and failures: the model is pruned correctly, skipped with a notice, or left untouched."""

import re
import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_actprune import ActivationPruning, ActivationPruningError
from lightning_actprune.core import ActivationRecorder, find_prunable_layers, plan_pruning
from tests.helpers import (
    NUM_CLASSES,
    Classifier,
    KeepUnpruned,
    MLPModule,
    assert_matches_oracle,
    loaders,
    make_data,
    zero_removed_inputs,
)


@pytest.fixture
def run(make_trainer):
    """``run(model, pruning, ...)``: fit under this test's ``tmp_path`` with the callback after a KeepUnpruned."""

    def run(model, pruning, train=None, val=None, keep=None, callbacks_extra=(), **trainer_kwargs):
        pl.seed_everything(0)
        keep = keep or KeepUnpruned()
        options = {"max_epochs": 2, "logger": False, "enable_checkpointing": False}  # pruned.ckpt goes to tmp_path
        trainer = make_trainer(keep, pruning, *callbacks_extra, **{**options, **trainer_kwargs})
        if train is None:
            train, val = loaders((8,))
        trainer.fit(model, train, val)
        return keep

    return run


def assert_oracle(model, keep, pruning, *inputs):
    """Pruned outputs == unpruned outputs with the removed neurons zeroed at their consumers."""
    assert_matches_oracle(model, keep.model, pruning.result.plan, *inputs)


def assert_unchanged(model, keep):
    state = model.state_dict()
    assert state.keys() == keep.state.keys()
    for name, tensor in keep.state.items():
        assert torch.equal(state[name], tensor), name


VAL_X = make_data((8,), n=50, seed=1).tensors[0]


# --- odd models ---------------------------------------------------------------------------------------------------


class SharedLayer(nn.Module):
    """``shared`` is called twice per forward, on its own output: its neurons and fc2's are one group, pruned whole."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 12)
        self.shared, self.out = nn.Linear(12, 12), nn.Linear(12, NUM_CLASSES)

    def forward(self, x):
        h = F.relu(self.fc2(F.relu(self.fc1(x))))
        h = F.relu(self.shared(F.relu(self.shared(h))))
        return self.out(h)


class TiedWeights(nn.Module):
    """``h1`` and ``h2`` share one weight tensor."""

    def __init__(self):
        super().__init__()
        self.fc0, self.fc1 = nn.Linear(8, 16), nn.Linear(16, 12)
        self.h1, self.h2 = nn.Linear(12, 12), nn.Linear(12, 12)
        self.h2.weight = self.h1.weight
        self.out = nn.Linear(12, NUM_CLASSES)

    def forward(self, x):
        h = F.relu(self.fc1(F.relu(self.fc0(x))))
        return self.out(F.relu(self.h2(F.relu(self.h1(h)))))


class NestedDict(nn.Module):
    """``nn.Sequential`` blocks inside an ``nn.ModuleDict``."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleDict(
            {
                "encoder": nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU()),
                "head": nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, NUM_CLASSES)),
            }
        )

    def forward(self, x):
        return self.blocks["head"](self.blocks["encoder"](x))


@pytest.mark.parametrize(
    ("net", "pruned", "skipped"),
    [
        (SharedLayer, {"fc1", "fc2+shared"}, None),
        (TiedWeights, {"fc0"}, r"not pruning .*h1 \(shares a parameter with another layer\)"),
        (NestedDict, {"blocks.encoder.0", "blocks.encoder.2", "blocks.head.0"}, None),
    ],
    ids=["shared_layer", "tied_weights", "sequential_in_moduledict"],
)
def test_odd_architectures_prune_correctly_or_skip_with_a_notice(net, pruned, skipped, run):
    model = Classifier(net())
    pruning = ActivationPruning(threshold=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        keep = run(model, pruning)
    assert {layer.name.replace("net.", "") for layer in pruning.result.plan.layers} == pruned
    if skipped:
        assert any(re.search(skipped, str(w.message)) for w in caught), [str(w.message) for w in caught]
    assert_oracle(model, keep, pruning, VAL_X)
    if net is TiedWeights:
        assert model.net.h1.weight is model.net.h2.weight


def test_frozen_layers_are_pruned_and_stay_frozen(run):
    model = Classifier(NestedDict())
    model.net.blocks["encoder"][0].requires_grad_(False)
    pruning = ActivationPruning(threshold=0.1)
    keep = run(model, pruning)
    assert pruning.result.params_after < pruning.result.params_before
    assert not any(p.requires_grad for p in model.net.blocks["encoder"][0].parameters())
    assert all(p.requires_grad for p in model.net.blocks["head"].parameters())
    assert_oracle(model, keep, pruning, VAL_X)


class Backbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU())

    def forward(self, x):
        return self.layers(x)


class LossModule(pl.LightningModule):
    """Trains and validates on ``self.step(batch)``, the loss; subclasses say how a batch reaches the model."""

    def training_step(self, batch, batch_idx):
        return self.step(batch)

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.step(batch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class NoForward(LossModule):
    """``validation_step`` calls the submodules; the LightningModule's own ``forward`` never runs."""

    def __init__(self):
        super().__init__()
        self.backbone, self.head = Backbone(), nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 3))

    def step(self, batch):
        x, y = batch
        return F.cross_entropy(self.head(self.backbone(x)), y)


def test_validation_step_that_calls_submodules(run):
    model = NoForward()
    pruning = ActivationPruning(threshold=0.05)
    keep = run(model, pruning)
    names = {layer.name for layer in pruning.result.plan.layers}
    # each submodule is traced on its own inputs; the backbone's last layer feeds the head across the two
    # traces, so it is treated as an output and kept whole
    assert names == {"backbone.layers.0", "head.0"}
    zero_removed_inputs(keep.model, pruning.result.plan)
    with torch.no_grad():
        torch.testing.assert_close(model.head(model.backbone(VAL_X)), keep.model.head(keep.model.backbone(VAL_X)))


class DictData(Dataset):
    def __init__(self, seed):
        self.x, self.y = make_data((8,), n=64, seed=seed).tensors
        self.x2 = torch.randn(len(self.x), 4, generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"image": self.x[i], "side": self.x2[i], "label": self.y[i], "id": i}


class TwoInputs(LossModule):
    """Dict batches with extra items, and a forward with two inputs joined by a concatenation."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 12), nn.Linear(4, 6)
        self.mix, self.out = nn.Linear(18, 10), nn.Linear(10, NUM_CLASSES)

    def forward(self, image, side):
        h = torch.cat([F.relu(self.a(image)), F.relu(self.b(side))], dim=1)
        return self.out(F.relu(self.mix(h)))

    def step(self, batch):
        return F.cross_entropy(self(batch["image"], side=batch["side"]), batch["label"])


def test_dict_batches_and_two_inputs_with_concatenation(run):
    model = TwoInputs()
    pruning = ActivationPruning(threshold=0.1)
    train, val = DataLoader(DictData(0), batch_size=16), DataLoader(DictData(1), batch_size=16)
    keep = run(model, pruning, train, val)
    assert {layer.name for layer in pruning.result.plan.layers} == {"a", "b", "mix"}
    data = DictData(1)
    image, side = data.x, data.x2
    zero_removed_inputs(keep.model, pruning.result.plan)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(image, side=side), keep.model(image, side=side))
    assert model.mix.in_features == len(pruning.result.plan.layers[0].kept) + len(pruning.result.plan.layers[1].kept)


# --- failures leave the trained model as it was --------------------------------------------------------------------


class CrashesAfterPruning(Classifier):
    """Validation fails once the model is smaller: the re-validation crashes."""

    def validation_step(self, batch, batch_idx):
        if self.net.net[0].out_features < 16:
            raise RuntimeError("re-validation exploded")
        return super().validation_step(batch, batch_idx)


@pytest.mark.parametrize("on_error", ["raise", "warn"])
def test_failed_revalidation_restores_the_model_exactly(on_error, run):
    model, keep = CrashesAfterPruning(MLPModule()), KeepUnpruned()
    parameters = list(model.parameters())
    pruning = ActivationPruning(threshold=0.3, on_error=on_error)
    expected = r"ctivation pruning failed, the trained model is unchanged: .*re-validation exploded"
    if on_error == "raise":
        with pytest.raises(ActivationPruningError, match=expected):
            run(model, pruning, keep=keep)
    else:
        with pytest.warns(UserWarning, match=expected):
            run(model, pruning, keep=keep)
    assert_unchanged(model, keep)
    assert all(a is b for a, b in zip(model.parameters(), parameters, strict=True))
    assert pruning.result is None
    assert model.net.net[0].out_features == 16


class NaNActivations(Classifier):
    def forward(self, x):
        if not self.training:
            x = x.clone()
            x[0, 0] = float("nan")
        return self.net(x)


def test_nan_activations_are_refused_with_the_layer_named(run):
    model = NaNActivations(MLPModule())
    with pytest.warns(UserWarning, match=r"activations contain NaN or Inf at the input of net.net.0"):
        keep = run(model, ActivationPruning(threshold=0.1, on_error="warn"))
    assert_unchanged(model, keep)


def test_interrupted_fit_prunes_nothing(tmp_path, run):
    class Fails(Classifier):
        def training_step(self, batch, batch_idx):
            if self.current_epoch == 1:
                raise RuntimeError("disk full")
            return super().training_step(batch, batch_idx)

    model, pruning = Fails(MLPModule()), ActivationPruning(threshold=0.2)
    with pytest.raises(RuntimeError, match="disk full"):
        run(model, pruning)
    assert pruning.result is None
    assert model.net.net[0].out_features == 16
    assert not list(tmp_path.rglob("actprune*"))


# --- trainer settings ----------------------------------------------------------------------------------------------


def test_fast_dev_run_prunes_on_its_one_batch_and_logger_false_does_not_crash(caplog, run):
    model, pruning = Classifier(MLPModule()), ActivationPruning(threshold=0.2)
    with caplog.at_level("INFO"):
        keep = run(model, pruning, fast_dev_run=True)
    assert "`fast_dev_run` validates one batch; the statistics come from it alone" in caplog.text
    assert pruning.result is not None
    assert pruning.result.plan.neurons_after <= pruning.result.plan.neurons_before
    # the plan is the one made from the first validation batch alone, and the model is pruned by it
    (first_batch, _), *_ = loaders((8,))[1]
    with ActivationRecorder(keep.model) as recorder, torch.no_grad():
        keep.model(first_batch)
    layers = find_prunable_layers(keep.model, recorder.example_inputs)
    expected = plan_pruning(layers, recorder.moments(), 0.2, "mean", model=keep.model)  # a written λ: a mean
    assert pruning.result.plan.to_dict() == expected.to_dict()
    assert 0 < pruning.result.plan.neurons_after < pruning.result.plan.neurons_before
    assert_oracle(model, keep, pruning, VAL_X)


def test_limit_val_batches_zero_fails_before_training(run):
    model = Classifier(MLPModule())
    with pytest.raises(ActivationPruningError, match=r"needs validation batches; got `Trainer\(limit_val_batches=0\)`"):
        run(model, ActivationPruning(threshold=0.2), limit_val_batches=0)
    assert model.global_step == 0


def test_layer_pattern_matching_no_layer_fails_at_setup(run):
    model = Classifier(MLPModule())
    with pytest.raises(
        ActivationPruningError,
        match=r"`layers` pattern 'encoder\.\*' matches no Linear/Conv layer of Classifier; its Linear/Conv"
        r" layers are: net.net.0, net.net.2, net.net.4",
    ):
        run(model, ActivationPruning(threshold=0.2, layers=["encoder.*"]))
    assert model.global_step == 0


def test_model_without_prunable_layer_is_left_alone(run):
    model = Classifier(nn.Linear(8, NUM_CLASSES))
    pruning = ActivationPruning(threshold=0.2)
    # said before training (the analysis at the start of fit), not only after it
    with pytest.warns(UserWarning, match=r"has no prunable layer \(seen before training\). Found Linear ×1; none is"):
        keep = run(model, pruning)
    assert pruning.result is None
    assert_unchanged(model, keep)


def test_statistics_memory_does_not_grow_with_batches():
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))

    def state_bytes(batches):
        with ActivationRecorder(model) as recorder, torch.no_grad():
            for _ in range(batches):
                model(torch.randn(64, 8))
        return sum(s.numel() * s.element_size() for m in recorder.metrics.values() for s in m.metric_state.values())

    # four float64 sums per neuron of the one measured input (32 hidden neurons) and one count
    assert state_bytes(1) == state_bytes(500) == 8 * (4 * 32 + 1)


def test_failed_pruning_of_the_best_checkpoint_restores_the_last_weights(tmp_path, run):
    from lightning.pytorch.callbacks import ModelCheckpoint

    model, keep = CrashesAfterPruning(MLPModule(), lr=0.5), KeepUnpruned()
    # mode="max" on a loss: the "best" checkpoint is an early epoch, so best and last weights differ
    checkpoint = ModelCheckpoint(dirpath=tmp_path, monitor="val_loss", mode="max", save_top_k=1)
    pruning = ActivationPruning(threshold=0.3, prune_best=True, on_error="warn")
    with pytest.warns(UserWarning, match="re-validation exploded"):
        run(model, pruning, keep=keep, max_epochs=4, enable_checkpointing=True, callbacks_extra=[checkpoint])
    best = torch.load(checkpoint.best_model_path, weights_only=True)["state_dict"]
    assert any(not torch.equal(best[k], v) for k, v in keep.state.items())  # best != last, or the test is moot
    assert_unchanged(model, keep)


def test_exclude_that_removes_every_prunable_layer_is_refused_before_pruning(run):
    model, keep = Classifier(MLPModule()), KeepUnpruned()
    pruning = ActivationPruning(threshold=0.2, exclude=["net.net.0", "net.net.2"])
    with pytest.raises(
        ActivationPruningError, match=r"leave no layer to prune; prunable layers are: net.net.0, net.net.2"
    ):
        run(model, pruning, keep=keep)
    assert_unchanged(model, keep)


def test_threshold_above_every_neuron_keeps_min_neurons_and_warns(run):
    model, pruning = Classifier(MLPModule()), ActivationPruning(threshold=1e6, min_neurons=2)
    with pytest.warns(UserWarning, match=r"λ=1e\+06 leaves net.net.0, net.net.2 with only `min_neurons=2` neuron\(s\)"):
        run(model, pruning)
    assert [len(layer.kept) for layer in pruning.result.plan.layers] == [2, 2]
    assert model.net.net[0].out_features == 2


def test_compiled_submodule_is_pruned_as_the_eager_module_with_a_notice(run):
    model = Classifier(MLPModule())
    model.net = torch.compile(model.net, backend="eager")  # the eager backend keeps the test fast
    pruning = ActivationPruning(threshold=0.1)
    with pytest.warns(UserWarning, match=r"net was compiled with `torch.compile`; it is pruned as the eager module"):
        keep = run(model, pruning)
    assert isinstance(model.net, MLPModule)
    assert pruning.result.params_after < pruning.result.params_before
    keep.model.net = keep.model.net._orig_mod  # the copy taken before pruning is still compiled
    assert_oracle(model, keep, pruning, VAL_X)


def test_keyboard_interrupt_prunes_nothing_and_writes_nothing(tmp_path, run):
    class Interrupted(Classifier):
        def training_step(self, batch, batch_idx):
            if self.current_epoch == 1:
                raise KeyboardInterrupt
            return super().training_step(batch, batch_idx)

    model, pruning = Interrupted(MLPModule()), ActivationPruning(threshold=0.2)
    with pytest.raises(SystemExit):  # Lightning's graceful shutdown on Ctrl+C
        run(model, pruning)
    assert pruning.result is None
    assert model.net.net[0].out_features == 16
    assert not list(tmp_path.rglob("pruned.ckpt"))
    assert not list(tmp_path.rglob("actprune*"))


def test_a_failing_report_warns_and_keeps_the_pruned_model(tmp_path, run):
    from lightning.pytorch.loggers import CSVLogger

    logger = CSVLogger(tmp_path, name="csv", version=0)
    (tmp_path / "csv" / "version_0" / "actprune_sweep.csv").mkdir(parents=True)  # the table cannot be written
    model, pruning = Classifier(MLPModule()), ActivationPruning(threshold=0.2, statistic="mean", sweep=[0.1, 0.2])
    with pytest.warns(UserWarning, match=r"the model is pruned, but reporting failed: IsADirectoryError"):
        run(model, pruning, logger=logger)
    assert pruning.result is not None
    assert model.net.net[0].out_features < 16
    assert (tmp_path / "csv" / "version_0" / "pruned.ckpt").is_file()


def test_compiled_model_with_nothing_to_prune_stays_compiled(run):
    model = Classifier(nn.Sequential(nn.Linear(8, NUM_CLASSES)))
    model.net = torch.compile(model.net, backend="eager")
    pruning = ActivationPruning(threshold=0.2)
    run(model, pruning)
    assert pruning.result is None
    assert isinstance(model.net, torch._dynamo.eval_frame.OptimizedModule)


def test_prune_best_on_a_compiled_submodule(tmp_path, run):
    from lightning.pytorch.callbacks import ModelCheckpoint

    model = Classifier(MLPModule())
    model.net = torch.compile(model.net, backend="eager")
    checkpoint = ModelCheckpoint(dirpath=tmp_path, monitor="val_loss", save_top_k=1)
    pruning = ActivationPruning(threshold=0.2, statistic="mean", prune_best=True)
    run(model, pruning, max_epochs=3, enable_checkpointing=True, callbacks_extra=[checkpoint])
    assert pruning.result is not None
    assert pruning.result.metrics_before["val_loss"] == pytest.approx(float(checkpoint.best_model_score))
