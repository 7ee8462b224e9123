"""Pruned models survive: the pruned checkpoint, every reload path, export, ModelCheckpoint, resume, state."""

import copy
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from lightning_actprune import (
    ActivationPruning,
    ActivationPruningError,
    PrunedCheckpointMixin,
    PruningPlan,
    export_pruned,
    load_pruned,
    pruning_plan_of,
    shrink_to_checkpoint,
)
from lightning_actprune._module_plan import _compose
from lightning_actprune._types import BiasUpdate
from lightning_actprune.core import ActivationRecorder, ModulePruning, apply_plan, find_prunable_layers, plan_pruning
from tests.helpers import ARCHITECTURES, Classifier, MLPModule, input_shape, loaders, quiet_trainer


class EvalClassifier(Classifier):
    """The helpers' Classifier with a test and a predict step."""

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_loss", F.cross_entropy(self(x), y))

    def predict_step(self, batch, batch_idx):
        return self(batch[0])


class MixinClassifier(PrunedCheckpointMixin, EvalClassifier):
    """Opts in with one line."""


class HelperClassifier(EvalClassifier):
    """Opts in through its own `on_load_checkpoint`."""

    def on_load_checkpoint(self, checkpoint):
        shrink_to_checkpoint(self, checkpoint)


def outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


def evaluation_trainer(tmp_path, *callbacks) -> pl.Trainer:
    return quiet_trainer(tmp_path, *callbacks, logger=False, enable_checkpointing=False)


def fit_trainer(root, *callbacks, **kwargs) -> pl.Trainer:
    return quiet_trainer(root, *callbacks, **{"max_epochs": 2, "logger": CSVLogger(root, name="csv"), **kwargs})


