"""Load an ONNX model, check it, bind its input shape and normalise it into what really runs.

Normalising is onnxruntime's basic-level offline optimisation (constant folding, BatchNorm
folded into Conv, Identity and Dropout removed), run once on the model with its dynamic
input dimensions bound, followed by ONNX shape inference, so that every tensor has a shape.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from deluceva.onnxruntime_session import inference_session, session_options
from deluceva.errors import DelucevaError

__all__ = ["Model", "load_model", "declared_input_shape"]

MIN_OPSET = 9


@dataclass
class Model:
    """A normalised ONNX model bound to one input shape.

    Attributes:
        path: the file it was loaded from ("<memory>" for an in-memory model).
        sha256: hash of the original file's bytes.
        onnx: the normalised model (static shapes, BatchNorm folded, constants folded).
        input_name, input_shape: its one image input.
        output_names: in the model's order.
        shapes: every tensor's static shape, by name.
        dtypes: every tensor's element type (an onnx.TensorProto enum), by name.
        constants: initializers, by name.
    """

    path: str
    sha256: str
    onnx: onnx.ModelProto
    input_name: str
    input_shape: tuple[int, ...]
    output_names: list[str]
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    dtypes: dict[str, int] = field(default_factory=dict)
    constants: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def opset(self) -> int:
        return next(o.version for o in self.onnx.opset_import if o.domain in ("", "ai.onnx"))

    def exposing(self, tensors) -> onnx.ModelProto:
        """A copy of the normalised model whose outputs also include `tensors` (after its own
        outputs, in the given order; the input and tensors already output are skipped)."""
        proto = onnx.ModelProto()
        proto.CopyFrom(self.onnx)
        present = {o.name for o in proto.graph.output} | {self.input_name}
        for tensor in dict.fromkeys(tensors):
            if tensor not in present:
                proto.graph.output.append(onnx.helper.make_tensor_value_info(
                    tensor, self.dtypes.get(tensor, onnx.TensorProto.FLOAT), self.shapes.get(tensor)))
        return proto


def load_model(source: str | os.PathLike | onnx.ModelProto, input_shape: tuple[int, ...] | None = None) -> Model:
    """Load and normalise a model for frames of `input_shape` (default: the model's own).

    Args:
        source: path of an .onnx file, or a ModelProto.
        input_shape: (1, C, H, W); needed when the model's height or width is dynamic.

    Raises:
        DelucevaError: unreadable file, invalid model, no single image input, shape mismatch.

    Example:
        >>> model = load_model("yolox_nano.onnx")            # doctest: +SKIP
        >>> model.input_shape
        (1, 3, 416, 416)
    """
    path, raw, proto = _read(source)
    label = path
    inputs = [i for i in proto.graph.input if i.name not in {init.name for init in proto.graph.initializer}]
    _move_initializer_inputs(proto)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None or opset < MIN_OPSET:
        raise DelucevaError(f"{label}: opset {opset} is not supported (need {MIN_OPSET} or later)")
    if len(inputs) != 1:
        raise DelucevaError(f"{label}: expected one image input, found {len(inputs)} ({', '.join(i.name for i in inputs)})")
    image = inputs[0]
    tensor_type = image.type.tensor_type
    if tensor_type.elem_type != onnx.TensorProto.FLOAT or len(tensor_type.shape.dim) != 4:
        raise DelucevaError(f"{label}: input {image.name!r} is not an image tensor (need float32 NxCxHxW)")
    declared = [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]
    shape = _bind_shape(label, image.name, declared, input_shape)
    for dim, size in zip(tensor_type.shape.dim, shape):
        dim.Clear()
        dim.dim_value = size
    normalised = _normalise(label, proto)
    model = Model(
        path=path,
        sha256=hashlib.sha256(raw).hexdigest(),
        onnx=normalised,
        input_name=image.name,
        input_shape=shape,
        output_names=[o.name for o in normalised.graph.output],
    )
    model.constants = {init.name: numpy_helper.to_array(init) for init in normalised.graph.initializer}
    model.shapes, model.dtypes = _infer_shapes(label, normalised, model)
    return model


def declared_input_shape(path: str | os.PathLike) -> list[int | None]:
    """The model's image input dims as declared (None where dynamic), before any binding.

    Raises:
        DelucevaError: the file is not a model deluceva can load (the load's own message).
    """
    _, _, proto = _read(path)
    initializers = {i.name for i in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise DelucevaError(f"{path}: expected one image input, found {len(inputs)} ({', '.join(i.name for i in inputs)})")
    dims = inputs[0].type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in dims]


def _read(source) -> tuple[str, bytes, onnx.ModelProto]:
    if isinstance(source, onnx.ModelProto):
        raw = source.SerializeToString()
        proto = onnx.load_from_string(raw)
        _check("<memory>", proto)
        return "<memory>", raw, proto
    path = str(source)
    if not os.path.exists(path):
        raise DelucevaError(f"{path}: no such file")
    if os.path.isdir(path):
        raise DelucevaError(f"{path}: is a directory, not an ONNX model")
    raw = Path(path).read_bytes()
    try:
        proto = onnx.load_from_string(raw)
    except Exception as error:  # protobuf raises several types for garbage
        raise DelucevaError(f"{path}: not an ONNX model ({_first_line(error)})") from None
    if not proto.graph.node:
        raise DelucevaError(f"{path}: not an ONNX model (no graph nodes; truncated or another format)")
    _check(path, proto)
    return path, raw, proto


def _check(label: str, proto: onnx.ModelProto) -> None:
    """onnx.checker, except that graph inputs and outputs may leave their shape unknown.

    The checker wants a shape on every main-graph input and output, but exporters and
    onnx.helper (`make_tensor_value_info(name, type, None)`) leave it out for "unknown rank" and
    onnxruntime runs such models; shapes are inferred after binding the input anyway. So the
    check runs on a copy where those shapes are present (and empty): nothing else is relaxed.
    """
    if not proto.graph.node:
        raise DelucevaError(f"{label}: the model's graph has no nodes")
    checked = proto
    shapeless = [v for v in (*proto.graph.input, *proto.graph.output)
                 if v.type.HasField("tensor_type") and not v.type.tensor_type.HasField("shape")]
    if shapeless:
        checked = onnx.ModelProto()
        checked.CopyFrom(proto)
        for value in (*checked.graph.input, *checked.graph.output):
            if value.type.HasField("tensor_type") and not value.type.tensor_type.HasField("shape"):
                value.type.tensor_type.shape.SetInParent()
    try:
        onnx.checker.check_model(checked, full_check=False)
    except Exception as error:
        raise DelucevaError(f"{label}: invalid ONNX model ({_first_line(error)})") from None


def _first_line(error: Exception) -> str:
    """The error's message on one line (some span several), at most 200 characters."""
    text = " ".join(str(error).split())
    return (text[:197] + "...") if len(text) > 200 else (text or type(error).__name__)


def _move_initializer_inputs(proto: onnx.ModelProto) -> None:
    """Drop graph inputs that are also initializers: they are weights, treated as constants."""
    names = {init.name for init in proto.graph.initializer}
    keep = [i for i in proto.graph.input if i.name not in names]
    del proto.graph.input[:]
    proto.graph.input.extend(keep)
    # IR 3 requires every initializer to be a graph input (onnxruntime refuses an unused one
    # that is not); IR 4 is the first version where they need not be, so say that.
    proto.ir_version = max(proto.ir_version, 4)


def _bind_shape(label: str, name: str, declared: list[int | None], wanted) -> tuple[int, ...]:
    if declared[0] not in (None, 1):
        raise DelucevaError(f"{label}: input {name!r} has a fixed batch of {declared[0]}; deluceva runs one frame "
                            "at a time (batch 1): export the model with batch 1 or a dynamic batch")
    if wanted is None:
        if any(d is None for d in declared[1:]):
            raise DelucevaError(f"{label}: input {name!r} has dynamic dimensions; give an input shape")
        return (1, *declared[1:])
    wanted = tuple(int(d) for d in wanted)
    if len(wanted) != 4 or wanted[0] != 1 or min(wanted) < 1:
        raise DelucevaError(f"{label}: input shape {wanted} is not 1xCxHxW")
    for axis, (have, want) in enumerate(zip(declared, wanted)):
        if axis > 0 and have is not None and have != want:
            raise DelucevaError(f"{label}: input {name!r} has fixed shape {tuple(declared)}, not {wanted}")
    return wanted


def _normalise(label: str, proto: onnx.ModelProto) -> onnx.ModelProto:
    options = session_options(1)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    with tempfile.TemporaryDirectory() as folder:
        options.optimized_model_filepath = os.path.join(folder, "normalised.onnx")
        try:
            inference_session(proto, options=options)
        except Exception as error:
            raise DelucevaError(f"{label}: onnxruntime cannot load this model ({_first_line(error)})") from None
        result = onnx.load(options.optimized_model_filepath)
    used = {n.domain for n in result.graph.node} | {"", "ai.onnx"}
    keep = [o for o in result.opset_import if o.domain in used]
    del result.opset_import[:]
    result.opset_import.extend(keep)
    _remove_dead_nodes(result)
    # Unnamed and repeated names get "{op}_{index}", never one a later node already has (an
    # exporter's own "Mul_373" further on, with decoding nodes appended unnamed before it).
    taken = {node.name for node in result.graph.node if node.name}
    seen: set[str] = set()
    for index, node in enumerate(result.graph.node):
        if not node.name or node.name in seen:
            name, k = f"{node.op_type}_{index}", 0
            while name in taken:
                k += 1
                name = f"{node.op_type}_{index}_{k}"
            node.name = name
            taken.add(name)
        seen.add(node.name)
    return result


def _remove_dead_nodes(proto: onnx.ModelProto) -> None:
    """Drop nodes whose outputs reach no graph output (onnxruntime keeps them), and their weights.

    A dead node would otherwise end up in a dense segment that exports nothing, or cost a delta
    step every frame for a value nobody reads.
    """
    graph = proto.graph
    live = {o.name for o in graph.output}
    keep = []
    for node in reversed(graph.node):
        if any(o in live for o in node.output if o):
            keep.append(node)
            live.update(t for t in node.input if t)
    if len(keep) == len(graph.node):
        return
    keep.reverse()
    del graph.node[:]
    graph.node.extend(keep)
    initializers = [i for i in graph.initializer if i.name in live]
    del graph.initializer[:]
    graph.initializer.extend(initializers)


def _infer_shapes(label: str, proto: onnx.ModelProto, model: Model):
    """Every tensor's static shape and element type, by name."""
    shapes: dict[str, tuple[int, ...]] = {model.input_name: model.input_shape}
    dtypes = {model.input_name: onnx.TensorProto.FLOAT}
    for name, value in model.constants.items():
        shapes[name] = tuple(value.shape)
        dtypes[name] = onnx.helper.np_dtype_to_tensor_dtype(value.dtype)
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    except Exception:
        inferred = proto
    for info in list(inferred.graph.value_info) + list(inferred.graph.output):
        if info.type.tensor_type.elem_type:
            dtypes[info.name] = info.type.tensor_type.elem_type
        dims = info.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            shapes[info.name] = tuple(d.dim_value for d in dims)
    missing = [o for n in proto.graph.node for o in n.output if o and (o not in shapes or o not in dtypes)]
    if missing:
        probed = _probe_shapes(label, proto, model, missing)
        shapes.update({name: value.shape for name, value in probed.items()})
        dtypes.update({name: onnx.helper.np_dtype_to_tensor_dtype(v.dtype) for name, v in probed.items()})
    return shapes, dtypes


def _probe_shapes(label: str, proto: onnx.ModelProto, model: Model, names: list[str]) -> dict[str, np.ndarray]:
    """Shapes that inference could not give, read off one onnxruntime run on a zero frame."""
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    known = {o.name for o in probe.graph.output}
    for name in names:
        if name not in known:
            probe.graph.output.append(onnx.ValueInfoProto(name=name))
    try:  # log level 4: its failure is reported in one line below, not logged first
        session = inference_session(probe, 1, log_level=4)
        values = session.run(names, {model.input_name: np.zeros(model.input_shape, np.float32)})
    except Exception as error:
        raise DelucevaError(f"{label}: cannot run the model on a {model.input_shape} input ({_first_line(error)}); "
                            "a model with dynamic height and width may need them a multiple of 32: "
                            "deluceva run/bench/profile --resize pad does that") from None
    return dict(zip(names, values))
