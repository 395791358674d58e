"""A user's ONNX file as the backbone (`BACKBONE=path/model.onnx`): run by ONNX Runtime, never by TensorFlow.

The file declares its data config in a sidecar JSON beside it, as a `.keras` file does (`model.json` beside
`model.onnx`: `preprocess`, `input_size`, `default_layer`, `crop_fraction`, `interpolation`, and `layout` NHWC|NCHW
where the graph's input does not show it); a file that declares no preprocessing is refused. Its layers are the graph's
named tensors, under names that HDF5 datasets and file names can hold (`layer_name`: `/layer4/relu/Relu_output_0` ->
`layer4.relu.Relu_output_0`); `make layers BACKBONE=x.onnx` lists them with their shapes from ONNX shape inference.

What runs is a modified copy of the graph (`cut_graph`) that takes uint8 RGB pixels (batch, size, size, 3), as the
exports of Keras models do; applies the declared preprocessing as ONNX operations (the steps of features.preprocess,
whose numpy reference is `numpy_preprocess`), transposed to NCHW where the model wants it; runs the model up to the
cut tensors, added as the graph's outputs; pools them (`--pool`) and casts them to the storage dtype. It is kept beside
the caches as `engines/<hash>.onnx` (`features.engines.export_path`: the hash covers the file's sha256, the layers,
size, batch, preprocessing, pooling, dtype), and `features.engines.onnx_forward` runs it exactly as a kept export of a
Keras model: resume, shards, updates and predict behave the same, and no TensorFlow is imported.

    >>> layer_name("/layer4/layer4.1/relu_1/Relu_output_0")
    'layer4.layer4.1.relu_1.Relu_output_0'
"""
from __future__ import annotations

import difflib
import json
import math
import os
import re
import tempfile
from pathlib import Path

import numpy as np

from features.backbones import (BackboneSpec, declared_evaluation, declared_preprocess, read_sidecar, sidecar_path)
from features.errors import UsageError, did_you_mean
from features.preprocess import LAYOUTS, Preprocess, numpy_preprocess, resolve_preprocess, steps

PIXELS = "feature_cache_pixels"  # the copy's input: uint8 RGB (batch, size, size, 3)
FEATURES = "feature_cache_features_{}"  # its outputs, one per cut layer, in the order given
STORAGE_TYPES = {"float32": 1, "float16": 10}  # onnx.TensorProto.FLOAT, FLOAT16
FLOAT_TYPES = (1, 10, 11, 16)  # FLOAT, FLOAT16, DOUBLE, BFLOAT16: tensors worth cutting at
ELEMENT_BYTES = {1: 4, 10: 2, 11: 8, 16: 2}
LAYOUT_OPS = {"Squeeze", "Unsqueeze", "Reshape", "Flatten", "Transpose", "Identity"}  # move values, compute nothing
NOT_KERAS = ("backbone '{}' is an ONNX graph, which runs on ONNX Runtime in extraction only; {} needs a Keras model. "
             "Use a registered name or a .keras file for it.")


def layer_name(tensor: str) -> str:
    """A tensor's name as a layer name: runs of characters other than letters, digits, `_ . : -` become one `.`
    (a `/` would nest HDF5 groups and folders, a `+` joins layers in a cache's file name)."""
    return re.sub(r"[^A-Za-z0-9_.:-]+", ".", tensor).strip(".") or "tensor"


