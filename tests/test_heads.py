"""Whole attention heads: each supported implementation prunes exactly like zeroing the heads before the out projection.

The oracle is written from the attention's own layout (head ``h`` is channels ``h*head_dim … (h+1)*head_dim`` of
the out projection's input), not from the plan's operations, so a wrong slice of q, k or v shows up.
"""

import copy
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_actprune import ActivationPruning, ActivationPruningError, load_pruned
from lightning_actprune._surgery import pruned_temporarily
from lightning_actprune.core import ActivationRecorder, apply_plan, find_prunable_layers, plan_from_kept, plan_pruning
from tests.helpers import NUM_CLASSES, Classifier, KeepUnpruned, assert_matches_oracle, loaders, zero_removed_inputs


def tiny_vit(**options: Any) -> tuple[nn.Module, torch.Tensor]:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=NUM_CLASSES, **options
    )
    return model.eval(), torch.randn(3, 3, 16, 16)


class Bert(nn.Module):
    """A tiny ``BertModel`` whose output is its last hidden state (a tensor, for the comparisons)."""

    def __init__(self) -> None:
        super().__init__()
        transformers = pytest.importorskip("transformers")
        config = transformers.BertConfig(
            vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
            max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        )  # fmt: skip
        self.bert = transformers.BertModel(config)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.bert(ids).last_hidden_state


def tiny_bert() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return Bert().eval(), torch.randint(0, 50, (3, 8))


class GPT2(nn.Module):
    """A tiny ``GPT2LMHeadModel`` (4 heads of 8 channels) whose output is its logits; ``lm`` is the model itself."""

    def __init__(self, **options: Any) -> None:
        super().__init__()
        transformers = pytest.importorskip("transformers")
        config = transformers.GPT2Config(
            n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0, **options
        )
        self.lm = transformers.GPT2LMHeadModel(config)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm(ids).logits


def tiny_gpt2(**options: Any) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return GPT2(**options).eval(), torch.randint(0, 64, (3, 8))


