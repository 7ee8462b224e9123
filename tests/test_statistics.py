import numpy as np
import pytest
import torch
from torch import nn

from lightning_actprune import STATISTICS, ActivationStatistics
from lightning_actprune._statistics import pool_moments, select_moments
from lightning_actprune.core import ActivationMoments, ActivationRecorder, neuron_statistic


def numpy_statistic(values: np.ndarray, statistic: str) -> np.ndarray:
    """Reference: ``values`` is (samples, neurons)."""
    return {
        "mean": lambda v: v.mean(0),
        "mean_abs": lambda v: np.abs(v).mean(0),
        "rms": lambda v: np.sqrt((v**2).mean(0)),
        "nonzero_fraction": lambda v: (v != 0).mean(0),
        "std": lambda v: v.std(0),
        "fluctuation": lambda v: v.var(0),  # before the consumer's weight norms, see test_plan_and_surgery
    }[statistic](values)


@pytest.mark.parametrize("statistic", STATISTICS)
@pytest.mark.parametrize(
    ("shape", "channel_dim"),
    [((7, 5), -1), ((3, 4, 5), -1), ((6, 5, 3, 2), 1), ((2, 5, 4), 1)],
    ids=["linear", "tokens", "conv2d", "conv1d"],
)
def test_metric_matches_numpy_over_batches(statistic, shape, channel_dim):
    g = torch.Generator().manual_seed(0)
    batches = [torch.relu(torch.randn(*shape, generator=g)) - 0.1 for _ in range(4)]
    metric = ActivationStatistics(num_neurons=5, channel_dim=channel_dim)
    for batch in batches:
        metric.update(batch)
    values = np.concatenate([b.movedim(channel_dim, -1).reshape(-1, 5).double().numpy() for b in batches])
    expected = numpy_statistic(values, statistic)
    torch.testing.assert_close(neuron_statistic(metric.compute(), statistic), torch.from_numpy(expected))
    assert metric.compute().num_values.item() == values.shape[0]


def test_states_are_float64_and_o_of_neurons_even_for_half_inputs():
    metric = ActivationStatistics(num_neurons=3)
    for _ in range(50):
        metric.update(torch.ones(10, 3, dtype=torch.bfloat16))
    assert all(state.dtype == torch.float64 and state.numel() <= 3 for state in metric.metric_state.values())
    assert {name: tuple(state.shape) for name, state in metric.metric_state.items()} == {
        "total": (3,),
        "total_squares": (3,),
        "total_abs": (3,),
        "nonzero": (3,),
        "count": (),
    }
    torch.testing.assert_close(metric.compute().mean, torch.ones(3, dtype=torch.float64))


def test_states_merge_across_processes_by_sum():
    # `merge_state` reduces with each state's `dist_reduce_fx`, as the sync across DDP ranks does: two "ranks" that
    # saw two halves of the data (of different sizes) hold together exactly the statistics of one that saw it all
    g = torch.Generator().manual_seed(0)
    halves = [torch.relu(torch.randn(n, 2, generator=g)) - 0.1 for n in (5, 3)]
    rank_zero, rank_one, whole = (ActivationStatistics(num_neurons=2) for _ in range(3))
    rank_zero.update(halves[0])
    rank_one.update(halves[1])
    whole.update(torch.cat(halves))
    assert set(rank_zero.metric_state) == {"total", "total_squares", "total_abs", "nonzero", "count"}
    rank_zero.merge_state(rank_one)
    for name, state in whole.metric_state.items():
        torch.testing.assert_close(rank_zero.metric_state[name], state, msg=name)
    merged, expected = rank_zero.compute(), whole.compute()
    assert merged.num_values.item() == 8
    for statistic in STATISTICS:
        torch.testing.assert_close(neuron_statistic(merged, statistic), neuron_statistic(expected, statistic))