def assert_plain(value, where="checkpoint"):
    """Only what `torch.load(weights_only=True)` and JSON can hold without a class: no pickled objects."""
    if isinstance(value, dict):
        for key, item in value.items():
            assert isinstance(key, str), where
            assert_plain(item, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            assert_plain(item, f"{where}[{i}]")
    else:
        assert value is None or isinstance(value, (bool, int, float, str)), (where, type(value))


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """One fit with ModelCheckpoint and ActivationPruning, shared by the tests that only read it."""
    root = tmp_path_factory.mktemp("pruned")
    pl.seed_everything(0)
    train, val = loaders((8,))
    model = EvalClassifier(MLPModule())
    pruning = ActivationPruning(threshold=0.2, statistic="mean", min_neurons=2)
    checkpoint = ModelCheckpoint(dirpath=root / "ckpt", monitor="val_acc", mode="max", save_last=True)
    trainer = fit_trainer(root, pruning, checkpoint)
    trainer.fit(model, train, val)
    assert pruning.result is not None
    x = torch.cat([batch[0] for batch in val])
    return SimpleNamespace(
        root=root,
        trainer=trainer,
        model=model,
        pruning=pruning,
        checkpoint=checkpoint,
        val=val,
        x=x,
        expected=outputs(model, x),
        path=pruning.pruned_checkpoint_path,
    )


def test_fit_writes_a_pruned_checkpoint_with_a_plain_plan(pruned):
    assert pruned.path == str(pruned.root / "csv" / "version_0" / "pruned.ckpt")  # under trainer.log_dir
    checkpoint = torch.load(pruned.path, weights_only=True)
    assert checkpoint["actprune_plan"] == pruned.pruning.result.plan.to_dict()
    assert_plain(checkpoint["actprune_plan"])
    assert pruning_plan_of(pruned.model) == pruned.pruning.result.plan
    for name, tensor in pruned.model.state_dict().items():
        assert torch.equal(checkpoint["state_dict"][name], tensor), name
    # the unpruned parameters' optimizer state is not worth keeping
    assert "optimizer_states" not in checkpoint
    full = EvalClassifier(MLPModule())
    assert checkpoint["state_dict"]["net.net.0.weight"].shape[0] < full.net.net[0].weight.shape[0]


@pytest.mark.parametrize("module_class", [MixinClassifier, HelperClassifier])
def test_load_from_checkpoint_when_the_module_opts_in(pruned, module_class):
    model = module_class.load_from_checkpoint(pruned.path, net=MLPModule(), weights_only=True)
    assert torch.equal(outputs(model, pruned.x), pruned.expected)
    assert pruning_plan_of(model) == pruned.pruning.result.plan


def test_load_from_checkpoint_without_opting_in_fails_on_shapes(pruned):
    # what every structural-pruning user hits without the mixin; the README says to add it
    with pytest.raises(RuntimeError, match="size mismatch"):
        EvalClassifier.load_from_checkpoint(pruned.path, net=MLPModule(), weights_only=True)


@pytest.mark.parametrize(
    ("module_class", "callbacks"),
    [(EvalClassifier, "callback"), (MixinClassifier, "none")],
    ids=["callback-on-trainer", "mixin-only"],
)
def test_trainer_evaluates_a_fresh_model_from_the_pruned_checkpoint(tmp_path, pruned, module_class, callbacks):
    extra = [ActivationPruning(threshold=0.2)] if callbacks == "callback" else []
    trainer = evaluation_trainer(tmp_path, *extra)
    expected_test = trainer.test(pruned.model, pruned.val, verbose=False)[0]["test_loss"]
    expected_val = trainer.validate(pruned.model, pruned.val, verbose=False)[0]["val_loss"]

    fresh = module_class(MLPModule())
    assert trainer.test(fresh, pruned.val, ckpt_path=pruned.path, verbose=False)[0]["test_loss"] == expected_test
    assert torch.equal(outputs(fresh, pruned.x), pruned.expected)

    fresh = module_class(MLPModule())
    assert trainer.validate(fresh, pruned.val, ckpt_path=pruned.path, verbose=False)[0]["val_loss"] == expected_val
    assert torch.equal(outputs(fresh, pruned.x), pruned.expected)

    fresh = module_class(MLPModule())
    predictions = trainer.predict(fresh, pruned.val, ckpt_path=pruned.path)
    assert torch.equal(torch.cat(predictions), pruned.expected)


def test_load_pruned_plain_pytorch_from_the_lightning_checkpoint(pruned):
    model = load_pruned(EvalClassifier(MLPModule()), pruned.path)
    assert torch.equal(outputs(model, pruned.x), pruned.expected)
    # only the network, without Lightning
    net = load_pruned(MLPModule(), pruned.path, submodule="net")
    assert torch.equal(outputs(net, pruned.x), pruned.expected)
    assert pruning_plan_of(net).operations[0].module == "net.0"


def test_export_pruned_round_trip(tmp_path, pruned):
    export_pruned(pruned.model, tmp_path / "model.pt")
    saved = torch.load(tmp_path / "model.pt", weights_only=True)
    assert set(saved) == {"state_dict", "actprune_plan"}
    assert_plain(saved["actprune_plan"])
    assert torch.equal(
        outputs(load_pruned(EvalClassifier(MLPModule()), tmp_path / "model.pt"), pruned.x), pruned.expected
    )

    export_pruned(pruned.model, tmp_path / "net.pt", submodule="net")
    net = load_pruned(MLPModule(), tmp_path / "net.pt")
    assert torch.equal(outputs(net, pruned.x), pruned.expected)


def small_plan(model: nn.Module, shape: tuple[int, ...]) -> PruningPlan:
    """A real plan from statistics on random data: mean_abs < 0.1, or else every layer down to 2 neurons."""
    with ActivationRecorder(model) as recorder, torch.no_grad():
        for seed in range(3):
            model(torch.randn(16, *shape, generator=torch.Generator().manual_seed(seed)))
    layers = find_prunable_layers(model, recorder.example_inputs)
    plan = plan_pruning(layers, recorder.moments(), threshold=0.1, statistic="mean_abs", min_neurons=2)
    return plan if plan.operations else plan_pruning(layers, recorder.moments(), threshold=1e9, min_neurons=2)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_export_and_load_pruned_for_every_architecture(tmp_path, architecture):
    torch.manual_seed(0)
    model = ARCHITECTURES[architecture]().eval()
    shape = input_shape(model)
    plan = small_plan(model, shape)
    assert plan.operations
    apply_plan(model, plan)
    export_pruned(model, tmp_path / "model.pt", plan=plan)
    fresh = load_pruned(ARCHITECTURES[architecture](), tmp_path / "model.pt")
    x = torch.randn(5, *shape)
    assert torch.equal(outputs(fresh, x), outputs(model, x))
    assert pruning_plan_of(fresh) == plan


def test_model_checkpoint_files_stay_valid_and_best_on_the_pruned_model_names_the_file(tmp_path, pruned):
    best = pruned.checkpoint.best_model_path
    saved = torch.load(best, weights_only=True)
    assert "actprune_plan" not in saved  # written during fit: the unpruned model
    full = EvalClassifier(MLPModule())
    full.load_state_dict(saved["state_dict"])  # loads into a fresh full-size model as always

    with pytest.raises(ActivationPruningError, match=r"holds the unpruned EvalClassifier .*pruned\.ckpt"):
        pruned.trainer.test(ckpt_path="best", dataloaders=pruned.val, verbose=False)
    assert torch.equal(outputs(pruned.model, pruned.x), pruned.expected)  # unchanged
    # the file the error names works, on the same Trainer
    pruned.trainer.test(pruned.model, pruned.val, ckpt_path=pruned.path, verbose=False)
    assert torch.equal(outputs(pruned.model, pruned.x), pruned.expected)

    # without the callback on the Trainer, the mixin gives the same error
    model = MixinClassifier.load_from_checkpoint(pruned.path, net=MLPModule(), weights_only=True)
    with pytest.raises(ActivationPruningError, match=r"holds the unpruned MixinClassifier"):
        evaluation_trainer(tmp_path).test(model, pruned.val, ckpt_path=best, verbose=False)


def test_loading_into_a_model_pruned_differently_is_a_clear_error(tmp_path, pruned):
    other = EvalClassifier(MLPModule())
    other_plan = PruningPlan(
        0.5, "mean", (), (ModulePruning("net.net.0", "out", (0,)), ModulePruning("net.net.2", "in", (0,)))
    )
    apply_plan(other, other_plan)
    with pytest.raises(ActivationPruningError, match="Was the model already pruned, or built with other arguments"):
        load_pruned(other, pruned.path)
    assert other.net.net[0].weight.shape[0] == 15  # unchanged

    export_pruned(other, tmp_path / "other.pt", plan=other_plan)
    model = load_pruned(EvalClassifier(MLPModule()), tmp_path / "other.pt")
    with pytest.raises(ActivationPruningError, match="it was already pruned differently"):
        load_pruned(model, pruned.path)
    with pytest.raises(ActivationPruningError, match="it was already pruned differently"):
        evaluation_trainer(tmp_path, ActivationPruning(threshold=0.2)).test(
            model, pruned.val, ckpt_path=pruned.path, verbose=False
        )
    assert model.net.net[0].weight.shape[0] == 15

    # a model built with other sizes
    wide_net = MLPModule()
    wide_net.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 12), nn.GELU(), nn.Linear(12, 3))
    wide = EvalClassifier(wide_net)
    with pytest.raises(ActivationPruningError, match="Was the model already pruned, or built with other arguments"):
        load_pruned(wide, pruned.path)
    assert wide.net.net[0].weight.shape[0] == 32
    narrow_net = MLPModule()
    narrow_net.net = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 12), nn.GELU(), nn.Linear(12, 3))
    narrow = EvalClassifier(narrow_net)
    with pytest.raises(
        ActivationPruningError, match=r"cannot shrink EvalClassifier to the pruning plan in .*pruned\.ckpt"
    ):
        load_pruned(narrow, pruned.path)
    assert narrow.net.net[0].weight.shape[0] == 4