def load_model(path: Path):
    """The ModelProto of `path`, or one line saying why it is not a usable ONNX model."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # protobuf raises DecodeError, onnx its own errors, for a file that is not a model
        first = str(err).strip().splitlines()[0][:160] if str(err).strip() else "no details"
        raise UsageError(f"backbone file '{path}' is not a readable ONNX model ({type(err).__name__}: {first}). "
                         "Expected a file written by torch.onnx.export, tf2onnx or onnx.save.") from None
    if not model.graph.node:
        raise UsageError(f"backbone file '{path}' is not an ONNX model: its graph has no operations "
                         f"({path.stat().st_size} bytes). Expected a file written by torch.onnx.export or tf2onnx.")
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        raise UsageError(f"backbone file '{path}' keeps its weights in external data files, which its sha256 would "
                         "not cover. Save it as one file: onnx.save_model(onnx.load(path), path, "
                         "save_as_external_data=False) (models under 2 GB).")
    return model


def _image_input(model, path: Path):
    """The graph's one non-initializer input, of rank 4."""
    weights = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in weights]
    if len(inputs) != 1:
        raise UsageError(f"backbone '{path}' takes {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); "
                         "expected one image input. Re-export the model with the image as its only input.")
    dims = _dims(inputs[0].type.tensor_type)
    if dims is not None and len(dims) != 4:
        raise UsageError(f"backbone '{path}': its input '{inputs[0].name}' has rank {len(dims)}, expected 4 (a batch "
                         "of images, NCHW or NHWC). Re-export it with an image input.")
    return inputs[0]


def _dims(tensor_type) -> list[int | None] | None:
    """A tensor type's dimensions (None where not a fixed number), or None when its rank is unknown."""
    if not tensor_type.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]


def _layout(path: Path, dims: list | None, declared: str | None) -> str:
    """NCHW when the input's axis 1 has 3 channels, NHWC when its axis 3 has; a sidecar must say where both or
    neither have."""
    seen = [name for name, axis in (("NCHW", 1), ("NHWC", 3)) if dims and dims[axis] == 3]
    if declared is not None:
        if seen and declared not in seen:
            raise UsageError(f"sidecar '{sidecar_path(path)}': layout {declared!r} does not fit the model's input "
                             f"{_shape_text(dims)}, which is {seen[0]}. Set \"layout\" to \"{seen[0]}\" or remove it.")
        return declared
    if len(seen) != 1:
        raise UsageError(f"backbone '{path}': its input {_shape_text(dims)} does not show whether it is NCHW or NHWC. "
                         f"Declare it in {sidecar_path(path)}: \"layout\": one of {', '.join(LAYOUTS)}.")
    return seen[0]


def _shape_text(dims: list | None) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in dims) + ")" if dims is not None else "(rank unknown)"


def _side(dims: list | None, layout: str) -> int | None:
    """The fixed side of a square input, None when height and width are free, -1 when they are not a square."""
    if dims is None:
        return None
    h, w = (dims[2], dims[3]) if layout == "NCHW" else (dims[1], dims[2])
    return h if h is not None and h == w else None if h is None and w is None else -1


def onnx_backbone(path: Path, preprocess: str | None) -> BackboneSpec:
    """The BackboneSpec of a user's .onnx file: its sidecar's data config, its layout and side read from the graph."""
    meta = read_sidecar(path)
    mode = declared_preprocess(path, preprocess, meta)
    description = resolve_preprocess(mode).description  # refuses an unknown mode
    model = load_model(path)
    dims = _dims(_image_input(model, path).type.tensor_type)
    layout = _layout(path, dims, meta.get("layout"))
    side = _side(dims, layout)
    if side == -1:
        raise UsageError(f"backbone '{path}' takes {layout} images of shape {_shape_text(dims)}, not square; images "
                         "are fed as squares. Re-export it with a square or a free input size.")
    declared = json.loads(sidecar_path(path).read_text()).get("input_size") if sidecar_path(path).exists() else None
    if side is not None and declared is not None and declared != side:
        raise UsageError(f"sidecar '{sidecar_path(path)}': input_size {declared} does not fit the model, whose input "
                         f"{_shape_text(dims)} is fixed at {side}. Set \"input_size\" to {side} or remove it.")
    if layout == "NCHW":
        description += "; transposed to NCHW"

    def build(weights, input_shape):
        raise UsageError(NOT_KERAS.format(path, "this command"))

    return BackboneSpec(str(path), build, Preprocess(numpy_preprocess(mode), description, mode),
                        side or meta["input_size"], meta.get("default_layer"), file=path, layout=layout,
                        **declared_evaluation(meta))


