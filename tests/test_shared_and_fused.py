"""Shared layers, fused projections and normalisations over the neurons (issues 20 and 23).

A layer called several times per forward (ALBERT's one transformer layer) is pruned once, with statistics pooled
over its calls; a fused gate/up projection split by ``chunk``/``split`` loses a gate row and its up row together
(Phi-3, timm's ``GluMlp``); timm's Global Response Normalisation (ConvNeXt-V2) is pruned exactly with its scale
corrected. Each case equals the zeroing oracle, reloads with ``load_pruned``, or is refused with a message in words.
"""

from __future__ import annotations

import copy
import csv
import re
import warnings
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor, nn

from lightning_actprune import ActivationPruning, _analysis, _torch_pruning, export_pruned, load_pruned
from lightning_actprune.core import (
    ActivationRecorder,
    PrunableLayer,
    PruningPlan,
    apply_plan,
    apply_plan_with_optimizers,
    find_prunable_layers,
    plan_from_kept,
)
from tests.helpers import NUM_CLASSES, Classifier, KeepUnpruned, assert_matches_oracle, loaders


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def found(model: nn.Module, *inputs: Any) -> tuple[list[PrunableLayer], str]:
    """The prunable layers of ``model`` and every warning the analysis gave, one per line."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layers = find_prunable_layers(model, inputs if len(inputs) > 1 else inputs[0])
    return layers, "\n".join(str(w.message) for w in caught if "lightning_actprune" in str(w.message))


def zero_at_response_norms(model: nn.Module, plan: PruningPlan) -> None:
    """The oracle's other half at a GRN: it normalises over the neurons, so they are zero where it reads them."""
    for operation in plan.operations:
        module = model.get_submodule(operation.module)
        if type(module).__name__ == "GlobalResponseNorm":
            index = torch.tensor(operation.indices)
            dim = module.channel_dim

            def zero(_: nn.Module, args: tuple[Tensor, ...], index: Tensor = index, dim: int = dim) -> tuple[Tensor]:
                return (args[0].index_fill(dim % args[0].dim(), index, 0.0),)

            module.register_forward_pre_hook(zero)


def prune_and_check(model: nn.Module, layers: list[PrunableLayer], *inputs: Any, keep_every: int = 2) -> PruningPlan:
    """Keep every ``keep_every``-th neuron of each layer; the pruned model must equal the zeroing oracle."""
    plan = plan_from_kept(layers, {layer.name: range(0, layer.neurons, keep_every) for layer in layers})
    original = copy.deepcopy(model).eval()
    apply_plan(model, plan)
    zero_at_response_norms(original, plan)
    assert_matches_oracle(model, original, plan, *inputs)
    return plan


def assert_reloads(pruned: nn.Module, fresh: nn.Module, plan: PruningPlan, tmp_path: Any, *inputs: Any) -> None:
    """``export_pruned`` then ``load_pruned`` into a freshly built model gives the pruned model's outputs exactly."""
    export_pruned(pruned, tmp_path / "pruned.pt", plan=plan)
    reloaded = load_pruned(fresh, tmp_path / "pruned.pt").eval()
    pruned.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(*inputs), pruned(*inputs), rtol=0, atol=0)


# --- one layer called several times per forward ----------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self, width: int = 12, hidden: int = 32) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SharedBlockNet(nn.Module):
    """ALBERT's pattern: one block, its weights shared, applied three times to a residual stream."""

    def __init__(self, calls: int = 3) -> None:
        super().__init__()
        self.calls = calls
        self.embed, self.block, self.head = nn.Linear(8, 12), Block(), nn.Linear(12, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x)
        for _ in range(self.calls):
            h = h + self.block(h)
        return self.head(h)


def test_a_block_called_three_times_is_pruned_once_exactly(tmp_path):
    torch.manual_seed(0)
    model, x = SharedBlockNet().eval(), torch.randn(16, 8)
    layers, warned = found(model, x)
    assert {layer.name for layer in layers} == {"block.fc1", "embed+block.fc2"}, warned
    assert "called" not in warned
    plan = prune_and_check(model, layers, x)
    assert model.block.fc1.out_features == model.block.fc2.in_features == 16
    assert model.embed.out_features == model.head.in_features == 6
    assert_reloads(model, SharedBlockNet(), plan, tmp_path, x)


