"""Which Hugging Face families the sweep tries, their tiny configs, and the batch each one runs on.

Two sources, both built from configs (random weights, nothing downloaded):

- :data:`CURATED`: the 20 families of issue 20 (and Falcon's multi-query layout) with hand-written tiny configs,
  shared with ``tests/test_hf_families.py``;
- every other ``model_type`` of the installed ``transformers`` (:func:`catalogue`): the class of the first task
  mapping in :data:`TASKS` that holds it, built from its **default config shrunk** by :func:`shrunk_options` (layers,
  widths, heads, vocabulary and positions made tiny, sub-configs too), fed what its ``main_input_name`` asks for.

``transformers`` is imported inside the functions only: this module imports without it.
"""

from __future__ import annotations

import dataclasses
import inspect
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

VOCAB = 100
"""The curated configs' vocabulary (as the tests have always used)."""
SMALL = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2}
HEADS = {"num_attention_heads": 4}
GQA = {"num_attention_heads": 4, "num_key_value_heads": 2}


@dataclasses.dataclass(frozen=True)
class Tiny:
    """A hand-written tiny config of one family and the class built from it."""

    model_type: str
    model_class: str
    config_class: str
    options: Mapping[str, Any]

    def config(self) -> Any:
        """The config (``transformers`` imported here)."""
        import transformers

        return getattr(transformers, self.config_class)(**self.options)

    def build(self) -> nn.Module:
        """The model from the config: random weights (seeded by the caller), training mode as built."""
        import transformers

        return getattr(transformers, self.model_class)(self.config())


def _tiny(model_type: str, model_class: str, config_class: str, **options: Any) -> Tiny:
    return Tiny(model_type, model_class, config_class, options)