def test_bad_files_are_named(tmp_path, pruned):
    torch.save({"weights": [1, 2]}, tmp_path / "bad.pt")
    with pytest.raises(ActivationPruningError, match=r"bad\.pt' holds no `state_dict`; found \['weights'\]"):
        load_pruned(MLPModule(), tmp_path / "bad.pt")
    with pytest.raises(ActivationPruningError, match="`submodule` 'head' matches no weight"):
        load_pruned(MLPModule(), pruned.path, submodule="head")
    with pytest.raises(ActivationPruningError, match="`submodule` must name a submodule of EvalClassifier; got 'head'"):
        export_pruned(pruned.model, tmp_path / "x.pt", submodule="head")
    checkpoint = torch.load(pruned.path, weights_only=True)
    checkpoint["actprune_plan"] = {"threshold": 0.1}
    torch.save(checkpoint, tmp_path / "malformed.ckpt")
    with pytest.raises(ActivationPruningError, match="has a malformed `actprune_plan`"):
        load_pruned(EvalClassifier(MLPModule()), tmp_path / "malformed.ckpt")


def test_resume_fit_from_a_checkpoint_taken_before_pruning(tmp_path, pruned):
    last = pruned.checkpoint.last_model_path
    saved = torch.load(last, weights_only=True)
    assert saved["callbacks"][pruned.pruning.state_key]["plan"] is None
    pruning = ActivationPruning(threshold=0.2, pruned_checkpoint=None)  # None: no pruned checkpoint
    trainer = fit_trainer(tmp_path, pruning, max_epochs=3, enable_checkpointing=False)
    model = EvalClassifier(MLPModule())
    train, val = loaders((8,))
    trainer.fit(model, train, val, ckpt_path=last)
    assert trainer.current_epoch == 3
    assert pruning.result is not None
    assert pruning_plan_of(model) == pruning.result.plan
    assert pruning.pruned_checkpoint_path is None
    assert not list(tmp_path.rglob("*.ckpt"))


