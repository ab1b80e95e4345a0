"""Load an ONNX model, check it, bind its input shape and normalise it into what really runs.

An image input as exporters make it, NHWC (1 x H x W x 3, then a Transpose, as tf2onnx writes)
or uint8 (the graph casts and normalises the pixels itself), is rewritten into a float32 NCHW
input first (`adapt_image_input`): the Transpose and the Cast it feeds are dropped, so the model
computes exactly what it did on the same pixels, and the planner sees a plain NCHW network.

Normalising is onnxruntime's basic-level offline optimisation (constant folding, BatchNorm
folded into Conv, Identity and Dropout removed), run once on the model as declared, followed by
ONNX shape inference and, where that cannot tell, a probe run at the bound input shape, so that
every tensor has a shape.
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

__all__ = ["Model", "ImageInput", "LAYOUTS", "load_model", "declared_input_shape", "image_input", "read_image_input",
           "adapt_image_input", "for_onnxruntime"]

MIN_OPSET = 9
LAYOUTS = ("NCHW", "NHWC")
_TO_NCHW = [0, 3, 1, 2]  # the Transpose an NHWC input goes through
_TO_NHWC = [0, 2, 3, 1]


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
        exported_input: how the file's own input was (layout and element type) before it was
            rewritten to float32 NCHW; None when it already was.
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
    exported_input: ImageInput | None = None

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


def load_model(source: str | os.PathLike | onnx.ModelProto, input_shape: tuple[int, ...] | None = None,
               layout: str | None = None) -> Model:
    """Load and normalise a model for frames of `input_shape` (default: the model's own).

    Args:
        source: path of an .onnx file, or a ModelProto.
        input_shape: (1, C, H, W); needed when the model's height or width is dynamic. For an
            NHWC model too, this is the rewritten input's NCHW shape.
        layout: the image input's layout, "NCHW" or "NHWC"; None: read off the graph (see
            `image_input`).

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
    exported = image_input(proto, layout, label)
    if exported.rewritten:
        adapt_image_input(proto, exported)
    image = next(i for i in proto.graph.input if i.name == exported.name)
    tensor_type = image.type.tensor_type
    declared = [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]
    shape = _bind_shape(label, image.name, declared, input_shape)
    # The input stays as declared here: binding it before onnxruntime's normalisation turns a
    # size the graph cannot take into a load failure instead of the probe's message that says
    # what fixes it (until this rewrite the binding went to a detached copy, so never happened).
    normalised = _normalise(label, proto)
    model = Model(
        path=path,
        sha256=hashlib.sha256(raw).hexdigest(),
        onnx=normalised,
        input_name=image.name,
        input_shape=shape,
        output_names=[o.name for o in normalised.graph.output],
        exported_input=exported if exported.rewritten else None,
    )
    model.constants = {init.name: numpy_helper.to_array(init) for init in normalised.graph.initializer}
    model.shapes, model.dtypes = _infer_shapes(label, normalised, model)
    return model


def declared_input_shape(path: str | os.PathLike, layout: str | None = None) -> list[int | None]:
    """The model's image input dims as declared (None where dynamic), before any binding, in
    NCHW order: an NHWC input's (1, H, W, C) is given as (1, C, H, W), as it is rewritten.

    Raises:
        DelucevaError: the file is not a model deluceva can load (the load's own message).
    """
    return list(read_image_input(path, layout).dims)


def for_onnxruntime(path: str | os.PathLike, layout: str | None = None) -> str | bytes:
    """What plain onnxruntime loads to take the float32 NCHW tensors deluceva feeds this model:
    the file itself, or (an NHWC or uint8 input) the bytes of its graph with the input rewritten."""
    _, _, proto = _read(path)
    image = image_input(proto, layout, str(path))
    if not image.rewritten:
        return str(path)
    _move_initializer_inputs(proto)
    adapt_image_input(proto, image)
    return proto.SerializeToString()


def read_image_input(path: str | os.PathLike, layout: str | None = None) -> ImageInput:
    """`image_input` of the model file at `path`."""
    _, _, proto = _read(path)
    return image_input(proto, layout, str(path))