def check_options(spec: BackboneSpec, engine: str, precision: str, jit: bool, weights: str) -> None:
    """Refuse, before any image is read, what only TensorFlow or a Keras model can do."""
    asked = [f"--engine {engine}" if engine not in ("auto", "onnx") else "", "--precision mixed" if
             precision == "mixed" else "", "--jit" if jit else ""]
    asked = [a for a in asked if a]
    if asked:
        raise UsageError(f"backbone '{spec.name}' is an ONNX graph, which runs on ONNX Runtime only; "
                         f"{' and '.join(asked)} need{'s' if len(asked) == 1 else ''} TensorFlow. Drop "
                         f"{' and '.join(asked)}.")
    if weights not in ("default", "imagenet"):
        raise UsageError(f"weights '{weights}' is not valid for an ONNX backbone ({spec.name}): its weights are in the "
                         "file. Drop WEIGHTS (--weights).")


def tensor_names(model) -> dict[str, str]:
    """Layer name -> tensor name for every tensor an operation of the graph makes, in graph order; a layer name that
    two tensors would share gets `~2`, `~3` on the later ones."""
    found: dict[str, str] = {}
    seen: set[str] = set()
    for node in model.graph.node:
        for tensor in node.output:
            if tensor and tensor not in seen:
                seen.add(tensor)
                name, k = layer_name(tensor), 2
                while name in found:
                    name, k = f"{layer_name(tensor)}~{k}", k + 1
                found[name] = tensor
    return found


def _fixed_input(model, layout: str, size: int, batch: int):
    """A copy of `model` whose image input is fixed at (batch, size, size, 3) in its layout, for shape inference."""
    import onnx

    model = onnx.ModelProto.FromString(model.SerializeToString())
    inp = _image_input(model, Path("?"))
    shape = (batch, 3, size, size) if layout == "NCHW" else (batch, size, size, 3)
    dims = inp.type.tensor_type.shape.dim
    del dims[:]
    for value in shape:
        dims.add().dim_value = value
    del model.graph.value_info[:]  # stale hints of other sizes would contradict the fixed ones
    return model


def _inferred_types(model, layout: str, size: int) -> dict[str, object]:
    """Tensor name -> inferred TensorTypeProto at batch 1 (tensors whose type cannot be inferred are absent)."""
    import onnx

    fixed = _fixed_input(model, layout, size, 1)
    try:
        inferred = onnx.shape_inference.infer_shapes(fixed, data_prop=True)
    except Exception:  # a graph that inference cannot follow: its shapes are shown as unknown, it may still run
        inferred = fixed
    g = inferred.graph
    return {v.name: v.type.tensor_type for v in [*g.value_info, *g.output, *g.input] if v.type.HasField("tensor_type")}


def layer_shapes(spec: BackboneSpec, size: int) -> list[tuple[str, str, tuple | None]]:
    """(layer name, operation, per-image shape: None or None dims where unknown) of every float tensor of the graph,
    from ONNX shape inference at batch 1 (what `make layers` prints)."""
    model = load_model(spec.file)
    _check_size(spec, model, size)
    types = _inferred_types(model, spec.layout, size)
    producer = {out: node.op_type for node in model.graph.node for out in node.output}
    rows = []
    for name, tensor in tensor_names(model).items():
        kind = types.get(tensor)
        if producer[tensor] == "Constant" or (kind is not None and kind.elem_type not in FLOAT_TYPES):
            continue
        dims = _dims(kind) if kind is not None else None
        rows.append((name, producer[tensor], tuple(dims[1:]) if dims else None))
    return rows


