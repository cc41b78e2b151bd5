"""host_tools.delta: building deltas between real bundle versions, applied as a device applies them.

Each case packs and signs two versions of a bundle, installs the first as the installer
lays out a slot, builds the delta on the "host", rebuilds the second on the "device"
with :func:`edge_sdk.bundle.delta.apply_delta`, and checks that the result is the new
bundle byte for byte and passes the device's verification.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from sparse_models import mlp

from edge_sdk.bundle import BundleSpec, Manifest, TensorInfo, pack_bundle, verify_bundle
from edge_sdk.bundle.archive import BundleReader, write_bundle
from edge_sdk.bundle.delta import DeltaLimits, apply_delta, read_delta_header
from edge_sdk.errors import ConfigError, HashMismatchError
from edge_sdk.trust import RecipientKey, SigningKey, TrustedKeys, encode_signatures
from host_tools.compress import pack_model as pack_weight_shared
from host_tools.delta import DeltaOptions, DeltaStats, build_delta, tensor_data_spans
from host_tools.keys import KeyRing, init_keys
from host_tools.packing import PackOptions, SparseOptions
from host_tools.packing import pack_model as pack_onnx

NOW = 1_700_000_000.0
DIMS = [64, 512, 512, 10]


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return SigningKey.generate()


@pytest.fixture(scope="module")
def trusted(key: SigningKey) -> TrustedKeys:
    return TrustedKeys((key.public_key,))


def _finetuned(model: onnx.ModelProto, names: tuple[str, ...], seed: int = 1) -> tuple[onnx.ModelProto, int]:
    """The model with the tensors ``names`` nudged (a fine-tune of those layers); the bytes changed."""
    tuned = onnx.ModelProto()
    tuned.CopyFrom(model)
    rng = np.random.default_rng(seed)
    changed = 0
    for init in tuned.graph.initializer:
        if init.name in names:
            values = numpy_helper.to_array(init)
            values = (values + rng.standard_normal(values.shape) * 0.01).astype(values.dtype)
            init.CopyFrom(numpy_helper.from_array(values, init.name))
            changed += values.nbytes
    return tuned, changed


def _pack(
    root: Path,
    key: SigningKey,
    version: int,
    model: bytes,
    name: str = "mlp",
    model_file: str = "model.onnx",
    **kw: object,
) -> Path:
    src = root / f"src-{name}-{version}"
    src.mkdir(parents=True)
    (src / model_file).write_bytes(model)
    np.savez(src / "sample.npz", x=np.ones((1, DIMS[0]), np.float32))
    out = root / f"{name}-v{version}.edge"
    spec = BundleSpec(
        name,
        version,
        "onnxruntime",
        src / model_file,
        inputs=(TensorInfo("x", (None, DIMS[0]), "float32"),),
        sample_input=src / "sample.npz",
        **kw,  # type: ignore[arg-type]
    )
    pack_bundle(spec, [key], out, now=NOW)
    return out


def _install(bundle: Path, slot: Path, trusted: TrustedKeys) -> Path:
    (slot / "payload").mkdir(parents=True)
    verified = verify_bundle(bundle, trusted, NOW, extract_to=slot / "payload")
    (slot / "manifest.json").write_bytes(verified.manifest.to_bytes())
    return slot


def _round_trip(
    tmp_path: Path, base: Path, new: Path, trusted: TrustedKeys, options: DeltaOptions | None = None
) -> DeltaStats:
    """Build on the host, rebuild on the device, and check the device would accept the result."""
    delta = tmp_path / "update.delta"
    stats = build_delta(base, new, delta, options)
    assert stats is not None
    assert stats.delta_bytes == delta.stat().st_size
    assert stats.copied_bytes + stats.literal_bytes + stats.zero_bytes == stats.full_bytes == new.stat().st_size
    header = read_delta_header(delta)
    assert (header.base_version, header.target_version, header.target_size) == (1, 2, stats.full_bytes)
    slot = _install(base, tmp_path / "slots" / "v1", trusted)
    out = tmp_path / "rebuilt.edge"
    apply_delta(delta, slot, out, DeltaLimits() if options is None else options.limits)
    assert out.read_bytes() == new.read_bytes()
    assert verify_bundle(out, trusted, NOW, installed_version=1).manifest.version == 2
    return stats


def _overhead(bundle: Path) -> int:
    """The literal bytes a delta sends besides changed payload: the new manifest and signatures,
    and per tar header (manifest, signatures, each payload file) its 76 non-zero bytes and short
    zero runs between them, 128 at most (long zero runs travel as ZERO operations)."""
    with BundleReader(bundle) as reader:
        return len(reader.manifest_bytes) + len(reader.signatures_bytes) + 128 * (2 + len(reader.payload))


# --- ONNX: tensors ------------------------------------------------------------------------


def test_finetune_of_the_last_layer_sends_little_more_than_that_layer(
    tmp_path: Path, key: SigningKey, trusted: TrustedKeys
) -> None:
    v1 = mlp(DIMS, 0.0, seed=0)
    v2, changed = _finetuned(v1, ("W2", "B2"))
    assert changed == (512 * 10 + 10) * 4
    base = _pack(tmp_path, key, 1, v1.SerializeToString())
    new = _pack(tmp_path, key, 2, v2.SerializeToString())

    stats = _round_trip(tmp_path, base, new, trusted)

    assert stats.changed_tensor_bytes == changed
    assert stats.files_copied_whole == 1  # the sample input
    assert stats.tensors_copied == 4  # W0, B0, W1, B1
    # Measured: 20,520 changed bytes -> 21,489 literal bytes (969 more: manifest 485,
    # signatures 143, tar header fields, the changed tensors' protobuf framing) and a delta
    # file of 21,913 bytes (1.07x the changed bytes), for a full bundle of 1,218,560 bytes.
    assert stats.literal_bytes - changed <= _overhead(new) == 1140
    assert stats.delta_bytes <= 1.2 * changed
    assert stats.ratio < 0.02


def test_tensors_are_found_when_everything_after_a_rename_shifts(
    tmp_path: Path, key: SigningKey, trusted: TrustedKeys
) -> None:
    v1 = mlp(DIMS, 0.0, seed=0)
    v2, changed = _finetuned(v1, ("W2",))
    for init in v2.graph.initializer:  # a longer name moves every byte after it
        if init.name == "W0":
            init.name = "encoder.layer0.weight"
    for node in v2.graph.node:
        node.input[:] = ["encoder.layer0.weight" if i == "W0" else i for i in node.input]
    base = _pack(tmp_path, key, 1, v1.SerializeToString())
    new = _pack(tmp_path, key, 2, v2.SerializeToString())

    stats = _round_trip(tmp_path, base, new, trusted)

    assert stats.changed_tensor_bytes == changed
    assert stats.tensors_copied == 4  # W0 under its new name, B0, W1, B1 (B2 is 40 bytes: below the lookup size)
    # Measured: 1,190 literal bytes beyond the changed ones; the rename rewrites the name twice
    # and the length prefixes of the graph and of the messages around it.
    assert stats.literal_bytes - changed <= _overhead(new) + 256
    assert stats.delta_bytes <= 1.2 * changed


def test_many_zero_runs_stay_within_the_devices_operation_limit(
    tmp_path: Path, key: SigningKey, trusted: TrustedKeys
) -> None:
    v1 = mlp(DIMS, 0.0, seed=0)
    v2, _ = _finetuned(v1, ("W1",))
    w1 = next(i for i in v2.graph.initializer if i.name == "W1")
    pruned = numpy_helper.to_array(w1).copy()
    pruned.reshape(-1, 16)[:, :8] = 0  # runs of 8 zero floats (32 bytes) between 8 kept ones
    w1.CopyFrom(numpy_helper.from_array(pruned, "W1"))
    base = _pack(tmp_path, key, 1, v1.SerializeToString())
    new = _pack(tmp_path, key, 2, v2.SerializeToString())

    eager = build_delta(base, new, tmp_path / "eager.delta")
    assert eager is not None and eager.ops > 10_000  # every zero run its own operation
    bounded = _round_trip(tmp_path, base, new, trusted, DeltaOptions(limits=DeltaLimits(max_ops=1000)))
    assert bounded.ops <= 1000 and bounded.zero_bytes < eager.zero_bytes
    assert build_delta(base, new, tmp_path / "none.delta", DeltaOptions(limits=DeltaLimits(max_ops=5))) is None
    assert not (tmp_path / "none.delta").exists()


def test_tensor_spans_are_the_tensors_raw_data() -> None:
    model = mlp([8, 16, 4], 0.0, seed=3)
    data = model.SerializeToString()
    spans = tensor_data_spans(data)
    assert [s.name for s in spans] == [i.name for i in model.graph.initializer]
    for span, init in zip(spans, model.graph.initializer, strict=True):
        assert data[span.offset : span.offset + span.length] == init.raw_data


def test_constant_and_subgraph_tensors_are_found() -> None:
    value = numpy_helper.from_array(np.arange(32, dtype=np.float32), "c")
    then_graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Constant", [], ["t"], value=numpy_helper.from_array(np.ones(8, np.float32), "k"))],
        "then",
        [],
        [onnx.helper.make_tensor_value_info("t", onnx.TensorProto.FLOAT, [8])],
    )
    nodes = [
        onnx.helper.make_node("Constant", [], ["c"], value=value),
        onnx.helper.make_node("If", ["cond"], ["t"], then_branch=then_graph, else_branch=then_graph),
    ]
    graph = onnx.helper.make_graph(
        nodes, "g", [onnx.helper.make_tensor_value_info("cond", onnx.TensorProto.BOOL, [])], []
    )
    data = onnx.helper.make_model(graph).SerializeToString()
    found = {(s.name, data[s.offset : s.offset + s.length]) for s in tensor_data_spans(data)}
    assert found == {("c", value.raw_data), ("k", np.ones(8, np.float32).tobytes())}


# --- other weight files: sparse CSR, weight-shared packed --------------------------------


def test_sparse_bundle_delta(tmp_path: Path) -> None:
    ring: KeyRing = init_keys(tmp_path / "keys", NOW)[0]
    v1 = mlp([64, 256, 256, 10], 0.9, seed=0)
    w2 = next(i for i in v1.graph.initializer if i.name == "W2")
    tuned = numpy_helper.to_array(w2).copy()
    tuned[tuned != 0] += 0.01  # a fine-tune of the last layer keeps its sparsity pattern
    v2 = onnx.ModelProto()
    v2.CopyFrom(v1)
    next(i for i in v2.graph.initializer if i.name == "W2").CopyFrom(numpy_helper.from_array(tuned, "W2"))
    bundles = []
    for version, model in ((1, v1), (2, v2)):
        path = tmp_path / f"sparse-v{version}.onnx"
        onnx.save(model, path)
        out = tmp_path / f"sparse-v{version}.edge"
        pack_onnx(PackOptions(path, out, "sparse", version, sparse=SparseOptions(0.5)), ring, NOW)
        bundles.append(out)
    with BundleReader(bundles[1]) as reader:
        assert Manifest.from_bytes(reader.manifest_bytes, 1 << 20).sparse is not None

    stats = _round_trip(tmp_path, bundles[0], bundles[1], ring.root.trusted("bundles"))

    # The CSR file changes only in the last layer's values (nonzeros of W2: float32 each).
    changed_values = int(np.count_nonzero(tuned)) * 4
    assert stats.literal_bytes <= 1.2 * changed_values + _overhead(bundles[1])
    assert stats.ratio < 0.1


def test_weight_shared_packed_file_delta(tmp_path: Path, key: SigningKey, trusted: TrustedKeys) -> None:
    def shared(model: onnx.ModelProto) -> onnx.ModelProto:
        out = onnx.ModelProto()
        out.CopyFrom(model)
        for init in out.graph.initializer:
            values = np.round(numpy_helper.to_array(init) * 8) / 8  # at most a few dozen distinct values
            init.CopyFrom(numpy_helper.from_array(values.astype(np.float32), init.name))
        return out

    v1 = shared(mlp([64, 256, 256, 10], 0.0, seed=0))
    v2 = shared(_finetuned(v1, ("W2",), seed=4)[0])
    packed = [pack_weight_shared(m) for m in (v1, v2)]
    base, new = (
        _pack(tmp_path, key, version, p.data, name="shared", model_file="model.packed")
        for version, p in enumerate(packed, start=1)
    )

    stats = _round_trip(tmp_path, base, new, trusted)

    # The packed file changes in W2's coded stream (and its CRC); the rest is copied.
    w2 = packed[1].breakdown["tensors"]["W2"]
    w2_bytes = w2["header"] + w2["codebook"] + w2["stream"]
    assert stats.changed_tensor_bytes is None  # no ONNX file in this bundle
    assert stats.literal_bytes <= 1.2 * w2_bytes + _overhead(new)


# --- when no delta is made ---------------------------------------------------------------


def test_identical_payload_under_a_new_version_is_almost_free(
    tmp_path: Path, key: SigningKey, trusted: TrustedKeys
) -> None:
    model = mlp(DIMS, 0.0, seed=0).SerializeToString()
    base, new = _pack(tmp_path, key, 1, model), _pack(tmp_path, key, 2, model)
    stats = _round_trip(tmp_path, base, new, trusted)
    assert stats.files_copied_whole == 2
    assert stats.changed_tensor_bytes == 0
    assert stats.delta_bytes < 2000


def test_encrypted_bundles_get_no_delta(tmp_path: Path, key: SigningKey) -> None:
    model = mlp(DIMS, 0.0, seed=0).SerializeToString()
    recipient = (RecipientKey.generate().public,)
    base = _pack(tmp_path, key, 1, model, encrypt_to=recipient)
    new = _pack(tmp_path, key, 2, model, encrypt_to=recipient)
    plain = _pack(tmp_path, key, 3, model)
    for a, b in ((base, new), (plain, new), (base, plain)):
        assert build_delta(a, b, tmp_path / "d.delta") is None
    assert not (tmp_path / "d.delta").exists()


def test_other_bundle_names_or_unrelated_content_get_no_delta(tmp_path: Path, key: SigningKey) -> None:
    base = _pack(tmp_path, key, 1, mlp(DIMS, 0.0, seed=0).SerializeToString())
    other = _pack(tmp_path, key, 2, mlp(DIMS, 0.0, seed=0).SerializeToString(), name="other")
    unrelated = _pack(tmp_path, key, 2, mlp(DIMS, 0.0, seed=9).SerializeToString())
    assert build_delta(base, other, tmp_path / "d.delta") is None
    assert build_delta(base, unrelated, tmp_path / "d.delta") is None
    assert not (tmp_path / "d.delta").exists()


def test_a_base_bundle_whose_payload_differs_from_its_manifest_is_refused(tmp_path: Path, key: SigningKey) -> None:
    base = _pack(tmp_path, key, 1, mlp(DIMS, 0.0, seed=0).SerializeToString())
    new = _pack(tmp_path, key, 2, mlp(DIMS, 0.0, seed=0).SerializeToString())
    with BundleReader(base) as reader:
        manifest_bytes = reader.manifest_bytes
        files = {}
        for rel, info in reader.payload.items():
            data = bytearray(b"".join(reader.iter_member(rel, info.size)))
            data[-1] ^= 1
            (tmp_path / rel).write_bytes(bytes(data))
            files[rel] = tmp_path / rel
    forged = tmp_path / "forged.edge"
    write_bundle(forged, manifest_bytes, encode_signatures([key.sign(manifest_bytes)]), files)
    with pytest.raises(HashMismatchError, match="does not match its manifest"):
        build_delta(forged, new, tmp_path / "d.delta")
    assert not (tmp_path / "d.delta").exists()


def test_options_are_checked() -> None:
    with pytest.raises(ConfigError, match="block_size"):
        DeltaOptions(block_size=0)
    with pytest.raises(ConfigError, match="max_ratio"):
        DeltaOptions(max_ratio=1.5)
    assert dataclasses.replace(DeltaOptions(), max_ratio=0.5).max_ratio == 0.5
