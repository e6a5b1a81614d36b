"""Prompt sources: text, JSONL and scene-world captions, with errors that say how to fix them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

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
