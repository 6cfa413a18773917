"""User task files (CSV, JSONL, Parquet, pairs, separate eval), their one-line errors, and per-batch padding.

Built-in tasks download a wheel from the package index: they are not unit tests and are not run here.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from orchestrator.config import DataConfig
from orchestrator.data import Split, TaskData, _random_split, accuracy_and_macro_f1, load_task, make_loader, task_summary
from orchestrator.errors import UserError
from orchestrator.models import load_tokenizer


def write_csv(path, rows, header=("text", "label")):
    pd.DataFrame(rows, columns=list(header)).to_csv(path, index=False)
    return path


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def cfg(task, **kwargs) -> DataConfig:
    return DataConfig(task=str(task), **({"train_size": None, "eval_size": None} | kwargs))


def labelled(sentences, n=40, names=("neg", "pos")):
    texts, labels = sentences
    return [(texts[i], names[labels[i]]) for i in range(n)]


def test_csv_with_string_labels(tmp_path, sentences):
    path = write_csv(tmp_path / "reviews.csv", labelled(sentences))
    task = load_task(cfg(path))
    assert task.name == "reviews"
    assert task.label_names == ["neg", "pos"]  # sorted
    assert task.num_labels == 2
    assert (len(task.train), len(task.eval)) == (32, 8)  # eval_fraction 0.2 of 40
    texts, labels = sentences
    expected = dict(zip(texts[:40], labels[:40]))
    for part in (task.train, task.eval):
        assert part.texts_b is None
        assert [expected[t] for t in part.texts] == part.labels  # 'pos' -> 1, 'neg' -> 0
    assert set(task.train.texts).isdisjoint(task.eval.texts)
    assert sorted(task.train.texts + task.eval.texts) == sorted(texts[:40])


def test_split_is_deterministic_and_seeded(tmp_path, sentences):
    path = write_csv(tmp_path / "reviews.csv", labelled(sentences))
    first, again = load_task(cfg(path)), load_task(cfg(path))
    assert first.eval.texts == again.eval.texts and first.train.labels == again.train.labels
    other = load_task(cfg(path, split_seed=1))
    assert other.eval.texts != first.eval.texts


def test_caps_sample_train_and_eval(tmp_path, sentences):
    path = write_csv(tmp_path / "reviews.csv", labelled(sentences))
    task = load_task(cfg(path, train_size=10, eval_size=8, eval_fraction=0.5))
    assert (len(task.train), len(task.eval)) == (10, 8)


def test_validation_is_held_out_of_the_training_split_and_the_eval_split_is_unchanged(tmp_path, sentences):
    path = write_csv(tmp_path / "reviews.csv", labelled(sentences))
    plain, held = load_task(cfg(path)), load_task(cfg(path, validation_size=8))
    assert plain.validation is None and (len(held.train), len(held.validation)) == (24, 8)
    assert held.eval.texts == plain.eval.texts  # what the report measures on does not move
    assert set(held.validation.texts).isdisjoint(held.train.texts)
    assert sorted(held.train.texts + held.validation.texts) == sorted(plain.train.texts)
    assert load_task(cfg(path, validation_size=8)).validation.texts == held.validation.texts  # seeded
    order = np.random.default_rng(0).permutation(32)  # without repeated texts: the row-by-row draw of before
    assert held.validation.texts == plain.train.subset(np.sort(order[:8])).texts
    assert task_summary(held)["validation_examples"] == 8 and "validation_examples" not in task_summary(plain)


def test_validation_holds_out_every_copy_of_its_texts(tmp_path, sentences):
    """With data.eval_path the task file is read as it is, repeats too: a copy of a validation row may not train."""
    rows = labelled(sentences)
    evaluation = write_csv(tmp_path / "eval.csv", rows[:8])
    task = load_task(cfg(write_csv(tmp_path / "twice.csv", rows + rows[:20]), eval_path=str(evaluation),
                         validation_size=12))
    assert not set(task.validation.texts) & set(task.train.texts)
    assert 12 <= len(task.validation) <= 13 and len(task.train) + len(task.validation) == 60  # ≤ one extra copy


def test_a_validation_split_that_leaves_too_little_training_is_refused(tmp_path, sentences):
    path = write_csv(tmp_path / "reviews.csv", labelled(sentences))
    with pytest.raises(UserError, match=r"^data.validation_size: 28 leaves 4 of 32 training examples; hold out fewer"):
        load_task(cfg(path, validation_size=28))
    with pytest.raises(UserError, match="^data.validation_size"):
        DataConfig(validation_size=4)


def test_jsonl(tmp_path, sentences):
    rows = [{"text": t, "label": lab} for t, lab in zip(*sentences)]
    task = load_task(cfg(write_jsonl(tmp_path / "data.jsonl", rows)))
    assert task.label_names == ["0", "1"]  # integer labels 0..K-1
    assert len(task.train) + len(task.eval) == 64
    lookup = dict(zip(*sentences))
    assert all(lookup[t] == lab for t, lab in zip(task.train.texts, task.train.labels))


def test_parquet(tmp_path, sentences):
    path = tmp_path / "data.parquet"
    pd.DataFrame({"text": sentences[0], "label": ["yes" if x else "no" for x in sentences[1]]}).to_parquet(path)
    task = load_task(cfg(path))
    assert task.label_names == ["no", "yes"]
    assert len(task.train) == 51 and len(task.eval) == 13  # round(64 × 0.2) = 13


def test_integer_labels_with_a_gap(tmp_path, sentences):
    texts, labels = sentences
    rows = [(t, 2 * lab) for t, lab in zip(texts, labels)]  # labels 0 and 2
    task = load_task(cfg(write_csv(tmp_path / "gap.csv", rows)))
    assert task.label_names == ["0", "1", "2"]
    assert set(task.train.labels) == {0, 2}
    huge = [(t, lab * 10**9) for t, lab in zip(texts, labels)]  # before: 10⁹ label names, then out of memory
    with pytest.raises(UserError, match=r"has integer label 1000000000 but only \d+ labelled rows; .*renumber"):
        load_task(cfg(write_csv(tmp_path / "huge.csv", huge)))


def test_an_eval_file_for_a_builtin_task_is_refused(tmp_path):
    with pytest.raises(UserError, match="^data.eval_path: the built-in task rotten_tomatoes has its own eval split"):
        load_task(DataConfig(task="rotten_tomatoes", eval_path=str(tmp_path / "missing.csv")))


def test_pair_columns(tmp_path, sentences):
    texts, labels = sentences
    rows = [(t, "and so it was", lab) for t, lab in zip(texts, labels)]
    path = write_csv(tmp_path / "pairs.csv", rows, header=("text_a", "text_b", "label"))
    task = load_task(cfg(path))
    assert task.train.texts_b is not None and task.eval.texts_b is not None
    assert len(task.train.texts_b) == len(task.train) and set(task.train.texts_b) == {"and so it was"}
    assert set(task.train.texts) <= set(texts)


def test_separate_eval_path(tmp_path, sentences):
    train = write_csv(tmp_path / "train.csv", labelled(sentences, 48))
    texts, labels = sentences
    evaluation = write_csv(tmp_path / "eval.csv", [(texts[i], ["neg", "pos"][labels[i]]) for i in range(48, 64)])
    task = load_task(cfg(train, eval_path=str(evaluation)))
    assert task.name == "train"
    assert (len(task.train), len(task.eval)) == (48, 16)
    assert task.train.texts == texts[:48]  # file order kept, no split
    assert task.eval.texts == texts[48:] and task.eval.labels == labels[48:]


def test_eval_file_with_only_one_of_the_labels_is_fine(tmp_path, sentences):
    train = write_csv(tmp_path / "train.csv", labelled(sentences, 40))
    evaluation = write_csv(tmp_path / "eval.csv", [("the movie was good!", "pos")] * 3)
    task = load_task(cfg(train, eval_path=str(evaluation)))
    assert task.eval.labels == [1, 1, 1]
    assert task.majority_rate() == 0.0  # train has 20 neg / 20 pos: argmax picks label 0


def test_majority_rate_and_summary():
    task = TaskData("t", ["a", "b"], Split(["x"] * 5, [1, 1, 1, 0, 0]), Split(["y"] * 4, [1, 0, 1, 1]))
    assert task.majority_rate() == 0.75
    assert task_summary(task) == {"task": "t", "labels": ["a", "b"], "train_examples": 5, "eval_examples": 4,
                                  "majority_rate": 0.75}
    # exact, not rounded: a model stuck on the majority class scores exactly this, and `report` must not see it beat it
    third = TaskData("t", ["a", "b"], Split(["x"] * 3, [1, 1, 0]), Split(["y"] * 3, [1, 0, 0]))
    assert task_summary(third)["majority_rate"] == 1 / 3


def test_split_subset_and_random_split():
    whole = Split([f"t{i}" for i in range(10)], [i % 2 for i in range(10)], [f"b{i}" for i in range(10)])
    sub = whole.subset([3, 1])
    assert (sub.texts, sub.labels, sub.texts_b) == (["t3", "t1"], [1, 1], ["b3", "b1"])
    train, evaluation = _random_split(whole, DataConfig(task="x", eval_fraction=0.3, split_seed=5))
    assert (len(train), len(evaluation)) == (7, 3)
    assert sorted(train.texts + evaluation.texts) == sorted(whole.texts)
    assert [t.replace("t", "b") for t in evaluation.texts] == evaluation.texts_b


# ---------------------------------------------------------------- errors


def expect_error(config: DataConfig, *fragments: str) -> str:
    with pytest.raises(UserError) as err:
        load_task(config)
    message = str(err.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_missing_columns(tmp_path, sentences):
    path = write_csv(tmp_path / "bad.csv", labelled(sentences), header=("sentence", "label"))
    expect_error(cfg(path), "lacks column(s) ['text_a', 'text_b']")
    path = write_csv(tmp_path / "nolabel.csv", labelled(sentences), header=("text", "target"))
    expect_error(cfg(path), "lacks column(s) ['label']")


def test_empty_files(tmp_path):
    (tmp_path / "empty.csv").write_text("")
    expect_error(cfg(tmp_path / "empty.csv"), "could not be parsed")
    (tmp_path / "header.csv").write_text("text,label\n")
    expect_error(cfg(tmp_path / "header.csv"), "has no rows with text and label")
    (tmp_path / "empty.jsonl").write_text("")
    expect_error(cfg(tmp_path / "empty.jsonl"), "empty.jsonl' lacks column(s)")  # an empty frame has no columns


def test_rows_without_text_or_label_are_dropped(tmp_path):
    (tmp_path / "holes.csv").write_text("text,label\ngood movie,pos\n,neg\nbad movie,\ndull plot,neg\nfun,pos\n",
                                        encoding="utf-8")
    (tmp_path / "eval.csv").write_text("text,label\nnice,pos\n", encoding="utf-8")
    task = load_task(cfg(tmp_path / "holes.csv", eval_path=str(tmp_path / "eval.csv")))
    assert (task.train.texts, task.train.labels) == (["good movie", "dull plot", "fun"], [1, 0, 1])
    (tmp_path / "tiny.csv").write_text("text,label\ngood movie,pos\n,neg\nbad movie,\n", encoding="utf-8")
    expect_error(cfg(tmp_path / "tiny.csv"), "leaves an empty train or eval split")


def test_one_class(tmp_path, sentences):
    path = write_csv(tmp_path / "one.csv", [(t, "pos") for t in sentences[0]])
    expect_error(cfg(path), "single class in its training split", "≥ 2 labels")


def test_non_utf8_csv(tmp_path):
    path = tmp_path / "latin.csv"
    path.write_bytes("text,label\ncaf\xe9 cr\xe8me br\xfbl\xe9e,pos\nna\xefve plot,neg\n".encode("latin-1"))
    expect_error(cfg(path), "is not UTF-8 text; re-encode it as UTF-8")


def test_non_utf8_jsonl(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes('{"text": "caf\xe9", "label": 1}\n{"text": "bad", "label": 0}\n'.encode("latin-1"))
    expect_error(cfg(path), "re-encode it as UTF-8")


@pytest.mark.parametrize("name", ["data.txt", "data.tsv", "data.xlsx"])
def test_unknown_extension(tmp_path, name):
    (tmp_path / name).write_text("text,label\na,1\nb,0\n")
    expect_error(cfg(tmp_path / name), "has an unknown extension", "use .csv, .jsonl or .parquet")


def test_missing_file(tmp_path):
    expect_error(cfg(tmp_path / "nope.csv"), "not found", "rotten_tomatoes")


def test_negative_integer_labels(tmp_path, sentences):
    texts, labels = sentences
    path = write_csv(tmp_path / "neg.csv", [(t, lab - 1) for t, lab in zip(texts, labels)])
    expect_error(cfg(path), "has negative label -1; integer labels must be 0..K-1")


def test_eval_labels_outside_train_labels(tmp_path, sentences):
    train = write_csv(tmp_path / "train.csv", labelled(sentences))
    evaluation = write_csv(tmp_path / "eval.csv", [("a good movie", "pos"), ("a so-so movie", "meh")])
    expect_error(cfg(train, eval_path=str(evaluation)), "has labels ['meh'] outside ['neg', 'pos']")


def test_eval_integer_label_outside_train_range(tmp_path, sentences):
    texts, labels = sentences
    train = write_csv(tmp_path / "train.csv", list(zip(texts, labels)))
    evaluation = write_csv(tmp_path / "eval.csv", [("fine", 1), ("odd", 2)])
    expect_error(cfg(train, eval_path=str(evaluation)), "has labels ['2'] outside ['0', '1']")


def test_unparseable_jsonl(tmp_path):
    (tmp_path / "broken.jsonl").write_text('{"text": "a", "label": 1}\n{not json\n')
    expect_error(cfg(tmp_path / "broken.jsonl"), "could not be parsed")


# ---------------------------------------------------------------- tokenised batches


def test_make_loader_pads_per_batch(tiny_model_dir, tiny_split):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    max_length = 14
    loader = make_loader(tiny_split, tokenizer, max_length, batch_size=8, shuffle=False)
    full = [len(ids) for ids in tokenizer(tiny_split.texts, truncation=True, max_length=max_length)["input_ids"]]
    assert max(full) == max_length and min(full) < max_length  # some texts are truncated, some are short

    batches = list(loader)
    assert len(batches) == 8
    widths = []
    for i, batch in enumerate(batches):
        assert set(batch) == {"input_ids", "token_type_ids", "attention_mask", "labels"}
        size, width = batch["input_ids"].shape
        assert size == 8
        assert batch["attention_mask"].shape == batch["token_type_ids"].shape == (size, width)
        assert batch["labels"].tolist() == tiny_split.labels[8 * i: 8 * i + 8]
        assert width == max(full[8 * i: 8 * i + 8]) <= max_length  # padded to the batch's longest, not to max_length
        assert batch["attention_mask"].sum(1).tolist() == full[8 * i: 8 * i + 8]
        pad = batch["attention_mask"] == 0
        assert (batch["input_ids"][pad] == tokenizer.pad_token_id).all()
        assert (batch["input_ids"][:, 0] == tokenizer.cls_token_id).all()
        widths.append(width)
    assert widths == [13, 14, 14, 14, 13, 14, 14, 14]


def test_make_loader_shuffle_is_seeded(tiny_model_dir, tiny_split):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    order = lambda seed: [b["labels"].tolist() + b["input_ids"][:, 1:4].flatten().tolist()  # noqa: E731
                          for b in make_loader(tiny_split, tokenizer, 16, 8, shuffle=True, seed=seed)]
    assert order(3) == order(3)
    assert order(3) != order(4)
    labels = sorted(x for b in make_loader(tiny_split, tokenizer, 16, 8, shuffle=True, seed=3) for x in b["labels"].tolist())
    assert labels == sorted(tiny_split.labels)


def test_make_loader_pairs(tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    split = Split(["the movie was good", "bad"], [1, 0], ["it is", "the plot was very dull and slow"])
    (batch,) = list(make_loader(split, tokenizer, 64, 4, shuffle=False))
    sep = tokenizer.sep_token_id
    assert batch["input_ids"].shape == (2, 1 + 1 + 1 + 7 + 1)  # [CLS] bad [SEP] 7 words [SEP]
    assert (batch["input_ids"] == sep).sum(1).tolist() == [2, 2]
    assert batch["token_type_ids"][1].tolist() == [0, 0, 0] + [1] * 8


# ---------------------------------------------------------------- regressions found by these tests


def test_integer_labels_with_a_blank_row_stay_integers(tmp_path):
    (tmp_path / "train.csv").write_text("text,label\ngood,1\nbad,0\nfine,1\nmeh,\nawful,0\n", encoding="utf-8")
    (tmp_path / "eval.csv").write_text("text,label\nnice,1\nsad,0\n", encoding="utf-8")
    task = load_task(cfg(tmp_path / "train.csv", eval_path=str(tmp_path / "eval.csv")))
    assert task.label_names == ["0", "1"]
    assert task.eval.labels == [1, 0]


def test_macro_f1_averages_over_the_classes_that_occur():
    """A class the eval sample lacks and no prediction names (R52's rare topics, a gap in integer labels) has no F1:
    it must not count as 0, or a perfect model scores below 1."""
    truth = np.array([1, 2, 2, 4])
    assert accuracy_and_macro_f1(truth, truth.copy()) == {"accuracy": 1.0, "f1": 1.0}
    predicted = np.array([1, 2, 2, 3])  # 3 is predicted but absent: it counts (F1 0), as does the missed 4
    scores = accuracy_and_macro_f1(truth, predicted)
    assert scores["accuracy"] == 0.75 and scores["f1"] == pytest.approx((1 + 1 + 0 + 0) / 4)


def test_labels_and_texts_spelled_like_missing_values_are_data(tmp_path, sentences):
    """pandas reads "None", "NA", "null" as missing by default: a "None" intent class would vanish with its rows."""
    rows = [(text, ("flight", "None")[i % 2]) for i, (text, _) in enumerate(labelled(sentences))] + [("NA", "flight")]
    task = load_task(cfg(write_csv(tmp_path / "intents.csv", rows), eval_fraction=0.25))
    assert task.label_names == ["None", "flight"] and len(task.train) + len(task.eval) == 41
    assert "NA" in task.train.texts + task.eval.texts


def test_json_labels_keep_their_json_type(tmp_path, sentences):
    """A JSON string label is a name even when it looks like a number; a JSON number is a class index."""
    texts, labels = sentences
    named = load_task(cfg(write_jsonl(tmp_path / "years.jsonl", [{"text": t, "label": ("2019", "2020")[y]}
                                                                   for t, y in zip(texts[:40], labels)])))
    assert named.label_names == ["2019", "2020"]
    coded = load_task(cfg(write_jsonl(tmp_path / "codes.jsonl", [{"text": t, "label": ("01", "02")[y]}
                                                                   for t, y in zip(texts[:40], labels)])))
    assert coded.label_names == ["01", "02"]  # not renamed to 1, 2 with an empty class 0
    indexed = load_task(cfg(write_jsonl(tmp_path / "index.jsonl", [{"text": t, "label": y}
                                                                    for t, y in zip(texts[:40], labels)])))
    assert indexed.label_names == ["0", "1"]


def test_a_repeated_text_is_kept_once_so_it_cannot_sit_on_both_sides(tmp_path, sentences):
    rows = labelled(sentences)
    task = load_task(cfg(write_csv(tmp_path / "twice.csv", rows + rows[:20]), eval_fraction=0.25))
    assert len(task.train) + len(task.eval) == 40 and not set(task.train.texts) & set(task.eval.texts)


def test_eval_path_may_not_be_the_task_file_itself(tmp_path, sentences):
    path = write_csv(tmp_path / "same.csv", labelled(sentences))
    expect_error(cfg(path, eval_path=str(tmp_path / "." / "same.csv")), "data.eval_path", "is the data.task file itself")