CURATED: dict[str, Tiny] = {
    "llama": _tiny("llama", "LlamaForCausalLM", "LlamaConfig", **SMALL, **GQA),
    "mistral": _tiny("mistral", "MistralForCausalLM", "MistralConfig", **SMALL, **GQA),
    "qwen2": _tiny("qwen2", "Qwen2ForCausalLM", "Qwen2Config", **SMALL, **GQA),  # biases on q, k and v
    "qwen3": _tiny("qwen3", "Qwen3ForCausalLM", "Qwen3Config", **SMALL, **GQA, head_dim=8),  # q_norm, k_norm
    "gemma": _tiny("gemma", "GemmaForCausalLM", "GemmaConfig", **SMALL, **GQA, head_dim=8),
    "phi3": _tiny("phi3", "Phi3ForCausalLM", "Phi3Config", **SMALL, **GQA, pad_token_id=0),  # fused qkv_proj
    # fused query_key_value, q/k/v interleaved per head, partial rotary
    "gpt_neox": _tiny("gpt_neox", "GPTNeoXForCausalLM", "GPTNeoXConfig", **SMALL, **HEADS),
    "opt": _tiny(
        "opt",
        "OPTForCausalLM",
        "OPTConfig",
        vocab_size=VOCAB,
        hidden_size=32,
        ffn_dim=48,
        num_hidden_layers=2,
        **HEADS,
        word_embed_proj_dim=32,
        max_position_embeddings=64,
    ),
    # fused, interleaved per head; ALiBi biases built by the model for every head
    "bloom": _tiny("bloom", "BloomForCausalLM", "BloomConfig", vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4),
    # fused, grouped per key/value head: [q q k v | q q k v]
    "falcon": _tiny(
        "falcon",
        "FalconForCausalLM",
        "FalconConfig",
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_kv_heads=2,
        new_decoder_architecture=True,
    ),
    # fused [q … q | k | v], one key/value head
    "falcon_multi_query": _tiny(
        "falcon",
        "FalconForCausalLM",
        "FalconConfig",
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
    ),
    "gptj": _tiny(  # rotary on part of each head
        "gptj",
        "GPTJForCausalLM",
        "GPTJConfig",
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=2,
        n_head=4,
        rotary_dim=4,
        n_positions=64,
    ),
    "t5": _tiny(
        "t5",
        "T5ForConditionalGeneration",
        "T5Config",
        vocab_size=VOCAB,
        d_model=32,
        d_kv=8,
        d_ff=48,
        num_layers=2,
        num_heads=4,
        decoder_start_token_id=0,
        dropout_rate=0.0,
    ),
    "bart": _tiny(
        "bart",
        "BartForConditionalGeneration",
        "BartConfig",
        vocab_size=VOCAB,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=48,
        decoder_ffn_dim=48,
        max_position_embeddings=64,
    ),
    "distilbert": _tiny(
        "distilbert",
        "DistilBertModel",
        "DistilBertConfig",
        vocab_size=VOCAB,
        dim=32,
        n_layers=2,
        n_heads=4,
        hidden_dim=48,
    ),
    "roberta": _tiny("roberta", "RobertaModel", "RobertaConfig", **SMALL, **HEADS, max_position_embeddings=64),
    # one layer, shared: called once per layer
    "albert": _tiny("albert", "AlbertModel", "AlbertConfig", **SMALL, **HEADS, embedding_size=16),
    "electra": _tiny("electra", "ElectraModel", "ElectraConfig", **SMALL, **HEADS, embedding_size=16),
    # disentangled attention: relative positions projected per head (shared key projection)
    "deberta_v2": _tiny(
        "deberta-v2",
        "DebertaV2Model",
        "DebertaV2Config",
        **SMALL,
        **HEADS,
        relative_attention=True,
        pos_att_type=["p2c", "c2p"],
        position_buckets=8,
        share_att_key=True,
    ),
    "vit": _tiny(
        "vit",
        "ViTModel",
        "ViTConfig",
        image_size=16,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        **HEADS,
        intermediate_size=48,
    ),
    "wav2vec2": _tiny(
        "wav2vec2",
        "Wav2Vec2Model",
        "Wav2Vec2Config",
        hidden_size=32,
        num_hidden_layers=2,
        **HEADS,
        intermediate_size=48,
        conv_dim=(8, 8),
        conv_stride=(5, 2),
        conv_kernel=(10, 3),
        num_conv_pos_embeddings=4,
        num_conv_pos_embedding_groups=2,
    ),
}
"""Issue 20's families, tiny, by the names the tests use (``falcon_multi_query``: Falcon with one key/value head)."""


# ---- every other family: its default config, shrunk ------------------------------------------------------------

TASKS = (
    ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "AutoModelForSeq2SeqLM", "seq2seq"),
    ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "AutoModelForCausalLM", "causal"),
    ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "AutoModelForSequenceClassification", "classifier"),
    ("MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES", "AutoModelForImageClassification", "classifier"),
    ("MODEL_FOR_CTC_MAPPING_NAMES", "AutoModelForCTC", "classifier"),
    ("MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES", "AutoModelForAudioClassification", "classifier"),
    ("MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES", "AutoModelForSpeechSeq2Seq", "seq2seq"),
    ("MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES", "AutoModelForImageTextToText", "multimodal"),
    ("MODEL_MAPPING_NAMES", "AutoModel", "base"),
)
"""``(transformers' mapping of model types to classes, its auto class, the task)``, in the order a family's class is
chosen: a generating head first, then a classifier, then the bare model. A causal-LM head of a family that also has a
masked-LM head (BERT's ``BertLMHeadModel``) is passed over: such an encoder is a classifier first."""

SHRUNK_LAYERS, SHRUNK_WIDTH, SHRUNK_FFN, SHRUNK_HEADS, SHRUNK_KV_HEADS = 2, 64, 96, 4, 2
SHRUNK_VOCAB, SHRUNK_POSITIONS, SHRUNK_IMAGE, SHRUNK_PATCH = 128, 64, 64, 8

