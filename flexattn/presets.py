"""Models built in code: tiny configurations for tests, the LLaVA-1.5-7B shape for cost runs, and a word-level
tokenizer for such models."""

from __future__ import annotations

from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

from .settings import FlexSettings


def llava_config(
    *,
    vocab_size: int,
    hidden_size: int,
    intermediate_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int | None = None,
    vision_hidden: int,
    vision_intermediate: int,
    vision_layers: int,
    vision_heads: int,
    image_size: int,
    patch_size: int,
    flex: FlexSettings,
    image_token_id: int | None = None,
    max_position_embeddings: int = 4096,
    rope_parameters: dict | None = None,
) -> LlavaConfig:
    text = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads or num_heads,
        max_position_embeddings=max_position_embeddings,
        rope_parameters=rope_parameters or {"rope_theta": 10000.0, "rope_type": "default"},
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=vision_intermediate,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=vision_hidden,
        hidden_act="quick_gelu",
    )
    config = LlavaConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=vocab_size - 1 if image_token_id is None else image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )
    config.flex_attention = flex.to_dict()
    return config


def tiny_config(*, num_layers: int = 4, selection_layer: int = 1, lowres_size: int = 56, zoom: int = 3,
                num_kv_heads: int | None = None, vocab_size: int = 96, **flex) -> LlavaConfig:
    """A model small enough for unit tests: LR 56 px / patch 14 -> 4x4 LR and 12x12 HR tokens."""
    return llava_config(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_layers=num_layers, num_heads=4,
        num_kv_heads=num_kv_heads, vision_hidden=32, vision_intermediate=64, vision_layers=3, vision_heads=2,
        image_size=lowres_size, patch_size=14,
        flex=FlexSettings(lowres_size=lowres_size, zoom=zoom, selection_layer=selection_layer, **flex),
    )


def llava_7b_config(depth_divisor: int = 1, zoom: int = 3) -> LlavaConfig:
    """LLaVA-1.5-7B widths, heads and vocabulary (LLaMA-7B + CLIP ViT-L/14-336).

    `depth_divisor` divides the depth of both the LLM (32 layers) and the tower (24) so the split of cost between
    them stays the 7B's; the selection layer (8 of 32) scales with it.
    """
    return llava_config(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32 // depth_divisor, num_heads=32,
        vision_hidden=1024, vision_intermediate=4096, vision_layers=24 // depth_divisor, vision_heads=16,
        image_size=336, patch_size=14, image_token_id=31999,
        flex=FlexSettings(lowres_size=336, zoom=zoom, selection_layer=8 // depth_divisor, threshold=48, pool_size=9),
    )


def word_tokenizer(words, vocab_size: int):
    """A word-level tokenizer: <pad> <s> </s> <unk>, then `words` (first occurrence), then fillers to `vocab_size`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    names = ["<pad>", "<s>", "</s>", "<unk>"]
    for word in words:
        if word not in names:
            names.append(word)
    names += [f"w{i}" for i in range(vocab_size - len(names))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(names)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
