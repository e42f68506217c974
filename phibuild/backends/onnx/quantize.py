"""ONNX Runtime GenAI's int4/int8 weight quantization, one weight at a time.

The builder's ``to_nbits`` serializes the whole float32 graph to one ModelProto (``ir.to_proto``) and hands it
to onnxruntime's ``MatMulNBitsQuantizer``: for Phi-3.5-mini that is 15 GB of float32 weights in memory at once,
then the quantizer's work beside them (measured: 18.7 GiB; bench/README.md, benchmark 8). The quantizer itself
works node by node. Here each eligible node is quantized alone, by the same quantizer with the same arguments,
in a model that holds that node and its own weights only, and its output replaces the node in the builder's
graph. The builder's other weights stay lazy until ``ir.save`` streams them, and the quantized ones go to a
scratch file as they are made (``Spill``), so the peak is one float32 matrix over what the builder holds before
it saves. The written bytes are the builder's own (tests/test_backend_onnx.py compares them).

What this does not reproduce runs the builder's own ``to_nbits``: CUDA (weight prepacking), the k_quant and rtn
algorithms, mixed precision and exact per-node overrides, and subgraphs holding weights to quantize.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

from ...errors import BuildError
from .. import replaced

logger = logging.getLogger(__name__)
PROTOBUF_LIMIT = 2**31 - 1  # the largest message protobuf serializes, a weight in a model of its own included


@contextlib.contextmanager
def one_weight_at_a_time(model_class: type) -> Iterator[None]:
    """``model_class.to_nbits`` replaced by :func:`to_nbits` for the duration of one build."""
    original = model_class.__dict__["to_nbits"]

    def to_nbits(self):
        return streamed_nbits(self) if streamable(self) else original(self)

    with replaced(model_class, to_nbits=to_nbits):
        yield


def streamable(builder: Any) -> bool:
    """Whether the builder's quantization is the single DEFAULT pass that :func:`streamed_nbits` reproduces."""
    return (builder.ep != "cuda"
            and getattr(builder, "quantization_algo", "default") == "default"
            and not getattr(builder, "int4_customized_weight_config", None)
            and not getattr(builder, "exact_quant_override_names", None)
            and not getattr(builder, "exact_quant_overrides", None)
            and not any(node.domain or any(inner.op_type in builder.quant_attrs["op_types_to_quantize"]
                                           for subgraph in _subgraphs(node) for inner in subgraph)
                        for node in _with_subgraphs(builder.model.graph)))


def _subgraphs(node) -> list:
    import onnx_ir as ir

    graphs = []
    for attr in node.attributes.values():
        if attr.type == ir.AttributeType.GRAPH:
            graphs.append(attr.value)
        elif attr.type == ir.AttributeType.GRAPHS:
            graphs.extend(attr.value)
    return graphs


def _with_subgraphs(graph) -> list:
    """The graph's nodes that hold subgraphs (the builder's If that picks a rotary cache)."""
    return [node for node in graph if _subgraphs(node)]


def streamed_nbits(builder: Any):
    """The builder's graph with every eligible weight quantized in place, as ``to_nbits`` would return it."""
    from onnxruntime.quantization.quant_utils import QuantFormat

    attrs = builder.quant_attrs
    quant_format = QuantFormat.QDQ if attrs["use_qdq"] else QuantFormat.QOperator
    arguments = dict(bits=attrs["bits"], block_size=attrs["matmul_block_size"], is_symmetric=attrs["is_symmetric"],
                     accuracy_level=attrs["accuracy_level"], quant_format=quant_format,
                     op_types_to_quantize=attrs["op_types_to_quantize"], algo_config=None)
    model = builder.model
    graph = model.graph
    excluded = set(attrs["nodes_to_exclude"])
    eligible = [node for node in graph
                if node.op_type in attrs["op_types_to_quantize"] and node.name not in excluded]
    os.makedirs(builder.cache_dir, exist_ok=True)
    with open(os.path.join(builder.cache_dir, SPILL), "wb") as spill:
        spilled = Spill(spill)
        for count, node in enumerate(eligible, 1):
            _quantize(model, node, arguments, spilled)
            if count % 50 == 0 or count == len(eligible):
                logger.info("quantized %d of %d weights", count, len(eligible))
    _set_versions(model, quant_format, attrs["op_types_to_quantize"])
    for node in _with_subgraphs(graph):
        # The quantizer remakes such a node with onnx.helper.make_node, which sorts its attributes by name.
        ordered = sorted(node.attributes.items())
        node.attributes.clear()
        node.attributes.update(ordered)
    used = {value.name for node in graph for value in node.inputs if value is not None}
    used.update(value.name for value in graph.outputs)
    for name in [name for name in graph.initializers if name not in used]:
        graph.initializers.pop(name)
    return model


