"""Models as people write them: recurrent layers, rich outputs, code the tracer cannot follow, transformers.

Each either prunes exactly (checked against the zeroing oracle) or skips what it cannot prune with one short
warning that names the layer and the reason; never a crash at the end of fit.
"""

import dataclasses
import importlib.metadata
import re
import warnings
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_actprune import ActivationPruning, load_pruned
from lightning_actprune.core import ActivationRecorder, apply_plan, find_prunable_layers, plan_pruning
from tests.helpers import NUM_CLASSES, Classifier, KeepUnpruned, assert_matches_oracle, loaders, zero_removed_inputs

SEQUENCE = (5, 8)  # time steps, features
TRACER_INTERNALS = re.compile(r"UnwrappedParameter|_UnbindOp|Op_\d|_ElementWiseOp|grad_fn")


@pytest.fixture
def fit(make_trainer):
    """``fit(model, shape)``: two epochs with ``ActivationPruning(target_params_reduction=0.3)``; the messages."""

    def fit(model, shape=(8,), keep=None):
        pl.seed_everything(0)
        pruning = ActivationPruning(target_params_reduction=0.3)
        keep = keep or KeepUnpruned()
        trainer = make_trainer(keep, pruning, max_epochs=2, logger=False, enable_checkpointing=False)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(model, *loaders(shape, batch_size=16))
        messages = [str(w.message) for w in caught if re.match("lightning_actprune|ActivationPruning", str(w.message))]
        return pruning, keep, messages

    return fit


def assert_readable(messages):
    """Every skip message is one short line in a user's words: module names, never the tracer's node names."""
    for message in messages:
        assert "\n" not in message
        assert len(message) < 300, message
        assert not TRACER_INTERNALS.search(message), message


class Recurrent(nn.Module):
    """Linear → ReLU → LSTM/GRU → last time step → Linear → ReLU → Linear (the prunable part)."""

    def __init__(self, rnn: type[nn.RNNBase]) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
        self.rnn = rnn(16, 12, batch_first=True)
        self.head = nn.Sequential(nn.Linear(12, 64), nn.ReLU(), nn.Linear(64, NUM_CLASSES))

    def forward(self, x: Tensor) -> Tensor:
        steps, _ = self.rnn(self.embed(x))
        return self.head(steps[:, -1])


@pytest.mark.parametrize("rnn", [nn.GRU, nn.LSTM, nn.RNN])
def test_a_linear_feeding_a_recurrent_layer_and_its_hidden_units_are_pruned(rnn, fit):
    model = Classifier(Recurrent(rnn))
    pruning, keep, messages = fit(model, SEQUENCE)
    assert [m for m in messages if "not pruning" in m] == []
    assert [layer.name for layer in pruning.result.plan.layers] == ["net.embed.0", "net.rnn", "net.head.0"]
    widths = {layer.name: len(layer.kept) for layer in pruning.result.plan.layers}
    assert model.net.embed[0].out_features == model.net.rnn.input_size == widths["net.embed.0"]
    assert model.net.rnn.hidden_size == model.net.head[0].in_features == widths["net.rnn"]
    assert pruning.result.params_reduction >= 0.3
    x = torch.randn(6, *SEQUENCE)
    assert_matches_oracle(model, keep.model, pruning.result.plan, x)


class Cache:
    """Not a tensor, not a container: what a key/value cache looks like to the tracer."""


@dataclasses.dataclass
class Output:
    logits: Tensor
    hidden: tuple[Tensor, ...]
    cache: Cache


