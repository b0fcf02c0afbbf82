"""minidit.fileio: atomic writes of text, JSON and .npz, and JSON read back as one line on error."""

import json

import numpy as np
import pytest

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