class Encoder(nn.Module):
    """Two causal ``nn.TransformerEncoderLayer`` (sequence first inside), mean over positions, a linear head."""

    def __init__(self, add_bias_kv: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(nn.TransformerEncoderLayer(32, 4, dim_feedforward=24, dropout=0.0) for _ in "ab")
        if add_bias_kv:
            self.layers[0].self_attn = nn.MultiheadAttention(32, 4, add_bias_kv=True)
        self.out = nn.Linear(32, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.transpose(0, 1)  # (batch, positions, features) -> (positions, batch, features)
        mask = torch.triu(torch.ones(len(x), len(x), dtype=torch.bool), diagonal=1)
        for layer in self.layers:
            x = layer(x, src_mask=mask)
        return self.out(x.mean(0))


def tiny_encoder() -> tuple[nn.Module, torch.Tensor]:
    return Encoder().eval(), torch.randn(3, 6, 32)


# per implementation: the model, where each attention's out projection is, its head count attribute
IMPLEMENTATIONS = {
    "timm": (tiny_vit, "blocks.{}.attn", "proj", "num_heads"),
    "bert": (tiny_bert, "bert.encoder.layer.{}.attention", "output.dense", "self.num_attention_heads"),
    "gpt2": (tiny_gpt2, "lm.transformer.h.{}.attn", "c_proj", "num_heads"),
    "torch": (tiny_encoder, "layers.{}.self_attn", "out_proj", "num_heads"),
}


def head_count(attention: nn.Module, attribute: str) -> int:
    *path, name = attribute.split(".")
    return getattr(attention.get_submodule(".".join(path)), name)


def zeroed(x: torch.Tensor, heads: list[int], head_dim: int) -> torch.Tensor:
    x = x.clone()
    for h in heads:
        x[..., h * head_dim : (h + 1) * head_dim] = 0
    return x


def zero_heads_before(attention: nn.Module, out_projection: str, heads: list[int], head_dim: int) -> None:
    """The oracle, on the unpruned model: ``heads``' outputs are zero where the out projection reads them."""
    if not isinstance(attention, nn.MultiheadAttention):
        attention.get_submodule(out_projection).register_forward_pre_hook(
            lambda module, args: (zeroed(args[0], heads, head_dim), *args[1:])
        )
        return

    def recompute(module: nn.MultiheadAttention, args: tuple, kwargs: dict, output: tuple) -> tuple:
        # PyTorch's own attention with an identity out projection gives the heads' outputs; then the real one
        width = module.embed_dim
        heads_out, _ = F.multi_head_attention_forward(
            *args[:3], width, module.num_heads, module.in_proj_weight, module.in_proj_bias, None, None, False, 0.0,
            torch.eye(width), torch.zeros(width), training=False, key_padding_mask=kwargs.get("key_padding_mask"),
            need_weights=False, attn_mask=kwargs.get("attn_mask"),
        )  # fmt: skip
        return F.linear(zeroed(heads_out, heads, head_dim), module.out_proj.weight, module.out_proj.bias), None

    attention.register_forward_hook(recompute, with_kwargs=True)


@pytest.mark.parametrize("implementation", list(IMPLEMENTATIONS))
def test_removing_heads_equals_zeroing_them_before_the_out_projection(implementation):
    build, attention, out_projection, attribute = IMPLEMENTATIONS[implementation]
    model, x = build()
    layers = find_prunable_layers(model, x)
    heads = {layer.name: layer for layer in layers if layer.name.endswith(":heads")}
    assert sorted(heads) == [attention.format(i) + ":heads" for i in range(2)]
    assert all(layer.neurons == 4 for layer in heads.values())
    kept = {attention.format(0) + ":heads": [1, 3], attention.format(1) + ":heads": [2]}
    plan = plan_from_kept(list(heads.values()), kept)
    reference = copy.deepcopy(model)
    parameters_before = sum(p.numel() for p in model.parameters())

    apply_plan(model, plan)

    for block, removed in ((0, [0, 2]), (1, [0, 1, 3])):
        name = attention.format(block)
        assert head_count(model.get_submodule(name), attribute) == 4 - len(removed)
        zero_heads_before(reference.get_submodule(name), out_projection, removed, head_dim=8)
    # every removed head takes 8 channels of q, k and v (weights and biases) and 8 input columns of the out projection
    per_head = 3 * (8 * 32 + 8) + 8 * 32
    assert sum(p.numel() for p in model.parameters()) == parameters_before - 5 * per_head
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x))


@pytest.mark.parametrize("implementation", list(IMPLEMENTATIONS))
def test_a_temporary_prune_restores_the_head_counts_and_every_module_keeps_a_head(implementation):
    build, attention, _, attribute = IMPLEMENTATIONS[implementation]
    model, x = build()
    layers = find_prunable_layers(model, x)
    kind = type(model.get_submodule(attention.format(0)))
    with torch.no_grad():
        before = model(x)
    with ActivationRecorder(model) as recorder, torch.no_grad():
        model(x)
    plan = plan_pruning(layers, recorder.moments(), threshold=1e30, statistic="rms")
    assert {layer.name: len(layer.kept) for layer in plan.layers if layer.name.endswith(":heads")} == {
        attention.format(i) + ":heads": 1 for i in range(2)
    }
    with pruned_temporarily(model, plan):
        assert head_count(model.get_submodule(attention.format(0)), attribute) == 1
        with torch.no_grad():
            model(x)
    assert head_count(model.get_submodule(attention.format(0)), attribute) == 4
    assert type(model.get_submodule(attention.format(0))) is kind  # a pruned nn.MultiheadAttention changed class
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=0, atol=0)


@pytest.mark.parametrize("implementation", ["timm", "bert", "gpt2"])  # nn.MultiheadAttention's are not Linears
def test_without_head_pruning_the_attention_projections_are_skipped_with_a_hint(implementation):
    build, attention, _, _ = IMPLEMENTATIONS[implementation]
    model, x = build()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layers = find_prunable_layers(model, x, prune_heads=False)
    assert not [layer for layer in layers if layer.name.endswith(":heads")]
    messages = "\n".join(str(w.message) for w in caught)
    assert f"inside attention {attention.format(0)}: use head pruning (`prune_heads: true`)." in messages
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        find_prunable_layers(model, x)
    assert "inside attention" not in "\n".join(str(w.message) for w in caught)