def default_layer(spec: BackboneSpec, model=None) -> str:
    """The sidecar's default_layer (a layer name, or a tensor's own name), else the graph's first output."""
    model = model or load_model(spec.file)
    names = tensor_names(model)
    wanted = spec.default_layer or model.graph.output[0].name
    return _layer_of(wanted, names, model) or wanted


def _check_size(spec: BackboneSpec, model, size: int) -> None:
    side = _side(_dims(_image_input(model, spec.file).type.tensor_type), spec.layout)
    if side is not None and size != side:
        raise UsageError(f"image size {size} is not valid for backbone '{spec.name}', whose input is fixed at "
                         f"{side}x{side}. Drop --image-size (SIZE), or re-export the model with a free input size.")


def resolve_layers(spec: BackboneSpec, layers: list[str], size: int) -> list[str]:
    """The cut layers as layer names (a tensor's own name, or a Keras layer's name in an export of a Keras model, is
    accepted too), checked against the graph before any image is read; none asked: the default layer."""
    model = load_model(spec.file)
    _check_size(spec, model, size)
    names = tensor_names(model)
    resolved = []
    for layer in layers or [default_layer(spec, model)]:
        name = _layer_of(layer, names, model)
        if name is None:
            raise UsageError(f"layer '{layer}' is not a tensor of backbone '{spec.name}' ({len(names)} tensors; see "
                             f"'make layers BACKBONE={spec.name}').{_suggest(layer, names)}")
        resolved.append(name)
    return resolved


def _layer_of(layer: str, names: dict[str, str], model) -> str | None:
    """`layer` as one of `names` (layer name -> tensor): itself, the layer of a tensor's own name, or a Keras layer's
    output (`_scope_output`); None where it is none of these."""
    if layer in names:
        return layer
    return next((name for name, tensor in names.items() if tensor == layer), None) or _scope_output(layer, names, model)


def _scope_output(layer: str, names: dict[str, str], model) -> str | None:
    """A Keras layer's name as its output in a tf2onnx export, where exactly one scope has that name: the last tensor
    made inside the scope (`avg_pool` -> `functional_1.avg_pool_1.Mean:0`), followed through the layout operations
    the converter appends outside any scope (a Squeeze back to Keras' shape, the graph's Identity). What a `.keras`
    sidecar's default_layer and LAYER mean in that model's export. None where no scope or several match."""
    pattern = re.compile(rf"{re.escape(layer)}(_[0-9]+)?")
    last: dict[str, str] = {}
    for name in names:  # graph order is topological: a scope's last tensor is the layer's output
        parts = name.split(".")
        for i, part in enumerate(parts[:-1]):
            if pattern.fullmatch(part):
                last[".".join(parts[: i + 1])] = name
    if len(last) != 1:
        return None
    found = next(iter(last.values()))
    by_tensor = {tensor: name for name, tensor in names.items()}
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for tensor in node.input:
            consumers.setdefault(tensor, []).append(node)
    while True:
        after = consumers.get(names[found], [])
        if len(after) != 1 or after[0].op_type not in LAYOUT_OPS or "." in by_tensor.get(after[0].output[0], "."):
            return found
        found = by_tensor[after[0].output[0]]


def _suggest(layer: str, names: dict[str, str]) -> str:
    """did_you_mean over the layer names, else over their dotted parts (`relu3` -> `relu1.Relu_output_0`)."""
    hint = did_you_mean(layer, names)
    if hint:
        return hint
    parts: dict[str, list[str]] = {}
    for name in names:
        for part in name.split("."):
            parts.setdefault(part, []).append(name)
    found = list(dict.fromkeys(n for p in difflib.get_close_matches(layer, list(parts), n=5, cutoff=0.6)
                               for n in parts[p]))[:5]
    return f" Did you mean: {', '.join(found)}?" if found else ""


