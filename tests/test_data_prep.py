"""Math data preparation: raw files in the documented formats -> verl RL parquet, and clear errors otherwise."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from opd.data import prepare_grpo_data as grpo_cli
from opd.data import process_eval_data as eval_cli
from opd.data.checks import InputError
from opd.data.math_sources import (
    AIME24_FILE,
    AIME25_FILE,
    BOXED_INSTRUCTION,
    DAPO_FILE,
    DAPO_PREFIX,
    DAPO_SUFFIX,
    MATH500_FILE,
    RL_SCHEMA,
)
from opd.data.prepare_grpo_data import prepare_grpo_data
from opd.data.process_eval_data import process_eval_data

N_DAPO = 10
DAPO_ANSWERS = [str(100 + i) for i in range(N_DAPO)]
AIME24 = {
    "ID": ["2024-I-1", "2024-I-2", "2024-I-3", "2024-II-4"],
    "Problem": ["Half of one?", "The set?", "Boxed by fbox?", "Spaced box?"],
    "Solution": [
        "So it is \\boxed{\\frac{1}{2}}.",
        "First \\boxed{0}, finally \\boxed{\\{1,2\\}}",
        "\\fbox{7}",
        "Hence \\boxed 5$.",
    ],
}
AIME24_TRUTHS = ["\\frac{1}{2}", "\\{1,2\\}", "7", "5"]
AIME25 = [
    {"problem": "AIME 2025 problem one", "answer": 70},
    {"problem": "AIME 2025 problem two", "answer": 588},
]
MATH500 = [
    {"problem": "What is 1+1?", "answer": "2", "subject": "Algebra"},
    {"problem": "Simplify 2/4.", "answer": "\\frac{1}{2}"},
    {"problem": "Largest prime below 10?", "answer": 7},
]
OUTPUTS = [
    "train.parquet",
    "val_dapo.parquet",
    "val_math500.parquet",
    "val_aime24.parquet",
    "val_aime25.parquet",
]
EVAL_OUTPUTS = ["val_math500.parquet", "val_aime24.parquet", "val_aime25.parquet"]


def dapo_question(i: int) -> str:
    return f"DAPO question {i}: compute {i} + 100."


def write_jsonl(path, records, blank_lines: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r) for r in records]
    path.write_text(("\n\n" if blank_lines else "\n").join(lines) + "\n")


def write_raw(data_dir, dapo_prompt_as_string: bool = False):
    """All four raw files in the documented formats."""
    dapo = data_dir / DAPO_FILE
    dapo.parent.mkdir(parents=True)
    contents = [DAPO_PREFIX + dapo_question(i) + DAPO_SUFFIX for i in range(N_DAPO)]
    pd.DataFrame(
        {
            "data_source": ["math_dapo"] * N_DAPO,
            "prompt": contents
            if dapo_prompt_as_string
            else [[{"role": "user", "content": c}] for c in contents],
            "reward_model": [{"style": "rule", "ground_truth": a} for a in DAPO_ANSWERS],
        }
    ).to_parquet(dapo)
    (data_dir / AIME24_FILE).parent.mkdir(parents=True)
    pd.DataFrame(AIME24).to_parquet(data_dir / AIME24_FILE)
    write_jsonl(data_dir / AIME25_FILE, AIME25)
    write_jsonl(data_dir / MATH500_FILE, MATH500)
    return data_dir


@pytest.fixture
def raw(tmp_path):
    return write_raw(tmp_path / "raw")


def rows(path) -> list[dict]:
    return pd.read_parquet(path).to_dict("records")


def content(row) -> str:
    return row["prompt"][0]["content"]


def test_schema_and_counts(raw, tmp_path):
    out = tmp_path / "out"
    counts = prepare_grpo_data(raw, out, train_ratio=0.8, seed=42)
    assert counts == {
        "train.parquet": 8,
        "val_dapo.parquet": 2,
        "val_math500.parquet": 3,
        "val_aime24.parquet": 4,
        "val_aime25.parquet": 2,
    }
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUTS)  # no temporary files left
    for name in OUTPUTS:
        schema = pq.read_schema(out / name)
        assert schema.names == ["data_source", "prompt", "ability", "reward_model", "extra_info"]
        assert schema.remove_metadata().equals(RL_SCHEMA)
        assert pa.types.is_list(schema.field("prompt").type)
    row = rows(out / "val_math500.parquet")[0]
    assert [dict(m) for m in row["prompt"]] == [{"role": "user", "content": content(row)}]
    assert row["reward_model"] == {"style": "rule", "ground_truth": "2"}
    assert row["extra_info"] == {"index": 0, "split": "test"}
    assert row["ability"] == "math"
    sources = {name: {r["data_source"] for r in rows(out / name)} for name in OUTPUTS}
    assert sources == {
        "train.parquet": {"math_dapo"},
        "val_dapo.parquet": {"math_dapo"},
        "val_math500.parquet": {"math"},
        "val_aime24.parquet": {"aime24"},
        "val_aime25.parquet": {"aime25"},
    }
    assert {r["extra_info"]["split"] for r in rows(out / "train.parquet")} == {"train"}
    assert {r["extra_info"]["split"] for r in rows(out / "val_dapo.parquet")} == {"val"}


def test_split_is_deterministic_and_partitions_dapo(raw, tmp_path):
    a, b, c = (
        prepare_grpo_data(raw, tmp_path / name, seed=seed) for name, seed in [("a", 1), ("b", 1), ("c", 2)]
    )
    assert a == b == c
    for name in OUTPUTS:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()

    def indices(folder, name):
        return [r["extra_info"]["index"] for r in rows(tmp_path / folder / name)]

    train, val = indices("a", "train.parquet"), indices("a", "val_dapo.parquet")
    assert sorted(train + val) == list(range(N_DAPO)) and not set(train) & set(val)
    assert (train, val) != (indices("c", "train.parquet"), indices("c", "val_dapo.parquet"))
    by_index = {r["extra_info"]["index"]: r for r in rows(tmp_path / "a" / "train.parquet")}
    for index, row in by_index.items():  # the ground truth travels with its question
        assert row["reward_model"]["ground_truth"] == DAPO_ANSWERS[index]
        assert dapo_question(index) in content(row)


@pytest.mark.parametrize("as_string", [False, True])
def test_dapo_instruction_is_stripped(tmp_path, as_string):
    raw = write_raw(tmp_path / "raw", dapo_prompt_as_string=as_string)
    prepare_grpo_data(raw, tmp_path / "out", variant="none")
    for row in rows(tmp_path / "out" / "train.parquet") + rows(tmp_path / "out" / "val_dapo.parquet"):
        assert content(row) == dapo_question(row["extra_info"]["index"])


@pytest.mark.parametrize(
    "variant, expected",
    [
        ("boxed", "What is 1+1?\n\n" + BOXED_INSTRUCTION),
        ("dapo", DAPO_PREFIX + "What is 1+1?" + DAPO_SUFFIX),
        ("none", "What is 1+1?"),
    ],
)
def test_variant_prompt_text(raw, tmp_path, variant, expected):
    prepare_grpo_data(raw, tmp_path / "out", variant=variant)
    assert content(rows(tmp_path / "out" / "val_math500.parquet")[0]) == expected
    train = rows(tmp_path / "out" / "train.parquet")[0]
    question = dapo_question(train["extra_info"]["index"])
    assert content(train) == expected.replace("What is 1+1?", question)


def test_boxed_is_the_default_and_text_is_exact():
    assert BOXED_INSTRUCTION == "Let's think step by step and output the final answer within \\boxed{}."
    assert DAPO_PREFIX.startswith("Solve the following math problem step by step.") and DAPO_PREFIX.endswith(
        "\n\n"
    )
    assert DAPO_SUFFIX == '\n\nRemember to put your answer on its own line after "Answer:".'


def test_ground_truths_nested_braces_case_insensitive_columns_and_int_answers(raw, tmp_path):
    process_eval_data(raw, tmp_path / "out", "none")
    aime24 = rows(tmp_path / "out" / "val_aime24.parquet")
    assert [r["reward_model"]["ground_truth"] for r in aime24] == AIME24_TRUTHS
    assert [content(r) for r in aime24] == AIME24["Problem"]
    truths = {
        name: [r["reward_model"]["ground_truth"] for r in rows(tmp_path / "out" / name)]
        for name in ("val_aime25.parquet", "val_math500.parquet")
    }
    assert truths == {"val_aime25.parquet": ["70", "588"], "val_math500.parquet": ["2", "\\frac{1}{2}", "7"]}
    # jsonl indices count records, blank lines skipped
    assert [r["extra_info"]["index"] for r in rows(tmp_path / "out" / "val_math500.parquet")] == [0, 1, 2]


def test_aime_answer_column_wins_over_solution(raw, tmp_path):
    frame = pd.DataFrame(AIME24).assign(Answer=[1, 2, 3, 4])
    frame.to_parquet(raw / AIME24_FILE)
    process_eval_data(raw, tmp_path / "out", "boxed")
    assert [r["reward_model"]["ground_truth"] for r in rows(tmp_path / "out" / "val_aime24.parquet")] == [
        "1",
        "2",
        "3",
        "4",
    ]


def test_dapo_answer_fallbacks(raw, tmp_path):
    frame = pd.read_parquet(raw / DAPO_FILE).drop(columns=["reward_model"])
    frame.assign(solution=[f"so \\boxed{{\\frac{{{i}}}{{2}}}}" for i in range(N_DAPO)]).to_parquet(
        raw / DAPO_FILE
    )
    prepare_grpo_data(raw, tmp_path / "a", train_ratio=0.5)
    truths = {
        r["extra_info"]["index"]: r["reward_model"]["ground_truth"]
        for r in rows(tmp_path / "a" / "train.parquet")
    }
    assert all(truth == f"\\frac{{{i}}}{{2}}" for i, truth in truths.items())
    frame.assign(answer=list(range(N_DAPO))).to_parquet(raw / DAPO_FILE)
    prepare_grpo_data(raw, tmp_path / "b", train_ratio=0.5)
    assert all(
        r["reward_model"]["ground_truth"] == str(r["extra_info"]["index"])
        for r in rows(tmp_path / "b" / "train.parquet")
    )


def test_eval_all_variants(raw, tmp_path):
    counts = process_eval_data(raw, None, "all")
    assert len(counts) == 9 and counts["dapo/val_aime24.parquet"] == 4
    for variant in ("boxed", "dapo", "none"):
        folder = raw / "eval_processed" / variant
        assert sorted(p.name for p in folder.iterdir()) == sorted(EVAL_OUTPUTS)
    none = content(rows(raw / "eval_processed" / "none" / "val_aime25.parquet")[0])
    assert none == "AIME 2025 problem one"
    assert process_eval_data(raw, tmp_path / "x", "all").keys() == counts.keys()
    assert (tmp_path / "x" / "boxed" / "val_math500.parquet").is_file()


def test_cli_defaults_aliases_and_output(raw, monkeypatch, capsys):
    monkeypatch.setenv("DATA_DIR", str(raw))
    assert grpo_cli.main(["--train_ratio", "0.5", "--instruction_variant", "dapo"]) == 0
    printed = capsys.readouterr().out
    assert str(raw / "grpo_processed") in printed and "5 rows  train.parquet" in printed
    assert sorted(p.name for p in (raw / "grpo_processed").iterdir()) == sorted(OUTPUTS)
    assert eval_cli.main(["--data_dir", str(raw)]) == 0
    assert "4 rows  val_aime24.parquet" in capsys.readouterr().out
    assert sorted(p.name for p in (raw / "eval_processed" / "boxed").iterdir()) == sorted(EVAL_OUTPUTS)


def test_cli_module_exit_code_and_message(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "opd.data.prepare_grpo_data", "--data-dir", str(tmp_path / "nowhere")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: missing raw data file(s)") and "Traceback" not in result.stderr
    assert str(tmp_path / "nowhere" / DAPO_FILE) in result.stderr and "DATA_DIR" in result.stderr


@pytest.mark.parametrize("main", [grpo_cli.main, eval_cli.main])
def test_cli_exit_code_on_bad_input(raw, capsys, main):
    (raw / MATH500_FILE).write_text('{"problem": "x", "answer": "1"}\n{not json}\n')
    with pytest.raises(SystemExit) as exit_info:
        main(["--data-dir", str(raw)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(raw / MATH500_FILE) in err and "line 2" in err
    with pytest.raises(SystemExit) as exit_info:
        main(["--data-dir", str(raw), "--instruction-variant", "fancy"])
    assert exit_info.value.code == 2 and "'fancy'" in capsys.readouterr().err


def _missing(raw):
    (raw / AIME25_FILE).unlink()
    return AIME25_FILE, None, ["expected raw layout", str(raw / DAPO_FILE), "DATA_DIR", "--data-dir"]


def _corrupt(raw):
    (raw / AIME24_FILE).write_text("Problem,Solution\nx,y\n")
    return AIME24_FILE, None, ["not a readable parquet", "re-export"]


def _bad_json(raw):
    (raw / AIME25_FILE).write_text('{"problem": "a", "answer": 1}\n\n{"problem": "b", answer: 2}\n')
    return AIME25_FILE, "line 3", ["not valid JSON", "one JSON object"]


def _not_an_object(raw):
    (raw / MATH500_FILE).write_text('["problem", "answer"]\n')
    return MATH500_FILE, "line 1", ["not a JSON object", '{"problem"']


def _missing_column(raw):
    pd.DataFrame({"ID": [1], "Question": ["q"], "Solution": ["\\boxed{1}"]}).to_parquet(raw / AIME24_FILE)
    return AIME24_FILE, None, ["`problem`", "found ['ID', 'Question', 'Solution']", "Re-export"]


def _missing_dapo_answer_columns(raw):
    pd.read_parquet(raw / DAPO_FILE).drop(columns=["reward_model"]).to_parquet(raw / DAPO_FILE)
    return DAPO_FILE, None, ["`reward_model`", "`answer`", "`solution`", "found ['data_source', 'prompt']"]


def _missing_field(raw):
    write_jsonl(
        raw / MATH500_FILE, [{"problem": "a", "answer": "1"}, {"question": "b", "answer": "2"}], False
    )
    return MATH500_FILE, "line 2", ["`problem`", "found ['answer', 'question']", "Write each line"]


def _empty_parquet(raw):
    pd.DataFrame({"Problem": pd.Series([], dtype=str), "Solution": pd.Series([], dtype=str)}).to_parquet(
        raw / AIME24_FILE
    )
    return AIME24_FILE, None, ["has no rows", "re-export"]


def _empty_jsonl(raw):
    (raw / AIME25_FILE).write_text("\n\n")
    return AIME25_FILE, None, ["has no rows", "re-export"]


def _null_ground_truth(raw):
    frame = pd.read_parquet(raw / DAPO_FILE)
    frame["reward_model"] = [
        {"style": "rule", "ground_truth": a if i != 3 else ""} for i, a in enumerate(DAPO_ANSWERS)
    ]
    frame.to_parquet(raw / DAPO_FILE)
    return DAPO_FILE, "row 3", ["no answer", "fill in the answer or drop the row"]


def _null_jsonl_answer(raw):
    write_jsonl(raw / AIME25_FILE, [{"problem": "a", "answer": 1}, {"problem": "b", "answer": None}], False)
    return AIME25_FILE, "line 2", ["no answer", "fill in the answer or drop the row"]


def _aime_without_boxed(raw):
    frame = pd.DataFrame(AIME24)
    frame.loc[2, "Solution"] = "the answer is 7"
    frame.to_parquet(raw / AIME24_FILE)
    return AIME24_FILE, "row 2", ["no answer", "\\boxed{}", "fill in the answer or drop the row"]


def _empty_problem(raw):
    write_jsonl(
        raw / MATH500_FILE, [{"problem": "a", "answer": "1"}, {"problem": "  ", "answer": "2"}], False
    )
    return MATH500_FILE, "line 2", ["empty or missing problem", "fill in the problem text or drop the row"]


def _empty_dapo_prompt(raw):
    frame = pd.read_parquet(raw / DAPO_FILE)
    frame.loc[4, "prompt"] = [{"role": "user", "content": DAPO_PREFIX + DAPO_SUFFIX}]
    frame.to_parquet(raw / DAPO_FILE)
    return DAPO_FILE, "row 4", ["empty or missing prompt", "fill in the problem text or drop the row"]


def _dapo_prompt_without_user_message(raw):
    frame = pd.read_parquet(raw / DAPO_FILE)
    frame.loc[1, "prompt"] = [{"role": "system", "content": "be brief"}]
    frame.to_parquet(raw / DAPO_FILE)
    return DAPO_FILE, "row 1", ["empty or missing prompt", "fill in the problem text"]


BAD_INPUTS = [
    _missing,
    _corrupt,
    _bad_json,
    _not_an_object,
    _missing_column,
    _missing_dapo_answer_columns,
    _missing_field,
    _empty_parquet,
    _empty_jsonl,
    _null_ground_truth,
    _null_jsonl_answer,
    _aime_without_boxed,
    _empty_problem,
    _empty_dapo_prompt,
    _dapo_prompt_without_user_message,
]


@pytest.mark.parametrize("break_input", BAD_INPUTS, ids=lambda f: f.__name__.strip("_"))
def test_bad_input_is_named_with_its_fix_and_writes_nothing(raw, tmp_path, break_input):
    bad_file, where, must_contain = break_input(raw)
    out = tmp_path / "out"
    with pytest.raises(InputError) as error:
        prepare_grpo_data(raw, out)
    message = str(error.value)
    assert str(raw / bad_file) in message
    if where is not None:
        assert f"{raw / bad_file} {where}" in message
    for text in must_contain:
        assert text in message, message
    assert not out.exists()
    if bad_file != DAPO_FILE:  # the evaluation CLI reads the same files with the same checks
        with pytest.raises(InputError) as eval_error:
            process_eval_data(raw, out, "all")
        assert str(eval_error.value) == message
        assert not out.exists()


@pytest.mark.parametrize(
    "kwargs, must_contain",
    [
        ({"variant": "fancy"}, ["'fancy'", "--instruction-variant", "boxed, dapo, none"]),
        ({"train_ratio": 1.0}, ["--train-ratio", "between 0 and 1"]),
        ({"train_ratio": 0.05}, [DAPO_FILE, "10 rows", "train split empty", "choose a ratio"]),
        ({"train_ratio": 0.0}, ["--train-ratio", "between 0 and 1"]),
    ],
)
def test_bad_settings(raw, tmp_path, kwargs, must_contain):
    with pytest.raises(InputError) as error:
        prepare_grpo_data(raw, tmp_path / "out", **kwargs)
    for text in must_contain:
        assert text in str(error.value)
    assert not (tmp_path / "out").exists()


def test_failed_run_keeps_previous_outputs(raw, tmp_path):
    out = tmp_path / "out"
    prepare_grpo_data(raw, out)
    before = {name: (out / name).read_bytes() for name in OUTPUTS}
    (raw / MATH500_FILE).write_text("{broken\n")
    with pytest.raises(InputError):
        prepare_grpo_data(raw, out, seed=7)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
