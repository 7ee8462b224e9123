"""The default criterion: each layer's fluctuation over its mean; BatchNorm-normalised channels by RMS (pooled)."""

import copy
import dataclasses

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_actprune import ActivationPruning, PruningPlan, PruningResult
from lightning_actprune._plan import _all_scores
from lightning_actprune._scoring import DEFAULT_CRITERION
from lightning_actprune.core import (
    ActivationRecorder,
    ThresholdEvaluator,
    find_prunable_layers,
    layer_scores,
    plan_for_reduction,
    plan_pruning,
)
from tests.helpers import CNN, Classifier, make_data

BATCHNORM_LAYERS = ("features.0", "features.4")  # followed by BatchNorm; `fc` is not


def inputs_rms(model, names, x):
    """A reference: the RMS of every input channel of each module, over samples and positions, from plain hooks."""
    seen = {}
    hooks = [
        model.get_submodule(name).register_forward_pre_hook(
            lambda m, args, name=name: seen.__setitem__(name, args[0].transpose(0, 1).flatten(1).square().mean(1))
        )
        for name in names
    ]
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    return {name: value.double().sqrt() for name, value in seen.items()}


def test_batchnorm_channels_are_ranked_by_rms_over_one_mean_and_the_rest_by_fluctuation_over_their_mean():
    torch.manual_seed(0)
    model = CNN().eval()
    with torch.no_grad():  # BatchNorm layers of different learned scales: the pooled ranking must see them
        model.features[1].weight.mul_(torch.linspace(0.2, 1.0, 6))
        model.features[5].weight.mul_(3.0)
    x = torch.randn(16, 1, 8, 8)
    with ActivationRecorder(model) as recorder, torch.no_grad():
        model(x)
    layers, moments = find_prunable_layers(model, x), recorder.moments()
    assert [layer.name for layer in layers] == [*BATCHNORM_LAYERS, "fc"]
    scores = _all_scores(layers, moments, DEFAULT_CRITERION, model, normalize=True)

    rms = inputs_rms(model, ["features.4", "fc"], x)
    raw = {"features.0": rms["features.4"], "features.4": rms["fc"].view(8, 4).square().mean(1).sqrt()}
    together = torch.cat(list(raw.values()))
    for name in BATCHNORM_LAYERS:
        torch.testing.assert_close(scores[name], raw[name] / together.mean(), rtol=1e-5, atol=1e-6)
    fluctuation = layer_scores(layers[2], moments, "fluctuation", model).cpu()
    torch.testing.assert_close(scores["fc"], fluctuation / fluctuation.mean())
    assert scores["features.4"].mean() > scores["features.0"].mean()  # one scale: the larger BatchNorm weights win

    plan = plan_pruning(layers, moments, 0.0, DEFAULT_CRITERION, model=model, normalize=True)
    assert plan.statistic == "fluctuation"
    assert plan.scored_by == (("features.0", "rms"), ("features.4", "rms"))
    assert PruningPlan.from_dict(plan.to_dict()) == plan
    old = {k: v for k, v in plan.to_dict().items() if k != "scored_by"}  # a plan saved before the field existed
    assert PruningPlan.from_dict(old).scored_by == ()
    plain = plan_pruning(layers, moments, 0.0, "fluctuation", model=model, normalize=True)
    assert plain.scored_by == ()

    # the summary says which criterion scored which layers: all of them by RMS is said as such, not as an exception
    every = dataclasses.replace(plan, scored_by=tuple((layer.name, "rms") for layer in plan.layers))
    for scored, line in [
        (plan, "  scored by fluctuation, except the 2 layer(s) marked: scored by rms, on one scale together"),
        (every, "  every layer scored by rms, on one scale together (under the default criterion"),
    ]:
        summary = PruningResult(scored, 100, 90, 1.0, 0.9).summary()
        assert line in summary
        assert sum("scored by" in row for row in summary.splitlines()) == 1


@pytest.mark.parametrize(
    ("options", "pooled"),
    [
        ({"target_params_reduction": 0.3}, True),
        ({"max_metric_drop": 1.0, "monitor": "val_acc"}, True),
        ({"target_params_reduction": 0.3, "statistic": "fluctuation"}, False),  # named: as named
        ({"target_params_reduction": 0.3, "normalize": False}, False),  # raw scales would not compare
        ({"threshold": 0.1}, False),  # a λ the user writes: mean activations
    ],
)
def test_which_settings_get_the_batchnorm_rule(options, pooled):
    assert (ActivationPruning(**options).scorer is DEFAULT_CRITERION) is pooled