@pytest.mark.parametrize(
    ("build", "expected", "message"),
    [
        (
            lambda: (Encoder(add_bias_kv=True).eval(), torch.randn(3, 6, 32)),
            ["layers.1.self_attn:heads"],
            "not pruning the heads of layers.0.self_attn: it adds bias_k/bias_v",
        ),
        (
            lambda: tiny_vit(scale_attn_norm=True),
            [],
            "the heads of blocks.0.attn, the heads of blocks.1.attn: its LayerNorm (scale_norm) normalises over all",
        ),
        (
            lambda: tiny_gpt2(add_cross_attention=True),
            ["lm.transformer.h.0.attn:heads", "lm.transformer.h.1.attn:heads"],
            "the heads of lm.transformer.h.0.crossattention, the heads of lm.transformer.h.1.crossattention: it is"
            " cross-attention",
        ),
    ],
    ids=["torch_bias_kv", "timm_scale_norm", "gpt2_cross_attention"],
)
def test_attention_whose_heads_cannot_go_alone_keeps_them_and_says_why(build, expected, message):
    model, x = build()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layers = find_prunable_layers(model, x)
    assert [layer.name for layer in layers if layer.name.endswith(":heads")] == expected
    assert message in "\n".join(str(w.message) for w in caught)


@pytest.mark.parametrize(
    "options",
    [{"attn_implementation": "sdpa"}, {"attn_implementation": "eager", "reorder_and_upcast_attn": True}],
    ids=["sdpa", "eager_upcast"],
)
def test_pruned_gpt2_heads_keep_the_key_value_cache_working(options):
    model, x = tiny_gpt2(**options)
    assert model.lm.config._attn_implementation == options["attn_implementation"]
    heads = [layer for layer in find_prunable_layers(model, x) if layer.name.endswith(":heads")]
    reference = copy.deepcopy(model)
    apply_plan(model, plan_from_kept(heads, {heads[0].name: [1, 3], heads[1].name: [2]}))
    for block, removed in ((0, [0, 2]), (1, [0, 1, 3])):
        attention = model.lm.transformer.h[block].attn
        assert (attention.num_heads, attention.split_size, attention.embed_dim) == (
            4 - len(removed),
            32 - 8 * len(removed),
            32,
        )
        zero_heads_before(reference.lm.transformer.h[block].attn, "c_proj", removed, head_dim=8)
    following = torch.randint(0, 64, (3, 1), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        prompt, expected = model.lm(x, use_cache=True), reference.lm(x, use_cache=True)
        torch.testing.assert_close(prompt.logits, expected.logits)
        assert prompt.past_key_values.layers[0].keys.shape == (3, 2, 8, 8)  # (batch, heads, tokens, head_dim)
        step = model.lm(following, cache=prompt.past_key_values, use_cache=True).logits
        torch.testing.assert_close(step, reference.lm(following, cache=expected.past_key_values).logits)
        torch.testing.assert_close(step, model(torch.cat([x, following], dim=1))[:, -1:])  # the cache changed nothing
        generated = model.lm.generate(x, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert generated.shape == (3, 11)


def test_vit_fit_prunes_heads_and_neurons_together_then_reloads_and_exports(make_trainer, tmp_path):
    model, _ = tiny_vit()
    classifier = Classifier(model, lr=0.01)
    keep = KeepUnpruned()
    pruning = ActivationPruning(target_params_reduction=0.3)
    trainer = make_trainer(keep, pruning, max_epochs=1, logger=False, enable_checkpointing=False)
    trainer.fit(classifier, *loaders((3, 16, 16), batch_size=16))

    plan = pruning.result.plan
    widths = {layer.name: len(layer.kept) for layer in plan.layers}
    assert {"net.blocks.0.attn:heads", "net.blocks.1.attn:heads", "net.blocks.0.mlp.fc1"} <= set(widths)
    assert sum(n for name, n in widths.items() if name.endswith(":heads")) < 8, widths  # some heads went
    assert pruning.result.params_reduction >= 0.3
    for block in range(2):
        attn = classifier.net.blocks[block].attn
        assert attn.num_heads == widths[f"net.blocks.{block}.attn:heads"] >= 1
        assert attn.qkv.out_features == 3 * attn.num_heads * 8 == 3 * attn.attn_dim
    x = torch.randn(5, 3, 16, 16)
    assert_matches_oracle(classifier, keep.model, plan, x)

    fresh, _ = tiny_vit()
    reloaded = load_pruned(Classifier(fresh), pruning.pruned_checkpoint_path).eval()
    assert [b.attn.num_heads for b in reloaded.net.blocks] == [b.attn.num_heads for b in classifier.net.blocks]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), classifier(x), rtol=0, atol=0)

    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    path = tmp_path / "vit.onnx"
    torch.onnx.export(classifier.net.eval(), (x,), str(path), external_data=False)
    shapes = {i.name: tuple(i.dims) for i in onnx.load(str(path)).graph.initializer}
    for block in range(2):
        assert shapes[f"blocks.{block}.attn.qkv.bias"] == (3 * 8 * classifier.net.blocks[block].attn.num_heads,)
    exported = torch.export.export(classifier.net, (x,)).module()
    with torch.no_grad():
        torch.testing.assert_close(exported(x), classifier.net(x))


