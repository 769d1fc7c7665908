"""The flexattn inspection app: Gradio UI wiring (`ui`), plain event functions (`events`), plotly figures
(`figures`), grid/pixel geometry (`geometry`), examples (`examples`) and the shared model (`runtime`)."""