def test_fit_from_the_pruned_checkpoint_explains_how_to_fine_tune(tmp_path, pruned):
    trainer = fit_trainer(tmp_path, ActivationPruning(threshold=0.2), enable_checkpointing=False)
    train, val = loaders((8,))
    with pytest.raises(ActivationPruningError, match="holds a pruned model without optimizer state"):
        trainer.fit(EvalClassifier(MLPModule()), train, val, ckpt_path=pruned.path)
    assert trainer.global_step == 0


def test_fine_tuning_and_pruning_again_keeps_checkpoints_loadable_into_full_size_models(tmp_path, pruned):
    model = MixinClassifier.load_from_checkpoint(pruned.path, net=MLPModule(), weights_only=True)
    first = pruning_plan_of(model)
    target = tmp_path / "out" / "second.ckpt"  # an absolute path is used as it is
    pruning = ActivationPruning(threshold=1e9, min_neurons=2, pruned_checkpoint=str(target))  # 2 neurons stay
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = fit_trainer(tmp_path, pruning, checkpoint, max_epochs=1)
    train, val = loaders((8,))
    trainer.fit(model, train, val)
    assert model.net.net[0].weight.shape[0] == 2
    # the checkpoint written while fine-tuning holds the first pruning, and restores into a fresh model
    during = torch.load(checkpoint.last_model_path, weights_only=True)
    assert during["actprune_plan"] == first.to_dict()
    fresh = EvalClassifier(MLPModule())
    evaluation_trainer(tmp_path, ActivationPruning(threshold=0.2)).validate(
        fresh, val, ckpt_path=checkpoint.last_model_path, verbose=False
    )
    assert fresh.net.net[0].weight.shape == during["state_dict"]["net.net.0.weight"].shape
    # and fit resumes from it, optimizer state included, into a fresh full-size model
    resumed = EvalClassifier(MLPModule())
    keep_all = ActivationPruning(threshold=0.0, statistic="mean_abs", pruned_checkpoint=None)  # removes nothing
    fit_trainer(tmp_path, keep_all, max_epochs=2).fit(resumed, train, val, ckpt_path=checkpoint.last_model_path)
    assert resumed.net.net[0].weight.shape == during["state_dict"]["net.net.0.weight"].shape
    # the second pruned checkpoint holds both prunings, from the full-size model
    assert pruning.pruned_checkpoint_path == str(target)
    reloaded = load_pruned(EvalClassifier(MLPModule()), target)
    assert torch.equal(outputs(reloaded, pruned.x), outputs(model, pruned.x))
    assert [len(layer.kept) for layer in pruning_plan_of(model).layers] == [2, 2]
    assert [layer.neurons for layer in pruning_plan_of(model).layers] == [16, 12]


def test_compensated_plan_round_trips_with_the_biases_it_creates(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 12, bias=False), nn.ReLU(), nn.Linear(12, 3))
    model.eval()
    x = torch.randn(32, 8)
    with ActivationRecorder(model) as recorder, torch.no_grad():
        model(x)
    layers = find_prunable_layers(model, recorder.example_inputs)
    plan = plan_pruning(layers, recorder.moments(), threshold=0.2, model=model, compensate=True)
    assert any(update.module == "2" for update in plan.bias_updates)
    apply_plan(model, plan)
    assert model[2].bias is not None
    # the created bias is the compensation alone (the consumer had none), at the neurons layer "2" keeps
    (update,) = [update for update in plan.bias_updates if update.module == "2"]
    kept = next((list(layer.kept) for layer in plan.layers if layer.name == "2"), list(range(12)))
    torch.testing.assert_close(model[2].bias.detach(), torch.tensor(update.delta, dtype=torch.float32)[kept])
    export_pruned(model, tmp_path / "model.pt", plan=plan)
    fresh = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 12, bias=False), nn.ReLU(), nn.Linear(12, 3))
    load_pruned(fresh, tmp_path / "model.pt")  # strict: the created bias is expected
    assert torch.equal(outputs(fresh, x), outputs(model, x))