def _opset(model) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def cut_graph(spec: BackboneSpec, layers: list[str], size: int, batch_size: int, pool: str, dtype: str):
    """The graph that runs: uint8 RGB pixels (sub-batch, size, size, 3) -> the declared preprocessing -> the model ->
    each cut layer, pooled and cast to `dtype`. Its batch is the model's own where fixed (it must divide
    `batch_size`), else the largest divisor of `batch_size` whose activations fit the engines' budget."""
    from onnx import TensorProto, helper, numpy_helper

    model = load_model(spec.file)
    _check_size(spec, model, size)
    g = model.graph
    image = _image_input(model, spec.file)
    types = _inferred_types(model, spec.layout, size)
    sub = _sub_batch(spec, _dims(image.type.tensor_type)[0] if _dims(image.type.tensor_type) else None, batch_size,
                     types)
    opset, names = _opset(model), tensor_names(model)
    made, constants = [], []  # new operations (the preprocessing, then pooling and casts) and their constants

    def const(name: str, array: np.ndarray) -> str:
        constants.append(numpy_helper.from_array(array, f"feature_cache_const_{name}"))
        return constants[-1].name

    def node(op: str, inputs: list[str], output: str, **attrs) -> str:
        made.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

    x = node("Cast", [PIXELS], "feature_cache_float", to=TensorProto.FLOAT)
    for i, (op, values) in enumerate(steps(spec.preprocess.mode)):  # numpy_preprocess, as ONNX operations
        if op == "bgr":
            x = node("Gather", [x, const(f"bgr{i}", np.array([2, 1, 0], np.int64))], f"feature_cache_step{i}", axis=3)
        else:
            x = node({"sub": "Sub", "div": "Div"}[op], [x, const(f"step{i}", np.asarray(values, np.float32))],
                     f"feature_cache_step{i}")
    if spec.layout == "NCHW":
        x = node("Transpose", [x], "feature_cache_nchw", perm=[0, 3, 1, 2])
    node("Cast", [x], image.name, to=image.type.tensor_type.elem_type or TensorProto.FLOAT)

    prelude, outputs = len(made), []
    for i, layer in enumerate(layers):
        tensor = names[layer]
        kind = types.get(tensor)
        dims = _dims(kind) if kind is not None else None
        rank = None if dims is None else len(dims)
        if pool != "none" and rank is None:
            raise UsageError(f"layer '{layer}' of backbone '{spec.name}' has a shape that ONNX shape inference cannot "
                             f"tell, so it cannot be pooled. Use --pool none, or cut at another layer.")
        if pool != "none" and rank > 2:
            axes = _pool_axes(dims, spec.layout)
            reduce = "ReduceMean" if pool == "avg" else "ReduceMax"
            if opset >= 18:  # axes became an input in opset 18
                tensor = node(reduce, [tensor, const(f"axes{i}", np.array(axes, np.int64))], f"feature_cache_pool{i}",
                              keepdims=0)
            else:
                tensor = node(reduce, [tensor], f"feature_cache_pool{i}", axes=axes, keepdims=0)
        node("Cast", [tensor], FEATURES.format(i), to=STORAGE_TYPES[dtype])
        out_rank = 2 if pool != "none" and rank > 2 else rank
        outputs.append(helper.make_tensor_value_info(FEATURES.format(i), STORAGE_TYPES[dtype],
                                                     None if out_rank is None else [None] * out_rank))

    everything = [*made[:prelude], *g.node, *made[prelude:]]
    kept = _needed(everything, [o.name for o in outputs])
    all_nodes = [n for n in everything if id(n) in kept]
    used = {name for n in all_nodes for name in _inputs(n)}
    new = helper.make_graph(all_nodes, g.name or "backbone",
                            [helper.make_tensor_value_info(PIXELS, TensorProto.UINT8, [sub, size, size, 3])],
                            outputs, [t for t in [*g.initializer, *constants] if t.name in used])
    new.sparse_initializer.extend(t for t in g.sparse_initializer if t.values.name in used)
    cut = helper.make_model(new, opset_imports=model.opset_import, ir_version=model.ir_version,
                            producer_name="feature-cache", doc_string=f"{spec.name} cut at {', '.join(layers)}")
    cut.functions.extend(model.functions)
    return cut


