"""Hostile and corrupt input: every bad file gives a typed CheckpointError, never a crash, hang or huge allocation."""

import importlib
import json
import os
import pickle
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ckptio
from ckptio.formats import read_safetensors, write_safetensors

SETTINGS = settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _valid_bytes() -> bytes:
    import io

    buf = io.BytesIO()
    write_safetensors(
        buf, {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4, dtype=torch.bfloat16)}
    )
    return buf.getvalue()


VALID = _valid_bytes()


def _file(header_bytes: bytes, data: bytes = b"", length: int | None = None) -> bytes:
    n = len(header_bytes) if length is None else length
    return struct.pack("<Q", n) + header_bytes + data


def _load_bytes(tmp_path, name, blob, mmap=True):
    path = tmp_path / name
    path.write_bytes(blob)
    with open(path, "rb") as f:
        return read_safetensors(f, str(path), mmap_file=mmap)


def _expect_corrupt(tmp_path, blob, match=None):
    for mmap in (True, False):
        with pytest.raises(ckptio.CheckpointError) as e:
            _load_bytes(tmp_path, "bad.safetensors", blob, mmap)
        assert "bad.safetensors" in str(e.value)  # names the file
        if match:
            assert match in str(e.value), str(e.value)


@SETTINGS
@given(cut=st.integers(min_value=0, max_value=len(VALID) - 1))
def test_any_truncation_is_refused(tmp_path, cut):
    _expect_corrupt(tmp_path, VALID[:cut])


@SETTINGS
@given(n=st.integers(min_value=len(VALID), max_value=2**64 - 1))
def test_header_length_beyond_file_or_absurd(tmp_path, n):
    _expect_corrupt(tmp_path, struct.pack("<Q", n) + VALID[8:], "header length")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)


@SETTINGS
@given(header=json_values, data=st.binary(max_size=64))
def test_arbitrary_json_headers(tmp_path, header, data):
    raw = json.dumps(header).encode()
    try:
        tensors, _ = _load_bytes(tmp_path, "fuzz.safetensors", _file(raw, data))
    except ckptio.CheckpointError as e:
        assert "fuzz.safetensors" in str(e)
        return
    # accepted only if it really describes the data: every byte accounted for, shapes consistent
    assert sum(t.numel() * t.element_size() for t in tensors.values()) == len(data)


entry = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(["F32", "BF16", "U8", "I64", "F8_E4M3", "X9", "", "f32"]),
        "shape": st.lists(st.integers(-2, 2**40), max_size=3),
        "data_offsets": st.lists(st.integers(-5, 2**40), min_size=0, max_size=3),
    }
)


@SETTINGS
@given(
    entries=st.dictionaries(st.text(min_size=1, max_size=5), entry, min_size=1, max_size=4),
    data=st.binary(max_size=128),
)
def test_offsets_shapes_dtypes(tmp_path, entries, data):
    raw = json.dumps(entries).encode()
    try:
        tensors, _ = _load_bytes(tmp_path, "offs.safetensors", _file(raw, data))
    except ckptio.CheckpointError:
        return
    assert sum(t.numel() * t.element_size() for t in tensors.values()) == len(data)
    for k, t in tensors.items():
        assert list(t.shape) == entries[k]["shape"]


def test_specific_lies_have_specific_messages(tmp_path):
    def hdr(d):
        return json.dumps(d).encode()

    f32 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    _expect_corrupt(tmp_path, _file(b"{not json", b""), "not valid UTF-8 JSON")
    _expect_corrupt(tmp_path, _file(hdr([1, 2])), "not a JSON object")
    _expect_corrupt(tmp_path, _file(hdr({"a": f32, "b": f32}), b"\0" * 8), "overlaps")
    _expect_corrupt(tmp_path, _file(hdr({"a": {**f32, "data_offsets": [0, 800]}}), b"\0" * 8), "needs 8 bytes")
    _expect_corrupt(
        tmp_path, _file(hdr({"a": {**f32, "shape": [2**40], "data_offsets": [0, 2**42]}}), b"\0" * 8), "truncated"
    )
    _expect_corrupt(tmp_path, _file(hdr({"a": {**f32, "dtype": "F128"}}), b"\0" * 8), "unknown dtype")
    _expect_corrupt(tmp_path, _file(hdr({"a": f32}), b"\0" * 12), "unexpected bytes")
    _expect_corrupt(tmp_path, _file(hdr({"a": {**f32, "data_offsets": [4, 12]}}), b"\0" * 12), "gap")
    dup = b'{"a":' + hdr(f32) + b',"a":' + hdr(f32) + b"}"
    _expect_corrupt(tmp_path, _file(dup, b"\0" * 8), "duplicate tensor name 'a'")
    _expect_corrupt(tmp_path, _file(b'{"\xff\xfe":' + hdr(f32) + b"}", b"\0" * 8), "not valid UTF-8")
    _expect_corrupt(tmp_path, _file(b'{"\\udc80":' + hdr(f32) + b"}", b"\0" * 8), "not valid UTF-8")
    _expect_corrupt(tmp_path, _file(hdr({"a": f32, "__metadata__": {"k": 1}}), b"\0" * 8), "__metadata__")
    _expect_corrupt(tmp_path, b"\1\2\3", "too short")


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_code_running_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"weight": torch.zeros(2), "evil": _Evil(marker)}, tmp_path / "evil.pt")
    with pytest.raises(ckptio.CheckpointSecurityError, match=r"evil\.pt"):
        ckptio.load_from_uri(str(tmp_path / "evil.pt"))
    os.makedirs(tmp_path / "run")
    os.replace(tmp_path / "evil.pt", tmp_path / "run" / "run.e00000001.pt")
    with pytest.raises(ckptio.CheckpointSecurityError):
        ckptio.load_from_uri(str(tmp_path / "run"))  # also when reached as "latest" of a directory
    assert not marker.exists()
    # plain pickle with a .pt name (no torch zip container) is refused the same way
    (tmp_path / "raw.pt").write_bytes(pickle.dumps(_Evil(marker)))
    with pytest.raises(ckptio.CheckpointError):
        ckptio.load_from_uri(str(tmp_path / "raw.pt"))
    assert not marker.exists()


