"""minidit.fileio: atomic writes of text, JSON and .npz, and JSON read back as one line on error."""

import json
import os
import stat

import numpy as np
import pytest
import torch

from minidit import fileio
from minidit.errors import UserError


def test_write_json_round_trips_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "sub" / "meta.json"
    fileio.write_json(path, {"a": [1, 2], "b": "x"})
    assert json.loads(path.read_text()) == {"a": [1, 2], "b": "x"} and path.read_text().endswith("}\n")
    assert fileio.read_json(path) == {"a": [1, 2], "b": "x"}
    assert [p.name for p in path.parent.iterdir()] == ["meta.json"]


def test_save_npz_writes_exactly_the_path_it_is_given(tmp_path):
    path = tmp_path / "samples.bin"  # np.savez(path) would write samples.bin.npz
    fileio.save_npz(path, arr_0=np.arange(6, dtype=np.uint8).reshape(2, 3), labels=np.array([1, 2]))
    assert [p.name for p in tmp_path.iterdir()] == ["samples.bin"]
    with np.load(path) as npz:
        assert npz["arr_0"].tolist() == [[0, 1, 2], [3, 4, 5]] and npz["labels"].tolist() == [1, 2]


class Refused(UserError):
    pass


@pytest.mark.parametrize(
    "text,why",
    [("{not json", "not readable JSON"), ("[1, 2]", "expected a JSON object, found list"), ("", "not readable JSON")],
)
def test_read_json_refuses_in_one_line_of_the_callers_error(tmp_path, text, why):
    path = tmp_path / "config.json"
    path.write_text(text)
    with pytest.raises(Refused, match=rf"^{path}: {why}.*; delete it$") as e:
        fileio.read_json(path, Refused, hint="delete it")
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match=f"^{tmp_path / 'missing.json'}: not readable JSON"):
        fileio.read_json(tmp_path / "missing.json")


def test_written_files_get_the_umask_permissions_even_when_the_writer_recreates_them(tmp_path):
    """safetensors' save_file replaces the temporary file with a fresh 0600 one: the result must still be
    readable as any new file is (0644 under umask 022), not private to its owner."""
    from safetensors.torch import save_file

    old = os.umask(0o022)
    try:
        fileio.atomic_write(tmp_path / "w.safetensors", lambda tmp: save_file({"w": torch.zeros(2)}, tmp))
        fileio.write_json(tmp_path / "a.json", {"a": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "w.safetensors").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644
