"""Your own criterion: a NeuronScorer plugs into the plain functions and the callback; the built-ins are scorers too."""

import pytest
import torch
from torch import nn

from lightning_actprune import ActivationPruning, ActivationPruningError, NeuronScorer
from lightning_actprune._scoring import SCORERS
from lightning_actprune.core import (
    STATISTICS,
    ActivationRecorder,
    find_prunable_layers,
    layer_scores,
    neuron_statistic,
    plan_pruning,
)
from tests.helpers import Classifier, KeepUnpruned, MLPModule, loaders, quiet_trainer
from tests.scorers import OutputWeightNorm, Signed, WrongShape


def expected_kept(weight: torch.Tensor, threshold: float, p: float = 2.0, min_neurons: int = 1) -> tuple[int, ...]:
    """The oracle: the rows whose norm reaches λ, or the ``min_neurons`` largest when too few do."""
    norms = [float(row.detach().abs().pow(p).sum() ** (1 / p)) for row in weight]
    kept = [i for i, norm in enumerate(norms) if norm >= threshold]
    if len(kept) < min_neurons:
        kept = sorted(sorted(range(len(norms)), key=lambda i: -norms[i])[:min_neurons])
    return tuple(kept)


def recorded(model: nn.Module, x: torch.Tensor):
    with ActivationRecorder(model) as recorder, torch.no_grad():
        model(x)
    return find_prunable_layers(model, recorder.example_inputs), recorder.moments()


def test_builtin_statistics_are_scorers_with_the_same_scores():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.GELU(), nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    layers, moments = recorded(model, torch.randn(64, 6))
    assert set(SCORERS) == set(STATISTICS)
    for name in STATISTICS:
        scorer = SCORERS[name]
        assert isinstance(scorer, NeuronScorer)
        assert scorer.name == name
        assert scorer.signed == (name == "mean")
        for layer in layers:
            by_name = layer_scores(layer, moments, name, model)
            torch.testing.assert_close(layer_scores(layer, moments, scorer, model), by_name)
            if name != "fluctuation":  # one consumer, no pooling: the statistic of the consumer's inputs
                (consumer,) = layer.consumers
                expected = neuron_statistic(moments[consumer.module], name)[list(consumer.indices)]
                torch.testing.assert_close(by_name, expected.to(torch.float64))


def test_own_scorer_plans_what_a_hand_computation_predicts():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 12), nn.ReLU(), nn.Linear(12, 9), nn.ReLU(), nn.Linear(9, 3)).eval()
    layers, moments = recorded(model, torch.randn(32, 5))
    scorer = OutputWeightNorm(p=1.0)
    norms = model[0].weight.detach().abs().sum(1).sort().values
    threshold = float(norms[5] + norms[6]) / 2  # between two norms: half of layer 0 goes
    plan = plan_pruning(layers, moments, threshold=threshold, statistic=scorer, model=model, min_neurons=2)
    kept = {layer.name: layer.kept for layer in plan.layers}
    assert kept["0"] == expected_kept(model[0].weight, threshold, p=1.0, min_neurons=2)
    assert kept["2"] == expected_kept(model[2].weight, threshold, p=1.0, min_neurons=2)
    assert 2 <= len(kept["0"]) < 12
    assert plan.statistic == "tests.scorers.OutputWeightNorm"
    assert not plan.normalize
    # standardised on request only
    normalized = plan_pruning(layers, moments, threshold=0.0, statistic=scorer, model=model, normalize=True)
    scores = model[0].weight.detach().abs().sum(1).double()
    standardised = (scores - scores.mean()) / scores.std(unbiased=False)
    assert normalized.layers[0].kept == tuple(int(i) for i in torch.nonzero(standardised >= 0).flatten())


def test_own_scorer_errors_name_the_statistic():
    model = nn.Sequential(nn.Linear(5, 12), nn.ReLU(), nn.Linear(12, 3)).eval()
    layers, moments = recorded(model, torch.randn(8, 5))
    with pytest.raises(ActivationPruningError, match=r"`statistic='tests.scorers.OutputWeightNorm'` needs the model"):
        layer_scores(layers[0], moments, OutputWeightNorm())
    with pytest.raises(
        ActivationPruningError,
        match=r"`statistic='tests.scorers.WrongShape'` must return one score per neuron, a tensor of shape \(12,\)"
        r" for 0; got \(12, 5\)",
    ):
        plan_pruning(layers, moments, threshold=0.1, statistic=WrongShape(), model=model)
    with pytest.raises(ActivationPruningError, match=r"`statistic` can be one of mean, .*; got 'median'"):
        layer_scores(layers[0], moments, "median", model)


def test_callback_prunes_by_own_scorer(tmp_path):
    torch.manual_seed(0)
    keep = KeepUnpruned()
    pruning = ActivationPruning(threshold=0.6, statistic=OutputWeightNorm(), pruned_checkpoint=None)
    assert pruning.statistic.p == 2.0
    assert pruning.effective_statistic == "tests.scorers.OutputWeightNorm"
    trainer = quiet_trainer(tmp_path, keep, pruning, max_epochs=1, logger=False, enable_checkpointing=False)
    train, val = loaders((8,))
    trainer.fit(Classifier(MLPModule()), train, val)
    kept = {layer.name: layer.kept for layer in pruning.result.plan.layers}
    assert kept == {
        "net.net.0": expected_kept(keep.state["net.net.0.weight"], 0.6),
        "net.net.2": expected_kept(keep.state["net.net.2.weight"], 0.6),
    }
    assert all(1 < len(layer.kept) < layer.neurons for layer in pruning.result.plan.layers)  # λ splits each layer
    assert "(weight norm)" in pruning.result.summary()
    assert pruning.state_dict()["statistic"] == "tests.scorers.OutputWeightNorm"  # plain data


def test_signed_scorer_allows_a_negative_threshold():
    assert ActivationPruning(threshold=-0.5, statistic=Signed()).threshold == -0.5
    with pytest.raises(
        ActivationPruningError,
        match=r"`threshold` must be a finite number >= 0; got -0.5 "
        r"\(tests.scorers.OutputWeightNorm has `signed = False`:",
    ):
        ActivationPruning(threshold=-0.5, statistic=OutputWeightNorm())
    assert ActivationPruning(threshold=-0.5, statistic=OutputWeightNorm(), normalize=True).threshold == -0.5