def _pool_axes(dims: list[int | None], layout: str) -> list[int]:
    """The spatial axes of a map (with its batch axis): a 4-d map's square pair of axes, its height and width (inside a
    graph, a map's layout need not be its input's: tf2onnx computes convolutions of an NHWC model in NCHW); else, or
    where all three sides are equal or unknown, the input's layout: NHWC 1..rank-2, NCHW 2..rank-1. A rank-3 tensor is
    (batch, tokens, channels) in either layout (a transformer's), pooled over its tokens as for Keras models."""
    rank = len(dims)
    if rank == 4 and None not in dims[1:]:
        a, b, c = dims[1:]
        if a == b != c:
            return [1, 2]
        if b == c != a:
            return [2, 3]
    if rank == 3 or layout == "NHWC":
        return list(range(1, rank - 1))
    return list(range(2, rank))


def _inputs(node) -> set[str]:
    """Every tensor a node reads, those its subgraphs (If, Loop, Scan bodies) read from outside included."""
    names = set(node.input)
    for attr in node.attribute:
        for graph in [attr.g] if attr.HasField("g") else list(attr.graphs):
            inner = {o for n in graph.node for o in n.output} | {i.name for i in graph.input} | \
                    {t.name for t in graph.initializer}
            names |= {name for n in graph.node for name in _inputs(n)} - inner
    return names - {""}


def _needed(nodes: list, outputs: list[str]) -> set[int]:
    """id() of the nodes that the outputs depend on (nodes are in topological order, as ONNX requires)."""
    wanted, kept = set(outputs), set()
    for n in reversed(nodes):
        if wanted & set(n.output):
            kept.add(id(n))
            wanted |= _inputs(n)
    return kept


def _sub_batch(spec: BackboneSpec, fixed: int | None, batch_size: int, types: dict) -> int:
    from features.engines import ACTIVATION_BUDGET

    if fixed is not None:
        if batch_size % fixed:
            raise UsageError(f"backbone '{spec.name}' takes batches of exactly {fixed} images, which do not divide "
                             f"--batch-size {batch_size}. Pass a multiple of {fixed} (BATCH=...), or re-export it with "
                             "a free batch size (torch.onnx.export(..., dynamic_axes={'input': {0: 'batch'}})).")
        return fixed
    peak = max([math.prod(d[1:]) * ELEMENT_BYTES[t.elem_type] for t in types.values() if t.elem_type in ELEMENT_BYTES
                for d in [_dims(t)] if d and None not in d], default=0)
    fits = [d for d in range(1, batch_size + 1) if batch_size % d == 0 and d * peak <= ACTIVATION_BUDGET]
    return max(fits, default=1)


def prepare(spec: BackboneSpec, layers: list[str], size: int, batch_size: int, pool: str, dtype: str,
            path: Path) -> Path:
    """Write the graph that runs (`cut_graph`) to `path`, unless an earlier run kept it there: atomically (a temporary
    file renamed into place), once ONNX Runtime has loaded it, so a graph it cannot run is refused in one line."""
    if path.exists():
        return path
    import onnx
    import onnxruntime as ort

    model = cut_graph(spec, layers, size, batch_size, pool, dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".export-", suffix=".onnx", dir=path.parent)
    os.close(fd)
    try:
        onnx.save_model(model, tmp)
        try:
            ort.InferenceSession(tmp, providers=["CPUExecutionProvider"])
        except Exception as err:  # ONNX Runtime raises its own Fail/InvalidGraph/NotImplemented types
            raise UsageError(f"backbone '{spec.name}' cannot be run by ONNX Runtime {ort.__version__} "
                             f"({str(err).strip().splitlines()[0][:200]}). Re-export it with an opset this version "
                             "supports, or cut at another layer.") from None
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would keep the shared cache folder's graphs private
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path
