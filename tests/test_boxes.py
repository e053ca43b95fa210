"""Hand-box files: read and checked at the edge, and clips cut around the boxes as the labelled clips are."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import write_box_files

from hawor_tune.data import build_dataset, read_split
from hawor_tune.data.boxes import BoxFileError, read_box_file, read_boxes
from hawor_tune.prediction import build_box_clips


@pytest.fixture(scope="module")
def test_boxes(synthetic_dataset, tmp_path_factory):
    folder = tmp_path_factory.mktemp("boxes")
    return folder, write_box_files(synthetic_dataset, folder, "test")


def _clips(dataset, boxes, **overrides):
    return build_box_clips(dataset.config(overrides), boxes)


def test_box_clips_cut_what_the_labelled_clips_cut(synthetic_dataset, test_boxes):
    # A box that is the extent of the visible keypoints gives the labelled split's crop (the ground-truth-box
    # protocol), so a detector's boxes and the evaluation feed the model alike.
    folder, _ = test_boxes
    labelled = build_dataset(synthetic_dataset.config(), "test", cached=False)
    clips = _clips(synthetic_dataset, read_boxes(folder, labelled.sequences))
    misc = json.loads((synthetic_dataset.root / "meta" / "misc.json").read_text())
    assert len(clips) == len(labelled)
    for i in range(len(labelled)):
        a, b = labelled[i], clips[i]
        name = labelled.sequences[int(a["seq_index"])]
        assert clips.names[int(b["seq_index"])] == name
        ioi = misc[name.split("/")[0]]["ioi_offset"]
        np.testing.assert_array_equal(b["image_index"].numpy(), a["frame_index"].numpy() + ioi)
        np.testing.assert_array_equal(b["hand_valid"].numpy(), a["hand_valid"].numpy())
        np.testing.assert_array_equal(b["scored"].numpy(), a["scored"].numpy())
        np.testing.assert_array_equal(b["images"].numpy(), a["images"].numpy())
        np.testing.assert_allclose(b["K"].numpy(), a["K"].numpy(), rtol=1e-6)
        np.testing.assert_allclose(b["flow"].numpy(), a["flow"].numpy(), atol=1e-5)
        observed = a["hand_valid"].numpy()  # (T, 2): only observed hands have the keypoints' box
        np.testing.assert_allclose(b["crop_K"].numpy()[observed], a["crop_K"].numpy()[observed], rtol=1e-4, atol=1e-3)
        diff = np.abs(b["crops"].numpy()[observed].astype(int) - a["crops"].numpy()[observed].astype(int))
        assert diff.max() <= 2 and diff.mean() < 0.05  # sub-pixel rounding of the box centre only


def test_frame_steps_interleave_streams_so_that_every_image_is_scored_once(synthetic_dataset, test_boxes):
    folder, written = test_boxes
    names = read_split(synthetic_dataset.root, "test")
    clips = _clips(synthetic_dataset, read_boxes(folder, names), **{"data.frame_step": 2})
    seen: dict[int, int] = {}
    for i in range(len(clips)):
        item = clips[i]
        images = item["image_index"].numpy()
        assert (np.diff(images) == 2).all()  # the model's frame rate within a clip
        assert (images % 2 == (images[0] % 2)).all()
        for image in images[item["scored"].numpy()]:
            seen[int(image)] = seen.get(int(image), 0) + 1
    assert seen == {i: 1 for i in written[names[0]]["image_index"]}


def _write(tmp_path, entry):
    path = tmp_path / "s04" / "seq.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(entry if isinstance(entry, str) else json.dumps(entry))
    return path


GOOD = {"image_index": [10, 11, 12], "left": [[1, 2, 30, 40, 0.9], None, [1, 2, 3, 4, 1]],
        "right": [None, None, [5.5, 6, 7, 8, 0]]}


@pytest.mark.parametrize(("edit", "fragments"), [
    ({"left": [[1, 2, 30, 40, 0.9], [1, 2], None]}, ["key 'left'[1] (image 11) is [1, 2]", "allowed: null, or [x1"]),
    ({"right": [None, None, [7, 6, 5, 8, 0.5]]}, ["key 'right'[2]", "x1 < x2"]),
    ({"right": [None, None, [5, 6, 7, 8, 1.5]]}, ["key 'right'[2]", "0 <= score <= 1"]),
    ({"right": [None, None]}, ["key 'right' is a list of 2", "a list of 3 entries"]),
    ({"image_index": [10, 12, 13]}, ["key 'image_index' goes from 10 to 12", "consecutive"]),
    ({"image_index": "10"}, ["key 'image_index' is \"10\"", "non-empty list"]),
    ({"intrinsics": [[0, 0, 1], [0, 1, 1], [0, 0, 1]]}, ["key 'intrinsics'", "fx, fy > 0"]),
    ({"boxes": []}, ["unknown key 'boxes'", "allowed keys"]),
])
def test_bad_box_files_name_the_file_the_key_the_value_and_what_is_allowed(tmp_path, edit, fragments):
    path = _write(tmp_path, {**GOOD, **edit})
    with pytest.raises(BoxFileError) as info:
        read_box_file(path, "s04/seq")
    message = str(info.value)
    assert str(path) in message and len(message.splitlines()) == 1
    for fragment in fragments:
        assert fragment in message


def test_a_good_box_file_reads_as_written(tmp_path):
    b = read_box_file(_write(tmp_path, GOOD), "s04/seq")
    assert b.image_index.tolist() == [10, 11, 12] and b.intrinsics is None
    np.testing.assert_array_equal(b.boxes[0, 0], [1, 2, 30, 40, 0.9])
    assert np.isnan(b.boxes[1]).all() and np.isnan(b.boxes[0, 1]).all()
    np.testing.assert_array_equal(b.boxes[2, 1], [5.5, 6, 7, 8, 0])


def test_missing_files_and_images_are_named(synthetic_dataset, test_boxes, tmp_path):
    with pytest.raises(BoxFileError, match="no such folder"):
        read_boxes(tmp_path / "nowhere", ["s04/x"])
    with pytest.raises(BoxFileError, match=r"not readable JSON"):
        read_box_file(_write(tmp_path, "{not json"), "s04/seq")
    folder, written = test_boxes
    name = read_split(synthetic_dataset.root, "test")[0]
    with pytest.raises(BoxFileError, match=f"no box file for sequence {name}"):
        read_boxes(tmp_path, [name])
    copy = tmp_path / "boxes"
    shutil.copytree(folder, copy)
    entry = dict(written[name])
    entry["image_index"] = [i + 1000 for i in entry["image_index"]]
    (copy / f"{name}.json").write_text(json.dumps(entry))
    with pytest.raises(BoxFileError, match=r"names image 0\d+, but .* does not exist"):
        _clips(synthetic_dataset, read_boxes(copy, [name]))
    entry = {k: v[:3] for k, v in written[name].items()}  # 3 images: shorter than a 4-frame clip
    (copy / f"{name}.json").write_text(json.dumps(entry))
    with pytest.raises(BoxFileError, match="shorter than a clip.*at least 4 images"):
        _clips(synthetic_dataset, read_boxes(copy, [name]))
