"""Teacher-forced FlexAttention training on batches, through the same attention function as inference.

At inference only the last row of a pass sees HR tokens; with teacher forcing every row that predicts an answer
token is such a "last row", so the training forward marks exactly those rows (`FlexHooks.rows`). Each gets its
own selection from its own LR attention, layer by layer, as it would while decoding. The threshold makes that
selection non-differentiable, so auxiliary losses stand in for it, each with its own targets per layer:
`attention_loss` pulls each answering row's head-summed LR attention onto given cells, and `selection_loss` asks
the thresholded map itself to cover given cells and nothing else, through a sigmoid in place of the threshold. Past selection, `reading_loss` asks each answering row's HR attention to find the HR tokens its
answer is on (the glyph of the letter a question names, among every selected glyph).
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
    # name -> (B, R, g, g) bool: LR cells for each row, e.g. where it should look in a group of layers; rows without
    # cells (all False) take no part in a loss on them (forward_loss maps layers to these names)
    cells: dict[str, torch.Tensor] = field(default_factory=dict)
    read_cells: torch.Tensor | None = None  # (B, R, G*G) bool: HR tokens each row should read its answer from


def encode_example(tokenizer, question: str, answer: str) -> tuple[list[int], list[int], list[int]]:
    """(ids before image, ids after image, answer ids + EOS) for the v1 prompt."""
    before, after = tokenize_around_image(tokenizer, conversation(question))
    answer_ids = tokenizer(" " + answer, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    return before, after, answer_ids


def collate(tokenizer, examples, lr_grid: int, cells: dict[str, list] | None = None, row_reads=None) -> Batch:
    """examples: (question, answer) pairs. cells[name][i][k]: (g, g) bool cells for the row of example i that predicts
    answer token k (the row predicting EOS may be given some too), or None. row_reads[i][k]: likewise, (G, G) bool HR
    tokens that row should read, or None."""
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
        out = torch.zeros(len(seqs), width, *shape, dtype=torch.bool)
        for i, per_row in enumerate(per_example):
            for k, target in enumerate(per_row[: len(rows[i])]):
                if target is not None:
                    out[i, k] = torch.as_tensor(target, dtype=torch.bool).reshape(shape)
        return out

    named = {name: per_row_cells(per_example, (lr_grid, lr_grid)) for name, per_example in (cells or {}).items()}
    reads = None
    if row_reads is not None:
        sides = {torch.as_tensor(t).shape[-1] for per_row in row_reads for t in per_row if t is not None}
        if len(sides) > 1:
            raise ValueError(f"row_reads mixes HR grids {sorted(sides)}")
        if sides:  # else no row reads anything: no read cells
            side = sides.pop()
            reads = per_row_cells(row_reads, (side, side)).flatten(2)
    return Batch(input_ids, mask, label_t, row_t, valid, image_start, named, reads)


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
    *,
    attend: dict[int, str] | None = None,
    select: dict[int, str] | None = None,
    aux_weight: float = 0.0,
    select_weight: float = 0.0,
    read_weight: float = 0.0,
    planted_selection: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict]:
    """Cross-entropy on answer tokens + aux_weight x attention loss + select_weight x selection loss
    + read_weight x reading loss (needs `batch.read_cells`). lr/hr_features: (B, g*g, D) / (B, G*G, D).

    attend / select: layer -> the name of the batch's cells that layer's LR map should put its attention on (attention
    loss) / cover when thresholded (selection loss). Each layer has its own targets, since each layer's selection
    drives the next: early layers can look at every candidate, later ones at the one the HR tokens showed to be
    right; layers before the selection layer can be given targets too (where the row looks before selecting).
    Each loss is the mean over its layers. planted_selection: (B, R, G*G) masks each row uses instead of its own
    selection (flex mode), e.g. `target_masks(batch, zoom, names)`; the LR maps still get their losses."""
    device = lr_features.device
    attend, select = attend or {}, select or {}
    wanted = [layer for layer in (*attend, *select)]
    logits, state = teacher_forced(model, batch, lr_features, hr_features, settings, original_sizes, mode,
                                   keep_lr_maps=bool(wanted), lr_maps_from=min(wanted) if wanted else None,
                                   keep_hr_maps=read_weight > 0, planted_selection=planted_selection)
    labels = batch.labels.to(device)
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE)
    stats = {"ce": ce.item()}
    loss = ce
    maps = dict(state.hooks.lr_maps)
    for name, weight, targets, loss_fn, extra in (
        ("aux", aux_weight, attend, attention_loss, ()),
        ("sel", select_weight, select, selection_loss, (settings.threshold,)),
    ):
        per_layer = [loss_fn([(layer, maps[layer])], batch.cells[cells].to(device), *extra)
                     for layer, cells in targets.items() if layer in maps and batch.cells[cells].any()]
        if weight > 0 and per_layer:
            term = torch.stack(per_layer).mean()
            loss = loss + weight * term
            stats[name] = term.item()
    hr_maps = state.hooks.hr_maps
    if read_weight > 0 and hr_maps and batch.read_cells is not None:
        read = reading_loss(hr_maps, batch.read_cells.to(device))
        loss = loss + read_weight * read
        stats["read"] = read.item()
    return loss, stats


def target_masks(batch: Batch, zoom: int, names) -> torch.Tensor:
    """(B, R, G*G): the union of each row's cells under `names`, as the HR mask a perfect selection (identity
    pooling) would give."""
    cells = torch.stack([batch.cells[name] for name in names]).any(0)
    return cells.repeat_interleave(zoom, dim=2).repeat_interleave(zoom, dim=3).flatten(2)


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


