"""What PyTorch computes on the inputs of a verification (:mod:`d2mc.verify`), kept so that ONNX Runtime can be
judged against it once the PyTorch model is gone: each step's tokens, logits and the cache rows to compare
(:class:`Reference`, made by :class:`ReferenceRecorder`), and the lookup tables compared row for row with the
artifact's (:func:`compare_lookup_tables`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from d2mc.arch import ModelArch
from d2mc.errors import UserError, first_line
from d2mc.modeling import CACHE_ARG

TABLE_BLOCK_BYTES = 64 << 20  # a lookup table is compared a block of rows of about this size at a time
FORCING_BIAS = 1e4  # added to a router logit to force its expert (fp16 holds it; no trained router reaches it)


@dataclass(frozen=True)
class ReferenceStep:
    """One step of the inputs with PyTorch's outputs: what ONNX Runtime is fed and what its outputs must match."""

    where: str
    tokens: np.ndarray  # [1, S] token ids
    past: int  # tokens before these
    feed: str  # the ONNX side's past: "empty", "previous" (its own cache after the step before) or "repeat" (the
    # first part's cache repeated to ``past`` tokens, as PyTorch was fed)
    logits: np.ndarray  # PyTorch's, fp32
    cache: dict[str, np.ndarray]  # PyTorch's keys and values by ONNX input name: the rows to compare
    biases: dict[int, np.ndarray] = field(default_factory=dict)  # forced experts: router bias per MoE block
    greedy: bool = False  # a first-part step, whose greedy pick is compared


@dataclass(frozen=True)
class Reference:
    """What PyTorch computed on the inputs of a verification (:func:`record_reference`): enough for
    :func:`replay_reference` to judge the ONNX model with the PyTorch model gone."""

    arch: ModelArch
    precision: str
    prefill: int
    decode_steps: int
    steps: list[ReferenceStep]
    first_cache: dict[str, np.ndarray]  # the first part's cache, in the graph's KV dtype, by ONNX input name
    sampled: list[int] = field(default_factory=list)
    last: int = 0
    forced: dict[int, int] = field(default_factory=dict)
    tables: dict[str, tuple[float, float]] = field(default_factory=dict)


def compare_lookup_tables(model, onnx_path: Path) -> dict[str, tuple[float, float]]:
    """``{table: (max |difference|, max |entry| of the model's)}`` for the token embedding (the LM head's table when
    the two are tied) and the rotary tables of the graph at ``onnx_path``, each against the one the PyTorch model
    computes with, over every row. A float table in the external data file is read through a memory map, a block
    of rows at a time."""
    import onnx

    from d2mc.arch import ModelArch
    from d2mc.lowering.onnx_graph import LM_HEAD_TABLE, embedding_is_tied

    arch = ModelArch.from_config(model.config)
    embedding = model.model.embed_tokens.weight.detach()
    expected = {LM_HEAD_TABLE: embedding.T} if embedding_is_tied(model) else {"embed_tokens": embedding}
    if arch.attention_blocks:
        device = embedding.device
        with torch.no_grad():
            cos, sin = model.model.rotary_emb(torch.zeros(1, device=device),
                                              torch.arange(arch.max_position_embeddings, device=device)[None])
        half = arch.head_dim // 2
        expected.update(cos_cache=cos[0, :, :half], sin_cache=sin[0, :, :half])
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    found = {}
    for tensor in graph.initializer:
        if tensor.name not in expected:
            continue
        reference = expected[tensor.name]
        actual = _read_initializer(tensor, onnx_path)
        if tuple(actual.shape) != tuple(reference.shape):
            raise UserError(f"'{tensor.name}' of '{onnx_path}' has shape {list(actual.shape)}, the model's "
                            f"{list(reference.shape)}: compare an artifact with the model it was exported from")
        rows = max(1, TABLE_BLOCK_BYTES // max(4 * reference[0].numel(), 1))
        diff = scale = 0.0
        for start in range(0, reference.shape[0], rows):
            block = reference[start:start + rows].float().cpu().numpy()
            diff = max(diff, max_abs_diff(np.asarray(actual[start:start + rows]), block))
            scale = max(scale, float(np.abs(block).max(initial=0.0)))
        found[tensor.name] = (diff, scale)
    return found


def _read_initializer(tensor, onnx_path: Path) -> np.ndarray:
    """An initializer's values: a read-only memory map of the external data file for a float tensor stored there,
    else the tensor read whole."""
    from onnx import TensorProto, numpy_helper
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    floats = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16}
    try:
        if uses_external_data(tensor) and tensor.data_type in floats:
            info = {e.key: e.value for e in tensor.external_data}
            dtype, shape = np.dtype(floats[tensor.data_type]), tuple(tensor.dims)
            data = onnx_path.parent / info["location"]
            offset = int(info.get("offset", 0))
            if data.stat().st_size < offset + dtype.itemsize * int(np.prod(shape)):
                raise ValueError(f"{data.name} is shorter than the tensor")
            return np.memmap(data, dtype, mode="r", offset=offset, shape=shape)
        if uses_external_data(tensor):
            load_external_data_for_tensor(tensor, str(onnx_path.parent))
        return numpy_helper.to_array(tensor)
    except Exception as exc:  # a truncated or unreadable data file
        raise UserError(f"cannot read '{tensor.name}' of '{onnx_path}' ({first_line(exc)}): the artifact is "
                        "corrupt or incomplete; export it again") from None