def test_composed_plan_equals_pruning_twice():
    torch.manual_seed(0)
    original = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 2))
    twice, once = copy.deepcopy(original), copy.deepcopy(original)
    first = PruningPlan(0.1, "mean", (), (ModulePruning("0", "out", (1, 4)), ModulePruning("2", "in", (1, 4))))
    then = PruningPlan(0.2, "mean", (), (ModulePruning("0", "out", (0, 2)), ModulePruning("2", "in", (0, 2))))
    apply_plan(twice, first)
    apply_plan(twice, then)
    composed = _compose(first, then)
    assert composed.operations[0] == ModulePruning("0", "out", (0, 1, 3, 4))
    apply_plan(once, composed)
    for name, tensor in twice.state_dict().items():
        assert torch.equal(tensor, once.state_dict()[name]), name

    # bias updates (compensation) are added to the full-size biases: the second one lands on the outputs kept
    twice, once = copy.deepcopy(original), copy.deepcopy(original)
    first = PruningPlan(0.1, "mean", (), first.operations, (BiasUpdate("2", (1.0, 2.0)),))
    then = PruningPlan(0.2, "mean", (), (ModulePruning("2", "out", (0,)),), (BiasUpdate("0", (1.0, 2.0, 3.0, 4.0)),))
    apply_plan(twice, first)
    apply_plan(twice, then)
    composed = _compose(first, then)
    assert set(composed.bias_updates) == {BiasUpdate("2", (1.0, 2.0)), BiasUpdate("0", (1.0, 0.0, 2.0, 3.0, 0.0, 4.0))}
    apply_plan(once, composed)
    for name, tensor in twice.state_dict().items():
        torch.testing.assert_close(tensor, once.state_dict()[name], msg=name)


def test_callback_state_round_trips_as_plain_values_and_old_states_load(tmp_path, pruned):
    state = pruned.pruning.state_dict()
    assert_plain(state, "state_dict")
    assert {"threshold", "statistic", "min_neurons", "plan", "pruned_checkpoint", "on_error"} <= set(state)
    restored = ActivationPruning(threshold=0.2)
    restored.load_state_dict(copy.deepcopy(state))
    assert restored.result == pruned.pruning.result
    assert restored.pruned_checkpoint_path == pruned.path

    # the state_dict of the first version: four keys, no result numbers
    old = {"threshold": 0.3, "statistic": "mean", "min_neurons": 1, "plan": pruned.pruning.result.plan.to_dict()}
    callback = ActivationPruning(threshold=0.2)
    callback.load_state_dict(old)
    assert callback.threshold == 0.2  # the constructor's settings stay
    assert callback.result is None
    callback.load_state_dict({"threshold": 0.2, "statistic": "mean", "min_neurons": 1, "plan": None})

    # a full checkpoint saved after pruning carries the plan and the callback's result
    path = tmp_path / "after.ckpt"
    pruned.trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)
    assert saved["actprune_plan"] == pruned.pruning.result.plan.to_dict()
    assert "optimizer_states" not in saved  # they belong to the unpruned parameters
    callback = ActivationPruning(threshold=0.2)
    fresh = EvalClassifier(MLPModule())
    evaluation_trainer(tmp_path, callback).test(fresh, pruned.val, ckpt_path=path, verbose=False)
    assert callback.result == pruned.pruning.result
    assert torch.equal(outputs(fresh, pruned.x), pruned.expected)


@pytest.mark.parametrize("value", ["", 3, True])
def test_bad_pruned_checkpoint_is_named(value):
    with pytest.raises(
        ActivationPruningError, match=rf"`pruned_checkpoint` must be a file path or None; got {value!r}"
    ):
        ActivationPruning(threshold=0.1, pruned_checkpoint=value)


