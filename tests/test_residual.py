"""Residual channels (``prune_residual``): a transformer's stream gets narrower, exactly, and everything follows."""

import copy
import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from lightning_actprune import ActivationPruning, export_pruned, load_pruned
from lightning_actprune._plan import plan_from_kept
from lightning_actprune._residual import WidthKeptLayerNorm
from lightning_actprune._scoring import DEFAULT_CRITERION
from lightning_actprune._surgery import pruned_temporarily
from lightning_actprune.core import (
    ActivationRecorder,
    PruningPlan,
    ThresholdEvaluator,
    apply_plan,
    apply_plan_with_optimizers,
    count_parameters,
    find_prunable_layers,
    plan_for_reduction,
)
from tests.helpers import Classifier, make_data
from tests.test_cli import callback_config, parse, pruning_callback

timm = pytest.importorskip("timm")

WIDTH = 32


def vit(**options) -> nn.Module:
    """timm's ViT, 2 blocks of 4 heads of 8, residual width 32; ``options`` change its layout."""
    torch.manual_seed(0)
    return timm.models.vision_transformer.VisionTransformer(
        img_size=16, patch_size=8, embed_dim=WIDTH, depth=2, num_heads=4, num_classes=3, **options
    ).eval()


NORMS = {
    "LayerNorm": (lambda: nn.LayerNorm(WIDTH), lambda: nn.LayerNorm(WIDTH, elementwise_affine=False)),
    "RMSNorm": (lambda: nn.RMSNorm(WIDTH), lambda: nn.RMSNorm(WIDTH, eps=1e-3)),  # eps None, then one of its own
}


class PreNormMixer(nn.Module):
    """A hand-written pre-norm network: a token embedding, two residual FFN blocks, then a final norm.

    With ``norm="LayerNorm"`` the final one has no weight or bias; with ``"RMSNorm"`` the blocks' norms have no eps.
    """

    def __init__(self, norm: str = "LayerNorm") -> None:
        super().__init__()
        block_norm, final_norm = NORMS[norm]
        self.embed = nn.Linear(6, WIDTH)
        self.position = nn.Parameter(torch.randn(5, WIDTH) * 0.1)
        self.norms = nn.ModuleList(block_norm() for _ in range(2))
        self.up = nn.ModuleList(nn.Linear(WIDTH, 48) for _ in range(2))
        self.down = nn.ModuleList(nn.Linear(48, WIDTH) for _ in range(2))
        self.final = final_norm()
        self.head = nn.Linear(WIDTH, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x) + self.position
        for norm, up, down in zip(self.norms, self.up, self.down, strict=True):
            x = x + down(F.gelu(up(norm(x))))
        return self.head(self.final(x).mean(1))


DEAD = list(range(8))
"""The residual channels :func:`silenced` makes carry nothing."""


def silenced(model: nn.Module) -> nn.Module:
    """``model`` whose residual channels :data:`DEAD` carry nothing: zero wherever the stream is read.

    Every LayerNorm outputs zero there (pre-norm blocks read the stream through them), and what writes the stream
    before the blocks (the embedding, the parameters added to it) is zero there (post-norm blocks read it as it is,
    and their LayerNorms write zeros into it).
    """
    with torch.no_grad():
        for module in model.modules():
            for name in ("weight", "bias") if isinstance(module, (nn.LayerNorm, nn.RMSNorm)) else ():
                if getattr(module, name, None) is not None:
                    getattr(module, name)[DEAD] = 0
        for name, parameter in model.named_parameters():
            if name in ("cls_token", "reg_token", "pos_embed", "position"):
                parameter[..., DEAD] = 0
            elif name.startswith(("patch_embed.proj.", "embed.")):
                parameter[DEAD] = 0
    return model


