"""Teacher-forced FlexAttention training on batches, through the same attention function as inference.

At inference only the last row of a pass sees HR tokens; with teacher forcing every row that predicts an answer
token is such a "last row", so the training forward marks exactly those rows (`FlexState.rows`). Each gets its
own selection from its own LR attention, layer by layer, as it would while decoding. The threshold makes that
selection non-differentiable, so auxiliary losses stand in for it: `attention_loss` pulls each answering row's
head-summed LR attention (at the selecting layers) onto the cells of the region the answer needs, and
`selection_loss` asks the thresholded map itself to cover those cells and nothing else, through a sigmoid in place
of the threshold. Past selection, `reading_loss` asks each answering row's HR attention to find the HR tokens its
answer is on (the glyph of the letter a question names, among every selected glyph).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .attention import FlexHooks, FlexState
from .prompt import conversation, tokenize_around_image
from .settings import FlexSettings

IGNORE = -100


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T) text ids; image positions hold pad
    attention_mask: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T), IGNORE outside answers
    rows: torch.Tensor  # (B, R) positions that predict answer tokens (padded by repeating the last one)
    row_valid: torch.Tensor  # (B, R) bool, False on padding
    image_start: int
    target_cells: torch.Tensor | None  # (B, R, g, g) bool: LR cells each row should look at
    read_cells: torch.Tensor | None = None  # (B, R, G*G) bool: HR tokens each row should read its answer from
    # (B, R, g, g) bool: what each row's LR map should find from `late_layer` on (forward_loss), e.g. only the shape
    # whose letter the question names, once earlier layers have read the letters of every shape
    late_target_cells: torch.Tensor | None = None


def encode_example(tokenizer, question: str, answer: str) -> tuple[list[int], list[int], list[int]]:
    """(ids before image, ids after image, answer ids + EOS) for the v1 prompt."""
    before, after = tokenize_around_image(tokenizer, conversation(question))
    answer_ids = tokenizer(" " + answer, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    return before, after, answer_ids


def collate(tokenizer, examples, lr_grid: int, row_targets=None, row_reads=None, row_late_targets=None) -> Batch:
    """examples: (question, answer) pairs; row_targets[i][k]: (g, g) bool cells the row predicting answer token k
    should attend to (or None); the row predicting EOS may be given one too. row_reads[i][k]: likewise, (G, G)
    bool HR tokens that row should read (or None). row_late_targets: as row_targets, for the late layers."""
    encoded = [encode_example(tokenizer, q, a) for q, a in examples]
    starts = {len(before) for before, _, _ in encoded}
    if len(starts) != 1:
        raise ValueError("every prompt in a batch must put the image at the same position")
    image_start = starts.pop()
    n_img = lr_grid * lr_grid
    pad = tokenizer.pad_token_id
    seqs, labels, rows = [], [], []
    for before, after, answer in encoded:
        ids = before + [pad] * n_img + after + answer
        prompt_len = len(ids) - len(answer)
        seqs.append(ids)
        labels.append([IGNORE] * prompt_len + answer)
        rows.append(list(range(prompt_len - 1, len(ids) - 1)))  # row t predicts token t + 1
    length = max(map(len, seqs))
    width = max(map(len, rows))
    input_ids = torch.full((len(seqs), length), pad)
    label_t = torch.full((len(seqs), length), IGNORE)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    row_t = torch.zeros((len(seqs), width), dtype=torch.long)
    valid = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, (ids, lab, r) in enumerate(zip(seqs, labels, rows)):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        label_t[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
        row_t[i] = torch.tensor(r + [r[-1]] * (width - len(r)))
        valid[i, : len(r)] = True

    def per_row_cells(per_example, shape):  # padding rows keep no target, so they add nothing to a loss
        cells = torch.zeros(len(seqs), width, *shape, dtype=torch.bool)
        for i, per_row in enumerate(per_example):
            for k, target in enumerate(per_row[: len(rows[i])]):
                if target is not None:
                    cells[i, k] = torch.as_tensor(target, dtype=torch.bool).reshape(shape)
        return cells

    cells = per_row_cells(row_targets, (lr_grid, lr_grid)) if row_targets is not None else None
    late = per_row_cells(row_late_targets, (lr_grid, lr_grid)) if row_late_targets is not None else None
    reads = None
    if row_reads is not None:
        sides = {torch.as_tensor(t).shape[-1] for per_row in row_reads for t in per_row if t is not None}
        if len(sides) > 1:
            raise ValueError(f"row_reads mixes HR grids {sorted(sides)}")
        if sides:  # else no row reads anything: no read cells
            side = sides.pop()
            reads = per_row_cells(row_reads, (side, side)).flatten(2)
    return Batch(input_ids, mask, label_t, row_t, valid, image_start, cells, reads, late)


def teacher_forced(
    model,
    batch: Batch,
    lr_features: torch.Tensor,
    hr_features: torch.Tensor | None,
    settings: FlexSettings,
    original_sizes,
    mode: str = "flex",
    **hooks,
) -> tuple[torch.Tensor, FlexState]:
    """One forward over a batch with the image's LR features spliced in and each answer row as an HR row:
    (logits, the pass's FlexState). `hooks` go to FlexHooks (keep_lr_maps, planted_selection, ...)."""
    device = lr_features.device
    g = int(round(lr_features.shape[1] ** 0.5))
    embeds = model.get_input_embeddings()(batch.input_ids.to(device))
    start = batch.image_start
    embeds = torch.cat([embeds[:, :start], lr_features.to(embeds.dtype), embeds[:, start + g * g :]], dim=1)
    hr_cos = hr_sin = None
    if mode != "lowres":
        hr_cos, hr_sin = model.hr_rotary_tables(start, g, g * settings.zoom)
    state = FlexState(
        mode=mode, settings=settings, image_start=start, lr_grid=g, hr_features=hr_features, hr_cos=hr_cos,
        hr_sin=hr_sin, original_sizes=original_sizes,
        hooks=FlexHooks(rows=batch.rows.to(device), row_valid=batch.row_valid.to(device), **hooks),
    )
    logits = model(inputs_embeds=embeds, attention_mask=batch.attention_mask.to(device), flex_state=state).logits
    return logits, state


def forward_loss(
    model,
    batch: Batch,
    lr_features: torch.Tensor,
    hr_features: torch.Tensor | None,
    settings: FlexSettings,
    original_sizes,
    mode: str = "flex",
    aux_weight: float = 0.0,
    planted_selection: torch.Tensor | None = None,
    select_weight: float = 0.0,
    read_weight: float = 0.0,
    late_layer: int | None = None,
) -> tuple[torch.Tensor, dict]:
    """Cross-entropy on answer tokens + aux_weight x attention loss + select_weight x selection loss
    + read_weight x reading loss (needs `batch.read_cells`).
    lr/hr_features: (B, g*g, D) / (B, G*G, D).

    planted_selection: (B, R, G*G) masks each row uses instead of its own selection (flex mode), e.g.
    `target_masks(batch, zoom)`; the LR maps still get the attention loss.
    late_layer: from this layer on, the attention and selection losses aim the LR maps at
    `batch.late_target_cells` instead of `batch.target_cells` (each layer's selection drives the next, so early
    layers can look at every candidate and later ones at the one the HR tokens showed to be right)."""
    device = lr_features.device
    logits, state = teacher_forced(model, batch, lr_features, hr_features, settings, original_sizes, mode,
                                   keep_lr_maps=aux_weight > 0 or select_weight > 0,
                                   keep_hr_maps=read_weight > 0, planted_selection=planted_selection)
    labels = batch.labels.to(device)
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE)
    stats = {"ce": ce.item()}
    loss = ce
    if late_layer is not None and batch.late_target_cells is None:
        raise ValueError("late_layer needs the batch's late targets: collate(..., row_late_targets=...)")
    late = batch.late_target_cells.to(device) if late_layer is not None else None
    lr_maps, hr_maps = state.hooks.lr_maps, state.hooks.hr_maps
    if aux_weight > 0 and lr_maps and batch.target_cells is not None:
        aux = by_layer(attention_loss, lr_maps, batch.target_cells.to(device), late, late_layer)
        loss = loss + aux_weight * aux
        stats["aux"] = aux.item()
    if select_weight > 0 and lr_maps and batch.target_cells is not None:
        # The last layer's map selects for no later layer, so only the maps whose masks are used take part.
        last = model.config.get_text_config().num_hidden_layers - 1
        used = [(layer, m) for layer, m in lr_maps if layer < last]
        sel = by_layer(selection_loss, used, batch.target_cells.to(device), late, late_layer, settings.threshold)
        loss = loss + select_weight * sel
        stats["sel"] = sel.item()
    if read_weight > 0 and hr_maps and batch.read_cells is not None:
        read = reading_loss(hr_maps, batch.read_cells.to(device))
        loss = loss + read_weight * read
        stats["read"] = read.item()
    return loss, stats


