"""Attention heads in every Hugging Face family, found by one mechanism: each family built from a tiny config.

The configs are ``CURATED`` of ``benchmarks/hf_families/families.py``: the families table of BENCHMARKS.md builds
the same models (``tests/test_benchmark_hf_families.py`` runs a subset of it).

For each family the oracle is written from the attention's own layout (head ``h`` is channels ``h*head_dim …
(h+1)*head_dim`` of the out projection's input, for every layout of q/k/v), not from the plan: the pruned model
equals the unpruned one whose removed heads are zeroed before the out projection. Causal language models (and the
encoder-decoders) then generate the same tokens with and without their key/value cache, and a fresh model shrinks to
the plan with :func:`load_pruned` and gives the same outputs.
"""

import copy
import io
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from benchmarks.hf_families.families import CURATED, GQA, SMALL, VOCAB
from lightning_actprune import ActivationPruning, ActivationPruningError, export_pruned, load_pruned
from lightning_actprune._counting import parameters_after
from lightning_actprune._heads import head_counts
from lightning_actprune._types import LayerPlan, PrunableLayer, PruningPlan, count_parameters
from lightning_actprune.core import apply_plan, find_prunable_layers, plan_from_kept
from tests.helpers import KeepUnpruned, assert_matches_oracle
from tests.test_heads import zero_heads_before

transformers = pytest.importorskip("transformers")


@dataclass(frozen=True)
class Family:
    """A tiny model of one family: how to build it, what it is, and where its attention keeps its heads.

    Attributes:
        build: the Hugging Face model, from a config.
        kind: ``"causal"`` and ``"seq2seq"`` generate; ``"encoder"``, ``"vision"``, ``"audio"`` do not.
        attention: the attention modules' names, ``{}`` for the layer index (two layers).
        out: the out projection, relative to an attention module.
        holder: the module that declares the head counts, relative to an attention module.
        coupled: head layers whose heads go from several modules at once (T5's stacks share position biases).
        kv_heads: key/value heads (grouped-query attention when fewer than the 4 heads).
    """

    build: Callable[[], nn.Module]
    kind: str
    attention: tuple[str, ...]
    out: str
    holder: str = ""
    coupled: tuple[tuple[str, ...], ...] = ()
    kv_heads: int = 4


T5_STACKS = tuple(
    tuple(f"model.{stack}.block.{i}.layer.{position}.{name}" for i in range(2))
    for stack, position, name in (
        ("encoder", 0, "SelfAttention"),
        ("decoder", 0, "SelfAttention"),
        ("decoder", 1, "EncDecAttention"),
    )
)

