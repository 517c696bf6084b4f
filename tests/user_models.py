"""Model files as a user writes them, shared by the tests of `attnlab explain` and of
the pipeline's `external` kind (each test writes the source to a file of its own)."""

#: A CNN per frame, then nn.TransformerEncoder with batch_first=False, no class token,
#: mean pooling; ``make_model()`` builds it.
CLIP_MODEL = '''
import torch
from torch import nn


class ClipClassifier(nn.Module):
    """A CNN per frame, then nn.TransformerEncoder with batch_first=False, mean pooling."""

    def __init__(self, n_classes=3, d=16):
        super().__init__()
        self.cnn = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                                 nn.Flatten(), nn.Linear(16, d))
        layer = nn.TransformerEncoderLayer(d, nhead=2, dim_feedforward=32, dropout=0.1)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(d, n_classes)

    def embed(self, clips):                       # [B, T, 1, H, W] -> [B, T, d]
        b, t = clips.shape[:2]
        return self.cnn(clips.flatten(0, 1)).view(b, t, -1)

    def forward(self, clips):
        h = self.encoder(self.embed(clips).transpose(0, 1))     # [T, B, d]
        return self.head(h.mean(0))


def make_model():
    return ClipClassifier()

'''
