"""The Gradio page: components wired to the event functions in `app.events`. No logic lives here."""

from __future__ import annotations

import gradio as gr

from flexattn.trace_file import TraceFile

from . import figures, runtime, walk
from .events import AVL_DEFAULTS, COMPARE_HEADERS, Events, new_session, rejected
from .examples import Example, load_examples

MODEL_EVENTS = "model"  # one queue for everything that runs the model (one GPU / one CPU model)
MAX_FILE_SIZE = "100mb"  # images are checked by pixels anyway; a 7B trace file can be tens of MB
QUEUE_SIZE = 64
DEFAULT_MAX_NEW_TOKENS = 32

CSS = """
.fa-warning {border-left: 4px solid #e8a317; background: rgba(232, 163, 23, 0.12); padding: 6px 12px;}
.fa-tokens mark {background: #ff7f0e; color: white; padding: 0 3px; border-radius: 3px;}
.fa-header p {margin: 0;}
.fa-card {font-size: 0.92em; opacity: 0.9;}
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
            raise rejected("not an image (the upload could not be decoded)") from None

    image.preprocess = preprocess
    return image


def refuse_by_name(component, message):
    """`component` whose rejected values (Gradio's checks, reached from the API) are refused with `message(value)`,
    in words that name the setting, as one log line (Gradio's own errors say "Value 999 is greater than maximum
    value 255." and print a traceback). The instance's method is replaced, as in `upload_image`."""
    stock = component.preprocess

    def preprocess(payload):
        try:
            return stock(payload)
        except gr.Error:
            raise rejected(message(payload)) from None

    component.preprocess = preprocess
    return component


def setting_slider(name: str, minimum: float, maximum: float, **kwargs) -> gr.Slider:
    """A slider refusing out-of-range values as "Selection threshold must be between 0 and 255, got 999"."""
    slider = gr.Slider(minimum, maximum, label=kwargs.pop("label", name), **kwargs)
    return refuse_by_name(slider, lambda value: f"{name} must be between {minimum:g} and {maximum:g}, got {value}")


def setting_radio(name: str, choices: list[tuple[str, str]], **kwargs) -> gr.Radio:
    """Radio buttons refusing other values as "Mode must be one of flex, lowres, select_all, got 'fast'"."""
    values = ", ".join(value for _, value in choices)
    radio = gr.Radio(choices, label=kwargs.pop("label", name), **kwargs)
    return refuse_by_name(radio, lambda value: f"{name} must be one of {values}, got {value!r}")


def index_slider(*args, **kwargs) -> gr.Slider:
    """`gr.Slider` picking an answer token or a layer: any whole number passes, and the views clamp it to the answer
    they show (its range changes with each answer, and an opened trace may have more layers than the model)."""
    slider = gr.Slider(*args, step=1, **kwargs)
    name = kwargs.get("label", "The index")

    def preprocess(payload):
        try:
            return None if payload is None else int(round(float(payload)))
        except (TypeError, ValueError, OverflowError):
            raise rejected(f"{name} must be a whole number, got {payload!r}") from None

    slider.preprocess = preprocess
    return slider


def header_markdown(info: dict) -> str:
    grids = (f"{info['layers']} layers · LR {info['lr_grid']}×{info['lr_grid']} tokens ({info['lowres_size']} px) · "
             f"HR {info['hr_grid']}×{info['hr_grid']} tokens ({info['hr_size']} px) · selection from layer "
             f"{info['selection_layer']}, threshold {info['threshold']:g}/255")
    if not info["loaded"]:
        return (f"### flexattn: where FlexAttention looks\n**No model loaded**: viewing a saved trace of "
                f"`{info['name']}` · {grids}. Ask and Compare need a model: start `python app.py` without `--trace`.")
    return (f"### flexattn: where FlexAttention looks\nModel `{info['name']}` on **{info['device']}** "
            f"({info['dtype']}) · {grids}")


def card_markdown(card) -> str:
    """One line on what the model is and can answer (flexattn.model_card)."""
    if not card.question_forms:
        return card.summary
    forms = " · ".join(f"“{form}”" for form in card.question_forms)
    return f"{card.summary} Its questions: {forms}. Try the examples."


UNTRAINED_WARNING = (
    "⚠️ **Untrained HR projections.** This checkpoint has no trained `k_proj_hd`/`v_proj_hd`: they start as copies "
    "of `k_proj`/`v_proj` (training-free plug-in). `flex` and `select_all` show the mechanism, not the quality of "
    "a trained FlexAttention model."
)


def build_demo(events: Events | None = None, examples: list[Example] | None = None,
               opened: TraceFile | None = None, opened_name: str = "") -> gr.Blocks:
    """The page for the shared model (`runtime.model()`), or, with no model loaded, for the `opened` trace file
    alone; `examples` default to assets/examples (none without a model)."""
    if not runtime.has_model() and opened is None:
        raise ValueError("no model loaded and no trace to show")
    info = runtime.describe(runtime.model()) if runtime.has_model() else runtime.describe_trace(opened)
    loaded = info["loaded"]
    examples = (load_examples() if examples is None else examples) if loaded else []
    events = events or Events(examples)
    initial = events.show_trace(opened, opened_name) if opened is not None else new_session()
    figures.warm_up()
    n_layers, sel = info["layers"], info["selection_layer"]

    def image_changed(path, state):
        state = events.image_changed(path, state)
        return state, list(state["chat"]), ""

    with gr.Blocks(title="flexattn: where FlexAttention looks", analytics_enabled=False) as demo:
        state = gr.State(initial, time_to_live=3600)
        with gr.Column(elem_id="fa-top"):
            gr.Markdown(header_markdown(info), elem_classes="fa-header", elem_id="fa-header")
            if loaded:
                gr.Markdown(card_markdown(info["card"]), elem_classes="fa-card", elem_id="fa-card")
            if info["untrained_hr"]:
                gr.Markdown(UNTRAINED_WARNING, elem_classes="fa-warning")
        with gr.Row(equal_height=False):
            with gr.Column(scale=4, min_width=320):
                image = upload_image(label="Image", sources=["upload", "clipboard"], height=320, elem_id="fa-image")
                question = gr.Textbox(label="Question (Enter asks)", placeholder="What letter is on the red circle?",
                                      lines=1, max_lines=4, elem_id="fa-question")
                mode = setting_radio("Mode", [("flex (FlexAttention)", "flex"), ("lowres (plain LLaVA-1.5)", "lowres"),
                                              ("select_all (every HR token)", "select_all")], value="flex")
                avl_on = gr.Checkbox(False, label="A-VL: evict and skip image tokens while decoding",
                                     elem_id="fa-avl-on")
                with gr.Row():
                    ask_btn = gr.Button("Ask", variant="primary", elem_id="fa-ask")
                    new_btn = gr.Button("New conversation")
                with gr.Accordion("Settings", open=False, elem_id="fa-settings"):
                    threshold = setting_slider("Selection threshold", 0, 255, value=info["threshold"], step=1,
                                               label="Selection threshold (0-255)")
                    selection_layer = setting_slider("Selection layer", 0, n_layers - 1, value=sel, step=1)
                    max_new = setting_slider("Max new tokens", 1, 512, value=DEFAULT_MAX_NEW_TOKENS, step=1,
                                             elem_id="fa-max-new")
                    do_sample = gr.Checkbox(False, label="Sample (off: greedy)")
                    temperature = setting_slider("Temperature", 0.05, 2.0, value=1.0, step=0.05)
                    top_p = setting_slider("Top-p", 0.05, 1.0, value=1.0, step=0.05)
                    seed = gr.Number(0, precision=0, label="Seed (sampling)")
                with gr.Accordion("A-VL settings (used when A-VL is on)", open=False):
                    vision_evict = setting_slider(
                        "Vision evict rate", 0, 1, value=AVL_DEFAULTS.vision_evict_rate, step=0.05,
                        label="Vision evict rate (image tokens dropped from each layer's cache)")
                    compute_skip = setting_slider(
                        "Compute skip rate", 0, 1, value=AVL_DEFAULTS.compute_skip_rate, step=0.05,
                        label="Compute skip rate (cached image tokens left out of the core)")
                    refresh_every = setting_slider(
                        "Refresh every", 1, 16, value=AVL_DEFAULTS.refresh_every, step=1,
                        label="Refresh every (steps; a refresh attends every cached token)")
                    text_evict = setting_slider(
                        "Text evict rate", 0, 1, value=AVL_DEFAULTS.text_evict_rate, step=0.05,
                        label="Text evict rate (answer tokens beyond the budget)")
                    selection_scores = setting_radio(
                        "HR selection scores", [("secondary (score every cached image token)", "secondary"),
                                                ("attended (the core only, cheaper)", "attended")],
                        value=AVL_DEFAULTS.selection_scores)
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
                    with gr.Tab("Compare", elem_id="fa-compare-tab"):
                        gr.Markdown("The image and question on the left in all three modes (greedy, no history), "
                                    "side by side at the same answer token and layer.")
                        compare_avl = gr.Checkbox(False, label="Also with A-VL (each mode twice: 6 runs instead of 3; "
                                                               "A-VL settings on the left)")
                        compare_btn = gr.Button("Compare lowres / flex / select_all", elem_id="fa-compare-btn")
                        table = gr.Dataframe(headers=COMPARE_HEADERS, interactive=False, wrap=True)
                        compare_pictures = gr.Plot(label="Where each mode looked", elem_id="fa-compare-pictures")
                        with gr.Row():
                            compare_token = index_slider(0, 1, value=0, label="Answer token", interactive=False,
                                                         elem_id="fa-compare-token")
                            compare_layer = index_slider(0, max(n_layers - 1, 1), value=min(sel + 1, n_layers - 1),
                                                         label="Layer", elem_id="fa-compare-layer")
                        compare_plot = gr.Plot(label="Cost by mode")
        gr.Markdown("### Inspect: where the answer looked, token by token and layer by layer")
        source_md = gr.Markdown(elem_id="fa-source")
        with gr.Row(equal_height=False):
            save_btn = gr.Button("Save trace", size="sm", scale=0, min_width=150, elem_id="fa-save-trace")
            open_btn = gr.UploadButton("Open trace", file_types=[".npz"], type="filepath", size="sm", scale=0,
                                       min_width=150, elem_id="fa-open-trace")
            trace_file = gr.File(label="Saved trace (one .npz file: image, question, answer, every layer's maps and "
                                       "masks; open it here or with python app.py --trace FILE)",
                                 interactive=False, visible=False, elem_id="fa-trace-file", scale=1)
        with gr.Row(equal_height=False, elem_id="fa-walk"):
            with gr.Column(scale=5):
                overview_plot = gr.Plot(label="The walk at a glance", elem_id="fa-overview")
            with gr.Column(scale=4):
                playback_plot = gr.Plot(label="Selection over the image, token by token", elem_id="fa-playback")
                play_btn = gr.Button("▶ Play / pause the answer tokens", size="sm", elem_id="fa-play")
        tokens_md = gr.Markdown(elem_classes="fa-tokens")
        with gr.Row():
            token_slider = index_slider(0, 1, value=0, label="Answer token", interactive=False, elem_id="fa-token")
            layer_slider = index_slider(0, max(n_layers - 1, 1), value=min(sel + 1, n_layers - 1), label="Layer",
                                        elem_id="fa-layer")
        layer_md = gr.Markdown()
        with gr.Row(equal_height=True, elem_id="fa-maps"):
            lr_plot = gr.Plot(label="LR attention", elem_id="fa-lr")
            mask_plot = gr.Plot(label="Selected HR tokens", elem_id="fa-mask")
        grid_plot = gr.Plot(label="All selecting layers", elem_id="fa-grid")
        chart_plot = gr.Plot(label="Per layer", elem_id="fa-chart")
        with gr.Column(visible=False, elem_id="fa-avl-group") as avl_group:
            gr.Markdown("#### A-VL: which image tokens each layer keeps (evicted / secondary / core) and what it "
                        "saves")
            avl_md = gr.Markdown(elem_id="fa-avl-text")
            with gr.Row(equal_height=True):
                avl_plot = gr.Plot(label="A-VL token states", elem_id="fa-avl")
                kv_plot = gr.Plot(label="A-VL memory and visual attention", elem_id="fa-kv")

        token_outputs = [lr_plot, mask_plot, grid_plot, chart_plot, layer_md, tokens_md]
        avl_outputs = [avl_plot, kv_plot, avl_md]
        inspect_outputs = [token_slider, layer_slider, source_md, overview_plot, playback_plot, *token_outputs,
                           *avl_outputs, avl_group]
        avl_inputs = [avl_on, vision_evict, compute_skip, refresh_every, text_evict, selection_scores]
        render_all = dict(fn=events.render_all, inputs=[state, layer_slider], outputs=inspect_outputs,
                          show_progress="hidden", concurrency_limit=4)
        image.change(image_changed, [image, state], [state, chatbot, stats], api_name="image_changed",
                     concurrency_limit=4, trigger_mode="always_last").then(**render_all, api_visibility="private")
        new_btn.click(events.new_conversation, [state], [state, chatbot, stats], api_name="new_conversation",
                      queue=False).then(**render_all, api_visibility="private")
        (
            gr.on([ask_btn.click, question.submit], events.start_turn, [image, question, state], [chatbot, state],
                  api_name="start_turn", concurrency_limit=4)
            .success(events.answer_turn,
                     [state, mode, threshold, selection_layer, max_new, do_sample, temperature, top_p, seed, image,
                      question, *avl_inputs],
                     [chatbot, state, stats], api_name="answer_turn", concurrency_id=MODEL_EVENTS,
                     concurrency_limit=1)
            .success(**render_all, api_name="inspect")
        )
        slider_options = dict(trigger_mode="always_last", show_progress="hidden", concurrency_limit=4)
        layer_slider.input(events.render_layer, [state, token_slider, layer_slider], [lr_plot, mask_plot, layer_md],
                           api_name="render_layer", **slider_options)
        layer_slider.input(events.render_playback, [state, layer_slider], [playback_plot], api_name="render_playback",
                           **slider_options)
        token_slider.input(events.render_token, [state, token_slider, layer_slider], token_outputs,
                           api_name="render_token", **slider_options)
        gr.on([layer_slider.input, token_slider.input], events.render_avl, [state, token_slider, layer_slider],
              avl_outputs, api_name="render_avl", **slider_options)
        play_btn.click(None, js=walk.PLAY_JS)
        save_btn.click(events.save_trace, [state], [trace_file], api_name="save_trace", concurrency_limit=4)
        open_btn.upload(events.open_trace, [open_btn, state], [state], api_name="open_trace",
                        concurrency_limit=4).success(**render_all, api_visibility="private")
        compare_btn.click(events.compare, [image, question, threshold, selection_layer, max_new, compare_avl,
                                           *avl_inputs[1:], state, compare_token, compare_layer],
                          [table, compare_plot, compare_pictures, compare_token, compare_layer, state],
                          api_name="compare", concurrency_id=MODEL_EVENTS, concurrency_limit=1)
        gr.on([compare_token.input, compare_layer.input], events.render_compare,
              [state, compare_token, compare_layer], [compare_pictures], api_name="render_compare", **slider_options)
        if opened is not None:  # the opened trace's views, as soon as the page loads
            demo.load(**render_all, api_visibility="private")
    demo.queue(max_size=QUEUE_SIZE, default_concurrency_limit=2)
    return demo
