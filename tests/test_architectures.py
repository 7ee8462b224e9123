"""Real architectures, built from their configs at tiny sizes: each prunes exactly, reloads and exports to ONNX.

Every model is fitted for a few steps in a real Trainer with ``ActivationPruning(target_params_reduction=0.3)``;
the pruned model must equal the trained one with the removed neurons' inputs zeroed (the oracle), load into a
freshly built model with ``load_pruned``, and export to ONNX. The libraries (torchvision, timm, transformers) are
optional: a case whose library is missing is skipped.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_actprune import ActivationPruning, load_pruned
from tests.helpers import KeepUnpruned, zero_removed_inputs

CLASSES = 10
IMAGE = (3, 32, 32)
TOKENS = 10  # sequence length of the language models
VOCABULARY = 64
SEQUENCE = (6, 8)  # time steps, features of the recurrent classifiers


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: these models' small convs run several times faster so on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _torchvision(name: str) -> nn.Module:
    models = pytest.importorskip("torchvision.models")
    return getattr(models, name)(num_classes=CLASSES)


def _timm(name: str, **kwargs: Any) -> nn.Module:
    timm = pytest.importorskip("timm")
    return timm.create_model(name, pretrained=False, num_classes=CLASSES, **kwargs)


def _bert() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=VOCABULARY, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32, num_labels=CLASSES,
    )  # fmt: skip
    return transformers.BertForSequenceClassification(config)


def _gpt2() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=VOCABULARY, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    assert config.use_cache  # the KV cache is on, as GPT-2 ships
    return transformers.GPT2LMHeadModel(config)


class RecurrentClassifier(nn.Module):
    """Linear → ReLU → LSTM/GRU → last step → Linear → ReLU → Linear: the Linear feeding it and its units prune too."""

    def __init__(self, rnn: type[nn.RNNBase]) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(SEQUENCE[1], 16), nn.ReLU())
        self.rnn = rnn(16, 16, batch_first=True)
        self.head = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, CLASSES))

    def forward(self, x: Tensor) -> Tensor:
        output, _ = self.rnn(self.embed(x))
        return self.head(output[:, -1])


class Case(NamedTuple):
    build: Callable[[], nn.Module]
    inputs: Callable[[int, torch.Generator], Tensor]
    pruned: str  # a regular expression that the names of the pruned layers match
    onnx: str | None = None  # why it cannot export, if it cannot


def _images(n: int, generator: torch.Generator) -> Tensor:
    return torch.randn(n, *IMAGE, generator=generator)


def _tokens(n: int, generator: torch.Generator) -> Tensor:
    return torch.randint(0, VOCABULARY, (n, TOKENS), generator=generator)


def _sequences(n: int, generator: torch.Generator) -> Tensor:
    return torch.randn(n, *SEQUENCE, generator=generator)


CASES = {
    "resnet18": Case(lambda: _torchvision("resnet18"), _images, r"net\.(conv1|layer\d\.\d\.conv\d).*"),
    "mobilenet_v3_small": Case(lambda: _torchvision("mobilenet_v3_small"), _images, r"net\.(features|classifier)\..*"),
    "convnext_atto": Case(lambda: _timm("convnext_atto"), _images, r"net\.stages\.\d\.blocks\.\d\.mlp\.fc1"),
    "vit_tiny": Case(
        lambda: _timm("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2),
        _images,
        r"net\.blocks\.\d\.(mlp\.fc1|attn:heads)",
    ),
    "bert": Case(
        _bert, _tokens, r"net\.bert\.(encoder\.layer\.\d\.(intermediate\.dense|attention:heads)|pooler\.dense)"
    ),
    "gpt2": Case(_gpt2, _tokens, r"net\.transformer\.h\.\d\.(mlp\.c_fc|attn:heads)"),
    "lstm": Case(lambda: RecurrentClassifier(nn.LSTM), _sequences, r"net\.(embed\.0|rnn|head\.0)"),
    "gru": Case(lambda: RecurrentClassifier(nn.GRU), _sequences, r"net\.(embed\.0|rnn|head\.0)"),
}


def logits(output: Any) -> Tensor:
    """The tensor of scores, whether the model returns it or a Hugging Face ``ModelOutput`` holding it."""
    return output if isinstance(output, Tensor) else output.logits


class Fitted(pl.LightningModule):
    """The smallest LightningModule around a ``Case``: cross-entropy on labels, or next-token for a language model."""

    def __init__(self, case: str) -> None:
        super().__init__()
        self.net = CASES[case].build()

    def forward(self, x: Tensor) -> Tensor:
        return logits(self.net(x))

    def loss(self, batch: list[Tensor]) -> Tensor:
        x, y = batch
        scores = self(x)
        if scores.dim() == 3:  # a language model: each token predicts the next
            return F.cross_entropy(scores[:, :-1].flatten(0, 1), x[:, 1:].flatten())
        return F.cross_entropy(scores, y)

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        return self.loss(batch)

    def validation_step(self, batch: list[Tensor], batch_idx: int) -> None:
        self.log("val_loss", self.loss(batch))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def _data(case: Case, n: int, seed: int) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    x = case.inputs(n, generator)
    y = torch.randint(0, CLASSES, (n,), generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=2)  # small batches: the checks run the model per layer


@pytest.mark.parametrize("name", list(CASES))
def test_architecture_prunes_exactly_reloads_and_exports(name, make_trainer, tmp_path):
    case = CASES[name]
    pl.seed_everything(0)
    model = Fitted(name)
    keep, pruning = (
        KeepUnpruned(),
        ActivationPruning(target_params_reduction=0.3, recalibration_batches=0),
    )  # BN stays: the oracle
    trainer = make_trainer(keep, pruning, max_epochs=1, logger=False, enable_checkpointing=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, _data(case, 4, seed=0), _data(case, 4, seed=1))
    messages = [str(w.message) for w in caught if str(w.message).startswith("lightning_actprune")]

    plan = pruning.result.plan
    assert plan.neurons_after < plan.neurons_before
    assert [layer.name for layer in plan.layers if layer.removed and not re.fullmatch(case.pruned, layer.name)] == []
    if name in ("lstm", "gru"):  # the Linear that feeds the recurrent layer and its hidden units are pruned
        assert not [m for m in messages if "not pruning" in m]
        assert {layer.name for layer in plan.layers if layer.removed} >= {"net.rnn"}

    x = case.inputs(4, torch.Generator().manual_seed(2))
    model.eval()
    zero_removed_inputs(keep.model, plan)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(expected, keep.model(x))
        reloaded = load_pruned(Fitted(name), pruning.pruned_checkpoint_path).eval()
        torch.testing.assert_close(reloaded(x), expected, rtol=0, atol=0)

    if case.onnx is not None:
        pytest.skip(f"ONNX: {case.onnx}")
    onnx = pytest.importorskip("onnx")
    from onnx.reference import ReferenceEvaluator

    session_input = "inputs"
    path = tmp_path / f"{name}.onnx"
    torch.onnx.export(model, (x,), str(path), input_names=[session_input], dynamo=False)
    onnx.checker.check_model(str(path))
    (exported,) = ReferenceEvaluator(str(path)).run(None, {session_input: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(exported), expected, rtol=1e-4, atol=1e-4)