def planned(model: nn.Module, x: torch.Tensor, reduction: float, **options) -> tuple[list, PruningPlan]:
    """The default criterion's plan for ``reduction`` with residual channels allowed."""
    with ActivationRecorder(model) as recorder, torch.no_grad():
        model(x)
    layers = find_prunable_layers(model, x, prune_residual=True, **options)
    evaluator = ThresholdEvaluator(copy.deepcopy(model), layers, recorder.moments(), DEFAULT_CRITERION, 1, True)
    return layers, plan_for_reduction(evaluator, reduction).plan


def residual_layer(plan: PruningPlan):
    (layer,) = [layer for layer in plan.layers if "+" in layer.name]
    return layer


def zeroed_oracle(model: nn.Module, plan: PruningPlan) -> list:
    """The unpruned model with the removed channels zeroed where norms and Linear layers read them."""
    handles = []
    for operation in plan.operations:
        module = model.get_submodule(operation.module)
        if isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or (operation.dim == "in" and isinstance(module, nn.Linear)):
            index = torch.tensor(operation.indices)

            def zero(_, args, index=index):
                inputs = args[0].clone()
                inputs[..., index] = 0
                return (inputs, *args[1:])

            handles.append(module.register_forward_pre_hook(zero))
    return handles


def assert_equals_zeroed(pruned: nn.Module, model: nn.Module, plan: PruningPlan, x: torch.Tensor) -> None:
    """``pruned`` gives what ``model`` gives with the channels ``plan`` removes zeroed (:func:`zeroed_oracle`)."""
    handles = zeroed_oracle(model, plan)
    try:
        with torch.no_grad():
            torch.testing.assert_close(pruned(x), model(x), rtol=1e-4, atol=1e-5)
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("kept", [[0, 2, 3, 7], list(range(9))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_width_kept_layer_norm_is_a_layer_norm_of_the_full_width_with_the_removed_channels_zero(kept, dtype):
    torch.manual_seed(0)
    full = nn.LayerNorm(12, eps=1e-3)
    with torch.no_grad():
        full.weight.normal_()
        full.bias.normal_()
    x = torch.randn(4, 5, 12) * 3 + 2
    zeroed = torch.zeros_like(x)
    zeroed[..., kept] = x[..., kept]
    expected = F.layer_norm(zeroed.double(), (12,), full.weight.double(), full.bias.double(), 1e-3)[..., kept]
    pruned = WidthKeptLayerNorm(len(kept), eps=1e-3).to(dtype)
    pruned.full_width = 12
    with torch.no_grad():
        pruned.weight.copy_(full.weight[kept])
        pruned.bias.copy_(full.bias[kept])
    out = pruned(x[..., kept].to(dtype))
    assert out.dtype == dtype
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 5e-2}
    torch.testing.assert_close(out.double(), expected, **tolerance)


def test_under_autocast_a_width_kept_layer_norm_returns_what_a_layer_norm_returns():
    torch.manual_seed(0)
    full = nn.LayerNorm(8)
    pruned = WidthKeptLayerNorm(8)
    pruned.full_width = 8  # nothing removed: it must be the LayerNorm itself
    x = torch.randn(3, 8).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, out = full(x), pruned(x)
    assert out.dtype == expected.dtype  # bfloat16 on the CPU; float32 on CUDA, where autocast runs it in float32
    torch.testing.assert_close(out, expected)


LAYOUTS = {
    "class token": {},
    "layer scale, register tokens": {"init_values": 0.1, "reg_tokens": 2},
    "average pooling, no class token": {"global_pool": "avg", "class_token": False, "fc_norm": True},
    "register tokens sliced off before pooling": {"reg_tokens": 4, "global_pool": "avg", "class_token": False},
    "post-norm blocks": {"block_fn": timm.models.vision_transformer.ResPostBlock},
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_residual_channels_go_from_every_member_and_pruning_equals_zeroing_them(layout):
    model = silenced(vit(**LAYOUTS[layout]))
    x = torch.randn(16, 3, 16, 16)
    _, plan = planned(model, x, 0.4)
    residual = residual_layer(plan)
    assert not set(DEAD) & set(residual.kept)  # the channels that carry nothing went first
    assert 1 <= len(residual.kept) < WIDTH
    pruned = copy.deepcopy(model)
    apply_plan(pruned, plan)
    kept = len(residual.kept)
    for name, p in pruned.named_parameters():  # every parameter of the stream's width lost the same channels
        if name in ("pos_embed", "cls_token", "reg_token") or name.endswith((".gamma", "norm.weight", "norm1.bias")):
            assert p.shape[-1] == kept, name
    assert pruned.patch_embed.proj.out_channels == kept
    assert pruned.head.in_features == kept
    assert all(type(m) is WidthKeptLayerNorm for m in pruned.modules() if isinstance(m, nn.LayerNorm))
    assert_equals_zeroed(pruned, model, plan, x)
    assert count_parameters(pruned) == plan_parameters(model, plan)


def plan_parameters(model: nn.Module, plan: PruningPlan) -> int:
    """What the target search counted for the plan, by arithmetic (it must be what the surgery leaves)."""
    from lightning_actprune._counting import parameters_after

    return parameters_after(model, plan, count_parameters(model))


@pytest.mark.parametrize("norm", NORMS)
def test_a_hand_written_pre_norm_network_loses_residual_channels_exactly(norm):
    torch.manual_seed(0)
    model = silenced(PreNormMixer(norm).eval())
    x = torch.randn(32, 5, 6)
    _, plan = planned(model, x, 0.5)
    kept = len(residual_layer(plan).kept)
    pruned = copy.deepcopy(model)
    apply_plan(pruned, plan)
    assert pruned.position.shape == (5, kept)
    assert pruned.final.normalized_shape == (kept,)
    if norm == "LayerNorm":
        assert pruned.final.weight is None
        assert pruned.final.full_width == WIDTH
    else:  # an RMSNorm keeps its class: its weight and eps are scaled by the widths' ratio
        assert type(pruned.final) is nn.RMSNorm
        assert pruned.final.eps == pytest.approx(1e-3 * WIDTH / kept)
        assert pruned.norms[0].eps == pytest.approx(torch.finfo(torch.float32).eps * WIDTH / kept)
    assert_equals_zeroed(pruned, model, plan, x)
    assert count_parameters(pruned) == plan_parameters(model, plan)


def test_without_prune_residual_the_stream_keeps_its_width_and_the_warning_says_why():
    model = vit()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layers = find_prunable_layers(model, torch.randn(4, 3, 16, 16))
    assert not any("patch_embed" in layer.name for layer in layers)
    assert any("not pruning patch_embed.proj and the 4 layers coupled to it" in str(w.message) for w in caught)


def test_pruning_twice_keeps_normalising_over_the_original_width():
    model = silenced(vit())
    x = torch.randn(16, 3, 16, 16)
    _, first = planned(model, x, 0.3)
    once = copy.deepcopy(model)
    apply_plan(once, first)
    (layer,) = [layer for layer in find_prunable_layers(once, x, prune_residual=True) if "+" in layer.name]
    second = plan_from_kept([layer], {layer.name: list(range(0, layer.neurons, 2))})  # every other channel stays
    twice = copy.deepcopy(once)
    apply_plan(twice, second)
    assert twice.norm.full_width == WIDTH
    assert twice.norm.normalized_shape[0] < once.norm.normalized_shape[0] < WIDTH
    assert_equals_zeroed(twice, once, second, x)


def test_a_temporary_prune_puts_the_layer_norms_back_exactly():
    model = silenced(vit())
    _, plan = planned(model, torch.randn(16, 3, 16, 16), 0.4)
    norm, weight = model.norm, model.norm.weight
    with pruned_temporarily(model, plan):
        assert type(model.norm) is WidthKeptLayerNorm
    assert type(norm) is nn.LayerNorm or type(norm).__name__ == "LayerNorm"
    assert not hasattr(norm, "full_width")
    assert norm.weight is weight
    assert norm.normalized_shape == (WIDTH,)
    assert model.cls_token.shape[-1] == WIDTH


def test_the_optimizer_state_of_the_added_parameters_follows_their_channels():
    model = silenced(vit()).train()
    x = torch.randn(16, 3, 16, 16)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(x).square().mean().backward()
    optimizer.step()
    old_cls, old_state = model.cls_token, optimizer.state[model.cls_token]["exp_avg"].clone()
    _, plan = planned(model.eval(), x, 0.4)
    kept = list(residual_layer(plan).kept)
    apply_plan_with_optimizers(model, plan, optimizer)
    assert model.cls_token is not old_cls
    torch.testing.assert_close(optimizer.state[model.cls_token]["exp_avg"], old_state[..., kept])
    model.train()
    model(x).square().mean().backward()
    optimizer.step()  # the smaller parameters train on


def test_an_exported_model_reloads_into_a_fresh_one_with_its_width_kept_layer_norms(tmp_path):
    model = silenced(vit())
    x = torch.randn(16, 3, 16, 16)
    _, plan = planned(model, x, 0.4)
    apply_plan(model, plan)
    export_pruned(model, tmp_path / "model.pt", plan=plan)
    fresh = load_pruned(vit(), tmp_path / "model.pt")
    assert type(fresh.norm) is WidthKeptLayerNorm
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x))


