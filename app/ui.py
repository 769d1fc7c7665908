"""The Gradio page: components wired to the event functions in `app.events`. No logic lives here."""

from __future__ import annotations

import gradio as gr

from . import figures, runtime
from .events import AVL_DEFAULTS, COMPARE_HEADERS, Events, new_session
from .examples import Example, load_examples

MODEL_EVENTS = "model"  # one queue for everything that runs the model (one GPU / one CPU model)
MAX_FILE_SIZE = "25mb"
QUEUE_SIZE = 64
DEFAULT_MAX_NEW_TOKENS = 32

CSS = """
.fa-warning {border-left: 4px solid #e8a317; background: rgba(232, 163, 23, 0.12); padding: 6px 12px;}
.fa-tokens mark {background: #ff7f0e; color: white; padding: 0 3px; border-radius: 3px;}
.fa-header p {margin: 0;}
"""


def theme():
    return gr.themes.Soft(primary_hue="blue", neutral_hue="slate")


def launch_options() -> dict:
    """What `launch()` needs besides host and port (Gradio 6 takes theme and css here, not in Blocks)."""
    return {"theme": theme(), "css": CSS, "max_file_size": MAX_FILE_SIZE}


def upload_image(**kwargs) -> gr.Image:
    """`gr.Image(type="filepath")` that hands the uploaded file to flexattn untouched.

    The stock component opens every upload with PIL first, so a non-image or a decompression bomb fails inside
    Gradio with a generic message before flexattn.load_image can say what is wrong (and, with an image_mode, it
    converts RGBA/16-bit pixels itself). The path is still only ever one in Gradio's upload cache: Gradio refuses
    other paths before preprocessing. (The instance's method is replaced rather than subclassing gr.Image, because
    Gradio writes a .pyi stub next to the source of every Component subclass at import time.)
    """
    image = gr.Image(type="filepath", image_mode=None, **kwargs)
    stock = image.preprocess

    def preprocess(payload):
        if payload is None:
            return None
        if payload.path and not (payload.url or "").startswith("data:"):
            return str(payload.path)
        try:
            return stock(payload)
        except Exception:
            raise gr.Error("not an image (the upload could not be decoded)", title="Cannot do that") from None

    image.preprocess = preprocess
    return image


def header_markdown(info: dict) -> str:
    return (
        f"### flexattn: where FlexAttention looks\n"
        f"Model `{info['name']}` on **{info['device']}** ({info['dtype']}) · {info['layers']} layers · "
        f"LR {info['lr_grid']}×{info['lr_grid']} tokens ({info['lowres_size']} px) · HR {info['hr_grid']}×"
        f"{info['hr_grid']} tokens ({info['hr_size']} px) · selection from layer {info['selection_layer']}, "
        f"threshold {info['threshold']:g}/255"
    )


UNTRAINED_WARNING = (
    "⚠️ **Untrained HR projections.** This checkpoint has no trained `k_proj_hd`/`v_proj_hd`: they start as copies "
    "of `k_proj`/`v_proj` (training-free plug-in). `flex` and `select_all` show the mechanism, not the quality of "
    "a trained FlexAttention model."
)


