"""FlexAttention (Li et al., ECCV 2024) for LLaVA-1.5 on stock Hugging Face transformers.

    from flexattn import FlexVLM
    vlm = FlexVLM.load()                    # the embedded model; or "senfu/llava-v1.5-7b-flexattn", or a directory
    result = vlm.answer("image.jpg", "What is written on the sign?", mode="flex")
    print(result.text, result.stats.hr_attended_mean)
    result.trace.passes[0][12].selected     # the HR tokens layer 12 selected for the first answer token
"""

from .image import ImageError, load_image
from .loading import EMBEDDED_MODEL, OFFICIAL_7B, ModelLoadError
from .memory import DeviceMemoryError
from .pipeline import AnswerOptions, FlexVLM, PreparedImage
from .prompt import PromptError
from .results import Answer, AnswerStats
from .settings import MODES, FlexSettings

__all__ = [
    "Answer",
    "AnswerOptions",
    "AnswerStats",
    "DeviceMemoryError",
    "EMBEDDED_MODEL",
    "FlexSettings",
    "FlexVLM",
    "ImageError",
    "MODES",
    "ModelLoadError",
    "OFFICIAL_7B",
    "PreparedImage",
    "PromptError",
    "load_image",
]