def test_hugging_face_models_keep_their_residual_width():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    )
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    ids = torch.randint(0, 50, (2, 6))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layers = find_prunable_layers(model, {"": ((ids,), {})}, prune_residual=True)
    assert layers  # the FFNs and heads still go
    assert not any("embeddings" in layer.name or "attention.output.dense" in layer.name for layer in layers)
    assert any("a Hugging Face model's hidden size" in str(w.message) for w in caught)


def test_yaml_turns_it_on(tmp_path):
    config = callback_config(tmp_path, "{target_params_reduction: 0.3, prune_residual: true}")
    assert pruning_callback(parse(config)).prune_residual is True
    with pytest.raises(Exception, match=r"`prune_residual` must be True or False; got 'yes'"):
        ActivationPruning(target_params_reduction=0.3, prune_residual="yes")


class ViTClassifier(Classifier):
    def __init__(self) -> None:
        super().__init__(silenced(vit()).train(), lr=1e-3)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def test_a_fit_with_the_trainer_defaults_prunes_the_stream_recovers_and_reloads(tmp_path):
    """Progress bar, checkpointing and the default logger on; the weights fit starts with are pruned, then trained."""
    pl.seed_everything(0)
    model = ViTClassifier()
    pruning = ActivationPruning(target_params_reduction=0.4, prune_residual=True, prune_on="fit_start")
    trainer = pl.Trainer(default_root_dir=tmp_path, max_epochs=1, accelerator="cpu", callbacks=[pruning])
    train = DataLoader(make_data((3, 16, 16)), batch_size=32)
    val = DataLoader(make_data((3, 16, 16), n=50, seed=1), batch_size=25)
    trainer.fit(model, train, val)
    result = pruning.result
    assert result.pruned
    assert result.params_reduction >= 0.4
    width = model.net.pos_embed.shape[-1]
    assert width < WIDTH
    assert "patch_embed" in result.summary()
    fresh = ViTClassifier()  # the pruned checkpoint shrinks a full-size model before loading
    metrics = pl.Trainer(default_root_dir=tmp_path, accelerator="cpu", callbacks=[pruning]).validate(
        fresh, val, ckpt_path=pruning.pruned_checkpoint_path
    )
    assert fresh.net.pos_embed.shape[-1] == width
    assert type(fresh.net.norm) is WidthKeptLayerNorm
    assert metrics[0]["val_acc"] >= 0
