"""Running a lowered model in ONNX Runtime the way any caller does: step by step with an explicit KV cache.

:class:`OrtDecoder` feeds the graph's inputs and reads its cache back; :func:`runnable_onnx` and
:func:`runnable_proto` make a graph comparable with PyTorch here: a TensorRT-flavoured graph's ``D2mcMoE`` plugin
nodes expanded into standard ops, quantized matmuls computing in the graph's float type if asked; :func:`add_router_bias_inputs` lets verification force each router's choice.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from d2mc.errors import UserError, first_line

ROUTER_WEIGHT = re.compile(r"blocks\.(\d+)\.router\.weight_t")  # the router MatMul's weight in a lowered graph


class OrtDecoder:
    """Runs a lowered model step by step with an explicit KV cache (what any ONNX Runtime caller does).

    ``proto``, when given, is a graph held in memory (a changed copy of the one at ``onnx_path``) whose external
    weights are read from beside ``onnx_path``. ``lean`` trades speed for memory, for a few steps on a large model:
    no memory arena (each run's buffers go back when it ends, instead of the arena keeping the largest it saw) and
    no prepacked copies of the weights.
    """

    def __init__(self, onnx_path: str | Path, threads: int | None = None, proto=None, lean: bool = False):
        import onnxruntime as ort

        path = Path(onnx_path)
        if not path.is_file():
            raise UserError(f"no ONNX model at '{path}': export one with d2mc export")
        self.path = path
        options = ort.SessionOptions()
        options.log_severity_level = 3
        # ONNX Runtime fuses DequantizeLinear + MatMul (the tensorrt flavour's quantized weights) into MatMulNBits
        # with int8 activations unless told otherwise: run them as TensorRT does, in the graph's float type
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
        if threads:
            options.intra_op_num_threads = threads
        if lean:
            options.enable_cpu_mem_arena = False
            options.add_session_config_entry("session.disable_prepacking", "1")
        source = str(path)
        if proto is not None:
            options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                             str(path.parent))
            source = proto.SerializeToString()
        try:
            self.session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own exception types for corrupt files
            if "D2mcMoE" in str(exc):
                raise UserError(f"'{path}' is the TensorRT flavour (D2mcMoE plugin nodes), which ONNX Runtime cannot "
                                "run: verify it with d2mc.verify.verify_onnx or export --format onnxruntime") from None
            raise UserError(f"ONNX Runtime cannot load '{path}' ({first_line(exc)}): the artifact is corrupt or "
                            "incomplete; export it again") from None
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.input_names = set(inputs)
        self.kv_names = sorted((n for n in inputs if n.startswith("past_key_values.")), key=_kv_order)
        first = inputs[self.kv_names[0]] if self.kv_names else None
        self.kv_heads, self.head_dim = _kv_dims(path, first.shape) if first else (1, 1)
        self.dtype = np.float16 if first is not None and "float16" in first.type else np.float32

    def empty_cache(self, batch: int) -> dict[str, np.ndarray]:
        return {n: np.zeros((batch, self.kv_heads, 0, self.head_dim), self.dtype) for n in self.kv_names}

    def step(self, ids: np.ndarray, cache: dict[str, np.ndarray], past: int,
             extra: dict[str, np.ndarray] | None = None) -> tuple[np.ndarray, dict]:
        """Feed ``ids`` [B, S] after ``past`` cached tokens; return logits and the new cache."""
        batch, length = ids.shape
        feeds = {"input_ids": ids.astype(np.int64), "attention_mask": np.ones((batch, past + length), np.int64),
                 "position_ids": np.broadcast_to(np.arange(past, past + length), (batch, length)).astype(np.int64),
                 **cache, **(extra or {})}
        try:
            outputs = self.session.run(None, {k: v for k, v in feeds.items() if k in self.input_names})
        except Exception as exc:  # ORT's own exception types: a graph that loads but cannot run
            raise UserError(f"ONNX Runtime failed to run '{self.path}' ({first_line(exc)}): the artifact is corrupt; "
                            "export it again") from None
        names = [o.name for o in self.session.get_outputs()]
        result = dict(zip(names, outputs, strict=False))
        new_cache = {n: result[n.replace("past_key_values", "present")] for n in self.kv_names}
        return result["logits"], new_cache


def _kv_order(name: str) -> tuple[int, str]:
    """``past_key_values.{i}.key`` sorted by block number (10 after 9), keys before values."""
    _, index, kind = name.split(".")
    return int(index) if index.isdigit() else 0, kind


def _kv_dims(path: Path, shape: list) -> tuple[int, int]:
    """KV heads and head size of a ``past_key_values`` input ``[B, heads, past, head_dim]``; graphs from other
    exporters may leave them symbolic, in which case the ``genai_config.json`` beside the model says."""
    heads, head_dim = shape[1], shape[3]
    if isinstance(heads, int) and isinstance(head_dim, int):
        return heads, head_dim
    config = path.with_name("genai_config.json")
    if not config.is_file():
        raise UserError(f"'{path}' leaves its KV-cache dimensions symbolic and has no genai_config.json beside it")
    decoder = json.loads(config.read_text())["model"]["decoder"]
    return decoder["num_key_value_heads"], decoder["head_size"]


@contextlib.contextmanager
def runnable_onnx(onnx_path: str | Path, float_matmuls: bool = False) -> Iterator[Path]:
    """``onnx_path``, or when :func:`runnable_proto` changes it (plugin nodes; with ``float_matmuls`` quantized
    matmuls' accuracy level) a copy beside it, sharing its external weights, of the graph it returns."""
    import onnx

    path = Path(onnx_path)
    proto, _ = runnable_proto(path, force_experts=False, float_matmuls=float_matmuls)
    if proto is None:
        yield path
        return
    reference = path.with_name(f".{path.stem}.reference.onnx")
    onnx.save(proto, reference)
    try:
        yield reference
    finally:
        reference.unlink(missing_ok=True)


def runnable_proto(path: Path, force_experts: bool, float_matmuls: bool = False):
    """The graph at ``path`` as ONNX Runtime can run it here, or None to run the file itself: plugin nodes expanded
    into standard ops, with ``float_matmuls`` quantized matmuls (``MatMulNBits``, ``QMoE``) at ``accuracy_level`` 0
    (the graph's float type, as the session config does for ``DequantizeLinear``: a comparison with PyTorch then
    judges the lowering, not the int8 rounding of activations), and with ``force_experts`` a bias input ``d2mc_router_bias.{block}``
    added to every router's logits. Returns ``(proto or None, {block: experts})``."""
    import onnx

    from d2mc.lowering.plugin_reference import expand_plugin_nodes

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # unreadable: let ONNX Runtime name the problem in OrtDecoder
        return None, {}
    changed = expand_plugin_nodes(proto) > 0
    for node in proto.graph.node if float_matmuls else ():
        for attribute in node.attribute:
            if attribute.name == "accuracy_level" and attribute.i != 0:
                attribute.i, changed = 0, True
    routers = add_router_bias_inputs(proto) if force_experts else {}
    return (proto if changed or routers else None), routers


def add_router_bias_inputs(proto) -> dict[int, int]:
    """Add a graph input ``d2mc_router_bias.{b}`` ``[experts]`` to the logits of each MoE block's router (the
    ``MatMul`` on ``blocks.{b}.router.weight_t``), rewiring every reader of the logits; returns ``{b: experts}``.
    Zero bias leaves the routing as it was; a large one on expert ``e`` makes every token choose ``e``."""
    from onnx import helper

    graph = proto.graph
    weights = {i.name: i for i in graph.initializer}
    renamed: dict[str, str] = {}
    routers: dict[int, int] = {}
    nodes = []
    for node in graph.node:
        nodes.append(node)
        match = ROUTER_WEIGHT.fullmatch(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if match is None or node.input[1] not in weights:
            continue
        block, weight = int(match.group(1)), weights[node.input[1]]
        bias = f"d2mc_router_bias.{block}"
        routers[block] = int(weight.dims[-1])
        renamed[node.output[0]] = f"{node.output[0]}.biased"
        nodes.append(helper.make_node("Add", [node.output[0], bias], [renamed[node.output[0]]],
                                      name=f"{bias}.add"))
        graph.input.append(helper.make_tensor_value_info(bias, weight.data_type, [routers[block]]))
    if routers:
        for node in nodes:
            if node.op_type == "Add" and node.name.startswith("d2mc_router_bias."):
                continue
            for i, name in enumerate(node.input):
                if name in renamed:
                    node.input[i] = renamed[name]
        del graph.node[:]
        graph.node.extend(nodes)
    return routers