@dataclass(frozen=True)
class ImageInput:
    """A model's one image input as the file declares it.

    Attributes:
        name: the input's name.
        dims: its dims in NCHW order (None where dynamic).
        layout: "NCHW" or "NHWC" as the file holds it; how it was told ("graph": a Transpose to
            NCHW follows it; "shape": 1 x H x W x 1 or 3; "option": --layout; "default").
        uint8: the file takes uint8 pixels (0..255) and converts them itself.
    """

    name: str
    dims: tuple[int | None, ...]
    layout: str = "NCHW"
    told_by: str = "default"
    uint8: bool = False

    @property
    def rewritten(self) -> bool:
        return self.layout != "NCHW" or self.uint8

    def describe(self) -> str:
        """E.g. "uint8 NHWC (from the graph's Transpose)"."""
        how = {"graph": "the graph's Transpose", "shape": "its shape", "option": "--layout", "default": "default"}
        return f"{'uint8' if self.uint8 else 'float32'} {self.layout} (layout from {how[self.told_by]})"


_ELEMENT_NAMES = {**{v: k.lower() for k, v in onnx.TensorProto.DataType.items()}, onnx.TensorProto.FLOAT: "float32",
                  onnx.TensorProto.DOUBLE: "float64"}


def image_input(proto: onnx.ModelProto, layout: str | None = None, label: str = "<memory>") -> ImageInput:
    """The model's one image input: its NCHW dims, layout and element type.

    The layout is `layout` where given; else NHWC where a Transpose with perm (0, 3, 1, 2)
    reads the input (through a Cast), or where the declared shape is 1 x H x W x 1 or 3 with H
    not 1 or 3; else NCHW.

    Raises:
        DelucevaError: not one input; not a rank-4 float32 or uint8 tensor; an unknown layout.
    """
    initializers = {i.name for i in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise DelucevaError(f"{label}: expected one image input, found {len(inputs)} ({', '.join(i.name for i in inputs)})")
    image = inputs[0]
    tensor_type = image.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tensor_type.shape.dim]
    kind = tensor_type.elem_type
    if kind not in (onnx.TensorProto.FLOAT, onnx.TensorProto.UINT8) or len(dims) != 4:
        shape = "x".join("?" if d is None else str(d) for d in dims) or "no shape"
        raise DelucevaError(f"{label}: input {image.name!r} is {_ELEMENT_NAMES.get(kind, kind)} {shape}, not an image "
                            "tensor (deluceva takes float32 or uint8 images, 1xCxHxW or 1xHxWxC)")
    if layout is not None and layout not in LAYOUTS:
        raise DelucevaError(f"--layout {layout!r} is not one of {', '.join(LAYOUTS)}")
    told_by = "option" if layout else "default"
    if layout is None:
        layout = "NCHW"
        if _transposed_to_nchw(proto, image.name):
            layout, told_by = "NHWC", "graph"
        elif dims[3] in (1, 3) and dims[1] not in (1, 3):
            layout, told_by = "NHWC", "shape"
    if layout == "NHWC":
        dims = [dims[0], dims[3], dims[1], dims[2]]
    return ImageInput(image.name, tuple(dims), layout, told_by, kind == onnx.TensorProto.UINT8)


def _consumers(graph, name: str) -> list:
    return [n for n in graph.node if name in n.input]


def _transposed_to_nchw(proto: onnx.ModelProto, name: str) -> bool:
    """Whether a Transpose (0, 3, 1, 2) reads `name`, directly or through Casts."""
    todo, seen = [name], set()
    while todo:
        tensor = todo.pop()
        for node in _consumers(proto.graph, tensor):
            if node.op_type == "Transpose" and list(_attribute(node, "perm", [])) == _TO_NCHW:
                return True
            if node.op_type == "Cast" and node.output[0] not in seen:
                seen.add(node.output[0])
                todo.append(node.output[0])
    return False