def test_ddp_spawn_is_refused_at_setup_before_training(make_trainer):
    trainer = make_trainer(strategy="ddp_spawn", devices=2, logger=False, max_epochs=1)
    model = EvalClassifier(MLPModule())
    train, val = loaders((8,))
    # what `trainer.fit` does before it spawns the workers, where setup would run
    trainer._data_connector.attach_data(model, train_dataloaders=train, val_dataloaders=val)
    callback = ActivationPruning(threshold=0.1)
    with pytest.raises(ActivationPruningError, match=r"does not support `strategy=DDPStrategy` with spawned processes"):
        callback.setup(trainer, model, "fit")
    callback.teardown(trainer, model, "fit")
    assert trainer.global_step == 0


def test_load_pruned_that_fails_after_shrinking_leaves_the_module_as_it_came(tmp_path, pruned):
    from lightning_actprune import export_pruned, pruning_plan_of

    export_pruned(pruned.model, tmp_path / "model.pt")

    class WithExtraBuffer(EvalClassifier):
        def __init__(self):
            super().__init__(MLPModule())
            self.register_buffer("extra", torch.zeros(1))  # the file lacks it: the strict load fails

    fresh = WithExtraBuffer()
    weights = [p for p in fresh.parameters()]
    with pytest.raises(RuntimeError, match="extra"):
        load_pruned(fresh, tmp_path / "model.pt")
    assert [p for p in fresh.parameters()] == weights
    assert fresh.net.net[0].out_features == 16
    assert pruning_plan_of(fresh) is None


def test_load_pruned_into_a_model_without_the_planned_layers_names_them(tmp_path, pruned):
    from lightning_actprune import export_pruned

    export_pruned(pruned.model, tmp_path / "model.pt")
    with pytest.raises(ActivationPruningError, match=r"the plan prunes 'net.net.0', which Sequential does not have"):
        load_pruned(nn.Sequential(nn.Linear(8, 3)), tmp_path / "model.pt")


def test_two_instances_with_different_layers_keep_their_own_state(tmp_path):
    pl.seed_everything(0)
    train, val = loaders((8,))

    def both() -> tuple[ActivationPruning, ActivationPruning]:
        first = ActivationPruning(threshold=0.2, layers=["net.net.0"], pruned_checkpoint=None)
        second = ActivationPruning(threshold=1e9, layers=["net.net.2"], min_neurons=3, pruned_checkpoint=None)
        return first, second

    first, second = both()
    trainer = fit_trainer(tmp_path, first, second, enable_checkpointing=False)
    trainer.fit(EvalClassifier(MLPModule()), train, val)
    assert [layer.name for layer in first.result.plan.layers] == ["net.net.0"]
    assert [(layer.name, len(layer.kept)) for layer in second.result.plan.layers] == [("net.net.2", 3)]
    path = tmp_path / "both.ckpt"
    trainer.save_checkpoint(path)
    states = torch.load(path, weights_only=True)["callbacks"]
    assert first.state_key != second.state_key
    assert {first.state_key, second.state_key} <= set(states)
    assert states[first.state_key]["plan"] == first.result.plan.to_dict()
    assert states[second.state_key]["plan"] == second.result.plan.to_dict()

    # a new Trainer with the same two callbacks gives each its own result back
    restored = both()
    evaluation_trainer(tmp_path, *restored).validate(EvalClassifier(MLPModule()), val, ckpt_path=path, verbose=False)
    assert restored[0].result == first.result
    assert restored[1].result == second.result

    # 0.1.0 saved the state under the class name: the instance it belongs to still finds it
    old = torch.load(path, weights_only=True)
    old["callbacks"] = {"ActivationPruning": old["callbacks"][second.state_key]}
    torch.save(old, tmp_path / "old.ckpt")
    restored = both()
    evaluation_trainer(tmp_path, *restored).validate(
        EvalClassifier(MLPModule()), val, ckpt_path=tmp_path / "old.ckpt", verbose=False
    )
    assert restored[0].result is None  # written by the instance with the other layers
    assert restored[1].result == second.result
    alone = ActivationPruning(threshold=0.3)  # the only instance: the old state is its, whatever its settings
    evaluation_trainer(tmp_path, alone).validate(
        EvalClassifier(MLPModule()), val, ckpt_path=tmp_path / "old.ckpt", verbose=False
    )
    assert alone.result == second.result
