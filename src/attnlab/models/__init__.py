"""Models of the attnlab experiments."""
from attnlab.models.encoder import EncoderClassifier, SinusoidalPosition

__all__ = ["EncoderClassifier", "SinusoidalPosition"]
