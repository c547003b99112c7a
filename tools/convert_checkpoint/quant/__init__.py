"""Quantized weight formats: 128x128 block FP8 (pt and TE quantizers) and TE pickles."""
