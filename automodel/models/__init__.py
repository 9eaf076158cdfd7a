from automodel.models.auto import AutoModelForImageTextToText, load_processor

__all__ = ["AutoModelForImageTextToText", "load_processor"]
