"""The one defensive JSON reader (evaluation.fileio.read_json_object): every problem is one line naming the file,
and the sweep and the training evaluator word its problem into their own messages."""

import json

import pytest

from evaluation.errors import InputError
from evaluation.fileio import JSONFileError, read_json_object, read_json_value

BAD = {  # file content -> words of the problem
    "": "empty",
    " \n\t": "empty",
    "not json at all": "not a JSON file (Expecting value",
    '{"fid": ' + "9" * 5000 + "}": "not a JSON file (Exceeds the limit",
    "[" * 100_000 + "]" * 100_000: "nested too deeply to be a JSON record",
    "[1, 2]": "a JSON list, not an object",
    '"text"': "a JSON string, not an object",
    "null": "JSON null, not an object",
}


@pytest.mark.parametrize("content", list(BAD), ids=range(len(BAD)))
def test_a_bad_record_is_one_line_naming_the_file_and_the_problem(tmp_path, content):
    path = tmp_path / "r.json"
    path.write_text(content)
    with pytest.raises(JSONFileError) as caught:
        read_json_object(path)
    assert isinstance(caught.value, InputError) and isinstance(caught.value, ValueError)
    assert str(caught.value).startswith(f"{path}: ") and BAD[content] in caught.value.problem
    assert "\n" not in str(caught.value) and str(caught.value) == f"{path}: {caught.value.problem}"


def test_not_utf8_missing_directory_and_too_large(tmp_path):
    (tmp_path / "latin.json").write_bytes(b'{"a": "\xe9"}')
    (tmp_path / "big.json").write_text(json.dumps({"a": "x" * 100}))
    (tmp_path / "dir.json").mkdir()
    cases = [(tmp_path / "latin.json", {}, "not a JSON file ('utf-8' codec can't decode"),
             (tmp_path / "missing.json", {}, "not a file"), (tmp_path / "dir.json", {}, "not a file"),
             (tmp_path / "big.json", {"max_bytes": 50, "what": "sweep record"}, "more than any sweep record (50)")]
    for path, kwargs, words in cases:
        with pytest.raises(JSONFileError) as caught:
            read_json_object(path, **kwargs)
        assert str(caught.value) == f"{path}: {caught.value.problem}" and words in caught.value.problem


def test_good_records_are_read_whole(tmp_path):
    record = {"fid": 1.5, "nan": float("nan"), "nested": {"list": [1, 2, None]}, "big": 10**400}
    (tmp_path / "r.json").write_text(json.dumps(record))
    got = read_json_object(tmp_path / "r.json")
    assert got["fid"] == 1.5 and got["nan"] != got["nan"] and got["nested"] == record["nested"]
    assert got["big"] == 10**400
    (tmp_path / "l.json").write_text("[1, 2]")
    assert read_json_value(tmp_path / "l.json") == [1, 2]


def test_the_sweep_names_a_damaged_point_and_refuses_a_damaged_manifest(tmp_path):
    from reglue.scoring import sweep

    point = tmp_path / "point.json"
    point.write_text("{truncated")
    logged = []
    assert sweep._stored(point, {"a": 1}, logged.append) is None
    assert logged == [f"{point}: not a JSON file (Expecting property name enclosed in double quotes: line 1 column 2 "
                      "(char 1)); scoring the point again"]
    (tmp_path / sweep.MANIFEST).write_text("[]")
    with pytest.raises(sweep.SweepError, match=r"sweep.json: not a sweep manifest \(a JSON list, not an object\)"):
        sweep.check_directory(tmp_path, {"a": 1})


def test_the_training_evaluator_names_a_damaged_result(tmp_path):
    from reglue.scoring.during_training import EvaluationError, recorded_identity

    (tmp_path / "0000100.json").write_text('{"identity": {"n": 8}}')
    assert recorded_identity(tmp_path) == {"n": 8}
    (tmp_path / "0000200.json").write_text("[]")
    with pytest.raises(EvaluationError) as caught:
        recorded_identity(tmp_path)
    assert str(caught.value) == (f"{tmp_path / '0000200.json'}: a JSON list, not an object; move it out of the eval "
                                 "directory")
