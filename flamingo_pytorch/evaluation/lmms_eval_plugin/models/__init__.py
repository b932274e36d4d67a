"""lmms-eval's plugin registry: model name -> class name in ``models/<name>.py``."""

AVAILABLE_MODELS = {"flamingo": "FlamingoLMMs"}
