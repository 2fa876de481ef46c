"""d2mc: a deployment compiler for on-device LLMs.

Dense Hugging Face LLM in, Mixture-of-Experts model (Dense2MoE), ONNX with KV cache, TensorRT engine and a
roofline-vs-measured latency report out. The Python API mirrors the CLI.
"""

__version__ = "0.1.0"

from d2mc.errors import UserError  # noqa: E402
from d2mc.loading import load_model  # noqa: E402
from d2mc.profiles import load_profile  # noqa: E402

__all__ = ["UserError", "load_model", "load_profile", "__version__"]

import d2mc.modeling  # noqa: E402,F401  (registers the converted-model classes with the Auto classes)