def test_encoder_fit_prunes_multihead_attention_heads_and_reloads_exactly(make_trainer):
    classifier = Classifier(Encoder(), lr=0.01)
    keep = KeepUnpruned()
    pruning = ActivationPruning(target_params_reduction=0.3)
    trainer = make_trainer(keep, pruning, max_epochs=1, logger=False, enable_checkpointing=False)
    trainer.fit(classifier, *loaders((6, 32), batch_size=16))

    widths = {layer.name: len(layer.kept) for layer in pruning.result.plan.layers}
    assert {"net.layers.0.self_attn:heads", "net.layers.1.self_attn:heads", "net.layers.0.linear1"} <= set(widths)
    assert sum(n for name, n in widths.items() if name.endswith(":heads")) < 8, widths  # some heads went
    for block in range(2):
        attention = classifier.net.layers[block].self_attn
        assert attention.num_heads == widths[f"net.layers.{block}.self_attn:heads"]
        assert attention.in_proj_weight.shape == (3 * 8 * attention.num_heads, 32)
    x = torch.randn(5, 6, 32)
    reference = keep.model
    zero_removed_inputs(reference, pruning.result.plan)  # the FFN neurons; nn.MultiheadAttention needs its own hook
    removed = {layer.name: list(layer.removed) for layer in pruning.result.plan.layers}
    for block in range(2):
        heads = removed[f"net.layers.{block}.self_attn:heads"]
        zero_heads_before(reference.net.layers[block].self_attn, "out_proj", heads, head_dim=8)
    classifier.eval()
    with torch.no_grad():
        torch.testing.assert_close(classifier(x), reference(x))

    reloaded = load_pruned(Classifier(Encoder()), pruning.pruned_checkpoint_path).eval()
    assert [type(layer.self_attn) for layer in reloaded.net.layers] == [
        type(layer.self_attn) for layer in classifier.net.layers
    ]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), classifier(x), rtol=0, atol=0)


def test_overlapping_recorders_measure_multihead_attention_until_the_last_one_ends():
    model, x = tiny_encoder()
    first, second = ActivationRecorder(model).__enter__(), ActivationRecorder(model).__enter__()
    first.__exit__(None, None, None)  # ends before the other, as the callback's preview does
    with torch.no_grad():
        model(x)
    assert "layers.0.self_attn.out_proj" in second.moments()  # the heads' activations were still measured
    second.__exit__(None, None, None)
    assert type(model.layers[0].self_attn) is nn.MultiheadAttention