def test_a_fit_with_the_defaults_scores_batchnorm_layers_by_rms_and_says_so(tmp_path, caplog):
    pl.seed_everything(0)
    model = Classifier(CNN(), lr=0.05)
    pruning = ActivationPruning(target_params_reduction=0.3)
    trainer = pl.Trainer(default_root_dir=tmp_path, max_epochs=2, accelerator="cpu", callbacks=[pruning])
    data = (
        DataLoader(make_data(CNN.image), batch_size=32),
        DataLoader(make_data(CNN.image, n=50, seed=1), batch_size=25),
    )
    with caplog.at_level("INFO"):
        trainer.fit(model, *data)
    result = pruning.result
    assert result.pruned
    assert result.params_reduction >= 0.3
    assert result.plan.scored_by == (("net.features.0", "rms"), ("net.features.4", "rms"))
    summary = result.summary()
    assert "except the 2 layer(s) marked: scored by rms, on one scale together" in summary
    lines = {line.split()[0]: line for line in summary.splitlines() if line.startswith("  ") and "->" in line}
    assert lines["net.features.0"].endswith("(rms)")
    assert lines["net.features.4"].endswith("(rms)")
    assert not lines["net.fc"].endswith(")")
    assert summary in caplog.text
    # the pruned checkpoint written by default carries the plan, and with it which layers RMS scored
    saved = torch.load(pruning.pruned_checkpoint_path, weights_only=True)
    assert PruningPlan.from_dict(saved["actprune_plan"]).scored_by == result.plan.scored_by


def tiny_vit() -> torch.nn.Module:
    """timm's ViT, 2 blocks of 4 heads of 8 and an FFN of 128."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.models.vision_transformer.VisionTransformer(
        img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=3
    ).eval()


def test_heads_and_ffn_neurons_are_scored_by_their_energy_over_their_layer_mean():
    """Oracle: a head's score is Σ over its value dimensions of var × ‖proj column‖², over the mean of its layer's."""
    model = tiny_vit()
    x = torch.randn(16, 3, 16, 16)
    inputs = {}
    hooks = [
        model.get_submodule(name).register_forward_pre_hook(
            lambda m, args, name=name: inputs.__setitem__(name, args[0].flatten(0, -2).double())
        )
        for name in ("blocks.0.attn.proj", "blocks.0.mlp.fc2")
    ]
    with ActivationRecorder(model) as recorder, torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    layers = find_prunable_layers(model, x)
    scores = _all_scores(layers, recorder.moments(), DEFAULT_CRITERION, model, normalize=True)

    def energy(name: str) -> torch.Tensor:
        columns = model.get_submodule(name).weight.detach().double().square().sum(0)
        return inputs[name].var(0, unbiased=False) * columns

    heads = energy("blocks.0.attn.proj").view(4, 8).sum(1)  # head h is channels 8h … 8h+7 of proj's input
    neurons = energy("blocks.0.mlp.fc2")
    torch.testing.assert_close(scores["blocks.0.attn:heads"], heads / heads.mean(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(scores["blocks.0.mlp.fc1"], neurons / neurons.mean(), rtol=1e-4, atol=1e-6)


def test_a_head_is_not_removed_for_being_the_lowest_of_four():
    """Heads of about equal share stay beside an FFN whose neurons differ; standardised among four, one went."""
    model = tiny_vit()
    with torch.no_grad():  # FFN neurons of very different weights: some carry far less than others
        for block in model.blocks:
            block.mlp.fc2.weight.mul_(torch.logspace(-2, 0, block.mlp.fc2.in_features))
    x = torch.randn(32, 3, 16, 16)
    with ActivationRecorder(model) as recorder, torch.no_grad():
        model(x)
    layers, moments = find_prunable_layers(model, x), recorder.moments()

    def heads_kept(statistic: object) -> list[int]:
        evaluator = ThresholdEvaluator(copy.deepcopy(model), layers, moments, statistic, 1, normalize=True)
        plan = plan_for_reduction(evaluator, 0.2).plan
        return [len(layer.kept) for layer in plan.layers if layer.name.endswith(":heads")]

    assert heads_kept(DEFAULT_CRITERION) == [4, 4]
    assert min(heads_kept("fluctuation")) < 4  # standardised among four, the lowest head is far below the mean