FAMILIES = {
    "llama": Family(CURATED["llama"].build, "causal", ("model.model.layers.{}.self_attn",), "o_proj", kv_heads=2),
    "mistral": Family(CURATED["mistral"].build, "causal", ("model.model.layers.{}.self_attn",), "o_proj", kv_heads=2),
    "qwen2": Family(  # biases on q, k and v
        CURATED["qwen2"].build, "causal", ("model.model.layers.{}.self_attn",), "o_proj", kv_heads=2
    ),
    "qwen3": Family(  # q_norm and k_norm over each head's channels
        CURATED["qwen3"].build, "causal", ("model.model.layers.{}.self_attn",), "o_proj", kv_heads=2
    ),
    "gemma": Family(CURATED["gemma"].build, "causal", ("model.model.layers.{}.self_attn",), "o_proj", kv_heads=2),
    "phi3": Family(  # one fused qkv_proj: [q | k | v]
        CURATED["phi3"].build, "causal", ("model.model.layers.{}.self_attn",), "o_proj", kv_heads=2
    ),
    "gpt_neox": Family(  # fused query_key_value, q/k/v interleaved per head, partial rotary
        CURATED["gpt_neox"].build, "causal", ("model.gpt_neox.layers.{}.attention",), "dense"
    ),
    "opt": Family(CURATED["opt"].build, "causal", ("model.model.decoder.layers.{}.self_attn",), "out_proj"),
    "bloom": Family(  # fused, interleaved per head; ALiBi biases built by the model for every head
        CURATED["bloom"].build, "causal", ("model.transformer.h.{}.self_attention",), "dense"
    ),
    "falcon": Family(  # fused, grouped per key/value head: [q q k v | q q k v]
        CURATED["falcon"].build, "causal", ("model.transformer.h.{}.self_attention",), "dense", kv_heads=2
    ),
    "falcon_multi_query": Family(  # fused [q … q | k | v], one key/value head
        CURATED["falcon_multi_query"].build, "causal", ("model.transformer.h.{}.self_attention",), "dense", kv_heads=1
    ),
    "gptj": Family(  # rotary on part of each head
        CURATED["gptj"].build, "causal", ("model.transformer.h.{}.attn",), "out_proj"
    ),
    "t5": Family(CURATED["t5"].build, "seq2seq", (), "o", coupled=T5_STACKS),
    "bart": Family(
        CURATED["bart"].build,
        "seq2seq",
        (
            "model.model.encoder.layers.{}.self_attn",
            "model.model.decoder.layers.{}.self_attn",
            "model.model.decoder.layers.{}.encoder_attn",
        ),
        "out_proj",
    ),
    "distilbert": Family(CURATED["distilbert"].build, "encoder", ("model.transformer.layer.{}.attention",), "out_lin"),
    "roberta": Family(
        CURATED["roberta"].build, "encoder", ("model.encoder.layer.{}.attention",), "output.dense", holder="self"
    ),
    "albert": Family(  # one layer, shared: called once per layer
        CURATED["albert"].build, "encoder", ("model.encoder.albert_layer_groups.0.albert_layers.0.attention",), "dense"
    ),
    "electra": Family(
        CURATED["electra"].build, "encoder", ("model.encoder.layer.{}.attention",), "output.dense", holder="self"
    ),
    "deberta_v2": Family(  # disentangled attention: relative positions projected per head (shared key projection)
        CURATED["deberta_v2"].build, "encoder", ("model.encoder.layer.{}.attention",), "output.dense", holder="self"
    ),
    "vit": Family(CURATED["vit"].build, "vision", ("model.layers.{}.attention",), "o_proj"),
    "wav2vec2": Family(CURATED["wav2vec2"].build, "audio", ("model.encoder.layers.{}.attention",), "out_proj"),
}


class Net(nn.Module):
    """A Hugging Face model whose output is one tensor: its logits or its last hidden state."""

    def __init__(self, model: nn.Module, kind: str) -> None:
        super().__init__()
        self.model, self.kind = model, kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "seq2seq":
            return self.model(input_ids=x, decoder_input_ids=x).logits
        output = self.model(x)
        return output.logits if getattr(output, "logits", None) is not None else output.last_hidden_state


def build(family: Family) -> tuple[Net, torch.Tensor]:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # token ids of the default configs beyond the tiny vocabulary
        net = Net(family.build(), family.kind).eval()
    generator = torch.Generator().manual_seed(1)
    if family.kind == "vision":
        return net, torch.randn(3, 3, 16, 16, generator=generator)
    if family.kind == "audio":
        return net, torch.randn(3, 200, generator=generator)
    return net, torch.randint(1, VOCAB, (3, 8), generator=generator)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def head_layer_names(family: Family) -> list[str]:
    singles = [pattern.format(i) for pattern in family.attention for i in range(2) if "{}" in pattern]
    singles += [pattern for pattern in family.attention if "{}" not in pattern]
    return [f"{name}:heads" for name in singles] + [f"{'+'.join(names)}:heads" for names in family.coupled]


def kept_in(layer: PrunableLayer, index: int) -> list[int]:
    """One head or group of each block that keeps equal counts, another one in every other layer; half elsewhere."""
    size = layer.neurons // layer.groups
    if size > 1 and layer.groups > 1:
        return [block * size + index % size for block in range(layer.groups)]
    return [1, 3] if index % 2 == 0 and layer.neurons == 4 else [index % 2] if layer.neurons == 2 else [2]


