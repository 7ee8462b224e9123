"""Criteria a user might plug in: importable by class path, as a LightningCLI YAML file names them."""

from torch import Tensor

from lightning_actprune import NeuronScorer


class OutputWeightNorm(NeuronScorer):
    """The Lp norm of the weight row (and bias) that produces each neuron: a magnitude criterion, no activations."""

    unit = "weight norm"

    def __init__(self, p: float = 2.0) -> None:
        self.p = p

    def __call__(self, layer, moments, model) -> Tensor:
        (producer,) = layer.producers
        module = model.get_submodule(producer)
        return module.weight.detach().flatten(1).norm(p=self.p, dim=1)


class Signed(OutputWeightNorm):
    """The producer's bias: scores of either sign."""

    signed = True

    def __call__(self, layer, moments, model) -> Tensor:
        (producer,) = layer.producers
        return model.get_submodule(producer).bias.detach()


class NoCall(NeuronScorer):
    """Forgot `__call__`."""


class WrongShape(NeuronScorer):
    def __call__(self, layer, moments, model) -> Tensor:
        return model.get_submodule(layer.producers[0]).weight.detach()