def _set_versions(model, quant_format, op_types) -> None:
    """The opset and IR versions MatMulNBitsQuantizer.process sets on the model it quantizes."""
    from onnxruntime.quantization.quant_utils import QuantFormat

    if quant_format == QuantFormat.QOperator:
        model.opset_imports["com.microsoft"] = 1
    if quant_format == QuantFormat.QDQ or "Gather" in op_types:
        for domain in ("", "ai.onnx"):
            if domain in model.opset_imports and model.opset_imports[domain] < 21:
                model.opset_imports[domain] = 21
        model.ir_version = max(model.ir_version, 10)


SPILL = "quantized.bin"  # in the builder's cache directory, which the build removes


class Spill:
    """Quantized weights written out as they are made and read back, memory-mapped, when ``ir.save`` writes the
    model: held in memory they would add up to the whole quantized model (4.3 GiB for Phi-3.5-mini at int8).

    Nothing may keep a reference into the quantizer's output: its protobuf arena also holds the float32 weight
    the quantizer removed, and one tensor deserialized from it keeps it all alive (measured: RssAnon grew by
    every weight, to 19.1 GiB for Phi-3.5-mini)."""

    def __init__(self, file):
        self.file = file

    def tensor(self, proto):
        """``proto``'s data, outside the quantizer's arena: in the scratch file, or (no raw data) a copy."""
        import onnx
        import onnx_ir as ir

        if not proto.HasField("raw_data"):
            return ir.serde.deserialize_tensor(onnx.TensorProto.FromString(proto.SerializeToString()))
        offset = self.file.tell()
        self.file.write(proto.raw_data)
        return ir.ExternalTensor(os.path.basename(self.file.name), offset, len(proto.raw_data),
                                 ir.DataType(proto.data_type), shape=ir.Shape(proto.dims), name=proto.name,
                                 base_dir=os.path.dirname(self.file.name))


def _quantize(model, node, arguments: dict[str, Any], spill: Spill) -> None:
    """Quantize one node through MatMulNBitsQuantizer in a model of its own, and splice the result in."""
    import onnx
    import onnx_ir as ir
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    graph = model.graph
    weights = {value.name: value for value in node.inputs if value is not None and value.is_initializer()}
    if not weights:
        return
    for name, value in weights.items():
        if value.const_value.nbytes > PROTOBUF_LIMIT:
            raise BuildError(f"the weight {name} is {value.const_value.nbytes / 1e9:.2f} GB in float32, over "
                             "protobuf's 2 GiB limit for one message, and phibuild hands each weight to "
                             "onnxruntime's quantizer as a model of its own: a model with such a weight (Phi-4-mini's "
                             "tied 200064-row output head) does not build with ONNX yet")
    alone = onnx.helper.make_model(
        onnx.helper.make_graph([ir.serde.serialize_node(node)], "node", [], [],
                               [ir.serde.serialize_tensor(value.const_value) for value in weights.values()]),
        ir_version=model.ir_version,
        opset_imports=[onnx.helper.make_opsetid(domain, version) for domain, version in model.opset_imports.items()])
    quantizer = MatMulNBitsQuantizer(model=alone, **arguments)
    quantizer.process()
    result = quantizer.model.model.graph
    if [proto.name for proto in result.node] == [node.name] and result.node[0].op_type == node.op_type:
        return  # the quantizer left it as it was (a weight it does not quantize)

    known = {value.name: value for value in node.inputs if value is not None}
    for tensor in result.initializer:
        if tensor.name in weights:
            continue
        const = spill.tensor(tensor)
        value = ir.Value(name=tensor.name, shape=const.shape, type=ir.TensorType(const.dtype), const_value=const)
        graph.register_initializer(value)
        known[value.name] = value
    new_nodes = []
    for proto in result.node:
        new = ir.Node(proto.domain, proto.op_type, [known[name] if name else None for name in proto.input],
                      [ir.serde.deserialize_attribute(attr) for attr in proto.attribute],
                      outputs=[ir.Value(name=name) for name in proto.output], name=proto.name)
        known.update((value.name, value) for value in new.outputs)
        new_nodes.append(new)
    old_outputs = list(node.outputs)
    new_outputs = [known[value.name] for value in old_outputs]
    ir.convenience.replace_nodes_and_values(graph, node, [node], new_nodes, old_outputs, new_outputs)
    for name in weights:
        if not graph.initializers[name].uses():
            graph.initializers.pop(name)