def removed_heads(layer: PrunableLayer, kept: list[int], heads: int) -> list[int]:
    """The query heads that go: the layer's neurons are query heads, or key/value groups of query heads."""
    size = heads // layer.neurons
    return [h for h in range(heads) if h // size not in kept]


def members(layer: PrunableLayer) -> list[str]:
    return layer.name.removesuffix(":heads").split("+")


def generated(model: nn.Module, ids: torch.Tensor, use_cache: bool) -> torch.Tensor:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.generate(ids, max_new_tokens=4, do_sample=False, use_cache=use_cache, pad_token_id=0)


def check_family(family: Family, gqa_unit: str, tmp_path: Any) -> None:
    net, x = build(family)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layers = find_prunable_layers(net, x, gqa_unit=gqa_unit)
    messages = "\n".join(str(w.message) for w in caught)
    assert "the heads of" not in messages, messages
    assert "inside attention" not in messages, messages
    heads = [layer for layer in layers if layer.name.endswith(":heads")]
    assert sorted(layer.name for layer in heads) == sorted(head_layer_names(family))
    by_units = gqa_unit == "kv_groups" and family.kv_heads < 4
    for layer in heads:
        assert layer.neurons == (family.kv_heads if by_units else 4)
        assert layer.groups == (family.kv_heads if not by_units and 1 < family.kv_heads < 4 else 1)
    before = head_counts(net)
    kept = {layer.name: kept_in(layer, i) for i, layer in enumerate(heads)}
    plan = plan_from_kept(heads, kept)
    reference = copy.deepcopy(net)

    apply_plan(net, plan)

    expected = {}
    for layer in heads:
        for name in members(layer):
            holder = f"{name}.{family.holder}" if family.holder else name
            counts = before[holder]
            gone = removed_heads(layer, kept[layer.name], counts.heads)
            kv_after = len(kept[layer.name]) if by_units or counts.kv_heads == counts.heads else counts.kv_heads
            expected[holder] = (counts.heads - len(gone), kv_after, counts.head_dim, counts.heads, counts.kv_heads)
            zero_heads_before(reference.get_submodule(name), family.out, gone, counts.head_dim)
    assert {name: tuple(c) for name, c in head_counts(net).items() if name in expected} == expected
    with torch.no_grad():
        torch.testing.assert_close(net(x), reference(x))

    if family.kind in ("causal", "seq2seq"):
        ids = x[:2, :5]
        with_cache = generated(net.model, ids, use_cache=True)
        torch.testing.assert_close(with_cache, generated(net.model, ids, use_cache=False), rtol=0, atol=0)
        torch.testing.assert_close(with_cache, generated(reference.model, ids, use_cache=True), rtol=0, atol=0)

    path = tmp_path / "pruned.pt"
    export_pruned(net, path, plan=plan)
    fresh, _ = build(family)
    reloaded = load_pruned(fresh, path).eval()
    assert head_counts(reloaded) == head_counts(net)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), net(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_heads_go_like_zeroing_them_and_the_model_generates_saves_and_reloads(name, tmp_path):
    check_family(FAMILIES[name], "query_heads", tmp_path)


GROUPED = [name for name, family in FAMILIES.items() if 1 < family.kv_heads < 4]


@pytest.mark.parametrize("name", GROUPED)
def test_key_value_groups_go_whole_with_gqa_unit_kv_groups(name, tmp_path):
    check_family(FAMILIES[name], "kv_groups", tmp_path)


@pytest.mark.parametrize("name", ["llama", "phi3", "bloom", "t5"])
def test_a_plan_that_fails_after_the_surgery_leaves_the_model_exactly_as_it_was(name):
    family = FAMILIES[name]
    net, x = build(family)
    heads = [layer for layer in find_prunable_layers(net, x) if layer.name.endswith(":heads")]
    plan = plan_from_kept(heads, {layer.name: kept_in(layer, i) for i, layer in enumerate(heads)})
    # the last head layer says it has 3 heads: its surgery runs, then its head counts cannot follow
    wrong = LayerPlan(plan.layers[-1].name, 3, (0,))
    bad = PruningPlan(plan.threshold, plan.statistic, (*plan.layers[:-1], wrong), plan.operations)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    attributes = {name: dict(vars(m)) for name, m in net.named_modules()}
    with torch.no_grad():
        expected = net(x)

    with pytest.raises(ActivationPruningError, match=r"the plan's heads of .* number 3; it has 4 heads"):
        apply_plan(net, bad)

    assert {name: dict(vars(m)) for name, m in net.named_modules()} == attributes
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())
    with torch.no_grad():
        torch.testing.assert_close(net(x), expected, rtol=0, atol=0)


