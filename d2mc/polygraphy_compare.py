"""The verification's comparison run through Polygraphy's ``Comparator`` instead of d2mc's own loop: ONNX Runtime
against PyTorch on a prefill and one decode step, judged by the tolerance of :mod:`d2mc.verify`."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from d2mc.errors import require_module
from d2mc.modeling import CACHE_ARG
from d2mc.onnx_session import OrtDecoder, runnable_onnx
from d2mc.verify import RELATIVE, TOLERANCE


def verify_with_polygraphy(model, onnx_path: str | Path, precision: str = "fp32", prefill: int = 16,
                           seed: int = 0) -> dict:
    """The same comparison through Polygraphy's ``Comparator``: ONNX Runtime against PyTorch on two feeds, a prefill
    of ``prefill`` tokens and one decode step after it (its past is ONNX Runtime's own ``present`` of the prefill;
    PyTorch rebuilds its cache from the same tokens). Returns ``{"passed", "max_abs_diff", "tolerance"}``.
    """
    require_module("polygraphy", "the Polygraphy comparison", "polygraphy")
    from polygraphy.backend.base import BaseRunner
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.common import TensorMetadata
    from polygraphy.comparator import Comparator, CompareFunc
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.ERROR
    generator = torch.Generator().manual_seed(seed)
    prefix = torch.randint(0, model.config.vocab_size, (1, prefill + 1), generator=generator)

    class TorchRunner(BaseRunner):
        """PyTorch on CPU, fed what the ONNX model is fed (Polygraphy's own PyTorch runner assumes CUDA)."""

        def __init__(self):
            super().__init__(name="pytorch-cpu")

        def activate_impl(self):
            pass

        def deactivate_impl(self):
            pass

        def get_input_metadata_impl(self):
            metadata = TensorMetadata()
            for name in ("input_ids", "attention_mask", "position_ids"):
                metadata.add(name, np.int64, (1, -1))
            return metadata

        def infer_impl(self, feed_dict):
            ids = torch.from_numpy(feed_dict["input_ids"])
            past = feed_dict["attention_mask"].shape[1] - ids.shape[1]
            start = time.perf_counter()
            with torch.no_grad():
                cache = getattr(model(prefix[:, :past], use_cache=True), CACHE_ARG) if past else None
                logits = model(ids, use_cache=True, **{CACHE_ARG: cache}).logits
            self.inference_time = time.perf_counter() - start
            return {"logits": logits.float().numpy()}

    with runnable_onnx(onnx_path, float_matmuls=True) as path:
        decoder = OrtDecoder(path)
        _, cache = decoder.step(prefix[:, :prefill].numpy(), decoder.empty_cache(1), 0)
        feeds = []
        for ids, past_cache, past in ((prefix[:, :prefill], decoder.empty_cache(1), 0),
                                      (prefix[:, prefill:], cache, prefill)):
            length = ids.shape[1]
            feeds.append({"input_ids": ids.numpy(), "attention_mask": np.ones((1, past + length), np.int64),
                          "position_ids": np.arange(past, past + length, dtype=np.int64)[None, :], **past_cache})
        ort_runner = OnnxrtRunner(SessionFromOnnx(str(path), providers=["cpu"]))
        results = Comparator.run([ort_runner, TorchRunner()], data_loader=feeds)
    worst = 0.0
    for iteration in range(len(feeds)):
        ort_out, torch_out = results[0][1][iteration]["logits"], results[1][1][iteration]["logits"]
        worst = max(worst, float(np.abs(np.asarray(ort_out, np.float32) - torch_out).max()))
    bound = TOLERANCE[precision]
    if precision in RELATIVE:
        bound *= max(float(np.abs(results[1][1][i]["logits"]).max()) for i in range(len(feeds)))
    accuracy = Comparator.compare_accuracy(results, compare_func=CompareFunc.simple(atol=bound, rtol=0.0))
    return {"passed": bool(accuracy) and worst <= bound, "max_abs_diff": worst, "tolerance": bound,
            "runners": [results[0][0], results[1][0]]}