def _attribute(node, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def adapt_image_input(proto: onnx.ModelProto, image: ImageInput) -> None:
    """Rewrite `proto` in place so that its image input is float32 NCHW, computing exactly what
    the file computed on the same pixels (pixel values 0..255 where the file takes uint8).

    The old input's value is rebuilt from the new one (Transpose (0, 2, 3, 1), Cast to uint8),
    then the pairs that cancel are dropped: a Cast to float of the rebuilt uint8 tensor (exact:
    the values are whole numbers in 0..255), a Transpose (0, 3, 1, 2) of the rebuilt NHWC one.
    What is left of the rebuilding runs in the graph (a uint8 input read by something other
    than a Cast, say), still exact.
    """
    graph = proto.graph
    value = next(i for i in graph.input if i.name == image.name)
    outputs = {o.name for o in graph.output}
    new = image.name
    old = f"{image.name}__exported"
    for node in graph.node:  # every reader of the input now reads the rebuilt exported tensor
        for k, tensor in enumerate(node.input):
            if tensor == new:
                node.input[k] = old
    rebuild, current = [], new
    if image.layout == "NHWC":
        rebuild.append(onnx.helper.make_node("Transpose", [current], [f"{image.name}__nhwc"], perm=_TO_NHWC,
                                             name=f"{image.name}__to_nhwc"))
        current = f"{image.name}__nhwc"
    float_form = current  # the exported input's value as float32
    if image.uint8:
        rebuild.append(onnx.helper.make_node("Cast", [current], [old], to=onnx.TensorProto.UINT8,
                                             name=f"{image.name}__to_uint8"))
    else:
        rebuild[-1].output[0] = old
        float_form = old
    for k, node in enumerate(rebuild):
        graph.node.insert(k, node)

    def drop(node, replacement: str) -> None:
        for other in graph.node:
            for k, tensor in enumerate(other.input):
                if tensor == node.output[0]:
                    other.input[k] = replacement
        graph.node.remove(node)

    if image.uint8:
        for node in _consumers(graph, old):
            if node.op_type == "Cast" and _attribute(node, "to", None) == onnx.TensorProto.FLOAT \
                    and node.output[0] not in outputs:
                drop(node, float_form)
    if image.uint8 and image.layout == "NHWC":
        # Transposed first, cast after (uint8 NHWC -> Transpose -> Cast): the Transpose's
        # output is the new input cast to uint8, and the float Casts of it are the new input.
        for node in _consumers(graph, old):
            if node.op_type == "Transpose" and list(_attribute(node, "perm", [])) == _TO_NCHW:
                node.op_type = "Cast"
                del node.attribute[:]
                node.attribute.append(onnx.helper.make_attribute("to", onnx.TensorProto.UINT8))
                node.input[0] = new
                for cast in _consumers(graph, node.output[0]):
                    if cast.op_type == "Cast" and _attribute(cast, "to", None) == onnx.TensorProto.FLOAT \
                            and cast.output[0] not in outputs:
                        drop(cast, new)
                if not _consumers(graph, node.output[0]) and node.output[0] not in outputs:
                    graph.node.remove(node)
    if image.layout == "NHWC":
        for node in _consumers(graph, float_form):
            if node.op_type == "Transpose" and list(_attribute(node, "perm", [])) == _TO_NCHW \
                    and node.output[0] not in outputs:
                drop(node, new)
    for node in reversed(rebuild):  # rebuilding nodes nobody reads any more
        if not _consumers(graph, node.output[0]) and node.output[0] not in outputs:
            graph.node.remove(node)
    value.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    dims = value.type.tensor_type.shape.dim
    declared = [onnx.TensorShapeProto.Dimension() for _ in range(4)]
    for target, source in zip(declared, [dims[i] for i in ((0, 3, 1, 2) if image.layout == "NHWC" else range(4))]):
        target.CopyFrom(source)
    del dims[:]
    dims.extend(declared)


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
    # Unnamed and repeated names get "{op}_{index}", never one another node already has (an
    # exporter's own "Mul_373", with decoding nodes appended unnamed that land at index 373).
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