def kv_name(block: int, kind: str) -> str:
    return f"past_key_values.{block}.{kind}"


class ReferenceRecorder:
    """PyTorch's side of a verification: runs the model on each input and keeps what the comparison needs."""

    def __init__(self, model, arch, kv_dtype):
        self.model, self.arch, self.kv_dtype = model, arch, kv_dtype
        weight = next(model.parameters())
        self.device, self.dtype = weight.device, weight.dtype  # where the model runs, and its cache's dtype
        self.steps: list[ReferenceStep] = []
        self.first_cache: dict[str, np.ndarray] = {}

    def step(self, tokens: torch.Tensor, torch_cache, past: int, feed: str, where: str, new_rows_only: bool = False,
             biases: dict | None = None, greedy: bool = False):
        """One forward through the cache, recorded; returns its output. With ``new_rows_only`` only the cache rows
        of ``tokens`` are kept for comparison (the past was fed to both sides as the same tensors)."""
        tokens = tokens.cpu()
        with torch.no_grad():
            out = self.model(tokens.to(self.device), use_cache=True, **{CACHE_ARG: torch_cache})
        keep = tokens.shape[1] if new_rows_only else None
        cache = {kv_name(i, kind): tensor[:, :, -keep if keep else 0:].float().cpu().numpy().copy()
                 for i, layer in enumerate(getattr(out, CACHE_ARG).layers)
                 for kind, tensor in (("key", layer.keys), ("value", layer.values))}
        self.steps.append(ReferenceStep(where, tokens.numpy(), past, feed, out.logits.float().cpu().numpy(), cache,
                                        biases or {}, greedy))
        return out

    def first_positions(self, ids: torch.Tensor, decode_steps: int) -> None:
        """A prefill and greedy decode steps from position 0; keeps the cache after them."""
        past, torch_cache, tokens = 0, None, ids
        for step in range(decode_steps + 1):
            where = "prefill" if step == 0 else f"decode at position {past}"
            out = self.step(tokens, torch_cache, past, "empty" if step == 0 else "previous", where, greedy=True)
            torch_cache = getattr(out, CACHE_ARG)
            past += tokens.shape[1]
            tokens = out.logits[:, -1:].argmax(-1)
        self.first_cache = {name: value.astype(self.kv_dtype) for name, value in self.steps[-1].cache.items()}

    def at_position(self, past: int, tokens: torch.Tensor) -> None:
        """``tokens`` after a past of ``past`` tokens: the first part's cache repeated to that length. The cache
        holds the only copy of that past, so each block's grows in place of the old one."""
        from transformers.cache_utils import DynamicCache

        torch_cache = DynamicCache(config=self.model.config)
        for i in range(len(self.arch.attention_blocks)):
            torch_cache.update(*(torch.from_numpy(repeated_cache(self.first_cache[kv_name(i, kind)], past, np.float32))
                                 .to(self.device, self.dtype) for kind in ("key", "value")), i)
        last = past + tokens.shape[1] - 1
        where = f"position {last}" if tokens.shape[1] == 1 else f"{tokens.shape[1]} tokens at positions {past}-{last}"
        self.step(tokens, torch_cache, past, "repeat", where, new_rows_only=True)

    def forcing(self, experts: dict[int, int], round_: int, ids: torch.Tensor) -> None:
        """A prefill and one decode step with expert ``round_`` (modulo its count) forced first in every MoE block,
        and the next ``top_k - 1`` experts after it, in order: the bias decides every choice, so no near tie of the
        router's logits (which reduced precision may break the other way) decides one."""
        layers = list(self.model.model.layers)
        biases = {}
        for block, count in experts.items():
            bias = np.zeros(count, np.float32)
            top_k = layers[block].top_k
            for j in range(top_k):
                bias[(round_ + j) % count] = FORCING_BIAS * (top_k - j) / top_k
            biases[block] = bias
        hooks = [layers[b].router.register_forward_hook(_adding(torch.from_numpy(bias))) for b, bias in biases.items()]
        try:
            where = f"expert {round_} forced"
            out = self.step(ids, None, 0, "empty", f"prefill, {where}", biases=biases)
            self.step(out.logits[:, -1:].argmax(-1), getattr(out, CACHE_ARG), ids.shape[1], "previous",
                      f"decode, {where}", biases=biases)
        finally:
            for hook in hooks:
                hook.remove()


def repeated_cache(cache: np.ndarray, past: int, dtype) -> np.ndarray:
    """A cache tensor ``[B, heads, length, head_dim]`` repeated along its positions to ``past`` of them, in
    ``dtype``."""
    return cache[:, :, np.arange(past) % max(cache.shape[2], 1)].astype(dtype, copy=False)


def _adding(bias: torch.Tensor):
    """A forward hook that adds ``bias`` to a module's output."""
    return lambda _module, _inputs, output: output + bias.to(output.device, output.dtype)


def max_abs_diff(actual: np.ndarray, expected: np.ndarray) -> float:
    """Largest absolute difference; infinite when either side holds NaN or infinity (so it never passes)."""
    if actual.size == 0:
        return 0.0
    diff = np.abs(actual.astype(np.float32) - expected.astype(np.float32))
    return float(diff.max()) if np.isfinite(diff).all() else float("inf")