class RichOutput(pl.LightningModule):
    """``forward`` returns a dict or a dataclass holding the logits, nested tensors and a non-tensor object."""

    def __init__(self, as_dataclass: bool) -> None:
        super().__init__()
        self.as_dataclass = as_dataclass
        self.fc1, self.fc2, self.out = nn.Linear(8, 16), nn.Linear(16, 12), nn.Linear(12, NUM_CLASSES)

    def forward(self, x: Tensor) -> Output | dict:
        hidden = F.relu(self.fc2(F.relu(self.fc1(x))))
        logits = self.out(hidden)
        if self.as_dataclass:
            return Output(logits, (logits.detach(),), Cache())
        return {"logits": logits, "extra": [(Cache(), x.shape)], "cache": Cache()}

    def logits(self, x: Tensor) -> Tensor:
        output = self(x)
        return output.logits if self.as_dataclass else output["logits"]

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return F.cross_entropy(self.logits(batch[0]), batch[1])

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.log("val_loss", F.cross_entropy(self.logits(batch[0]), batch[1]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


@pytest.mark.parametrize("as_dataclass", [False, True], ids=["dict", "dataclass"])
def test_outputs_holding_non_tensor_objects_are_pruned(as_dataclass, fit):
    model = RichOutput(as_dataclass)
    pruning, keep, _ = fit(model)
    assert {layer.name for layer in pruning.result.plan.layers} == {"fc1", "fc2"}
    assert pruning.result.params_after < pruning.result.params_before
    x = torch.randn(6, 8)
    zero_removed_inputs(keep.model, pruning.result.plan)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.logits(x), keep.model.logits(x))


class NumpyHead(nn.Module):
    """At inference, rounds its hidden activations with NumPy: fine in validation, impossible to trace with grad."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.out = nn.Linear(12, 10), nn.Linear(10, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.fc(x))
        if not self.training:
            h = torch.from_numpy(h.numpy().round(3))
        return self.out(h)


class BackboneAndHead(pl.LightningModule):
    """``validation_step`` calls the backbone and the head one after the other: two traced roots."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU())
        self.head = NumpyHead()

    def step(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        return F.cross_entropy(self.head(self.backbone(batch[0])), batch[1])

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self.step(batch)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.log("val_loss", self.step(batch))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_a_module_the_tracer_cannot_run_is_skipped_by_name_and_the_rest_is_pruned(fit):
    model = BackboneAndHead()
    pruning, keep, messages = fit(model)
    (skip,) = [m for m in messages if "tracing failed" in m]
    assert re.fullmatch(
        r"lightning_actprune: not pruning the layers inside head: tracing failed: RuntimeError: .*numpy.*", skip
    ), skip
    assert_readable(messages)
    assert [layer.name for layer in pruning.result.plan.layers] == ["backbone.0"]
    assert model.backbone[0].out_features < 16
    assert model.head.fc.out_features == 10
    x = torch.randn(6, 8)
    zero_removed_inputs(keep.model, pruning.result.plan)
    with torch.no_grad():
        torch.testing.assert_close(model.backbone(x), keep.model.backbone(x))


class Blocks(nn.Module):
    """What transformer blocks do to a Linear's neurons: normalise them, scale them by a bare parameter, split them
    into heads; each block's Linear is skipped, for its own reason."""

    def __init__(self, depth: int = 5) -> None:
        super().__init__()
        self.fc = nn.ModuleList(nn.Linear(16, 16) for _ in range(depth))
        self.norm = nn.ModuleList(nn.LayerNorm(16) for _ in range(depth))
        self.qk, self.scale = nn.Linear(16, 16), nn.Parameter(torch.ones(8))
        self.out = nn.Linear(8, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        x = F.pad(x, (0, 8))
        for fc, norm in zip(self.fc, self.norm, strict=True):
            x = norm(F.relu(fc(x)))
        q, k = self.qk(x).view(len(x), 2, 8).unbind(1)
        return self.out(q * k * self.scale)


def test_skip_messages_name_the_layers_and_the_reason_in_words():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert find_prunable_layers(Blocks(), torch.randn(6, 8)) == []
    messages = [str(w.message) for w in caught if "actprune" in str(w.message)]
    assert_readable(messages)
    for i in range(5):
        assert f"lightning_actprune: not pruning fc.{i}: its neurons reach LayerNorm norm.{i}," in "\n".join(messages)
    # Torch-Pruning 1.5 cannot build this group at all: it is skipped with the failure, never a crash
    old_tracer = importlib.metadata.version("torch-pruning") < "1.6"
    reason = (
        r"tracing its group failed: TypeError"
        if old_tracer
        else r"its neurons reach .*(torch.unbind|the parameter scale)"
    )
    assert any(re.search(rf"not pruning qk: {reason}", m) for m in messages)


def test_many_layers_with_one_reason_make_one_short_warning():
    model = nn.ModuleList(nn.LSTM(8, 8, batch_first=True, bidirectional=True) for _ in range(6))

    class FinalStates(nn.Module):
        """Six bidirectional LSTMs read by their final states, which the analysis does not follow."""

        def __init__(self) -> None:
            super().__init__()
            self.layers, self.out = model, nn.Linear(8, NUM_CLASSES)

        def forward(self, x: Tensor) -> Tensor:
            return self.out(sum(layer(x)[1][0][-1] for layer in self.layers))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert find_prunable_layers(FinalStates(), torch.randn(3, *SEQUENCE)) == []
    (message,) = [str(w.message) for w in caught if "actprune" in str(w.message)]
    assert message == (
        "lightning_actprune: not pruning layers.0, layers.1, layers.2 and 3 more: its final state h_n (or c_n) is read"
        " and it is bidirectional: only one direction's final state is followed (the output sequence is, in both"
        " directions)."
    )


def test_nothing_prunable_lists_the_layer_types_found(fit):
    model = Classifier(nn.Sequential(nn.Linear(8, 12), nn.LayerNorm(12), nn.Linear(12, NUM_CLASSES)))
    pruning, _, messages = fit(model)
    assert pruning.result is None
    assert any(
        "Classifier has no prunable layer (seen before training). Found Linear ×2, LayerNorm ×1; none is prunable" in m
        for m in messages
    ), messages
    assert any(
        "not pruning net.0: its neurons reach LayerNorm net.1, which cannot lose neurons here." in m for m in messages
    )
    assert_readable(messages)


class TinyGPT2(pl.LightningModule):
    """Hugging Face's GPT-2 (two blocks, 32 features in 4 heads, a 64-token vocabulary) trained as a language model."""

    def __init__(self, use_cache: bool = True) -> None:
        super().__init__()
        transformers = pytest.importorskip("transformers")
        config = transformers.GPT2Config(
            n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=32, use_cache=use_cache, bos_token_id=0,
            eos_token_id=0,
        )  # fmt: skip
        self.model = transformers.GPT2LMHeadModel(config)

    def forward(self, tokens: Tensor) -> Any:
        return self.model(input_ids=tokens, labels=tokens)

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        return self(batch[0]).loss

    def validation_step(self, batch: list[Tensor], batch_idx: int) -> None:
        self.log("val_loss", self(batch[0]).loss)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


@pytest.mark.parametrize(
    ("use_cache", "recovery_epochs"), [(True, 0), (False, 0), (True, 1)], ids=["cache", "no_cache", "in_fit"]
)
def test_gpt2_prunes_its_heads_and_mlp_neurons_exactly_and_keeps_its_cache(use_cache, recovery_epochs, make_trainer):
    pl.seed_everything(0)
    model = TinyGPT2(use_cache)
    tokens = torch.randint(0, 64, (32, 10), generator=torch.Generator().manual_seed(0))
    train = val = DataLoader(TensorDataset(tokens), batch_size=16)
    keep = KeepUnpruned()
    pruning = ActivationPruning(target_params_reduction=0.3, recovery_epochs=recovery_epochs)
    trainer = make_trainer(keep, pruning, max_epochs=2, logger=False, enable_checkpointing=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, train, val)
    messages = [str(w.message) for w in caught if re.match("lightning_actprune|ActivationPruning", str(w.message))]
    assert_readable(messages)
    assert not any("c_attn" in m for m in messages), messages  # the heads layer handles q/k/v: no skip message
    plan = pruning.result.plan
    blocks = [f"model.transformer.h.{i}" for i in range(2)]
    assert [layer.name for layer in plan.layers] == [f"{b}.{n}" for b in blocks for n in ("attn:heads", "mlp.c_fc")]
    widths = {layer.name: len(layer.kept) for layer in plan.layers}
    assert sum(widths[f"{b}.attn:heads"] for b in blocks) < 8, widths  # some heads went, with MLP neurons
    assert sum(widths[f"{b}.mlp.c_fc"] for b in blocks) < 256, widths
    for block, layer in zip(blocks, model.model.transformer.h, strict=True):
        heads = widths[f"{block}.attn:heads"]
        attn, mlp = layer.attn, layer.mlp
        assert attn.num_heads == heads >= 1
        assert attn.c_attn.nf == attn.c_attn.weight.shape[1] == 3 * attn.split_size == 3 * 8 * heads
        assert attn.c_proj.weight.shape == (8 * heads, 32)
        assert mlp.c_fc.nf == mlp.c_fc.weight.shape[1] == mlp.c_proj.weight.shape[0] < 128
        assert attn.embed_dim == attn.c_proj.nf == mlp.c_proj.nf == 32  # the residual stream keeps its width
    if recovery_epochs:  # pruned after epoch 0, then trained on: Adam's moments were sliced with the weights
        assert pruning.pruned_at_epoch == 0
        state = trainer.optimizers[0].state
        attn, mlp = model.model.transformer.h[0].attn, model.model.transformer.h[0].mlp
        for layer in (attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj):
            assert state[layer.weight]["exp_avg"].shape == state[layer.weight]["exp_avg_sq"].shape == layer.weight.shape
        assert state[mlp.c_fc.bias]["exp_avg"].shape == (mlp.c_fc.nf,)
        assert state[attn.c_attn.bias]["exp_avg"].shape == (attn.c_attn.nf,)
    else:
        model.eval()
        zero_removed_inputs(keep.model, plan)
        with torch.no_grad():
            torch.testing.assert_close(model(tokens).logits, keep.model(tokens).logits)
    fresh = load_pruned(TinyGPT2(use_cache), pruning.pruned_checkpoint_path).eval()
    assert [layer.attn.split_size for layer in fresh.model.transformer.h] == [
        layer.attn.split_size for layer in model.model.transformer.h
    ]
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(tokens).logits, model(tokens).logits, rtol=0, atol=0)
        prompt = fresh.model(tokens[:, :-1], use_cache=True)  # generating: the cache holds the heads that stay
        step = fresh.model(tokens[:, -1:], cache=prompt.past_key_values, use_cache=True).logits
        torch.testing.assert_close(step, model(tokens).logits[:, -1:])


def test_the_analysis_runs_once_before_training_and_the_prune_uses_it(make_trainer, caplog):
    class SeenAtTrainStart(Callback):
        def on_train_start(self, trainer, pl_module):
            self.layers = pruning.prunable_layers
            self.step = trainer.global_step

    class FinalState(Recurrent):
        """The head reads a bidirectional GRU's final state, which the analysis does not follow: a skip warning."""

        def __init__(self) -> None:
            super().__init__(nn.GRU)
            self.rnn = nn.GRU(16, 12, batch_first=True, bidirectional=True)

        def forward(self, x: Tensor) -> Tensor:
            return self.head(self.rnn(self.embed(x))[1][-1])

    pl.seed_everything(0)
    pruning = ActivationPruning(target_params_reduction=0.3, pruned_checkpoint=None)
    seen = SeenAtTrainStart()
    trainer = make_trainer(seen, pruning, max_epochs=2, logger=False, enable_checkpointing=False)
    with caplog.at_level("INFO"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(Classifier(FinalState()), *loaders(SEQUENCE, batch_size=16))
    assert seen.step == 0
    names = ["net.embed.0", "net.head.0"]
    assert [layer.name for layer in seen.layers] == names  # known before the first training step
    assert [layer.name for layer in pruning.result.plan.layers] == names
    assert "ActivationPruning: 2 prunable layer(s), 80 neurons: net.embed.0 (16), net.head.0 (64)" in caplog.text
    # the skip warnings were given once, at the start, not again at the prune
    assert sum("not pruning net.rnn: its final state h_n" in str(w.message) for w in caught) == 1


def test_gpt2_conv1d_scores_and_compensates_like_the_linear_it_transposes():
    conv1d = pytest.importorskip("transformers.pytorch_utils").Conv1D
    torch.manual_seed(0)
    transposed = nn.Sequential(conv1d(16, 8), nn.ReLU(), conv1d(12, 16), nn.GELU(), conv1d(NUM_CLASSES, 12))
    linear = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 12), nn.GELU(), nn.Linear(12, NUM_CLASSES))
    with torch.no_grad():
        for source, target in zip(transposed[::2], linear[::2], strict=True):
            target.weight.copy_(source.weight.t())
            target.bias.copy_(torch.randn(target.out_features))
            source.bias.copy_(target.bias)
    x = torch.randn(40, 8)
    plans = []
    for model in (transposed, linear):
        with ActivationRecorder(model) as recorder, torch.no_grad():
            model(x)
        layers = find_prunable_layers(model, x)
        plans.append(plan_pruning(layers, recorder.moments(), 0.05, "fluctuation", model=model, compensate=True))
    assert plans[0] == plans[1]
    assert plans[0].neurons_after < plans[0].neurons_before
    assert plans[0].bias_updates
    apply_plan(transposed, plans[0])
    apply_plan(linear, plans[1])
    with torch.no_grad():
        torch.testing.assert_close(transposed(x), linear(x))