def by_layer(loss_fn, lr_maps, targets: torch.Tensor, late_targets: torch.Tensor | None, late_layer: int | None,
             *args) -> torch.Tensor:
    """loss_fn(maps, targets) with the maps of layers >= late_layer scored against late_targets instead: the mean of
    the two groups' losses weighted by their numbers of layers (so without late targets it is loss_fn itself)."""
    if late_targets is None or late_layer is None:
        return loss_fn(lr_maps, targets, *args)
    groups = [(g, t) for g, t in (([m for m in lr_maps if m[0] < late_layer], targets),
                                  ([m for m in lr_maps if m[0] >= late_layer], late_targets)) if g]
    return sum(len(g) * loss_fn(g, t, *args) for g, t in groups) / sum(len(g) for g, _ in groups)


def target_masks(batch: Batch, zoom: int) -> torch.Tensor:
    """(B, R, G*G): each row's target LR cells as the HR mask a perfect selection (identity pooling) would give."""
    cells = batch.target_cells.repeat_interleave(zoom, dim=2).repeat_interleave(zoom, dim=3)
    return cells.flatten(2)


def attention_loss(lr_maps, target_cells: torch.Tensor) -> torch.Tensor:
    """Mean over selecting layers and rows of -log(share of the row's LR attention that falls on its target)."""
    has_target = target_cells.flatten(2).any(-1)  # (B, R)
    losses = []
    for _, lr_map in lr_maps:
        total = lr_map.flatten(2).sum(-1).clamp_min(1e-6)
        on_target = (lr_map * target_cells).flatten(2).sum(-1)
        losses.append(-torch.log(on_target / total + 1e-6)[has_target])
    return torch.cat(losses).mean() if losses else torch.zeros(())