def test_the_statistics_of_a_shared_layer_are_pooled_over_its_calls():
    torch.manual_seed(0)
    model, x = SharedBlockNet().eval(), torch.randn(10, 8)
    seen: list[Tensor] = []
    handle = model.block.fc2.register_forward_pre_hook(lambda _, args: seen.append(args[0].detach().clone()))
    with ActivationRecorder(model) as recorder, torch.no_grad():
        model(x)
    handle.remove()
    moments = recorder.moments()["block.fc2"]
    every_call = torch.cat(seen).double()
    assert len(seen) == 3
    assert float(moments.num_values) == 3 * len(x)
    torch.testing.assert_close(moments.mean, every_call.mean(0))
    torch.testing.assert_close(moments.mean_square, every_call.square().mean(0))


class SharedOnInputAndHidden(nn.Module):
    """``shared`` reads the model's input in one call and ``fc``'s neurons in the other: they cannot lose neurons."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.shared, self.out = nn.Linear(8, 8), nn.Linear(8, 6), nn.Linear(6, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(F.relu(self.shared(x)) + F.relu(self.shared(F.relu(self.fc(x)))))


def test_a_shared_layer_whose_calls_read_other_features_is_refused_in_words():
    layers, warned = found(SharedOnInputAndHidden().eval(), torch.randn(6, 8))
    assert [layer.name for layer in layers] == ["shared"]
    assert (
        "not pruning fc: shared is called 2 times per forward (one layer, shared weights), and not every call reads"
        " these neurons: removing them does not equal zeroing them." in warned
    )


# --- fused projections -----------------------------------------------------------------------------------------------


class FusedMLP(nn.Module):
    """Phi-3's MLP on a residual stream: one Linear makes gate and up, ``down(act(gate) * up)``."""

    def __init__(self, pieces: str = "chunk", gate_last: bool = False, hidden: int = 10) -> None:
        super().__init__()
        self.pieces, self.gate_last, self.hidden = pieces, gate_last, hidden
        self.embed, self.gate_up = nn.Linear(8, 12), nn.Linear(12, 2 * hidden)
        self.down, self.head = nn.Linear(hidden, 12), nn.Linear(12, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x)
        fused = self.gate_up(h)
        if self.pieces == "chunk":
            first, second = fused.chunk(2, dim=-1)
        elif self.pieces == "split":
            first, second = fused.split([fused.shape[-1] // 2] * 2, dim=-1)
        else:  # sizes fixed at construction: they do not follow the pruning
            first, second = fused.split([self.hidden, self.hidden], dim=-1)
        gate, up = (second, first) if self.gate_last else (first, second)
        return self.head(h + self.down(F.silu(gate) * up))


class FusedConvMLP(nn.Module):
    """timm's ``GluMlp(use_conv=True)``: a 1x1 conv makes both halves, chunked along the channels."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.fc1 = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 12, 1)
        self.fc2, self.head = nn.Conv2d(6, 8, 1), nn.Linear(8, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(x)
        x1, x2 = self.fc1(h).chunk(2, dim=1)
        h = h + self.fc2(x1 * torch.sigmoid(x2))
        return self.head(h.mean((2, 3)))


@pytest.mark.parametrize(
    ("pieces", "gate_last"), [("chunk", False), ("chunk", True), ("split", False)], ids=["chunk", "gate_last", "split"]
)
def test_a_fused_gate_up_projection_loses_a_gate_row_and_its_up_row_together(pieces, gate_last, tmp_path):
    torch.manual_seed(0)
    model, x = FusedMLP(pieces, gate_last).eval(), torch.randn(3, 5, 8)
    layers, warned = found(model, x)
    (fused,) = [layer for layer in layers if layer.name == "gate_up"]
    assert fused.neurons == 10, warned  # one neuron per gate/up pair, not 20
    (rows,) = [s for s in fused.slices if s.module == "gate_up" and s.dim == "out"]
    assert rows.neurons == tuple(range(10)) * 2  # row j and row 10 + j carry neuron j
    plan = prune_and_check(model, [fused], x)
    assert model.gate_up.out_features == 2 * model.down.in_features == 10
    assert_reloads(model, FusedMLP(pieces, gate_last), plan, tmp_path, x)


def test_a_fused_conv_projection_chunked_along_the_channels_prunes_exactly():
    torch.manual_seed(0)
    model, x = FusedConvMLP().eval(), torch.randn(2, 3, 4, 4)
    layers, warned = found(model, x)
    (fused,) = [layer for layer in layers if layer.name == "fc1"]
    assert fused.neurons == 6, warned
    prune_and_check(model, [fused], x)
    assert model.fc1.out_channels == 2 * model.fc2.in_channels == 6


class SplitIntoTwoLayers(nn.Module):
    """One Linear's outputs chunked in two, each half read by a layer of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.left, self.right = nn.Linear(8, 10), nn.Linear(5, NUM_CLASSES), nn.Linear(5, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        a, b = F.relu(self.fc(x)).chunk(2, dim=-1)
        return self.left(a) + self.right(b)


def test_a_split_into_pieces_read_by_different_layers_is_refused_in_words():
    # a plan keeping 2 neurons of one half and 4 of the other would give chunk(2) halves of 3: refused, not guessed
    layers, warned = found(SplitIntoTwoLayers().eval(), torch.randn(6, 8))
    assert layers == []
    assert (
        "not pruning fc: its neurons reach a torch.split/chunk of its features into pieces read apart (they would lose"
        " unequal numbers of neurons), which cannot lose neurons here." in warned
    )


class MismatchedHalves(nn.Module):
    """Gate row ``j`` is multiplied with up row ``H - 1 - j`` (a flip): the rows cannot be matched as pairs."""

    def __init__(self) -> None:
        super().__init__()
        self.gate_up, self.down = nn.Linear(8, 12), nn.Linear(6, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up.flip(-1))


@pytest.mark.parametrize("model", [MismatchedHalves, lambda: FusedMLP("fixed_sizes")], ids=["flipped", "fixed_sizes"])
def test_a_fused_projection_whose_pieces_cannot_be_matched_is_refused_in_words(model):
    layers, warned = found(model().eval(), torch.randn(6, 8))
    assert "gate_up" not in [layer.name for layer in layers]
    assert (
        "not pruning gate_up: its outputs are split into pieces (a fused projection, e.g. gate and up in one Linear)"
        " that could not be matched row for row, or whose sizes are fixed in code" in warned
    )


# --- Global Response Normalisation -----------------------------------------------------------------------------------


class GRNBlock(nn.Module):
    """ConvNeXt-V2's MLP: Linear → GELU → GRN → Linear, channels last, on a residual stream."""

    def __init__(self, grn: type[nn.Module] | None = None, channels_last: bool = True) -> None:
        super().__init__()
        self.channels_last = channels_last
        self.stem, self.head = nn.Conv2d(3, 8, 1), nn.Linear(8, NUM_CLASSES)
        if channels_last:
            self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)
        else:
            self.fc1, self.fc2 = nn.Conv2d(8, 16, 1), nn.Conv2d(16, 8, 1)
        if grn is None:
            grn = pytest.importorskip("timm.layers.grn").GlobalResponseNorm
            self.grn = grn(16, channels_last=channels_last)
        else:
            self.grn = grn(16)
        with torch.no_grad():  # timm starts GRN at zero, where it is the identity and any pruning looks exact
            self.grn.weight.normal_()
            self.grn.bias.normal_()

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(x)
        if self.channels_last:
            h = h + self.fc2(self.grn(F.gelu(self.fc1(h.permute(0, 2, 3, 1))))).permute(0, 3, 1, 2)
        else:
            h = h + self.fc2(self.grn(F.gelu(self.fc1(h))))
        return self.head(h.mean((2, 3)))


@pytest.mark.parametrize("channels_last", [True, False], ids=["channels_last", "channels_first"])
def test_a_global_response_norm_is_pruned_exactly_with_its_scale_corrected(channels_last, tmp_path):
    torch.manual_seed(0)
    model, x = GRNBlock(channels_last=channels_last).eval(), torch.randn(2, 3, 5, 5)
    eps = model.grn.eps
    layers, warned = found(model, x)
    (layer,) = [layer for layer in layers if layer.name == "fc1"]
    assert {s.module for s in layer.slices} == {"fc1", "grn", "fc2"}, warned
    weight = model.grn.weight.detach().clone()
    plan = prune_and_check(model, [layer], x, keep_every=4)  # 16 channels -> 4
    assert model.grn.weight.shape == model.grn.bias.shape == (4,)
    torch.testing.assert_close(model.grn.weight.detach(), weight[::4] * 4)  # C / C' = 16 / 4
    assert model.grn.eps == pytest.approx(eps * 4)
    assert_reloads(model, GRNBlock(channels_last=channels_last), plan, tmp_path, x)


def test_the_optimizer_state_of_a_global_response_norm_follows_its_channels():
    torch.manual_seed(0)
    model, x = GRNBlock(), torch.randn(2, 3, 5, 5)
    optimizer = torch.optim.Adam(model.parameters())
    model(x).sum().backward()
    optimizer.step()
    layers, _ = found(model.eval(), x)
    plan = plan_from_kept(layers, {"fc1": range(0, 16, 4)})
    moments = optimizer.state[model.grn.weight]["exp_avg"].clone()
    apply_plan_with_optimizers(model, plan, optimizer)
    # the surgery scales the weight's values, never which entries survive: the state is the kept channels' own
    torch.testing.assert_close(optimizer.state[model.grn.weight]["exp_avg"], moments[::4])


class HandWrittenGRN(nn.Module):
    """A GRN as the ConvNeXt-V2 paper writes it: its ``eps`` is fixed in code, so its scale cannot be corrected."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.zeros(dim)), nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        g = x.norm(p=2, dim=(1, 2), keepdim=True)
        return x + self.bias + self.weight * x * g / (g.mean(dim=-1, keepdim=True) + 1e-6)


def test_a_response_normalisation_that_cannot_be_corrected_is_refused_in_words():
    layers, warned = found(GRNBlock(HandWrittenGRN).eval(), torch.randn(2, 3, 5, 5))
    assert "fc1" not in [layer.name for layer in layers]
    assert "not pruning fc1: its neurons reach HandWrittenGRN grn (a global response normalisation over them)" in warned


# --- the analysis stays within a forward pass's memory ---------------------------------------------------------------


def test_tracing_keeps_no_tensor_for_a_backward_pass():
    model, x = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), torch.randn(3, 4)
    graph = _torch_pruning.dependency_graph(model, (x,), {}, _analysis._tensors_with_grad)
    relu = next(node.grad_fn for node in graph.module2node.values() if "Relu" in type(node.grad_fn).__name__)
    with pytest.raises(RuntimeError, match="traces without saving tensors"):
        _ = relu._saved_result  # what a backward pass would read: never kept
    assert [layer.name for layer in find_prunable_layers(model, x)] == ["0"]


# --- the real classes (timm and transformers are optional) -----------------------------------------------------------


def _albert() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.AlbertConfig(
        vocab_size=64, embedding_size=16, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=32,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.AlbertModel(config).eval()


class Phi3Logits(nn.Module):
    """Phi-3 from a tiny config; the logits alone (its cache is no tensor to compare)."""

    def __init__(self) -> None:
        super().__init__()
        transformers = pytest.importorskip("transformers")
        config = transformers.Phi3Config(
            vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=32, pad_token_id=0, bos_token_id=0, eos_token_id=0,
        )  # fmt: skip
        torch.manual_seed(0)
        self.model = transformers.Phi3ForCausalLM(config).eval()

    def forward(self, tokens: Tensor) -> Tensor:
        return self.model(input_ids=tokens, use_cache=False).logits


def _timm(name: str, **kwargs: Any) -> nn.Module:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, **kwargs).eval()


def _convnextv2() -> nn.Module:
    model = _timm("convnextv2_atto")
    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__ == "GlobalResponseNorm":
                module.weight.normal_()
                module.bias.normal_()
    return model


def _convmixer() -> nn.Module:
    pytest.importorskip("timm")
    from timm.models.convmixer import ConvMixer

    torch.manual_seed(0)
    return ConvMixer(dim=16, depth=2, kernel_size=3, patch_size=4, num_classes=NUM_CLASSES).eval()


TOKENS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
REAL = {
    # name: (build, input, the layers expected among the prunable ones)
    "albert": (_albert, TOKENS, {"encoder.albert_layer_groups.0.albert_layers.0.ffn"}),
    "phi3": (Phi3Logits, TOKENS, {f"model.model.layers.{i}.mlp.gate_up_proj" for i in range(2)}),
    "convnextv2_atto": (_convnextv2, torch.randn(2, 3, 32, 32), {f"stages.{i}.blocks.0.mlp.fc1" for i in range(4)}),
    "eva02_tiny": (
        lambda: _timm("eva02_tiny_patch14_224", img_size=28, depth=2),
        torch.randn(2, 3, 28, 28),
        {"blocks.0.mlp.fc1", "blocks.1.mlp.fc1"},
    ),
    "eva02_swiglu": (  # timm's SwiGLU: fc1_g and fc1_x, two Linears multiplied (no norm between)
        lambda: _timm("eva02_tiny_patch14_224", img_size=28, depth=2, swiglu_align_to=8),
        torch.randn(2, 3, 28, 28),
        {f"blocks.{i}.mlp.fc1_g+blocks.{i}.mlp.fc1_x" for i in range(2)},
    ),
    "convmixer": (_convmixer, torch.randn(2, 3, 16, 16), {"stem.0+blocks.0.0.fn.0", "blocks.0.1+blocks.1.0.fn.0"}),
}


@pytest.mark.parametrize("name", REAL)
def test_real_models_prune_their_shared_fused_and_normalised_layers_exactly(name, tmp_path):
    build, x, expected = REAL[name]
    model = build()
    layers, warned = found(model, x)
    assert expected <= {layer.name for layer in layers}, warned
    plan = prune_and_check(model, [layer for layer in layers if layer.name in expected], x)
    assert_reloads(model, build(), plan, tmp_path, x)
    assert not re.search(r"GroupTooLarge|Exception|Error", warned), warned  # skips say why in words


def test_eva02_with_a_normalisation_inside_its_mlp_says_so():
    model = _timm("eva02_tiny_patch14_224", img_size=28, depth=1, scale_mlp=True)
    layers, warned = found(model, torch.randn(2, 3, 28, 28))
    assert not [layer for layer in layers if "mlp" in layer.name]
    assert (
        "not pruning blocks.0.mlp.fc1_g+blocks.0.mlp.fc1_x: its neurons reach LayerNorm blocks.0.mlp.norm, which cannot"
        " lose neurons here." in warned
    )


def test_albert_shared_layer_loses_ffn_neurons_and_whole_heads_not_single_projection_channels():
    """The shared attention's projections lose whole heads (merged with the heads helper's work), never channels."""
    layers, warned = found(_albert(), TOKENS)
    attention = "encoder.albert_layer_groups.0.albert_layers.0.attention"
    assert [layer.name for layer in layers] == [
        f"{attention}:heads",
        "encoder.albert_layer_groups.0.albert_layers.0.ffn",
    ]
    assert f"{attention}.query+" not in warned
    assert "shared weights" not in warned


def test_hugging_face_convnextv2_grn_with_its_eps_fixed_in_code_is_refused_in_words():
    transformers = pytest.importorskip("transformers")
    config = transformers.ConvNextV2Config(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, num_labels=NUM_CLASSES)
    layers, warned = found(transformers.ConvNextV2ForImageClassification(config).eval(), torch.randn(2, 3, 32, 32))
    assert layers == []
    assert (
        "not pruning convnextv2.encoder.stages.0.layers.0.pwconv1: its neurons reach ConvNextV2GRN"
        " convnextv2.encoder.stages.0.layers.0.grn (a global response normalisation over them)" in warned
    )


def test_phi3_fused_gate_up_rows_are_paired():
    model = Phi3Logits()
    layers, _ = found(model, TOKENS)
    (layer,) = [layer for layer in layers if layer.name == "model.model.layers.0.mlp.gate_up_proj"]
    assert layer.neurons == 48  # intermediate_size: gate_up_proj has 96 rows
    (rows,) = [s for s in layer.slices if s.dim == "out"]
    assert rows.neurons == tuple(range(48)) * 2


# --- a fit with the Trainer's defaults -------------------------------------------------------------------------------


def test_a_model_with_a_shared_block_fits_prunes_and_reloads_with_the_trainer_defaults(tmp_path):
    pl.seed_everything(0)
    model = Classifier(SharedBlockNet())
    keep, pruning = KeepUnpruned(), ActivationPruning(target_params_reduction=0.3)
    trainer = pl.Trainer(
        accelerator="cpu", default_root_dir=tmp_path, max_epochs=2, callbacks=[keep, pruning],
        logger=CSVLogger(tmp_path, name="csv"),
    )  # fmt: skip
    trainer.fit(model, *loaders((8,), batch_size=16))
    result = pruning.result
    assert result is not None
    assert result.params_after < result.params_before
    assert "net.block.fc1" in [layer.name for layer in result.plan.layers]
    assert model.net.block.fc1.out_features < 32
    x = torch.randn(10, 8)
    assert_matches_oracle(model, keep.model, result.plan, x)
    with open(trainer.logger.experiment.metrics_file_path) as f:
        rows = [row for row in csv.DictReader(f) if row.get("actprune/params_after")]
    assert float(rows[0]["actprune/params_after"]) == result.params_after
    assert trainer.checkpoint_callback is not None
    assert trainer.checkpoint_callback.best_model_path
    fresh = load_pruned(Classifier(SharedBlockNet()), pruning.pruned_checkpoint_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
