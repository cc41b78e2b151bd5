"""`edgectl compress` and `pack --sample` as a user meets them, run as real processes (the demo: test_demo.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

pytestmark = pytest.mark.integration

LIGHT_SQUEEZENET = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light" / "light_squeezenet.onnx"


def test_compress_refuses_an_unwritable_output_before_any_work(host, tiny_model, tmp_path):
    # No --calib either: were the work done first, the run would take seconds and fail later.
    r = host.run("compress", str(tiny_model.path), "-o", "/nonexistent/dir/x.onnx", "--quantize", "int8-static")
    assert r.code == 2, r.stderr
    assert "/nonexistent/dir/x.onnx" in r.stderr and "does not exist" in r.stderr
    assert "nothing was done" in r.stderr

    out = tmp_path / "ok.onnx"
    r = host.run("compress", str(tiny_model.path), "-o", str(out), "--packed", str(tmp_path / "no" / "p.bin"))
    assert r.code == 2 and "--packed" in r.stderr and str(tmp_path / "no" / "p.bin") in r.stderr
    assert not out.exists()


def test_bare_compress_needs_no_data_and_static_says_what_it_needs(host, tiny_model, tmp_path):
    out = tmp_path / "tiny.q.onnx"
    r = host.run("compress", str(tiny_model.path), "-o", str(out), "--json")
    assert r.code == 0, r.stderr
    assert [s["name"] for s in r.json()["report"]["steps"]] == ["int8-dynamic"] and out.exists()

    out.unlink()
    r = host.run("compress", str(tiny_model.path), "-o", str(out), "--quantize", "int8-static")
    assert r.code == 2 and "needs calibration data: give --calib" in r.stderr and "int8-dynamic" in r.stderr
    assert not out.exists()

    helped = host.run("compress", "--help")
    assert "int8-dynamic (needs no data) without" in " ".join(helped.stdout.split())


def test_compress_old_ir_light_squeezenet(host, tmp_path):
    out = tmp_path / "squeeze.int8.onnx"
    r = host.run("compress", str(LIGHT_SQUEEZENET), "-o", str(out), "--quantize", "int8-dynamic", "--json")
    assert r.code == 0, r.stderr
    model = onnx.load(str(out))
    assert model.ir_version >= 4 and [i.name for i in model.graph.input] == ["data_0"]


def test_pack_sample_layouts_and_mismatch(host, tiny_model, tmp_path):
    good = tmp_path / "x.npz"
    np.savez(good, x=np.ones((2, 16), np.float32))
    bundle = host.pack(tiny_model.path, good, tmp_path / "a.edge", "layouts")
    checked = host.run("verify", str(bundle), "--json")
    assert checked.code == 0, checked.stderr

    per_input = tmp_path / "xname.npz"
    np.savez(per_input, **{"x.input": np.ones((1, 16), np.float64)})
    host.pack(tiny_model.path, per_input, tmp_path / "b.edge", "layouts", 2)

    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, x=np.ones((2, 15), np.float32))
    r = host.run(
        "pack", str(tiny_model.path), "-o", str(tmp_path / "c.edge"), "--name", "l", "--version", "3",
        "--sample", str(wrong),
    )  # fmt: skip
    assert r.code == 2 and "'input' expects shape [?, 16]" in r.stderr and "[2, 15]" in r.stderr
    assert not (tmp_path / "c.edge").exists()
    assert "x.NAME" in " ".join(host.run("pack", "--help").stdout.split())
