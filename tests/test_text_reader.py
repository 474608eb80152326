"""The delimited-number reader: fast path and block-wise diagnosis agree, and lines stay exact."""

from __future__ import annotations

import numpy as np

from components.ingest.text import ValueRule, check_values, parse_numeric, split_text


def _text(rows: list[str], header: str | None = "a,b,c") -> bytes:
    return ((header + "\n") if header else "").encode() + "\n".join(rows).encode() + b"\n"


def test_bad_rows_far_into_a_large_file_keep_their_line_numbers():
    rows = [f"{i},{i % 7},{i % 3}" for i in range(5000)]
    rows[2999] = "1,2"  # line 3001 with the header
    rows[4500] = "1,zz,3"  # line 4502
    text = split_text("f.csv", _text(rows), header="required")
    parsed = parse_numeric(text, delimiter=",", n_fields=3)
    assert [(r.line, r.column) for r in parsed.rejects] == [(3001, 3), (4502, 2)]
    assert len(parsed.values) == 4998
    kept = np.delete(np.arange(5000), [2999, 4500])
    np.testing.assert_array_equal(parsed.values[:, 0], kept.astype(np.float32))
    np.testing.assert_array_equal(parsed.lines, kept + 2)


def test_fast_path_and_diagnosis_give_the_same_values():
    rows = [f"{i}.5,{-i},1e{i % 3}" for i in range(3000)]
    clean = parse_numeric(split_text("f", _text(rows), header="required"), delimiter=",", n_fields=3)
    rows.append("x,y,z")
    diagnosed = parse_numeric(split_text("f", _text(rows), header="required"), delimiter=",", n_fields=3)
    np.testing.assert_array_equal(clean.values, diagnosed.values)
    np.testing.assert_array_equal(clean.lines, diagnosed.lines)


def test_value_rules_report_the_first_bad_column_of_each_row():
    text = split_text("f", _text(["5,0,255", "10,0,0", "1,300,-1", "2,nan,0"], header=None), header="none")
    rows = parse_numeric(text, delimiter=",", n_fields=3)
    good, rejects = check_values("f", rows, [ValueRule(slice(0, 1), "label", 0, 9, True),
                                             ValueRule(slice(1, None), "pixel", 0, 255, True)])
    assert good.tolist() == [True, False, False, False]
    assert [(r.line, r.column) for r in rejects] == [(2, 1), (3, 2), (4, 2)]


def test_auto_header_detection():
    assert split_text("f", b"x,y\n1,2\n", header="auto").header == "x,y"
    assert split_text("f", b"1,2\n3,4\n", header="auto").header is None
    assert split_text("f", b"1e-3 2.5E+01\n", header="auto").header is None
