"""An independent, deliberately plain implementation of the released model's inference semantics.

It walks the decoder layer by layer with eager attention over explicit (key, value) lists, exactly as the
semantics are written down: the last query row of each pass attends to text + LR + selected HR (layers > S),
masks come from that row's text+LR softmax (layers >= S), HR keys/values are never cached. It shares no
attention code with flexattn; tests compare flexattn's cached `generate` against it token for token and mask for
mask.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def rope_tables(text_config, positions: torch.Tensor):
    d = text_config.hidden_size // text_config.num_attention_heads
    theta = text_config.rope_parameters["rope_theta"]
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2).float() / d))
    freqs = positions.float()[:, None] * inv_freq[None]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def reference_mask(head_summed_lr: torch.Tensor, size, threshold, pool, hr_grid, mode):
    """head_summed_lr: (g*g,) -> (hr_grid*hr_grid,) bool, written from the spec."""
    if mode == "select_all":
        return torch.ones(hr_grid * hr_grid, dtype=torch.bool)
    g = int(math.isqrt(head_summed_lr.numel()))
    m = head_summed_lr.reshape(g, g).clone()
    w, h = size
    margin = int((abs(w - h) // 2) / max(w, h) * g)
    if margin > 0:
        if w > h:
            m[:margin] = 0
            m[g - margin :] = 0
        else:
            m[:, :margin] = 0
            m[:, g - margin :] = 0
    m = (m - m.min()) / (m.max() - m.min())
    on = (m * 255 > threshold).float()[None, None]
    on = F.adaptive_max_pool2d(on, (pool, pool))
    return F.interpolate(on, size=(hr_grid, hr_grid), mode="nearest")[0, 0].flatten().bool()


class ReferenceDecoder:
    """Greedy decoding under the released semantics, with a per-layer key/value cache of text+LR tokens only."""

    def __init__(self, model, mode, hr_features, image_start, lr_grid, original_size, settings):
        self.m = model
        self.text = model.config.text_config
        self.mode = mode
        self.hr = hr_features  # (G*G, D)
        self.image_start, self.g = image_start, lr_grid
        self.G = lr_grid * settings.zoom
        self.size = original_size
        self.s = settings
        n = self.text.num_hidden_layers
        self.cache = [([], []) for _ in range(n)]
        self.length = 0
        cos, sin = rope_tables(self.text, torch.arange(image_start, image_start + lr_grid * lr_grid))

        def up(t):
            grid = t.reshape(lr_grid, lr_grid, -1).permute(2, 0, 1)[None]
            return F.interpolate(grid, size=(self.G, self.G), mode="bicubic")[0].reshape(t.shape[1], -1).T

        self.hr_cos, self.hr_sin = up(cos), up(sin)

    def step(self, embeds: torch.Tensor):
        """One pass over `embeds` (T, D). Returns last-row logits and the masks computed per layer."""
        text = self.text
        nh, d = text.num_attention_heads, text.hidden_size // text.num_attention_heads
        nkv = text.num_key_value_heads
        T = embeds.shape[0]
        positions = torch.arange(self.length, self.length + T)
        cos, sin = rope_tables(text, positions)
        h = embeds
        masks = {}
        prev_mask = None
        for i, layer in enumerate(self.m.model.language_model.layers):
            a = layer.self_attn
            x = layer.input_layernorm(h)
            q = a.q_proj(x).view(T, nh, d).transpose(0, 1)
            k = a.k_proj(x).view(T, nkv, d).transpose(0, 1)
            v = a.v_proj(x).view(T, nkv, d).transpose(0, 1)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            ks, vs = self.cache[i]
            ks.append(k)
            vs.append(v)
            K = torch.cat(ks, dim=1).repeat_interleave(nh // nkv, dim=0)
            V = torch.cat(vs, dim=1).repeat_interleave(nh // nkv, dim=0)
            N = K.shape[1]
            scores = q @ K.transpose(1, 2) / math.sqrt(d)
            causal = torch.arange(N)[None, :] > (torch.arange(T)[:, None] + N - T)
            scores = scores.masked_fill(causal, float("-inf"))
            probs = scores.softmax(-1)
            out = probs @ V  # (nh, T, d)
            if self.mode != "lowres" and i > self.s.selection_layer and prev_mask is not None:
                sel = self.hr[prev_mask]
                kh = a.k_proj_hd(sel).view(-1, nkv, d).transpose(0, 1)
                vh = a.v_proj_hd(sel).view(-1, nkv, d).transpose(0, 1)
                kh = kh * self.hr_cos[prev_mask] + rotate_half(kh) * self.hr_sin[prev_mask]
                kh = kh.repeat_interleave(nh // nkv, dim=0)
                vh = vh.repeat_interleave(nh // nkv, dim=0)
                hr_scores = (q[:, -1:] @ kh.transpose(1, 2))[:, 0] / math.sqrt(d)  # (nh, M)
                last = torch.cat([scores[:, -1], hr_scores], dim=-1).softmax(-1)
                out[:, -1] = (last[:, None] @ torch.cat([V, vh], dim=1))[:, 0]
            if self.mode != "lowres" and i >= self.s.selection_layer:
                lr = probs[:, -1, self.image_start : self.image_start + self.g * self.g].sum(0)
                prev_mask = reference_mask(lr, self.size, self.s.threshold, self.s.pool_size, self.G, self.mode)
                masks[i] = prev_mask
            h = h + a.o_proj(out.transpose(0, 1).reshape(T, nh * d))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        self.length += T
        logits = self.m.lm_head(self.m.model.language_model.norm(h[-1]))
        return logits, masks

    @torch.no_grad()
    def greedy(self, prompt_embeds: torch.Tensor, max_new_tokens: int, eos: int):
        tokens, all_masks = [], []
        embeds = prompt_embeds
        for _ in range(max_new_tokens):
            logits, masks = self.step(embeds)
            token = int(logits.argmax())
            tokens.append(token)
            all_masks.append(masks)
            if token == eos:
                break
            embeds = self.m.get_input_embeddings()(torch.tensor([token]))
        return tokens, all_masks
