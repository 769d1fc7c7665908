"""FlexAttention LLaVA: stock `LlavaForConditionalGeneration` plus per-layer HR key/value projections.

The only structural change to LLaVA-1.5 is `k_proj_hd` / `v_proj_hd` beside each decoder attention (the released
checkpoint's names). Behaviour changes only through the registered "flexattn" attention function and the
`flex_state` a caller passes to `forward` / `generate`; without one, this model is plain LLaVA.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import LlavaForConditionalGeneration

from . import attention  # noqa: F401  (registers the "flexattn" attention implementation)
from .attention import FlexState, interpolate_rotary
from .hr_features import HRFeatures
from .image import ImageViews
from .settings import FlexSettings


class FlexLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    def __init__(self, config):
        super().__init__(config)
        text = config.text_config
        for layer in self.model.language_model.layers:
            attn = layer.self_attn
            kv_dim = text.num_key_value_heads * attn.head_dim
            attn.k_proj_hd = nn.Linear(text.hidden_size, kv_dim, bias=text.attention_bias)
            attn.v_proj_hd = nn.Linear(text.hidden_size, kv_dim, bias=text.attention_bias)
        self.post_init()

    # ---- configuration -------------------------------------------------------------------------------------
    @property
    def flex_settings(self) -> FlexSettings:
        return FlexSettings.from_dict(getattr(self.config, "flex_attention", None) or {})

    @property
    def decoder(self):
        return self.model.language_model

    def copy_hr_projections_from_lowres(self) -> None:
        """Training-free start: HR projections as copies of each layer's k_proj / v_proj."""
        with torch.no_grad():
            for layer in self.decoder.layers:
                attn = layer.self_attn
                attn.k_proj_hd.load_state_dict(attn.k_proj.state_dict())
                attn.v_proj_hd.load_state_dict(attn.v_proj.state_dict())

    # ---- vision ----------------------------------------------------------------------------------------------
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, L, L) -> (N, g*g, D): vision tower (LLaVA's select layer / feature) + projector."""
        pixels = pixels.to(self.device, self.dtype)
        features = self.model.get_image_features(
            pixel_values=pixels,
            vision_feature_layer=self.config.vision_feature_layer,
            vision_feature_select_strategy=self.config.vision_feature_select_strategy,
        ).pooler_output
        return torch.stack(list(features))

    def encode_lowres(self, views: ImageViews) -> torch.Tensor:
        """LR features (g*g, D) of one image."""
        return self.encode_pixels(views.lowres)[0]

    def highres_features(self, views: ImageViews, lr_grid: int) -> HRFeatures:
        """The image's HR features, encoded crop by crop on demand (call `.full()` to encode them all)."""
        return HRFeatures(
            views.highres_crops, views.zoom, lr_grid, self.encode_pixels,
            dim=self.config.text_config.hidden_size, dtype=self.dtype, device=self.device,
        )

    def hr_rotary_tables(self, image_start: int, lr_grid: int, hr_grid: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotary cos/sin for the HR keys: the LR image positions' tables, bicubically resized to the HR grid."""
        positions = torch.arange(image_start, image_start + lr_grid * lr_grid, device=self.device)[None]
        probe = torch.zeros(1, device=self.device, dtype=torch.float32)
        cos, sin = self.decoder.rotary_emb(probe, positions)
        cos, sin = interpolate_rotary(cos[0], sin[0], hr_grid)
        return cos.to(self.dtype), sin.to(self.dtype)

    # ---- language model ------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids=None,
        pixel_values=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        logits_to_keep=0,
        flex_state: FlexState | None = None,
        **kwargs,
    ):
        # One call of forward is one pass: the selection handed from layer to layer starts afresh.
        if flex_state is not None:
            flex_state.begin_pass()
        return super().forward(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            labels=labels,
            logits_to_keep=logits_to_keep,
            flex_state=flex_state,
            **kwargs,
        )
