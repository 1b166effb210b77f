"""Quantised frozen base layers: nf4.py and int8.py (the formats), layers.py (QuantLinear), convert.py
(quantise / dequantise a model, memory figures). Empty on purpose: ``import peftlab.quant.layers``
(which model/targets.py does) must not run the model-level code, which imports model/targets.py back."""