@pytest.mark.parametrize("class_path", ["os.system", "subprocess.Popen", "builtins.eval", "shutil.rmtree"])
def test_header_and_manifest_classes_outside_allow_list_are_never_imported(tmp_path, policy, monkeypatch, class_path):
    imported = []
    real_import = importlib.import_module
    monkeypatch.setattr(importlib, "import_module", lambda name, *a: imported.append(name) or real_import(name, *a))
    arch = json.dumps({"class_path": class_path, "config": {}})
    with open(tmp_path / "h.safetensors", "wb") as f:
        write_safetensors(f, policy.state_dict(), {"ckptio.architecture": arch})
    ckptio.save_policy_artifact(str(tmp_path / "m" / "x"), policy, None)
    (tmp_path / "m" / "model_architecture.json").write_text(arch)
    for uri in (tmp_path / "h.safetensors", tmp_path / "m" / "x.safetensors"):
        # reading tensors imports nothing, so it goes on: tensors and the record are there (#19)
        art = ckptio.load_from_uri(str(uri))
        assert torch.equal(art.state_dict["body.weight"], policy.body.weight)
        assert art.policy_architecture.class_path == class_path and art.architecture_json()["config"] == {}
        with pytest.raises(ckptio.CheckpointSecurityError, match="allow-list"):  # building is where it is refused
            art.instantiate({"obs_dim": 6, "num_actions": 3})
    assert imported == []


def test_run_names_and_uris_cannot_write_outside(tmp_path, policy):
    mgr = ckptio.CheckpointManager(str(tmp_path / "run"), run_name="../../etc/passwd")
    uri = mgr.save_agent(policy, 1)
    assert os.path.dirname(uri) == str(tmp_path / "run" / "checkpoints")
    from ckptio.storage import Storage

    s = Storage(str(tmp_path / "run" / "checkpoints"))
    os.symlink("/tmp", tmp_path / "run" / "checkpoints" / "escape")
    # a sibling whose name starts with this directory's: a prefix test on the path would let it through
    (tmp_path / "run" / "checkpoints2").mkdir()
    os.symlink(tmp_path / "run" / "checkpoints2", tmp_path / "run" / "checkpoints" / "sibling")
    for name in ("../outside.safetensors", "escape/x.safetensors", "a/../../b", "sibling/x.safetensors"):
        with pytest.raises(ckptio.CheckpointSecurityError):
            s.write_bytes(name, b"x")
    assert os.listdir(tmp_path / "run" / "checkpoints2") == []


@pytest.mark.parametrize("class_path", ["ckptio_evil.Arch", "archsevil.Arch", "archs_x.Arch", "ckptio2.m.Arch"])
def test_look_alike_module_prefixes_are_not_allowed(tmp_path, policy, monkeypatch, class_path):
    """The allow-list matches whole dotted components: 'archs' does not allow 'archsevil'."""
    imported = []
    real_import = importlib.import_module
    monkeypatch.setattr(importlib, "import_module", lambda name, *a: imported.append(name) or real_import(name, *a))
    with open(tmp_path / "h.safetensors", "wb") as f:
        write_safetensors(
            f, policy.state_dict(), {"ckptio.architecture": json.dumps({"class_path": class_path, "config": {}})}
        )
    art = ckptio.load_from_uri(str(tmp_path / "h.safetensors"), allow=["archs.sub"])
    with pytest.raises(ckptio.CheckpointSecurityError, match="allow-list"):
        art.instantiate({"obs_dim": 6, "num_actions": 3})
    assert imported == []