def build_demo(events: Events | None = None, examples: list[Example] | None = None) -> gr.Blocks:
    """The page for the shared model (`runtime.model()`); `examples` default to assets/examples."""
    examples = load_examples() if examples is None else examples
    events = events or Events(examples)
    info = runtime.describe(runtime.model())
    figures.warm_up()
    n_layers, sel = info["layers"], info["selection_layer"]

    cleared = (None, None, None, None, "", "", None, None, "")  # inspect outputs, then the A-VL panel

    def image_changed(path, state):
        state = events.image_changed(path, state)
        return state, list(state["chat"]), "", *cleared

    def new_conversation(state):
        state = dict(state or new_session())
        state.update(history=[], chat=[], pending=None, answer=None)
        return state, [], "", *cleared

    def render_new(state, layer):
        n = events.token_count(state)
        token_slider = gr.Slider(minimum=0, maximum=max(n - 1, 1), value=0, interactive=n > 1)
        return token_slider, *events.render_token(state, 0, layer), *events.render_avl(state, 0, layer)

    with gr.Blocks(title="flexattn: where FlexAttention looks", analytics_enabled=False) as demo:
        state = gr.State(new_session(), time_to_live=3600)
        gr.Markdown(header_markdown(info), elem_classes="fa-header")
        if info["untrained_hr"]:
            gr.Markdown(UNTRAINED_WARNING, elem_classes="fa-warning")
        with gr.Row(equal_height=False):
            with gr.Column(scale=4, min_width=320):
                image = upload_image(label="Image", sources=["upload", "clipboard"], height=320, elem_id="fa-image")
                question = gr.Textbox(label="Question", placeholder="What letter is on the red circle?", lines=2,
                                      elem_id="fa-question")
                mode = gr.Radio([("flex (FlexAttention)", "flex"), ("lowres (plain LLaVA-1.5)", "lowres"),
                                 ("select_all (every HR token)", "select_all")], value="flex", label="Mode")
                avl_on = gr.Checkbox(False, label="A-VL: evict and skip image tokens while decoding",
                                     elem_id="fa-avl-on")
                with gr.Row():
                    ask_btn = gr.Button("Ask", variant="primary", elem_id="fa-ask")
                    new_btn = gr.Button("New conversation")
                with gr.Accordion("Settings", open=False):
                    threshold = gr.Slider(0, 255, value=info["threshold"], step=1, label="Selection threshold (0-255)")
                    selection_layer = gr.Slider(0, n_layers - 1, value=sel, step=1, label="Selection layer")
                    max_new = gr.Slider(1, 512, value=DEFAULT_MAX_NEW_TOKENS, step=1, label="Max new tokens")
                    do_sample = gr.Checkbox(False, label="Sample (off: greedy)")
                    temperature = gr.Slider(0.05, 2.0, value=1.0, step=0.05, label="Temperature")
                    top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p")
                    seed = gr.Number(0, precision=0, label="Seed (sampling)")
                with gr.Accordion("A-VL settings (used when A-VL is on)", open=False):
                    vision_evict = gr.Slider(0, 1, value=AVL_DEFAULTS.vision_evict_rate, step=0.05,
                                             label="Vision evict rate (image tokens dropped from each layer's cache)")
                    compute_skip = gr.Slider(0, 1, value=AVL_DEFAULTS.compute_skip_rate, step=0.05,
                                             label="Compute skip rate (cached image tokens left out of the core)")
                    refresh_every = gr.Slider(1, 16, value=AVL_DEFAULTS.refresh_every, step=1,
                                              label="Refresh every (steps; a refresh attends every cached token)")
                    text_evict = gr.Slider(0, 1, value=AVL_DEFAULTS.text_evict_rate, step=0.05,
                                           label="Text evict rate (answer tokens beyond the budget)")
                    selection_scores = gr.Radio(
                        [("secondary (score every cached image token)", "secondary"),
                         ("attended (the core only, cheaper)", "attended")],
                        value=AVL_DEFAULTS.selection_scores, label="HR selection scores")
                if examples:
                    gr.Examples(
                        [[e.image, e.question] for e in examples], inputs=[image, question], label="Examples",
                        examples_per_page=12, cache_examples=False,
                    )
            with gr.Column(scale=6, min_width=420):
                with gr.Tabs():
                    with gr.Tab("Ask"):
                        chatbot = gr.Chatbot(label="Conversation about this image", height=380, elem_id="fa-chat")
                        stats = gr.Markdown(elem_id="fa-stats")
                    with gr.Tab("Compare"):
                        gr.Markdown("The image and question on the left in all three modes (greedy, no history).")
                        compare_avl = gr.Checkbox(False, label="Also with A-VL (each mode twice: 6 runs instead of 3; "
                                                               "A-VL settings on the left)")
                        compare_btn = gr.Button("Compare lowres / flex / select_all")
                        table = gr.Dataframe(headers=COMPARE_HEADERS, interactive=False, wrap=True)
                        compare_plot = gr.Plot(label="Cost by mode")
        gr.Markdown("### Inspect: where the answer looked, token by token and layer by layer")
        tokens_md = gr.Markdown(elem_classes="fa-tokens")
        with gr.Row():
            token_slider = gr.Slider(0, 1, value=0, step=1, label="Answer token", interactive=False,
                                     elem_id="fa-token")
            layer_slider = gr.Slider(0, n_layers - 1, value=min(sel + 1, n_layers - 1), step=1, label="Layer")
        layer_md = gr.Markdown()
        with gr.Row(equal_height=True):
            lr_plot = gr.Plot(label="LR attention", elem_id="fa-lr")
            mask_plot = gr.Plot(label="Selected HR tokens", elem_id="fa-mask")
        grid_plot = gr.Plot(label="All selecting layers", elem_id="fa-grid")
        chart_plot = gr.Plot(label="Per layer", elem_id="fa-chart")
        gr.Markdown("#### A-VL: which image tokens each layer keeps (evicted / secondary / core) and what it saves")
        avl_md = gr.Markdown(elem_id="fa-avl-text")
        with gr.Row(equal_height=True):
            avl_plot = gr.Plot(label="A-VL token states", elem_id="fa-avl")
            kv_plot = gr.Plot(label="A-VL memory and visual attention", elem_id="fa-kv")

        inspect_outputs = [lr_plot, mask_plot, grid_plot, chart_plot, layer_md, tokens_md]
        avl_outputs = [avl_plot, kv_plot, avl_md]
        avl_inputs = [avl_on, vision_evict, compute_skip, refresh_every, text_evict, selection_scores]
        image.change(image_changed, [image, state], [state, chatbot, stats, *inspect_outputs, *avl_outputs],
                     api_name="image_changed", concurrency_limit=4, trigger_mode="always_last")
        new_btn.click(new_conversation, [state], [state, chatbot, stats, *inspect_outputs, *avl_outputs],
                      api_name="new_conversation", queue=False)
        (
            gr.on([ask_btn.click, question.submit], events.start_turn, [image, question, state], [chatbot, state],
                  api_name="start_turn", concurrency_limit=4)
            .success(events.answer_turn,
                     [state, mode, threshold, selection_layer, max_new, do_sample, temperature, top_p, seed, image,
                      question, *avl_inputs],
                     [chatbot, state, stats], api_name="answer_turn", concurrency_id=MODEL_EVENTS,
                     concurrency_limit=1)
            .success(render_new, [state, layer_slider], [token_slider, *inspect_outputs, *avl_outputs],
                     api_name="inspect",
                     show_progress="hidden", concurrency_limit=4)
        )
        slider_options = dict(trigger_mode="always_last", show_progress="hidden", concurrency_limit=4)
        layer_slider.input(events.render_layer, [state, token_slider, layer_slider], [lr_plot, mask_plot, layer_md],
                           api_name="render_layer", **slider_options)
        token_slider.input(events.render_token, [state, token_slider, layer_slider], inspect_outputs,
                           api_name="render_token", **slider_options)
        gr.on([layer_slider.input, token_slider.input], events.render_avl, [state, token_slider, layer_slider],
              avl_outputs, api_name="render_avl", **slider_options)
        compare_btn.click(events.compare, [image, question, threshold, selection_layer, max_new, compare_avl,
                                           *avl_inputs[1:]],
                          [table, compare_plot], api_name="compare", concurrency_id=MODEL_EVENTS, concurrency_limit=1)
    demo.queue(max_size=QUEUE_SIZE, default_concurrency_limit=2)
    return demo