def reading_loss(hr_maps, read_cells: torch.Tensor) -> torch.Tensor:
    """Mean over HR-attending layers and rows of -log(share of the row's attention, mean over heads, that falls on
    the HR tokens it should read), for rows whose mask holds at least one of them.

    Selection brings the named shape's region (or, for a question that names a letter, every shape) into view; the
    answer still needs the row to find the one HR token that carries it, e.g. the glyph of the letter the question
    names among all selected glyphs. The cross-entropy teaches that only through the answer; this loss asks for it
    directly, as `attention_loss` does for the LR map."""
    losses = []
    for _, probs in hr_maps:  # (B, H, R, G*G), zero on unselected tokens
        mean = probs.float().mean(1)  # (B, R, G*G)
        visible = (read_cells & (mean > 0)).any(-1)  # a read token the mask let through
        on_read = (mean * read_cells).sum(-1)
        losses.append(-torch.log(on_read + 1e-6)[visible])
    return torch.cat(losses).mean() if losses else torch.zeros(())


def selection_loss(lr_maps, target_cells: torch.Tensor, threshold: float, temperature: float = 16.0) -> torch.Tensor:
    """Class-balanced cross-entropy between each row's selection and its target cells, with the selection made soft:
    sigmoid((min-max normalised map x 255 - threshold) / temperature) in place of `> threshold`.

    `attention_loss` is content once most attention sits on one target cell, which leaves the rest of the target
    below the threshold; this loss asks for every target cell above it (recall) and every other cell below
    (HR share). Padded margins are not handled: training images are square. Mean over layers and rows."""
    has_target = target_cells.flatten(2).any(-1)  # (B, R)
    target = target_cells.flatten(2).float()
    n_on = target.sum(-1).clamp_min(1)
    n_off = (1 - target).sum(-1).clamp_min(1)
    losses = []
    for _, lr_map in lr_maps:
        flat = lr_map.flatten(2).float()
        low, high = flat.min(-1, keepdim=True).values, flat.max(-1, keepdim=True).values
        logits = ((flat - low) / (high - low).clamp_min(1e-6) * 255 - threshold) / temperature
        missed = (F.softplus(-logits) * target).sum(-1) / n_on  # -log p(selected) on target cells
        spilled = (F.softplus(logits) * (1 - target)).sum(-1) / n_off  # -log p(not selected) elsewhere
        losses.append((missed + spilled)[has_target])
    return torch.cat(losses).mean() if losses else torch.zeros(())


