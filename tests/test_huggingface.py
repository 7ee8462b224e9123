"""Pruned Hugging Face models go through ``save_pretrained`` → ``from_pretrained`` with the same outputs and tokens.

Every family the package prunes today, built from a tiny config: with uniform widths the config states them and the
stock ``save_pretrained``/``from_pretrained`` load the pruned model at its size; with free widths
``lightning_actprune.save_pretrained`` writes it zero-padded to widths the config states, the stock loader gives the
same outputs, and ``lightning_actprune.from_pretrained`` removes the padding again.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import fnmatch
import functools
import json
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.cli import LightningCLI
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_actprune import (
    ActivationPruning,
    ActivationPruningError,
    from_pretrained,
    load_pruned,
    pruning_plan_of,
    save_pretrained,
)
from lightning_actprune._config import PruningSettings
from lightning_actprune._huggingface import (
    PADDING_FILE,
    HeadShape,
    pretrained_models,
    role,
    sync_pretrained_configs,
    uniform_ties,
)
from lightning_actprune.core import (
    ActivationRecorder,
    PruningPlan,
    apply_plan,
    find_prunable_layers,
    layer_scores,
    plan_from_kept,
    plan_pruning,
)
from lightning_actprune.core import ModulePruning as Op

transformers = pytest.importorskip("transformers")

VOCAB = 64
TOKENS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
DECODER = {"decoder_start_token_id": 1}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclasses.dataclass(frozen=True)
class Family:
    """A tiny model of one family: its config, the auto class that loads it, and what it does."""

    config_class: str
    options: dict[str, Any]
    auto: str
    kind: str  # "causal", "seq2seq" or "classifier"
    width_field: str  # the config field that holds its FFN width
    ffn: str  # the layers that field governs (a glob)
    task_layers: tuple[str, ...] = ()  # layers outside the blocks, whose width no config field holds

    def config(self) -> Any:
        return getattr(transformers, self.config_class)(**self.options)


LLAMA_LIKE = {
    "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "max_position_embeddings": 64, **TOKENS,
}  # fmt: skip
BERT_LIKE = {
    "vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 48,
    "max_position_embeddings": 40, **TOKENS,
}  # fmt: skip
GPT2 = {"n_layer": 2, "n_embd": 32, "n_head": 4, "vocab_size": VOCAB, "n_positions": 32, **TOKENS}
OPT = {
    "vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "ffn_dim": 48,
    "max_position_embeddings": 32, "word_embed_proj_dim": 32, **TOKENS,
}  # fmt: skip
DISTILBERT = {
    "vocab_size": VOCAB, "dim": 32, "n_layers": 2, "n_heads": 4, "hidden_dim": 48, "max_position_embeddings": 32,
    "pad_token_id": 0,
}  # fmt: skip
BART = {
    "vocab_size": VOCAB, "d_model": 32, "encoder_layers": 2, "decoder_layers": 2, "encoder_attention_heads": 4,
    "decoder_attention_heads": 4, "encoder_ffn_dim": 48, "decoder_ffn_dim": 40, "max_position_embeddings": 32,
    **TOKENS, **DECODER,
}  # fmt: skip
T5 = {
    "vocab_size": VOCAB, "d_model": 32, "d_kv": 8, "d_ff": 48, "num_layers": 2, "num_decoder_layers": 2,
    "num_heads": 4, **TOKENS, **DECODER,
}  # fmt: skip
FALCON = {
    "vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "ffn_hidden_size": 48,
    **TOKENS,
}  # fmt: skip
FALCON_GQA = {**FALCON, "num_kv_heads": 2, "new_decoder_architecture": True}  # fused [q q k v | q q k v]
CAUSAL, SEQ2SEQ, CLASSIFIER = "AutoModelForCausalLM", "AutoModelForSeq2SeqLM", "AutoModelForSequenceClassification"

FAMILIES = {
    "llama": Family("LlamaConfig", LLAMA_LIKE, CAUSAL, "causal", "intermediate_size", "*.mlp.*"),
    "mistral": Family("MistralConfig", LLAMA_LIKE, CAUSAL, "causal", "intermediate_size", "*.mlp.*"),
    "qwen2": Family("Qwen2Config", LLAMA_LIKE, CAUSAL, "causal", "intermediate_size", "*.mlp.*"),
    "gpt2": Family("GPT2Config", GPT2, CAUSAL, "causal", "n_inner", "*.mlp.c_fc"),
    "opt": Family("OPTConfig", OPT, CAUSAL, "causal", "ffn_dim", "*.fc1"),
    # fused q/k/v whose axis also holds the key/value heads: one of them (multi-query), or one per group
    "falcon": Family("FalconConfig", FALCON, CAUSAL, "causal", "ffn_hidden_size", "*.dense_h_to_4h"),
    "falcon_gqa": Family("FalconConfig", FALCON_GQA, CAUSAL, "causal", "ffn_hidden_size", "*.dense_h_to_4h"),
    "bert": Family(
        "BertConfig", BERT_LIKE, CLASSIFIER, "classifier", "intermediate_size", "*.intermediate.dense", ("*pooler*",)
    ),
    "roberta": Family(
        "RobertaConfig",
        BERT_LIKE,
        CLASSIFIER,
        "classifier",
        "intermediate_size",
        "*.intermediate.dense",
        ("classifier.*",),
    ),
    "distilbert": Family(
        "DistilBertConfig", DISTILBERT, CLASSIFIER, "classifier", "hidden_dim", "*.ffn.lin1", ("pre_classifier",)
    ),
    "bart": Family("BartConfig", BART, SEQ2SEQ, "seq2seq", "encoder_ffn_dim", "model.encoder.*.fc1"),
    "t5": Family("T5Config", T5, SEQ2SEQ, "seq2seq", "d_ff", "*.DenseReluDense.wi"),
}


def auto(name: str) -> Any:
    return getattr(transformers, FAMILIES[name].auto)


def inputs(name: str, batch: int = 4, seed: int = 0) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, 8), generator=g)
    x = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if FAMILIES[name].kind == "seq2seq":
        x["decoder_input_ids"] = torch.randint(3, VOCAB, (batch, 5), generator=g)
    return x


@functools.cache
def _analysed(name: str, exclude: tuple[str, ...], prune_heads: bool) -> tuple[nn.Module, list, dict]:
    torch.manual_seed(0)
    model = auto(name).from_config(FAMILIES[name].config()).eval()
    x = inputs(name, batch=8, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with ActivationRecorder(model) as recorder, torch.no_grad():
            model(**x)
        layers = find_prunable_layers(model, {"": ((), x)}, exclude=exclude, prune_heads=prune_heads)
    return model, layers, recorder.moments()


def pruned(name: str, uniform: bool, exclude: tuple[str, ...] = (), prune_heads: bool = True):
    """A fresh tiny model of the family, pruned: the same width per role (``uniform``) or a different one per layer."""
    unpruned, layers, moments = _analysed(name, exclude, prune_heads)
    model = copy.deepcopy(unpruned)
    if uniform:
        tied = uniform_ties(model, layers)
        plan = plan_pruning(layers, moments, threshold=0.0, statistic="rms", normalize=True, tied=tied)
    else:  # each layer keeps its own count, around half, its most active neurons
        kept = {}
        positions: dict[bool, int] = {}  # heads and neurons counted apart: widths differ within each kind
        for layer in layers:
            heads = layer.name.endswith(":heads")
            i = positions[heads] = positions.get(heads, -1) + 1
            count = min(max(layer.neurons // 2 + i % 3 - 1, 1), layer.neurons - 1)
            scores = layer_scores(layer, moments, "rms")
            if layer.groups > 1:  # the query heads of each key/value head: the same count from every block
                per_block = max(layer.neurons // layer.groups // 2, 1)
                ranked = [sorted(block, key=lambda j: -float(scores[j]))[:per_block] for block in layer.blocks()]
                kept[layer.name] = sorted(j for block in ranked for j in block)
                continue
            kept[layer.name] = sorted(int(j) for j in scores.argsort(descending=True)[:count])
        plan = plan_from_kept(layers, kept)
    apply_plan(model, plan)
    return model, plan


def parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def assert_same_behaviour(name: str, loaded: nn.Module, model: nn.Module) -> None:
    """The same outputs, and for the generative families the same greedy generations (with the cache)."""
    x = inputs(name)
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**x).logits, model(**x).logits)
    if FAMILIES[name].kind == "classifier":
        return
    prompt = {k: v for k, v in x.items() if k != "decoder_input_ids"}
    generate = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(loaded.generate(**prompt, **generate), model.generate(**prompt, **generate))


def widths(plan: PruningPlan, pattern: str = "*") -> dict[str, int]:
    return {layer.name: len(layer.kept) for layer in plan.layers if fnmatch.fnmatch(layer.name, pattern)}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_uniform_widths_round_trip_through_the_stock_save_and_load(name, tmp_path):
    family = FAMILIES[name]
    model, plan = pruned(name, uniform=True, exclude=family.task_layers, prune_heads=False)
    assert plan.neurons_after < plan.neurons_before
    assert sync_pretrained_configs(model) == []  # everything it prunes, the config states
    (width,) = set(widths(plan, family.ffn).values())  # one width in every block
    assert getattr(model.config, family.width_field) == width
    model.save_pretrained(tmp_path)  # the model's own save
    loaded = auto(name).from_pretrained(tmp_path)
    assert parameters(loaded) == parameters(model)
    assert_same_behaviour(name, loaded, model)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_free_widths_round_trip_zero_padded(name, tmp_path):
    family = FAMILIES[name]
    model, plan = pruned(name, uniform=False)
    ffn = widths(plan, family.ffn).values()
    assert len(set(ffn)) > 1  # the config cannot state them
    save_pretrained(model, tmp_path, plan=plan)
    padding = json.loads((tmp_path / PADDING_FILE).read_text())
    assert padding["operations"]
    stock = auto(name).from_pretrained(tmp_path)  # what pipelines, PEFT and the Hub do
    assert parameters(model) < parameters(stock) < parameters(_analysed(name, (), True)[0])
    assert getattr(stock.config, family.width_field) == max(ffn)  # the widest layer's width, not the full one
    assert_same_behaviour(name, stock, model)
    ours = from_pretrained(auto(name), tmp_path)
    assert parameters(ours) == parameters(model)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    assert_same_behaviour(name, ours, model)
    assert pruning_plan_of(ours) is not None  # what a Lightning checkpoint of it would carry


def test_the_padding_goes_to_the_widest_layer_of_each_field(tmp_path):
    model, plan = pruned("bart", uniform=False)
    layers = widths(plan)
    save_pretrained(model, tmp_path, plan=plan)
    config = json.loads((tmp_path / "config.json").read_text())
    encoder = [w for n, w in layers.items() if n.startswith("model.encoder.") and not n.endswith(":heads")]
    decoder = [w for n, w in layers.items() if n.startswith("model.decoder.") and not n.endswith(":heads")]
    assert len(set(encoder)) == len(set(decoder)) == 2
    assert config["encoder_ffn_dim"] == max(encoder)
    assert config["decoder_ffn_dim"] == max(decoder)
    assert model.config.encoder_ffn_dim == 48  # the model's own config is not changed by a padded save


def test_a_layer_that_kept_every_neuron_sets_the_padded_width(tmp_path):
    unpruned, layers, _ = _analysed("llama", (), True)
    model = copy.deepcopy(unpruned)
    (mlp,) = [layer for layer in layers if "layers.1.mlp" in layer.name]
    plan = plan_from_kept(layers, {mlp.name: range(0, 64, 2)})  # block 0 keeps its 64 neurons, block 1 half
    apply_plan(model, plan)
    save_pretrained(model, tmp_path, plan=plan)
    padding = json.loads((tmp_path / PADDING_FILE).read_text())
    assert {o["module"] for o in padding["operations"]} == {
        f"model.layers.1.mlp.{n}_proj" for n in ("gate", "up", "down")
    }
    stock = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert stock.config.intermediate_size == 64
    assert parameters(stock) == parameters(unpruned)
    assert_same_behaviour("llama", stock, model)
    ours = from_pretrained(transformers.AutoModelForCausalLM, tmp_path)
    assert [layer.mlp.up_proj.out_features for layer in ours.model.layers] == [64, 32]
    assert_same_behaviour("llama", ours, model)


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_heads_the_config_cannot_state_are_padded_and_the_ffn_keeps_its_uniform_width(name, tmp_path):
    model, plan = pruned(name, uniform=True)
    heads = {w for n, w in widths(plan).items() if n.endswith(":heads")}
    assert len(heads) == 1  # the same number in every block
    assert max(heads) < 4
    (unstated,) = sync_pretrained_configs(model)
    assert "cannot state the widths of" in unstated
    assert "lightning_actprune.save_pretrained" in unstated
    assert model.config.num_attention_heads == 4  # BERT and GPT-2 derive head_dim from it: left as it is
    (ffn,) = set(widths(plan, FAMILIES[name].ffn).values())
    assert getattr(model.config, FAMILIES[name].width_field) == ffn
    save_pretrained(model, tmp_path, plan=plan)
    stock = auto(name).from_pretrained(tmp_path)
    assert getattr(stock.config, FAMILIES[name].width_field) == ffn  # the FFN loads at its pruned width
    assert_same_behaviour(name, stock, model)
    assert_same_behaviour(name, from_pretrained(auto(name), tmp_path), model)


def test_per_layer_widths_go_into_a_per_layer_config_field(tmp_path):
    config = transformers.Gemma3nTextConfig(
        vocab_size=VOCAB, vocab_size_per_layer_input=VOCAB, hidden_size=32, hidden_size_per_layer_input=4,
        intermediate_size=[64, 64], num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        max_position_embeddings=64, laurel_rank=4, altup_num_inputs=2, num_kv_shared_layers=0,
        activation_sparsity_pattern=[0.0, 0.0], layer_types=["full_attention"] * 2, **TOKENS,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.Gemma3nForCausalLM(config).eval()
    x = inputs("llama", batch=8, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layers = find_prunable_layers(model, {"": ((), x)}, exclude=["*laurel*"])
    mlp = [layer for layer in layers if ".mlp." in layer.name]  # the per-layer field sets these widths
    assert [layer.name for layer in mlp] == [
        f"model.layers.{i}.mlp.gate_proj+model.layers.{i}.mlp.up_proj" for i in (0, 1)
    ]
    apply_plan(model, plan_from_kept(mlp, {mlp[0].name: range(20), mlp[1].name: range(3, 30)}))
    assert sync_pretrained_configs(model) == []
    assert model.config.intermediate_size == [20, 27]
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**x).logits, model(**x).logits)
    generate = {"max_new_tokens": 5, "do_sample": False}
    assert torch.equal(loaded.generate(**x, **generate), model.generate(**x, **generate))


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_llama_style_head_counts_plug_in_with_an_explicit_head_dim(name, tmp_path):
    """The interface head pruning reports through: each attention module's heads, key/value heads and head_dim.

    One key/value head and its two query heads go from every layer, by hand (no adapter prunes Llama heads yet).
    Qwen2's config has no ``head_dim``: it must be written, or ``hidden_size // num_attention_heads`` (16) is built.
    """
    torch.manual_seed(0)
    model = auto(name).from_config(FAMILIES[name].config()).eval()
    operations, shapes = [], {}
    for i in range(2):
        attention = f"model.layers.{i}.self_attn"
        operations += [
            Op(f"{attention}.q_proj", "out", tuple(range(16, 32))),
            Op(f"{attention}.k_proj", "out", tuple(range(8, 16))),
            Op(f"{attention}.v_proj", "out", tuple(range(8, 16))),
            Op(f"{attention}.o_proj", "in", tuple(range(16, 32))),
        ]
        shapes[attention] = HeadShape(heads=2, kv_heads=1, head_dim=8)
    apply_plan(model, PruningPlan(0.0, "by hand", (), tuple(operations)))
    assert sync_pretrained_configs(model) != []  # without the shapes, the config cannot state the heads
    assert sync_pretrained_configs(model, head_shapes_of={"": shapes}) == []
    assert (model.config.num_attention_heads, model.config.num_key_value_heads, model.config.head_dim) == (2, 1, 8)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert (saved["num_attention_heads"], saved["num_key_value_heads"], saved["head_dim"]) == (2, 1, 8)
    loaded = auto(name).from_pretrained(tmp_path)
    assert parameters(loaded) == parameters(model)
    assert_same_behaviour(name, loaded, model)


def test_same_roles_are_tied_by_block_and_by_config_field():
    assert role("model.layers.11.mlp.gate_proj+model.layers.11.mlp.up_proj") == (
        "model.layers.*.mlp.gate_proj+model.layers.*.mlp.up_proj"
    )
    assert role("blocks.0.attn:heads") == "blocks.*.attn:heads"
    model, layers, _ = _analysed("t5", (), True)
    # T5's one d_ff and one num_heads: its encoder and decoder FFNs are one role, its three stacks' heads another
    heads, ffn = sorted((sorted(tie) for tie in uniform_ties(model, layers)), key=len)
    assert sorted(heads + ffn) == sorted(layer.name for layer in layers)
    assert all(name.endswith(":heads") for name in heads)
    assert len(heads) == 3
    assert {name.split(".")[0] for name in ffn} == {"encoder", "decoder"}
    model, layers, _ = _analysed("bart", (), True)
    ties = sorted(sorted(tie) for tie in uniform_ties(model, layers))  # encoder_ffn_dim and decoder_ffn_dim, heads
    assert ties == sorted(
        [[f"model.{part}.layers.{i}.fc1" for i in (0, 1)] for part in ("decoder", "encoder")]
        + [[f"model.{part}.layers.{i}.{attention}:heads" for i in (0, 1)]
           for part, attention in (("decoder", "self_attn"), ("decoder", "encoder_attn"), ("encoder", "self_attn"))]
    )  # fmt: skip
    model, layers, _ = _analysed("bert", (), True)
    ties = sorted(sorted(tie) for tie in uniform_ties(model, layers))
    assert ties == [
        [f"bert.encoder.layer.{i}.attention:heads" for i in (0, 1)],
        [f"bert.encoder.layer.{i}.intermediate.dense" for i in (0, 1)],
    ]  # the pooler has no twin


def test_roles_of_a_config_whose_head_width_is_a_read_only_property():
    # Falcon's head_dim is a property without a setter: its head counts cannot be stated, the roles still tie
    config = transformers.FalconConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_kv_heads=2,
        new_decoder_architecture=True,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.FalconForCausalLM(config).eval()
    layers = find_prunable_layers(model, torch.randint(3, VOCAB, (2, 6)))
    ties = sorted(sorted(tie) for tie in uniform_ties(model, layers))
    assert ties == [
        [f"transformer.h.{i}.mlp.dense_h_to_4h" for i in (0, 1)],
        [f"transformer.h.{i}.self_attention:heads" for i in (0, 1)],
    ]


def test_exactness_guard_and_bad_arguments(tmp_path):
    model, plan = pruned("llama", uniform=False)
    save_pretrained(model, tmp_path, plan=plan)
    weights = tmp_path / "model.safetensors"
    safetensors = pytest.importorskip("safetensors.torch")
    state = safetensors.load_file(weights)
    padding = json.loads((tmp_path / PADDING_FILE).read_text())
    operation = next(o for o in padding["operations"] if o["module"].endswith("up_proj"))
    state[f"{operation['module']}.weight"][operation["indices"][0]] = 1.0  # someone trained the padded model
    safetensors.save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(ActivationPruningError, match=r"up_proj.weight .* is not zero where actprune_padding.json"):
        from_pretrained(transformers.AutoModelForCausalLM, tmp_path)
    with pytest.raises(ActivationPruningError, match=r"must be a Hugging Face PreTrainedModel or hold exactly one"):
        save_pretrained(nn.Linear(2, 2), tmp_path)
    pair = nn.ModuleDict({"a": model, "b": copy.deepcopy(model)})
    with pytest.raises(
        ActivationPruningError, match=r"ModuleDict holds a \(LlamaForCausalLM\), b \(LlamaForCausalLM\)"
    ):
        save_pretrained(pair, tmp_path)
    unrecorded, _ = pruned("llama", uniform=False)
    with pytest.raises(ActivationPruningError, match=r"no pruning plan is recorded for it: pass the plan"):
        save_pretrained(unrecorded, tmp_path / "again")
    with pytest.raises(ActivationPruningError, match=r"`uniform_widths` must be True or False; got 'yes'"):
        PruningSettings(threshold=0.1, uniform_widths="yes")
    assert pretrained_models(pair) == [("a", model), ("b", pair["b"])]


# ---- the callback, configured from YAML -------------------------------------------------------------------------


class TinyLlama(pl.LightningModule):
    """A two-block Llama trained as a language model on a fixed token sequence task."""

    def __init__(self, intermediate_size: int = 64) -> None:
        super().__init__()
        config = transformers.LlamaConfig(**{**LLAMA_LIKE, "intermediate_size": intermediate_size})
        self.model = transformers.LlamaForCausalLM(config)

    def forward(self, tokens: Tensor) -> Any:
        return self.model(input_ids=tokens, labels=tokens)

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        return self(batch[0]).loss

    def validation_step(self, batch: list[Tensor], batch_idx: int) -> None:
        self.log("val_loss", self(batch[0]).loss)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=3e-3)


class CountingTokens(pl.LightningDataModule):
    """Sequences that count up from a random start: next-token prediction a tiny model learns in a few steps."""

    def _loader(self, seed: int) -> DataLoader:
        start = torch.randint(3, VOCAB - 12, (32, 1), generator=torch.Generator().manual_seed(seed))
        return DataLoader(TensorDataset(start + torch.arange(12)), batch_size=16)

    def train_dataloader(self) -> DataLoader:
        return self._loader(0)

    def val_dataloader(self) -> DataLoader:
        return self._loader(1)


@pytest.mark.slow
def test_fit_with_uniform_widths_from_yaml_then_the_models_own_save_pretrained(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(
        "seed_everything: 0\n"
        "trainer:\n"
        "  max_epochs: 2\n  accelerator: cpu\n"
        f"  default_root_dir: {tmp_path}\n"
        f"  logger: {{class_path: lightning.pytorch.loggers.CSVLogger, init_args: {{save_dir: {tmp_path}}}}}\n"
        "  callbacks:\n"
        "    - class_path: lightning_actprune.ActivationPruning\n"
        "      init_args: {target_params_reduction: 0.25, uniform_widths: true}\n"
    )
    cli = LightningCLI(TinyLlama, CountingTokens, run=False, args=["--config", str(config)])
    (pruning,) = [c for c in cli.trainer.callbacks if isinstance(c, ActivationPruning)]
    assert pruning.uniform_widths is True
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert not [w for w in caught if "cannot state" in str(w.message)]
    result = pruning.result
    assert result.params_reduction >= 0.25
    ffn = {name: kept for name, kept in widths(result.plan).items() if not name.endswith(":heads")}
    (width,) = set(ffn.values())  # one width for both blocks
    heads = {name: kept for name, kept in widths(result.plan).items() if name.endswith(":heads")}
    assert len(set(heads.values())) <= 1  # and one head count
    assert width < 64
    lm = cli.model.model
    assert lm.config.intermediate_size == width  # the callback kept the config in step
    lm.save_pretrained(tmp_path / "hf")  # the user's own save, after fit
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert loaded.config.intermediate_size == width
    assert_same_behaviour("llama", loaded, lm)
    (metrics,) = tmp_path.glob("lightning_logs/version_*/metrics.csv")
    with open(metrics) as f:
        rows = [r for r in csv.DictReader(f) if r.get("actprune/params_after")]
    assert float(rows[0]["actprune/params_after"]) == parameters(cli.model)
    fresh = load_pruned(TinyLlama(), pruning.pruned_checkpoint_path)  # the loaders keep the config in step too
    assert fresh.model.config.intermediate_size == width
    assert_same_behaviour("llama", fresh.model, lm)


def test_fit_with_free_widths_says_how_to_save_and_save_pretrained_takes_the_lightning_module(tmp_path, caplog):
    pl.seed_everything(0)
    model = TinyLlama()
    pruning = ActivationPruning(target_params_reduction=0.25, statistic="rms", pruned_checkpoint=None)
    trainer = pl.Trainer(
        max_epochs=1, accelerator="cpu", default_root_dir=tmp_path, callbacks=[pruning], enable_progress_bar=False
    )
    with caplog.at_level("INFO"):
        trainer.fit(model, datamodule=CountingTokens())
    assert len(set(widths(pruning.result.plan).values())) > 1
    assert "cannot state the widths of model.layers.0.mlp.down_proj" in caplog.text
    assert model.model.config.intermediate_size == 64  # not a width it could build
    save_pretrained(model, tmp_path / "hf")  # the plan the callback recorded, found through the LightningModule
    stock = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert stock.config.intermediate_size == max(widths(pruning.result.plan).values())
    assert_same_behaviour("llama", stock, model.model)
    assert_same_behaviour("llama", from_pretrained(transformers.AutoModelForCausalLM, tmp_path / "hf"), model.model)


def test_a_pruned_checkpoint_path_reloads_with_its_config_in_step(tmp_path):
    model, plan = pruned("llama", uniform=True)
    holder = nn.Module()
    holder.model = model
    width = model.model.layers[0].mlp.up_proj.out_features
    plan = dataclasses.replace(
        plan,
        operations=tuple(Op(f"model.{o.module}", o.dim, o.indices) for o in plan.operations),
        layers=tuple(
            dataclasses.replace(layer, name="+".join(f"model.{n}" for n in layer.name.split("+")))
            for layer in plan.layers
        ),
    )
    path = Path(tmp_path) / "pruned.pt"
    torch.save({"state_dict": holder.state_dict(), "actprune_plan": plan.to_dict()}, path)
    fresh = nn.Module()
    torch.manual_seed(0)
    fresh.model = transformers.AutoModelForCausalLM.from_config(FAMILIES["llama"].config())
    load_pruned(fresh, path)
    assert fresh.model.config.intermediate_size == width != 64