def test_t5_heads_are_coupled_across_the_layers_of_a_stack_with_the_bias_table():
    net, x = build(FAMILIES["t5"])
    heads = [layer for layer in find_prunable_layers(net, x) if layer.name.endswith(":heads")]
    encoder = next(layer for layer in heads if "encoder" in layer.name)
    table = "model.encoder.block.0.layer.0.SelfAttention.relative_attention_bias"
    (bias,) = [piece for piece in encoder.slices if piece.module == table]
    assert (bias.dim, bias.indices, bias.neurons) == ("out", (0, 1, 2, 3), (0, 1, 2, 3))  # one column per head
    apply_plan(net, plan_from_kept([encoder], {encoder.name: [0, 2]}))
    attention = net.model.encoder.block
    assert attention[0].layer[0].SelfAttention.relative_attention_bias.weight.shape == (32, 2)
    assert [block.layer[0].SelfAttention.n_heads for block in attention] == [2, 2]


def test_bloom_alibi_biases_are_cut_to_each_layers_heads():
    net, x = build(FAMILIES["bloom"])
    heads = [layer for layer in find_prunable_layers(net, x) if layer.name.endswith(":heads")]
    reference = copy.deepcopy(net)
    apply_plan(net, plan_from_kept(heads, {heads[0].name: [0, 3], heads[1].name: [1, 2, 3]}))
    assert [block.self_attention.num_heads for block in net.model.transformer.h] == [2, 3]
    assert net.model.transformer.num_heads == 4  # the model still builds the biases of all heads
    for block, gone in zip(reference.model.transformer.h, ([1, 2], [0]), strict=True):
        zero_heads_before(block.self_attention, "dense", gone, 8)
    with torch.no_grad():
        torch.testing.assert_close(net(x), reference(x))


def test_phi3_reads_its_head_count_from_a_view_of_the_config_that_is_its_own():
    net, x = build(FAMILIES["phi3"])
    config = net.model.config
    heads = [layer for layer in find_prunable_layers(net, x) if layer.name.endswith(":heads")]
    apply_plan(net, plan_from_kept(heads, {heads[0].name: [1, 3], heads[1].name: [0, 1, 2, 3]}))
    attention = net.model.model.layers[0].self_attn
    assert attention.config.num_attention_heads == 2
    assert attention.num_key_value_groups == 1
    assert config.num_attention_heads == 4
    assert net.model.model.layers[1].self_attn.config is config
    config._attn_implementation = "eager"
    assert attention.config._attn_implementation == "eager"  # everything else is read from the model's config
    buffer = io.BytesIO()
    torch.save(net, buffer)  # the view is plain data: the whole model pickles, copies and runs the same
    buffer.seek(0)
    with torch.no_grad():
        expected = net(x)
        torch.testing.assert_close(torch.load(buffer, weights_only=False)(x), expected, rtol=0, atol=0)
        torch.testing.assert_close(copy.deepcopy(net)(x), expected, rtol=0, atol=0)


