"""Prompt sources: text, JSONL and scene-world captions, with errors that say how to fix them."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffwidget.runs.prompt_files import MAX_LINE_BYTES
from diffwidget.runs.prompts import PromptItem, PromptSourceError, load_prompts, scene_ground_truth


def test_text_file_skips_blank_and_comment_lines_and_ids_follow_line_numbers(tmp_path: Path):
    path = tmp_path / "captions.txt"
    path.write_text("# my captions\na red circle\n\n  a blue square  \n")
    items = load_prompts(path)
    assert [(i.id, i.prompt) for i in items] == [
        ("line00002", "a red circle"),
        ("line00004", "a blue square"),
    ]


def test_jsonl_keeps_ids_labels_roles_and_seed(tmp_path: Path):
    path = tmp_path / "prompts.jsonl"
    lines = [
        {
            "id": "dog-1",
            "prompt": "a dog on grass",
            "labels": {"dog": "yes"},
            "roles": {"subject": [1]},
        },
        {"prompt": "grass", "seed": 5},
    ]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    first, second = load_prompts(path)
    assert (first.id, first.labels, first.roles) == ("dog-1", {"dog": "yes"}, {"subject": [1]})
    assert (second.id, second.seed) == ("line00002", 5)
    assert second.generator_seed(3) == 8


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"id": "a", "prompt": "x"}\n{"id": "b", "prompt": ', "prompts.jsonl:2: not valid JSON"),
        ('{"id": "a", "text": "x"}', 'a "prompt" string'),
        ('{"prompt": "x", "caption": "y"}', "unknown keys ['caption']"),
        ('{"prompt": "a dog", "roles": {"subject": [5]}}', "outside 0..1"),
        ('{"id": "a", "prompt": "x"}\n{"id": "a", "prompt": "y"}', "duplicated ids ['a']"),
        ('{"id": "a b/c", "prompt": "x"}', "not file-safe"),
        ("", "holds no prompts"),
    ],
)
def test_bad_jsonl_gets_a_clear_error(tmp_path: Path, content: str, message: str):
    path = tmp_path / "prompts.jsonl"
    path.write_text(content)
    with pytest.raises(PromptSourceError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_prompts(path)


def test_missing_file_and_bad_scene_spec(tmp_path: Path):
    with pytest.raises(PromptSourceError, match="no prompt file"):
        load_prompts(tmp_path / "nope.txt")
    with pytest.raises(PromptSourceError, match="scene:N with a positive whole number"):
        load_prompts("scene:ten")


def test_scene_sources_are_disjoint_streams_with_ground_truth():
    held_out = load_prompts("scene:6")
    train = load_prompts("scene-train:6")
    assert [i.id for i in held_out][:2] == ["scene00000", "scene00001"]
    assert [i.id for i in train][:1] == ["train00000"]
    assert all(i.objects for i in held_out + train)
    # held_out_scenes alternates one- and two-object captions.
    assert [len(i.objects) for i in held_out] == [1, 2, 1, 2, 1, 2]
    one = held_out[0]
    assert set(one.labels) == {"colour", "shape", "size", "position"}
    assert held_out[1].labels == {}


def test_scene_ground_truth_by_hand():
    objects, roles = scene_ground_truth("a small red circle left of a large blue square")
    words = ["a", "small", "red", "circle", "left", "of", "a", "large", "blue", "square"]
    assert [words[o.words["colour"]] for o in objects] == ["red", "blue"]
    assert [words[o.words["shape"]] for o in objects] == ["circle", "square"]
    assert roles == {"subject": [1, 2, 3], "relation": [4, 5], "object": [7, 8, 9]}
    objects, roles = scene_ground_truth("a large green triangle at the top")
    assert (objects[0].position, roles) == ("top", {"subject": [1, 2, 3], "relation": [4, 5, 6]})
    assert scene_ground_truth("a photo of a dog") == ((), {})


def test_scene_ground_truth_of_captions_without_size_words():
    objects, roles = scene_ground_truth("a red circle left of a blue square")
    words = ["a", "red", "circle", "left", "of", "a", "blue", "square"]
    assert [words[o.words["colour"]] for o in objects] == ["red", "blue"]
    assert [words[o.words["shape"]] for o in objects] == ["circle", "square"]
    assert [o.size for o in objects] == [None, None]
    assert all("size" not in o.words for o in objects)
    assert roles == {"subject": [1, 2], "relation": [3, 4], "object": [6, 7]}
    for centre in ("in the centre", "in the middle"):
        objects, roles = scene_ground_truth(f"a green triangle {centre}")
        assert (objects[0].position, roles) == (
            "centre",
            {"subject": [1, 2], "relation": [3, 4, 5]},
        )


def test_seeds_derive_from_ids_not_from_order():
    a, b = PromptItem("x1", "p"), PromptItem("x2", "p")
    assert a.generator_seed(0) != b.generator_seed(0)
    assert a.generator_seed(0) == PromptItem("x1", "other prompt").generator_seed(0)
    assert a.generator_seed(1) == a.generator_seed(0) + 1
    assert PromptItem.from_json(a.to_json()) == a


# ----------------------------------------------------------- files as people save them
#: Characters str.splitlines() breaks on besides \n and \r: inside a caption they stay.
NOT_LINE_BREAKS = "\u2028\u2029\x85\x0b\x0c\x1c\x1d\x1e"
caption_text = st.text(
    alphabet=st.one_of(
        st.characters(codec="utf-8", exclude_characters="\n\r\x00"),
        st.sampled_from(NOT_LINE_BREAKS + "\ufeff"),
    ),
    min_size=1,
    max_size=40,
).filter(lambda c: c.strip() and not c.strip().startswith("#"))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(captions=st.lists(caption_text, min_size=1, max_size=8), crlf=st.booleans())
def test_jsonl_as_json_dumps_writes_it_round_trips(tmp_path_factory, captions, crlf):
    path = tmp_path_factory.mktemp("p") / "prompts.jsonl"
    end = "\r\n" if crlf else "\n"
    lines = [
        json.dumps({"id": f"c{k}", "prompt": c}, ensure_ascii=False) for k, c in enumerate(captions)
    ]
    path.write_text(end.join(lines) + end, encoding="utf-8", newline="")
    items = load_prompts(path)
    assert [(i.id, i.prompt) for i in items] == [
        (f"c{k}", c.strip()) for k, c in enumerate(captions)
    ]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    captions=st.lists(caption_text, min_size=1, max_size=8),
    crlf=st.booleans(),
    bom=st.booleans(),
)
def test_text_files_split_on_newlines_only(tmp_path_factory, captions, crlf, bom):
    path = tmp_path_factory.mktemp("p") / "captions.txt"
    end = "\r\n" if crlf else "\n"
    text = ("\ufeff" if bom else "") + end.join(captions) + end
    path.write_bytes(text.encode("utf-8"))
    items = load_prompts(path)
    assert [(i.id, i.prompt) for i in items] == [
        (f"line{k + 1:05d}", c.strip()) for k, c in enumerate(captions)
    ]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
line_objects = st.fixed_dictionaries(
    {"prompt": st.one_of(st.just("a small red circle at the top"), json_values)},
    optional={
        "id": st.one_of(
            st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,8}", fullmatch=True), json_values
        ),
        "labels": json_values,
        "roles": st.one_of(st.just({"subject": [1, 2]}), json_values),
        "seed": json_values,
        "extra": json_values,
    },
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lines=st.lists(line_objects, min_size=1, max_size=4))
def test_any_jsonl_line_loads_or_is_refused_with_its_line_number(tmp_path_factory, lines):
    path = tmp_path_factory.mktemp("p") / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines), encoding="utf-8")
    try:
        items = load_prompts(path)
    except PromptSourceError as error:
        refusal = str(error)
    else:
        refusal = ""
    if refusal:
        assert refusal.startswith(str(path))
        return
    for item, line in zip(items, lines, strict=True):
        assert item.prompt == line["prompt"].strip()
        assert item.seed is None or (type(item.seed) is int and item.seed >= 0)
        assert all(type(k) is str and type(v) is str for k, v in item.labels.items())
        assert all(type(i) is int for words in item.roles.values() for i in words)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(content=st.binary(max_size=200), suffix=st.sampled_from([".jsonl", ".txt"]))
def test_any_bytes_load_or_are_refused_clearly(tmp_path_factory, content, suffix):
    path = tmp_path_factory.mktemp("p") / f"prompts{suffix}"
    path.write_bytes(content)
    try:
        items = load_prompts(path)
    except PromptSourceError:
        return
    assert items
    assert all(i.prompt and "\n" not in i.prompt for i in items)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"id": null, "prompt": "x"}', ":1: the id must be a string, got null"),
        ('{"prompt": "x", "seed": true}', ':1: "seed" must be a whole number, got true'),
        ('{"prompt": "x", "seed": 1.5}', ':1: "seed" must be a whole number, got a number'),
        (
            '{"prompt": "x", "labels": {"colour": ["red"]}}',
            "label 'colour' must be a string, got a list",
        ),
        ('{"prompt": "x", "labels": ["red"]}', '"labels" must be an object'),
        ('{"prompt": "a dog", "roles": {"subject": [true]}}', "must be a whole number, got true"),
        ('{"prompt": 7}', "the prompt must be a string, got a number"),
        ('{"prompt": "x", "prompt": "y"}', "the key 'prompt' is given twice"),
        ('{"prompt": "x", "seed": NaN}', "NaN is not JSON"),
        ('{"prompt": "x", "id": "a\\n"}', "not file-safe"),
        ('{"prompt": "x", "id": "con.1"}', "Windows reserves"),
        ('{"prompt": "\\ud800"}', "unpaired surrogate"),
        ('{"prompt": "a\\u0000b"}', "NUL character"),
        ("[" * 5000 + "]" * 5000, "nested too deeply"),
        ('{"prompt": "x", "seed": ' + "9" * 5000 + "}", "not valid JSON"),
    ],
)
def test_jsonl_fields_of_the_wrong_type_are_refused_with_the_line(
    tmp_path: Path, line: str, message: str
):
    path = tmp_path / "prompts.jsonl"
    path.write_text(line)
    with pytest.raises(PromptSourceError) as error:
        load_prompts(path)
    assert message in str(error.value)
    assert str(error.value).startswith(f"{path}:1:")


def test_ids_differing_only_in_case_collide(tmp_path: Path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"id": "Dog", "prompt": "x"}\n\n{"id": "dog", "prompt": "y"}\n')
    with pytest.raises(
        PromptSourceError,
        match=r"prompts.jsonl:3: duplicated ids \['Dog', 'dog'\] \(the same up to case\), "
        r"first at .*prompts.jsonl:1",
    ):
        load_prompts(path)


def test_a_byte_order_mark_keeps_the_first_captions_ground_truth(tmp_path: Path):
    path = tmp_path / "captions.txt"
    path.write_bytes("\ufeffa small red square at the top\n".encode())
    (item,) = load_prompts(path)
    assert item.prompt == "a small red square at the top"
    assert [o.colour for o in item.objects] == ["red"]
    path.write_bytes("a red circle\n".encode("utf-16"))
    with pytest.raises(PromptSourceError, match="UTF-16; save it as UTF-8"):
        load_prompts(path)


def test_line_separators_stay_inside_a_caption_and_ids_keep_their_line(tmp_path: Path):
    path = tmp_path / "captions.txt"
    path.write_bytes("a red\u2028circle\nsecond\x85caption\r\nthird\x0cone\n".encode())
    items = load_prompts(path)
    assert [(i.id, i.prompt) for i in items] == [
        ("line00001", "a red\u2028circle"),
        ("line00002", "second\x85caption"),
        ("line00003", "third\x0cone"),
    ]


def test_a_long_line_is_refused_before_it_is_read(tmp_path: Path):
    path = tmp_path / "prompts.jsonl"
    ok = json.dumps({"prompt": "a red circle"})
    path.write_text(ok + "\n" + json.dumps({"prompt": "a red circle " * 800_000}) + "\n")
    assert path.stat().st_size > 10_000_000
    tracemalloc.start()
    try:
        with pytest.raises(
            PromptSourceError,
            match=rf"prompts.jsonl:2: the line is longer than {MAX_LINE_BYTES} bytes",
        ):
            load_prompts(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * MAX_LINE_BYTES + 1_000_000


def test_loading_memory_is_a_small_multiple_of_the_file(tmp_path: Path):
    path = tmp_path / "prompts.jsonl"
    lines = (
        json.dumps(
            {
                "id": f"p{k}",
                "prompt": f"a small red circle at the top {k}",
                "labels": {"colour": "red"},
            }
        )
        for k in range(5000)
    )
    path.write_text("\n".join(lines) + "\n")
    load_prompts("scene:1")  # the scene grammar's modules, imported once
    tracemalloc.start()
    try:
        items = load_prompts(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(items) == 5000
    assert peak < 15 * path.stat().st_size, peak / path.stat().st_size


def test_a_list_of_captions_must_hold_strings():
    with pytest.raises(
        PromptSourceError, match=r"prompts\[1\]: the prompt must be a string, got a number"
    ):
        load_prompts(["a red circle", 3])
    with pytest.raises(PromptSourceError, match=r"a \.json file is not a prompt source"):
        load_prompts(Path(__file__).parents[1] / "widget" / "snapshots" / "explorer_state.json")