SHRUNK_FIELDS: tuple[tuple[tuple[str, ...], int], ...] = (
    (
        ("num_hidden_layers", "num_layers", "n_layer", "n_layers", "encoder_layers", "decoder_layers",
         "num_decoder_layers", "num_encoder_layers", "text_layers", "vision_layers"),
        SHRUNK_LAYERS,
    ),
    (("hidden_size", "d_model", "n_embd", "embed_dim", "dim", "word_embed_proj_dim", "embedding_size"), SHRUNK_WIDTH),
    (
        ("intermediate_size", "ffn_dim", "encoder_ffn_dim", "decoder_ffn_dim", "d_ff", "n_inner", "dff",
         "ffn_hidden_size", "feed_forward_size", "decoder_intermediate_size"),
        SHRUNK_FFN,
    ),
    (("moe_intermediate_size", "shared_expert_intermediate_size", "expert_intermediate_size"), SHRUNK_FFN // 3),
    (
        ("num_attention_heads", "n_head", "num_heads", "n_heads", "encoder_attention_heads",
         "decoder_attention_heads"),
        SHRUNK_HEADS,
    ),
    (("num_key_value_heads", "num_kv_heads", "n_head_kv", "multi_query_group_num"), SHRUNK_KV_HEADS),
    (("head_dim", "d_kv", "kv_channels", "attention_head_dim", "v_head_dim"), SHRUNK_WIDTH // SHRUNK_HEADS),
    (("qk_rope_head_dim", "qk_nope_head_dim", "rotary_dim"), SHRUNK_WIDTH // SHRUNK_HEADS // 2),
    (("kv_lora_rank", "q_lora_rank"), SHRUNK_WIDTH // 2),
    (("vocab_size",), SHRUNK_VOCAB),
    (("max_position_embeddings", "n_positions", "n_ctx", "max_target_positions"), SHRUNK_POSITIONS),
    (("image_size",), SHRUNK_IMAGE),
    (("patch_size",), SHRUNK_PATCH),
    (("window_size",), 4),  # Swin's windows: 64 / 4 patches is 16 a side
    (("num_experts", "num_local_experts", "n_routed_experts"), 4),
    (("n_shared_experts", "n_group", "topk_group"), 1),
)  # fmt: skip
"""The config fields that take each new value, wherever a default config holds an int there (``None``: left)."""

EXPERTS_PER_TOKEN = ("num_experts_per_tok", "num_selected_experts", "moe_top_k")
LIST_FIELDS = {"conv_dim": 16, "num_heads": SHRUNK_HEADS, "depths": 1}
"""Per-layer or per-stage lists whose every entry shrinks (wav2vec2's feature extractor, Swin's stages), by field."""

MAX_SOURCE_POSITIONS = 16
"""Speech encoders (Whisper): the mel frames they take are twice this."""


@dataclasses.dataclass(frozen=True)
class Family:
    """One row of the sweep: which class, built how, loaded back by which auto class, and what it is.

    Attributes:
        name: the row's name (a ``model_type``, or a curated name such as ``falcon_multi_query``).
        model_type: the ``model_type`` of its config.
        model_class: the ``transformers`` class that is built.
        auto_class: the auto class whose ``from_pretrained`` loads it back.
        task: ``"causal"``, ``"seq2seq"`` (these two generate), ``"classifier"``, ``"multimodal"`` (fed text only)
            or ``"base"`` (the bare model).
        curated: built from :data:`CURATED` rather than from the default config, shrunk.
    """

    name: str
    model_type: str
    model_class: str
    auto_class: str
    task: str
    curated: bool

    @property
    def generates(self) -> bool:
        """Whether ``generate`` is compared with and without the key/value cache."""
        return self.task in ("causal", "seq2seq")


def _mappings() -> list[tuple[dict[str, Any], str, str]]:
    from transformers.models.auto import modeling_auto

    return [(getattr(modeling_auto, mapping), auto, task) for mapping, auto, task in TASKS]


def _first_class(value: str | tuple[str, ...]) -> str:
    return value if isinstance(value, str) else value[0]


def family_of(model_type: str, name: str | None = None) -> Family | None:
    """The class :data:`TASKS` chooses for ``model_type`` (``None`` when no mapping holds it)."""
    from transformers.models.auto import modeling_auto

    masked = modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES
    for mapping, auto, task in _mappings():
        if model_type not in mapping or (task == "causal" and model_type in masked):
            continue
        return Family(name or model_type, model_type, _first_class(mapping[model_type]), auto, task, curated=False)
    return None


def curated_family(name: str) -> Family:
    """A :data:`CURATED` family, with the auto class (and task) of the mapping that holds its class."""
    tiny = CURATED[name]
    for mapping, auto, task in _mappings():
        value = mapping.get(tiny.model_type)
        if value is not None and tiny.model_class in ((value,) if isinstance(value, str) else value):
            return Family(name, tiny.model_type, tiny.model_class, auto, task, curated=True)
    raise LookupError(f"no auto class of transformers maps {tiny.model_type!r} to {tiny.model_class}")


def catalogue() -> list[Family]:
    """The curated families, then every other ``model_type`` some task mapping holds, by name."""
    from transformers.models.auto import configuration_auto

    families = [curated_family(name) for name in CURATED]
    covered = {family.model_type for family in families}
    for model_type in sorted(configuration_auto.CONFIG_MAPPING_NAMES):
        if model_type in covered:
            continue
        family = family_of(model_type)
        if family is not None:
            families.append(family)
    return families


def find(names: list[str]) -> list[Family]:
    """The families of these names (curated names or model types), in the order given."""
    by_name = {family.name: family for family in catalogue()}
    unknown = [name for name in names if name not in by_name]
    if unknown:
        raise KeyError(f"no family named {', '.join(unknown)} (curated names or transformers model types)")
    return [by_name[name] for name in names]


def _is_config(value: object) -> bool:
    return callable(getattr(value, "to_dict", None)) and isinstance(getattr(value, "model_type", None), str)


def shrunk_options(config: Any) -> dict[str, Any]:
    """The constructor arguments that make ``config`` (a default config) tiny; sub-configs shrink as dicts.

    Only fields the default config holds as an int are changed (a ``None`` there means "derived"; it stays), so the
    config's own ``__init__`` derives the rest (per-layer lists, ``head_dim`` …) from the new numbers. Token ids beyond
    the new vocabulary move inside it, to its top.
    """
    values = config.to_dict()
    options: dict[str, Any] = {}
    for fields, value in SHRUNK_FIELDS:
        for field in fields:
            if isinstance(values.get(field), int) and not isinstance(values[field], bool):
                options[field] = value
    if isinstance(values.get("patch_size"), (list, tuple)):
        options["patch_size"] = [SHRUNK_PATCH] * len(values["patch_size"])
    if isinstance(values.get("image_size"), (list, tuple)):
        options["image_size"] = [SHRUNK_IMAGE] * len(values["image_size"])
    for field in EXPERTS_PER_TOKEN:
        if isinstance(values.get(field), int):
            options[field] = min(values[field], 2)
    for field, value in LIST_FIELDS.items():
        if isinstance(values.get(field), (list, tuple)):
            options[field] = [value] * len(values[field])
    if isinstance(values.get("qk_rope_head_dim"), int) and "head_dim" in options:  # multi-head latent attention
        options["head_dim"] = options["qk_rope_head_dim"]  # DeepSeek's rotary width
    if isinstance(values.get("max_source_positions"), int):
        options["max_source_positions"] = MAX_SOURCE_POSITIONS
    if "vocab_size" in options:
        options.update(_tokens_inside(values, SHRUNK_VOCAB))
    for field, value in vars(config).items():
        if _is_config(value):
            options[field] = {"model_type": value.model_type, **shrunk_options(value)}
    return options


def _tokens_inside(values: Mapping[str, Any], vocab: int) -> dict[str, Any]:
    moved: dict[str, Any] = {}
    top = vocab - 1
    for field, value in sorted(values.items()):
        if not (field.endswith("_token_id") or field.endswith("_token_index") or field.endswith("_token_ids")):
            continue
        if isinstance(value, int) and value >= vocab:
            moved[field], top = top, top - 1
        elif isinstance(value, list) and any(isinstance(v, int) and v >= vocab for v in value):
            moved[field] = [v if not isinstance(v, int) or v < vocab else vocab - 1 for v in value]
    return moved


def tiny_config(family: Family) -> Any:
    """The family's config: the curated one, or its default config shrunk."""
    if family.curated:
        return CURATED[family.name].config()
    from transformers import AutoConfig

    default = AutoConfig.for_model(family.model_type)
    return type(default)(**shrunk_options(default))


def build(family: Family, seed: int = 0) -> tuple[nn.Module, dict[str, Any]]:
    """The model (eval mode, float32, weights from ``seed``) and a batch of random inputs it accepts."""
    import transformers

    config = tiny_config(family)
    if family.task == "classifier" and getattr(config, "pad_token_id", 0) is None:
        config.pad_token_id = 0  # classifiers that pool the last token need it for batches of several
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # token ids of default configs beyond the tiny vocabulary and the like
        model = getattr(transformers, family.model_class)(config).float().eval()
    return model, example_batch(model, family, seed + 1)


def special_tokens(config: Any) -> set[int]:
    """Every token id a config (and its sub-configs) names: random inputs avoid them."""
    found: set[int] = set()
    for field, value in config.to_dict().items():
        if "token" in field and isinstance(value, int) and not isinstance(value, bool):
            found.add(value)
        elif "token" in field and isinstance(value, list):
            found.update(v for v in value if isinstance(v, int))
    for value in vars(config).values():
        if _is_config(value):
            found |= special_tokens(value)
    return found


def text_config(config: Any) -> Any:
    """The config that holds the vocabulary: the model's own, or its text sub-config (multimodal models)."""
    if isinstance(getattr(config, "vocab_size", None), int):
        return config
    for getter in ("get_text_config",):
        method = getattr(config, getter, None)
        if callable(method):
            return method()
    return config


BATCH, SEQUENCE = 4, 12


def example_batch(model: nn.Module, family: Family, seed: int) -> dict[str, Any]:
    """What the model's ``main_input_name`` asks for (token ids, images, waveforms, mel features), at random.

    Encoder-decoders also get ``decoder_input_ids`` (the same ids: a sequence the decoder reads); a model that is
    bare model or a classifier and reads both token ids and images (CLIP's kind) gets both; a multimodal generator
    gets text only.
    """
    config = model.config  # type: ignore[union-attr]
    generator = torch.Generator().manual_seed(seed)
    main = getattr(model, "main_input_name", "input_ids")
    text = text_config(config)
    vocab = int(getattr(text, "vocab_size", None) or SHRUNK_VOCAB)
    allowed = torch.tensor(sorted(set(range(3, vocab)) - special_tokens(config)))
    ids = allowed[torch.randint(0, len(allowed), (BATCH, SEQUENCE), generator=generator)]
    inputs: dict[str, Any] = {}
    parameters = set(inspect.signature(model.forward).parameters)
    both = family.task in ("base", "classifier") and main == "input_ids" and {"input_ids", "pixel_values"} <= parameters
    if main == "pixel_values" or both:
        vision = getattr(config, "vision_config", None) or config
        size = getattr(vision, "image_size", SHRUNK_IMAGE)
        height, width = (size, size) if isinstance(size, int) else tuple(size)[:2]
        channels = getattr(vision, "num_channels", 3)
        inputs["pixel_values"] = torch.randn(BATCH, channels, height, width, generator=generator)
    if main == "input_values":
        inputs[main] = torch.randn(BATCH, 1600, generator=generator)
    elif main == "input_features":
        bins = getattr(config, "num_mel_bins", None) or getattr(config, "input_feat_per_channel", 80)
        frames = 2 * getattr(config, "max_source_positions", 32)
        inputs[main] = torch.randn(BATCH, bins, frames, generator=generator)
    if main not in inputs:
        inputs[main] = ids
    if getattr(config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = ids
    return inputs