class TinyAttention(nn.Module):
    """Attention written by hand, 4 heads of 8 channels over 2 key/value heads, its q/k/v stored in ``layout``.

    No class name, module name or library says where its heads are: only its own numbers (``num_heads``,
    ``num_key_value_heads``, ``head_dim``) and what its forward does.

    Layouts: ``separate`` (q, k, v), ``kvq`` (one projection, ``[k | v | q]``), ``per_group`` (one projection, each
    key/value head's queries then its key and value), ``per_channel`` (one projection storing channel ``d`` of every
    head together: its blocks are not heads), ``fixed`` (``separate``, but its forward splits into 4 heads whatever
    its attributes say).
    """

    def __init__(self, layout: str, kv_heads: int = 2) -> None:
        super().__init__()
        self.layout, self.num_heads, self.num_key_value_heads, self.head_dim = layout, 4, kv_heads, 8
        if layout in ("separate", "fixed"):
            self.q, self.k, self.v = nn.Linear(32, 32), nn.Linear(32, 8 * kv_heads), nn.Linear(32, 8 * kv_heads)
        else:
            self.qkv = nn.Linear(32, 8 * (4 + 2 * kv_heads))
        self.out = nn.Linear(32, 32)

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch, tokens, _ = x.shape
        heads, kv_heads, width = self.num_heads, self.num_key_value_heads, self.head_dim
        if self.layout in ("separate", "fixed"):
            q_heads = 4 if self.layout == "fixed" else heads
            q = self.q(x).view(batch, tokens, q_heads, width)
            return q, self.k(x).view(batch, tokens, -1, width), self.v(x).view(batch, tokens, -1, width)
        fused = self.qkv(x)
        if self.layout == "kvq":
            k, v, q = fused.split([kv_heads * width, kv_heads * width, heads * width], dim=-1)
            return q.view(batch, tokens, heads, width), *(t.view(batch, tokens, kv_heads, width) for t in (k, v))
        if self.layout == "per_group":
            grouped = fused.view(batch, tokens, kv_heads, heads // kv_heads + 2, width)
            q = grouped[..., :-2, :].reshape(batch, tokens, heads, width)
            return q, grouped[..., -2, :], grouped[..., -1, :]
        by_channel = fused.view(batch, tokens, width, heads + 2 * kv_heads).transpose(-1, -2)
        return by_channel.split([heads, kv_heads, kv_heads], dim=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (t.transpose(1, 2) for t in self.split(x))  # (batch, heads, tokens, head_dim)
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
        heads = F.scaled_dot_product_attention(q, k, v)
        return self.out(heads.transpose(1, 2).reshape(*x.shape[:2], -1))


class Stack(nn.Module):
    """Two residual blocks of :class:`TinyAttention`, a mean over tokens and a linear head."""

    def __init__(self, layout: str, kv_heads: int = 2) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(TinyAttention(layout, kv_heads) for _ in "ab")
        self.head = nn.Linear(32, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return self.head(x.mean(1))


@pytest.mark.parametrize("layout", ["separate", "kvq", "per_group"])
@pytest.mark.parametrize("gqa_unit", ["query_heads", "kv_groups"])
def test_heads_of_an_attention_written_by_hand_are_found_from_its_numbers_in_any_qkv_layout(layout, gqa_unit):
    model, x = Stack(layout).eval(), torch.randn(3, 6, 32)
    heads = [layer for layer in find_prunable_layers(model, x, gqa_unit=gqa_unit) if layer.name.endswith(":heads")]
    assert [layer.name for layer in heads] == ["blocks.0:heads", "blocks.1:heads"]
    by_groups = gqa_unit == "kv_groups"
    assert [(layer.neurons, layer.groups) for layer in heads] == [(2, 1) if by_groups else (4, 2)] * 2
    # query heads: one of each key/value head's two goes; key/value groups: the first goes with its two queries
    kept = {heads[0].name: [1] if by_groups else [1, 3], heads[1].name: [1] if by_groups else [0, 2]}
    removed = [[0, 1], [0, 1]] if by_groups else [[0, 2], [1, 3]]
    reference = copy.deepcopy(model)

    apply_plan(model, plan_from_kept(heads, kept))

    for block, gone in zip(range(2), removed, strict=True):
        attention = model.blocks[block]
        assert (attention.num_heads, attention.num_key_value_heads) == (2, 1 if by_groups else 2)
        zero_heads_before(reference.blocks[block], "out", gone, head_dim=8)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x))


def tied_weights() -> tuple[nn.Module, torch.Tensor]:
    model = Stack("separate", kv_heads=4).eval()
    model.blocks[0].k.weight = model.blocks[0].q.weight
    return model, torch.randn(3, 6, 32)


@pytest.mark.parametrize(
    ("build", "gqa_unit", "message"),
    [
        (
            lambda: (Stack("per_channel").eval(), torch.randn(3, 6, 32)),
            "query_heads",
            "not pruning the heads of blocks.0: the layout of blocks.0.qkv could not be proven: zeroing its outputs 0-7"
            " changes heads 0, 1, 2, 3, and no block of its projections feeds a single head (its channels are not"
            " stored head by head).",
        ),
        (
            lambda: (Stack("fixed").eval(), torch.randn(3, 6, 32)),
            "query_heads",
            # the analysis traces on 2 of the 3 samples (`_TRACE_SAMPLES`): the failed forward's batch is 2
            "not pruning the heads of blocks.0, the heads of blocks.1: with fewer heads the model does not run (its"
            " forward failed: RuntimeError: shape '[2, 6, 4, 8]' is invalid",
        ),
        (
            lambda: (Stack("kvq", kv_heads=1).eval(), torch.randn(3, 6, 32)),
            "kv_groups",
            "it has one key/value head (multi-query attention): no key/value group can go with"
            " `gqa_unit='kv_groups'`; `gqa_unit='query_heads'` removes its query heads.",
        ),
        (
            tied_weights,
            "query_heads",
            "not pruning the heads of blocks.0: its blocks.0.q.weight is shared with blocks.0.k (tied weights), which"
            " would lose rows with it.",
        ),
    ],
    ids=["channels_not_heads", "fixed_head_count", "multi_query_by_groups", "tied_weights"],
)
def test_heads_that_cannot_go_are_kept_and_the_warning_says_why_in_words(build, gqa_unit, message):
    model, x = build()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layers = find_prunable_layers(model, x, gqa_unit=gqa_unit)
    messages = "\n".join(str(w.message) for w in caught)
    assert message in messages
    assert "GroupTooLarge" not in messages
    assert "IndexError" not in messages
    assert "blocks.0:heads" not in [layer.name for layer in layers]


def test_gqa_unit_must_be_one_of_its_values(tmp_path):
    with pytest.raises(ActivationPruningError, match=r"`gqa_unit` can be one of query_heads, kv_groups; got 'heads'"):
        ActivationPruning(threshold=0.1, gqa_unit="heads")  # type: ignore[arg-type]
    model, x = Stack("separate").eval(), torch.randn(3, 6, 32)
    with pytest.raises(ActivationPruningError, match=r"`gqa_unit` can be one of query_heads, kv_groups; got 'kv'"):
        find_prunable_layers(model, x, gqa_unit="kv")
    from tests.test_cli import callback_config, parse, pruning_callback

    callback = pruning_callback(parse(callback_config(tmp_path, "{threshold: 0.1, gqa_unit: kv_groups}")))
    assert callback.gqa_unit == "kv_groups"
    assert callback.settings.to_state()["gqa_unit"] == "kv_groups"


@pytest.mark.parametrize("version", ["SwinTransformerBlock", "SwinTransformerBlockV2"])
def test_a_linear_pair_beside_an_attention_module_is_not_taken_for_its_heads(version):
    # torchvision's Swin computes its attention with F.linear (no Linear module inside it); the probe, looking for
    # the heads in the attention's parent block, took the block's MLP (a multiple of the head count) for them, and
    # the MLP then went unpruned with nothing said. The heads must be the declaring module's own.
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    # Swin-V2's attention also calls a position-bias MLP (cpb_mlp: Linear layers inside the attention module), so a
    # site that merely calls some Linear of the holder is no proof either: the out projection must read its output
    swin = torchvision.models.swin_transformer
    model = swin.SwinTransformer(
        patch_size=[4, 4],
        embed_dim=24,  # the MLP's hidden 4 × 24 = 3 heads × 32
        depths=[2],
        num_heads=[3],
        window_size=[4, 4],
        num_classes=3,
        block=getattr(swin, version),
    ).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the residual stream and the functional attention are skipped, with warnings
        layers = find_prunable_layers(model, torch.randn(2, 3, 32, 32))
    assert [layer.name for layer in layers] == ["features.1.0.mlp.0", "features.1.1.mlp.0"]
