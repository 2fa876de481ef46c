"""Lowering to ONNX: one graph with KV cache for prefill and decode, built directly from the weights."""

from d2mc.lowering.onnx_graph import LoweringOptions, lower_to_onnx

__all__ = ["LoweringOptions", "lower_to_onnx"]