class LanguageModel(pl.LightningModule):
    """A tiny Llama with grouped-query attention (4 heads over 2 key/value heads) trained on its next tokens."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lm = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL, **GQA))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm(ids).logits

    def training_step(self, batch: tuple[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.lm(batch[0], labels=batch[0]).loss

    def validation_step(self, batch: tuple[torch.Tensor], batch_idx: int) -> None:
        self.log("val_loss", self.lm(batch[0], labels=batch[0]).loss)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def test_a_trainer_with_the_defaults_prunes_heads_and_ffn_neurons_of_a_grouped_query_llama(tmp_path):
    ids = torch.arange(64 * 12).reshape(64, 12) % 17 + 1  # a learnable pattern
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=16)
    model, keep = LanguageModel(), KeepUnpruned()
    pruning = ActivationPruning(target_params_reduction=0.3)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        default_root_dir=tmp_path,
        callbacks=[keep, pruning],
        logger=CSVLogger(tmp_path),
    )
    trainer.fit(model, data, data)

    widths = {layer.name: (layer.neurons, len(layer.kept)) for layer in pruning.result.plan.layers}
    heads = {name: w for name, w in widths.items() if name.endswith(":heads")}
    ffn = {name: w for name, w in widths.items() if not name.endswith(":heads")}
    assert sorted(heads) == [f"lm.model.layers.{i}.self_attn:heads" for i in range(2)]
    assert sum(after for _, after in heads.values()) < 8, widths  # some query heads went …
    assert sum(after for _, after in ffn.values()) < sum(before for before, _ in ffn.values()), widths  # … and neurons
    assert pruning.result.params_reduction >= 0.3
    for i, layer in enumerate(model.lm.model.layers):
        attention = layer.self_attn
        kept = heads[f"lm.model.layers.{i}.self_attn:heads"][1]
        assert attention.q_proj.out_features == 8 * kept
        assert attention.k_proj.out_features == 16  # both key/value heads stay: each keeps as many query heads
        assert attention.num_key_value_groups * 2 == kept
    assert_matches_oracle(model, keep.model, pruning.result.plan, ids[:4])
    assert "actprune/params_after" in next(tmp_path.glob("lightning_logs/version_*/metrics.csv")).read_text()
    assert trainer.checkpoint_callback is not None
    assert list(tmp_path.glob("lightning_logs/version_*/checkpoints/*.ckpt"))
    reloaded = load_pruned(LanguageModel(), pruning.pruned_checkpoint_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids[:4]), model(ids[:4]), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("name", "gqa_unit"),
    [
        ("llama", "query_heads"),
        ("llama", "kv_groups"),
        ("phi3", "query_heads"),
        ("gpt_neox", "query_heads"),
        ("t5", "query_heads"),
    ],
)
def test_the_parameter_count_of_a_head_plan_is_that_of_the_pruned_model(name, gqa_unit):
    net, x = build(FAMILIES[name])
    heads = [layer for layer in find_prunable_layers(net, x, gqa_unit=gqa_unit) if layer.name.endswith(":heads")]
    plan = plan_from_kept(heads, {layer.name: kept_in(layer, i) for i, layer in enumerate(heads)})
    before = count_parameters(net)
    counted = parameters_after(net, plan, before)

    apply_plan(net, plan)

    if name == "t5":  # an Embedding (the bias table) is not counted by arithmetic: the search sizes the pruned model
        assert counted is None
    else:
        assert counted == count_parameters(net) < before


@pytest.mark.parametrize("name", ["llama", "bloom", "t5"])
def test_a_model_pruned_twice_reloads_from_the_composed_plan(name, tmp_path):
    from lightning_actprune._module_plan import _record_pruning

    family = FAMILIES[name]
    net, x = build(family)
    for _ in range(2):  # the second analysis probes the pruned model, whose per-head inputs are already cut
        heads = [layer for layer in find_prunable_layers(net, x) if layer.name.endswith(":heads")]
        kept = {layer.name: list(range(1, layer.neurons, 2)) for layer in heads}  # every other: 4 -> 2 -> 1 heads
        plan = plan_from_kept(heads, kept)
        apply_plan(net, plan)
        _record_pruning(net, plan)
    counts = {name: tuple(c) for name, c in head_counts(net).items()}
    assert all(c[0] < c[3] for c in counts.values())
    path = tmp_path / "twice.pt"
    export_pruned(net, path)
    fresh, _ = build(family)
    reloaded = load_pruned(fresh, path).eval()
    assert {name: tuple(c) for name, c in head_counts(reloaded).items()} == counts
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), net(x), rtol=0, atol=0)