def test_units_on_known_activations():
    # one neuron that is 0 half the time and 4 the other half: mean 2, mean_abs 2, rms 2*sqrt(2), std 2, nonzero 0.5
    metric = ActivationStatistics(num_neurons=1)
    metric.update(torch.tensor([[0.0], [4.0], [0.0], [4.0]]))
    moments = metric.compute()
    expected = {"mean": 2.0, "mean_abs": 2.0, "rms": 8**0.5, "std": 2.0, "nonzero_fraction": 0.5}
    for statistic, value in expected.items():
        assert neuron_statistic(moments, statistic).item() == pytest.approx(value)


def test_pool_moments_averages_positions_of_a_channel():
    # 2 channels flattened with 3 positions each: features 0-2 are channel 0, 3-5 are channel 1
    x = torch.arange(24, dtype=torch.float64).reshape(4, 6)
    metric = ActivationStatistics(num_neurons=6)
    metric.update(x)
    pooled = pool_moments(metric.compute(), torch.tensor([0, 0, 0, 1, 1, 1]), 2)
    reference = x.reshape(4, 2, 3).transpose(1, 2).reshape(-1, 2)  # (samples*positions, channels)
    torch.testing.assert_close(pooled.mean, reference.mean(0))
    torch.testing.assert_close(neuron_statistic(pooled, "std"), reference.std(0, unbiased=False))
    assert pooled.num_values.tolist() == [12.0, 12.0]


def test_recorder_measures_consumer_inputs_and_captures_examples():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(10, 3)
    with ActivationRecorder(model) as recorder, torch.no_grad():
        model(x)
        model(x)
    hidden = torch.relu(model[0](x)).detach()
    torch.testing.assert_close(recorder.moments()["2"].mean, hidden.double().mean(0))
    assert recorder.moments()["2"].num_values.item() == 20
    args, kwargs = recorder.example_inputs[""]
    assert args[0] is not x
    assert torch.equal(args[0], x)
    assert kwargs == {}
    # hooks are gone after the block
    with torch.no_grad():
        model(x)
    assert recorder.moments()["2"].num_values.item() == 20


def test_recorder_rejects_nan_activations():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2))
    with ActivationRecorder(model) as recorder, torch.no_grad():
        model(torch.tensor([[float("nan"), 1.0]]))
    with pytest.raises(ValueError, match=r"NaN or Inf at the input of 1, 2"):
        recorder.check_finite()


def test_recorder_does_not_measure_the_models_own_inputs():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(5, 3)
    with ActivationRecorder(model) as recorder, torch.no_grad():
        model(x)
        model[0](x)  # the same tensor, now reaching the layer outside a call of the model: it is measured
    assert set(recorder.metrics) == {"0", "2"}
    assert recorder.moments()["0"].num_values.item() == 5
    assert recorder.moments()["2"].num_values.item() == 5


def test_neuron_statistic_rejects_unknown_name():
    moments = ActivationMoments(*(torch.zeros(1) for _ in range(5)))
    with pytest.raises(ValueError, match=r"`statistic` can be one of mean, .*; got 'median'"):
        neuron_statistic(moments, "median")


def test_pooling_and_selecting_only_the_needed_moments_keeps_their_values_and_makes_the_others_nan():
    g = torch.Generator().manual_seed(0)
    metric = ActivationStatistics(num_neurons=6)
    metric.update(torch.relu(torch.randn(10, 6, generator=g)) - 0.1)
    moments = metric.compute()
    index, neurons = torch.tensor([4, 0, 5, 1]), torch.tensor([0, 0, 1, 1])
    every = pool_moments(select_moments(moments, index), neurons, 2)
    needed = ("mean", "mean_square")
    some = pool_moments(select_moments(moments, index, needed), neurons, 2, needed)
    for name in needed:
        torch.testing.assert_close(getattr(some, name), getattr(every, name))
        # the reference: the two features of each neuron averaged by hand
        expected = getattr(moments, name)[index].reshape(2, 2).mean(1)
        torch.testing.assert_close(getattr(some, name), expected)
    assert torch.isnan(some.mean_abs).all()
    assert torch.isnan(some.nonzero_fraction).all()
    assert some.mean_abs.shape == (2,)
    torch.testing.assert_close(some.num_values, every.num_values)
    torch.testing.assert_close(neuron_statistic(some, "fluctuation"), neuron_statistic(every, "fluctuation"))
