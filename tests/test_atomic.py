import os
import stat

import pytest

from ncguard.atomic import atomic_write


def test_writes_bytes_text_and_callables(tmp_path):
    assert atomic_write(tmp_path / "a.bin", b"\x00\x01").read_bytes() == b"\x00\x01"
    assert atomic_write(tmp_path / "sub" / "b.txt", "héllo").read_text(encoding="utf-8") == "héllo"
    assert atomic_write(tmp_path / "c.bin", lambda h: h.write(b"xyz")).read_bytes() == b"xyz"


def test_result_is_world_readable(tmp_path):
    path = atomic_write(tmp_path / "model.onnx", b"data")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644


def test_failure_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = atomic_write(tmp_path / "x.json", "old")

    def explode(handle):
        handle.write(b"half")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        atomic_write(path, explode)
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]
