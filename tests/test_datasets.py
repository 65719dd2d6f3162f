"""Real-dataset registrations on tiny fake trees in each release layout (no download)."""

import importlib.util
import json
import logging
import os

import cv2
import numpy as np
import pycocotools.mask as mask_util
import pytest
import tifffile
from conftest import _ann, _coco_tree, _messages, captured_logs, tiny_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog, build_detection_train_loader

import iaunet.data.datasets  # noqa: F401  (registers the names)
from iaunet.data import IAUNetDatasetMapper

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREFIXES = ("revvity25_", "livecell_", "evican2_", "isbi2014_")


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(ROOT, "datasets", f"{name}.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def root(tmp_path, monkeypatch):
    """An empty datasets root; metadata set by earlier loads is cleared so that tests are
    independent."""
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "data"))
    monkeypatch.setenv("IAUNET_DATASET_CACHE", str(tmp_path / "cache"))
    (tmp_path / "data").mkdir()
    yield tmp_path / "data"
    for name in DatasetCatalog.list():
        if name.startswith(PREFIXES):
            meta = MetadataCatalog.get(name)
            for key in ("json_file", "image_root"):
                if hasattr(meta, key):
                    delattr(meta, key)


def square(x, y, s):
    return [x, y, x + s, y, x + s, y + s, x, y + s]


def write_json(path, images, annotations, categories=("cell",)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    cats = [{"id": i + 1, "name": n} for i, n in enumerate(categories)]
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": cats}, f)


def ann(ann_id, image_id, poly, category_id=1, **extra):
    return dict(
        id=ann_id,
        image_id=image_id,
        category_id=category_id,
        segmentation=[poly],
        iscrowd=0,
        bbox=[
            min(poly[0::2]),
            min(poly[1::2]),
            max(poly[0::2]) - min(poly[0::2]),
            max(poly[1::2]) - min(poly[1::2]),
        ],
        area=1.0,
        **extra,
    )


def write_image(path, h=64, w=64, dtype=np.uint16):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img = (np.arange(h * w).reshape(h, w) % 4000).astype(dtype)
    if path.endswith(".tif"):
        tifffile.imwrite(path, img)
    else:
        assert cv2.imwrite(path, img)


def make_revvity(root, amodal_field=False):
    """2 train images (16-bit PNG; one without cells) and 1 test image (16-bit TIFF), overlapping
    cells."""
    d = root / "revvity25"
    write_image(str(d / "images/a.png"))
    write_image(str(d / "images/empty.png"))
    write_image(str(d / "images/t.tif"))
    extra = {"amodal_segmentation": [square(5, 5, 40)]} if amodal_field else {}
    write_json(
        str(d / "annotations/train.json"),
        [
            {"id": 1, "file_name": "a.png", "height": 64, "width": 64},
            {"id": 2, "file_name": "empty.png", "height": 64, "width": 64},
        ],
        [ann(1, 1, square(5, 5, 30), **extra), ann(2, 1, square(20, 20, 30))],
    )
    write_json(
        str(d / "annotations/valid.json"),
        [{"id": 7, "file_name": "t.tif", "height": 64, "width": 64}],
        [ann(3, 7, square(2, 2, 10))],
    )
    return d


def test_names_and_metadata_without_data():
    expected = [f"revvity25_{s}" for s in ("train", "test", "amodal_train", "amodal_test")]
    expected += ["revvity25_both_train", "revvity25_both_test"]
    expected += [f"livecell_{s}" for s in ("train", "val", "test")]
    expected += [f"livecell_crops_{s}" for s in ("train", "val", "test")]
    evican = ("train", "val", "eval_easy", "eval_medium", "eval_difficult")
    expected += [f"evican2_{s}" for s in evican] + [f"evican2_cell_{s}" for s in evican]
    expected += [f"isbi2014_{s}" for s in ("train", "val", "test")]
    expected += [f"isbi2014_cyto_{s}" for s in ("train", "val", "test")]
    assert set(expected) <= set(DatasetCatalog.list())
    classes = {
        "revvity25_train": ["cell"],
        "livecell_test": ["cell"],
        "evican2_val": ["cell", "nucleus"],
        "evican2_cell_val": ["cell"],
        "isbi2014_test": ["cytoplasm", "nucleus"],
        "isbi2014_cyto_test": ["cytoplasm"],
    }
    for name, names in classes.items():
        meta = MetadataCatalog.get(name)
        assert meta.thing_classes == names and meta.evaluator_type == "coco"
        assert meta.thing_dataset_id_to_contiguous_id == {i + 1: i for i in range(len(names))}


def test_missing_root_names_path_and_env_var(root):
    with pytest.raises(FileNotFoundError, match=r"revvity25.*DETECTRON2_DATASETS"):
        DatasetCatalog.get("revvity25_train")
    with pytest.raises(FileNotFoundError, match="prepare_livecell_crops"):
        DatasetCatalog.get("livecell_crops_train")


def test_revvity25_modal(root):
    make_revvity(root)
    train = DatasetCatalog.get("revvity25_train")
    assert [len(d["annotations"]) for d in train] == [2, 0]  # the image without cells is kept
    assert train[0]["file_name"] == str(root / "revvity25/images/a.png")
    assert {a["category_id"] for a in train[0]["annotations"]} == {0}
    test = DatasetCatalog.get("revvity25_test")
    assert len(test) == 1 and test[0]["image_id"] == 7 and test[0]["file_name"].endswith("t.tif")
    assert MetadataCatalog.get("revvity25_train").json_file == str(
        root / "revvity25/annotations/train.json"
    )


def test_revvity25_amodal_field(root):
    make_revvity(root, amodal_field=True)
    modal, amodal = (
        DatasetCatalog.get("revvity25_train"),
        DatasetCatalog.get("revvity25_amodal_train"),
    )
    assert modal[0]["annotations"][0]["segmentation"] == [square(5, 5, 30)]
    assert amodal[0]["annotations"][0]["segmentation"] == [square(5, 5, 40)]
    assert amodal[0]["annotations"][0]["bbox"] == [
        5.0,
        5.0,
        40.0,
        40.0,
    ]  # recomputed from the amodal outline
    assert amodal[0]["annotations"][1]["segmentation"] == [
        square(20, 20, 30)
    ]  # no hidden part: modal outline
    with pytest.raises(ValueError, match=r"valid\.json.*amodal"):
        DatasetCatalog.get("revvity25_amodal_test")  # neither the field nor a separate file


def test_revvity25_amodal_separate_file(root):
    d = make_revvity(root)
    write_json(
        str(d / "annotations/amodal/valid.json"),
        [{"id": 7, "file_name": "t.tif", "height": 64, "width": 64}],
        [ann(3, 7, square(2, 2, 20)), ann(4, 7, square(10, 10, 20))],
    )
    assert len(DatasetCatalog.get("revvity25_amodal_test")[0]["annotations"]) == 2


def test_revvity25_both_outlines(root):
    d = make_revvity(root, amodal_field=True)
    both = DatasetCatalog.get("revvity25_both_train")[0]["annotations"]
    assert [a["segmentation"] for a in both] == [[square(5, 5, 30)], [square(20, 20, 30)]]
    assert both[0]["amodal_segmentation"] == [square(5, 5, 40)]
    assert "amodal_segmentation" not in both[1]  # no hidden part: its whole outline is its own
    write_json(  # a separate amodal file, matched by annotation id
        str(d / "annotations/valid_amodal.json"),
        [{"id": 7, "file_name": "t.tif", "height": 64, "width": 64}],
        [ann(3, 7, square(2, 2, 20))],
    )
    (a,) = DatasetCatalog.get("revvity25_both_test")[0]["annotations"]
    assert a["segmentation"] == [square(2, 2, 10)] and a["amodal_segmentation"] == [
        square(2, 2, 20)
    ]
    write_json(
        str(d / "annotations/valid_amodal.json"),
        [{"id": 7, "file_name": "t.tif", "height": 64, "width": 64}],
        [ann(4, 7, square(2, 2, 20))],
    )
    with pytest.raises(
        ValueError, match=r"valid_amodal\.json: no amodal outline for annotation id 3"
    ):
        DatasetCatalog.get("revvity25_both_test")


def test_bad_inputs_name_the_file(root, caplog):
    d = make_revvity(root)
    (d / "annotations/valid.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"valid\.json"):
        DatasetCatalog.get("revvity25_test")

    write_json(
        str(d / "annotations/valid.json"),
        [{"id": 1, "file_name": "gone.png", "height": 64, "width": 64}],
        [],
    )
    with pytest.raises(FileNotFoundError, match=r"valid\.json.*gone\.png"):
        DatasetCatalog.get("revvity25_test")

    imgs = [{"id": 1, "file_name": "t.tif", "height": 64, "width": 64}]
    write_json(str(d / "annotations/valid.json"), imgs, [ann(1, 1, square(1, 1, 5), category_id=3)])
    with pytest.raises(ValueError, match=r"valid\.json.*category_id=3"):
        DatasetCatalog.get("revvity25_test")

    write_json(str(d / "annotations/valid.json"), imgs + [dict(imgs[0], file_name="a.png")], [])
    with pytest.raises(ValueError, match=r"valid\.json.*duplicate image id 1"):
        DatasetCatalog.get("revvity25_test")

    write_json(
        str(d / "annotations/valid.json"),
        imgs,
        [ann(1, 1, square(1, 1, 5)), ann(1, 1, square(9, 9, 5))],
    )
    with pytest.raises(ValueError, match=r"valid\.json.*duplicate annotation id 1"):
        DatasetCatalog.get("revvity25_test")

    write_json(
        str(d / "annotations/valid.json"),
        imgs,
        [ann(1, 1, square(1, 1, 5))],
        categories=("cell", "dust"),
    )
    with pytest.raises(ValueError, match=r"valid\.json.*expected 1\.\.1"):
        DatasetCatalog.get("revvity25_test")

    bad = ann(8, 1, [1, 1, 5, 5])  # 2 points
    two = dict(
        ann(9, 1, square(1, 1, 5)), segmentation=[square(1, 1, 5), [3, 3, 4, 4]]
    )  # one bad part
    write_json(str(d / "annotations/valid.json"), imgs, [bad, two])
    with caplog.at_level(logging.WARNING):
        dicts = DatasetCatalog.get("revvity25_test")
    assert [a["segmentation"] for a in dicts[0]["annotations"]] == [[square(1, 1, 5)]]
    assert "valid.json" in caplog.text and "[8, 9]" in caplog.text
    meta_json = MetadataCatalog.get(
        "revvity25_test"
    ).json_file  # the normalized copy, valid for COCOEvaluator
    assert (
        meta_json != str(d / "annotations/valid.json")
        and len(json.load(open(meta_json))["annotations"]) == 1
    )


def make_livecell(root, n=2):
    """LIVECell layout: images nested by cell type, annotations stored as a dict keyed by id."""
    d = root / "livecell"
    for split, folder in (("train", "livecell_train_val_images"), ("test", "livecell_test_images")):
        images, anns = [], {}
        for i in range(n):
            name = f"A172_Phase_C7_1_0{i}d00h00m_{i}.tif"
            write_image(str(d / "images" / folder / "A172" / name), h=96, w=128, dtype=np.uint8)
            images.append({"id": i + 1, "file_name": name, "height": 96, "width": 128})
            for k, (x, y) in enumerate(((10, 10), (30, 25), (90, 60))):
                a = ann(10 * i + k + 1, i + 1, square(x, y, 30))
                del a["bbox"], a["area"]
                anns[str(a["id"])] = a
        with open(d / f"livecell_coco_{split}.json", "w") as f:
            json.dump(
                {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "cell"}]},
                f,
            )
    return d


def test_livecell_dict_annotations_nested_images(root):
    from pycocotools.coco import COCO

    d = make_livecell(root)
    dicts = DatasetCatalog.get("livecell_train")
    assert len(dicts) == 2 and [len(x["annotations"]) for x in dicts] == [3, 3]
    assert dicts[0]["file_name"] == str(
        d / "images/livecell_train_val_images/A172" / "A172_Phase_C7_1_00d00h00m_0.tif"
    )
    assert dicts[0]["annotations"][0]["bbox"] == [10.0, 10.0, 30.0, 30.0]
    coco = COCO(
        MetadataCatalog.get("livecell_train").json_file
    )  # evaluable: list annotations with area
    assert len(coco.anns) == 6 and all(a["area"] > 0 for a in coco.anns.values())


def test_livecell_crops(root, tmp_path):
    make_livecell(root)
    prep = load_script("prepare_livecell_crops")
    args = ["--splits", "train", "test", "--size", "64", "--crops-per-image", "3"]
    out = prep.main(args)
    again = prep.main(args + ["--out", str(tmp_path / "again")])
    assert open(out["train"]).read() == open(again["train"]).read()  # seeded: identical
    crops = DatasetCatalog.get("livecell_crops_train")
    assert len(crops) == 6 and all((c["height"], c["width"]) == (64, 64) for c in crops)
    assert len(DatasetCatalog.get("livecell_crops_test")) == 6
    # Each crop's masks equal the full-image masks cut to the window, up to rasterization at the
    # border.
    full = {(d["image_id"]): d for d in DatasetCatalog.get("livecell_train")}
    info = {i["id"]: i for i in json.load(open(out["train"]))["images"]}
    for c in crops:
        x0, y0, w, h = info[c["image_id"]]["crop"]
        src = next(
            d
            for d in full.values()
            if d["file_name"].endswith(info[c["image_id"]]["source_file_name"])
        )
        full_masks = [
            mask_util.decode(mask_util.merge(mask_util.frPyObjects(a["segmentation"], 96, 128)))
            for a in src["annotations"]
        ]
        ref = [m[y0 : y0 + h, x0 : x0 + w] for m in full_masks]
        ref = [m for m in ref if m.any()]
        got = [mask_util.decode(a["segmentation"]) for a in c["annotations"]]
        assert len(got) == len(ref)
        for g, r in zip(got, ref):
            assert np.logical_xor(g, r).sum() <= 0.05 * r.sum() + 4
    image = cv2.imread(crops[0]["file_name"], cv2.IMREAD_UNCHANGED)
    assert image.shape == (64, 64) and image.dtype == np.uint8
    grid = prep.main(
        ["--splits", "test", "--size", "64", "--mode", "grid", "--out", str(tmp_path / "grid")]
    )
    assert (
        len(json.load(open(grid["test"]))["images"]) == 2 * 2 * 2
    )  # 96x128 -> 2 x 2 tiles per image


def make_evican(root):
    """Release layout: jsons on top, images/EVICAN_*2019/, eval subsets as separate jsons, no
    bbox/area."""
    d = root / "evican2"
    cats = ("Cell", "Nucleus")

    def write(json_name, folder, image_names):
        images, anns = [], []
        for i, name in enumerate(image_names):
            write_image(str(d / "images" / folder / name), dtype=np.uint8)
            images.append({"id": i + 1, "file_name": name, "height": 64, "width": 64})
            for a in (
                ann(2 * i + 1, i + 1, square(5, 5, 40)),
                ann(2 * i + 2, i + 1, square(20, 20, 8), category_id=2),
            ):
                del a["bbox"], a["area"]
                anns.append(a)
        write_json(str(d / json_name), images, anns, categories=cats)

    write(
        "instances_train2019_EVICAN2.json",
        "EVICAN_train2019",
        ["1_A549.jpg", "2_A549.jpg", "3_Caki.jpg"],
    )
    write("instances_val2019_EVICAN2.json", "EVICAN_val2019", ["4_A549.jpg"])
    for level, names in (
        ("easy", ["10_C2C12.jpg"]),
        ("medium", ["11_C2C12.jpg", "12_HeLa.jpg"]),
        ("difficult", ["2_769p.jpg"]),
    ):
        write(f"instances_eval2019_{level}_EVICAN2.json", "EVICAN_eval2019", names)


def test_evican2(root):
    make_evican(root)
    train = DatasetCatalog.get("evican2_train")
    assert len(train) == 3 and [a["category_id"] for a in train[0]["annotations"]] == [0, 1]
    assert train[0]["annotations"][1]["bbox"] == [20.0, 20.0, 8.0, 8.0]  # filled from the outline
    cell = DatasetCatalog.get("evican2_cell_train")
    assert [a["category_id"] for a in cell[0]["annotations"]] == [0]
    assert [
        len(DatasetCatalog.get(f"evican2_eval_{s}")) for s in ("easy", "medium", "difficult")
    ] == [1, 2, 1]
    medium = DatasetCatalog.get("evican2_cell_eval_medium")
    assert medium[1]["file_name"].endswith("images/EVICAN_eval2019/12_HeLa.jpg")
    cell_json = json.load(open(MetadataCatalog.get("evican2_cell_eval_medium").json_file))
    assert (
        cell_json["categories"] == [{"id": 1, "name": "Cell"}]
        and len(cell_json["annotations"]) == 2
    )


def overlapping_cells(h, w, k):
    """Two overlapping cytoplasm masks and two separate nuclei (one mask), shifted by ``k``."""
    a, b, n = (np.zeros((h, w), bool) for _ in range(3))
    a[5:25, 5 + k : 30 + k] = True
    b[15:35, 20 + k : 45 + k] = True
    n[10:13, 10 + k : 13 + k] = n[25:28, 35 + k : 38 + k] = True
    return [a, b], n


def isbi_samples(count, h=40, w=60):
    imgs = [
        np.random.default_rng(i).uniform(0, 1, (h, w)) for i in range(count)
    ]  # double, as in MATLAB
    return imgs, [overlapping_cells(h, w, i % 5) for i in range(count)]


def cell_array(items):
    out = np.empty((len(items), 1), dtype=object)
    for i, x in enumerate(items):
        out[i, 0] = x
    return out


def write_v5(src, images_file, gt_file, var, prefix, imgs, gts):
    from scipy.io import savemat

    savemat(os.path.join(src, images_file), {var: cell_array(imgs)})
    savemat(
        os.path.join(src, gt_file),
        {
            f"{prefix}_Cytoplasm": cell_array([cell_array(c) for c, _ in gts]),
            f"{prefix}_Nuclei": cell_array([n for _, n in gts]),
            "CellNum": np.array([[len(c)] for c, _ in gts]),
        },
    )


def test_isbi2014_prepare_challenge_files(root, tmp_path):
    src = tmp_path / "isbi_src"
    src.mkdir()
    write_v5(
        str(src), "isbi_train.mat", "isbi_train_GT.mat", "ISBI_Train", "train", *isbi_samples(3)
    )
    write_v5(
        str(src), "isbi_test90.mat", "isbi_test90_GT.mat", "ISBI_Test90", "test", *isbi_samples(2)
    )
    out = load_script("prepare_isbi2014").main(["--src", str(src)])
    assert set(out) == {"train", "val"}
    train = DatasetCatalog.get("isbi2014_train")
    assert len(train) == 3 and len(DatasetCatalog.get("isbi2014_val")) == 2
    cyto, nuclei = overlapping_cells(40, 60, 0)
    got = train[0]["annotations"]
    assert [a["category_id"] for a in got] == [
        0,
        0,
        1,
        1,
    ]  # 2 cytoplasms, nuclei split into 2 instances
    masks = [mask_util.decode(a["segmentation"]).astype(bool) for a in got]
    assert np.array_equal(masks[0], cyto[0]) and np.array_equal(masks[1], cyto[1])  # overlap kept
    assert (masks[0] & masks[1]).any()
    assert [len(d["annotations"]) for d in DatasetCatalog.get("isbi2014_cyto_train")] == [2, 2, 2]
    image = cv2.imread(train[0]["file_name"], cv2.IMREAD_UNCHANGED)
    assert image.shape == (40, 60) and image.dtype == np.uint8
    with pytest.raises(FileNotFoundError, match=r"isbi2014.*prepare_isbi2014"):
        DatasetCatalog.get("isbi2014_test")  # the root exists, but not the test split: json missing


def write_v73(path, variables):
    """A MATLAB v7.3 (HDF5) file: arrays stored transposed, cell arrays as object references."""
    h5py = pytest.importorskip("h5py")
    with h5py.File(path, "w", userblock_size=512) as f:
        refs, count = f.create_group("#refs#"), iter(range(10**6))

        def store(group, name, value):
            if isinstance(value, list):
                data = np.array(
                    [[store(refs, f"r{next(count)}", v) for v in value]], dtype=h5py.ref_dtype
                )
            else:
                value = np.asarray(value)
                data = (value.astype(np.uint8) if value.dtype == bool else value).T
            return group.create_dataset(name, data=data).ref

        for name, value in variables.items():
            store(f, name, value)
    with open(
        path, "r+b"
    ) as f:  # the MATLAB header in the userblock, which scipy reads as "version 7.3"
        f.write(b"MATLAB 7.3 MAT-file, HDF5 schema 1.00 .".ljust(116) + b" " * 8 + b"\x00\x02IM")


def test_isbi2014_prepare_v73_files(root, tmp_path):
    pytest.importorskip("h5py")
    from scipy.io import savemat

    src = tmp_path / "synthetic"
    src.mkdir()
    imgs, gts = isbi_samples(2)
    write_v73(str(src / "trainset.mat"), {"trainset": imgs})
    savemat(
        str(src / "trainset_GT.mat"),
        {
            "train_Cytoplasm": cell_array([cell_array(c) for c, _ in gts]),
            "train_Nuclei": cell_array([n for _, n in gts]),
        },
    )
    imgs, gts = isbi_samples(92)  # 90 val + 2 test
    write_v73(str(src / "testset.mat"), {"testset": imgs})
    write_v73(
        str(src / "testset_GT.mat"),
        {"test_Cytoplasm": [list(c) for c, _ in gts], "test_Nuclei": [n for _, n in gts]},
    )
    load_script("prepare_isbi2014").main(["--src", str(src), "--out", str(root / "isbi2014")])
    assert [len(DatasetCatalog.get(f"isbi2014_{s}")) for s in ("train", "val", "test")] == [
        2,
        90,
        2,
    ]
    test = DatasetCatalog.get("isbi2014_test")
    cyto, _ = overlapping_cells(
        40, 60, 91 % 5
    )  # test image 1 = release test image 91: orientation kept
    assert np.array_equal(
        mask_util.decode(test[1]["annotations"][1]["segmentation"]).astype(bool), cyto[1]
    )


def test_mapper_targets_match_annotations(root):
    from iaunet.data.dataset_mapper import IAUNetDatasetMapper

    make_revvity(root)
    mapper = IAUNetDatasetMapper(
        True, augmentations=[]
    )  # no augmentation: targets comparable pixel for pixel
    outputs = []
    for record in DatasetCatalog.get("revvity25_train"):
        out = mapper(record)
        areas = [
            float(mask_util.area(mask_util.merge(mask_util.frPyObjects(a["segmentation"], 64, 64))))
            for a in record["annotations"]
        ]
        inst = out["instances"]
        assert out["image"].shape == (3, 64, 64) and len(inst) == len(areas)
        assert inst.gt_masks.tensor.sum(dim=(1, 2)).tolist() == areas
        assert inst.gt_classes.tolist() == [0] * len(areas)
        outputs.append(inst)
    assert [len(i) for i in outputs] == [2, 0]
    assert (
        outputs[0].gt_masks.tensor[0] & outputs[0].gt_masks.tensor[1]
    ).any()  # overlapping cells stay whole


def test_coco_evaluator_on_registered_metadata(root, tmp_path):
    """Ground truth fed back as predictions scores AP 100: json_file and the class-id mapping
    agree."""
    import torch
    from detectron2.evaluation import COCOEvaluator
    from detectron2.structures import BitMasks, Instances

    make_evican(root)
    for name in ("evican2_eval_medium", "evican2_cell_eval_medium"):
        dicts = DatasetCatalog.get(name)
        evaluator = COCOEvaluator(
            name, tasks=("segm",), distributed=False, output_dir=str(tmp_path / name)
        )
        evaluator.reset()
        for d in dicts:
            masks = [
                mask_util.decode(mask_util.merge(mask_util.frPyObjects(a["segmentation"], 64, 64)))
                for a in d["annotations"]
            ]
            inst = Instances((64, 64))
            inst.pred_masks = torch.from_numpy(np.stack(masks)).bool()
            inst.pred_boxes = BitMasks(inst.pred_masks).get_bounding_boxes()
            inst.scores = torch.ones(len(masks))
            inst.pred_classes = torch.tensor([a["category_id"] for a in d["annotations"]])
            evaluator.process([{"image_id": d["image_id"]}], [{"instances": inst}])
        assert evaluator.evaluate()["segm"]["AP"] == pytest.approx(100.0)


@pytest.mark.parametrize("config", ["iaunet_R50.yaml", "iaunet_swin_s.yaml"])
def test_revvity25_config_starts_training(root, config):
    """The design-card command (`train_net.py --config-file configs/revvity25/<config>`) builds its
    model, optimizer and data loader on a Revvity-25 tree and takes a training step (images shrunk
    for speed)."""

    import torch
    from detectron2.config import get_cfg
    from detectron2.utils.events import EventStorage

    from iaunet import add_iaunet_config
    from iaunet.engine import Trainer

    make_revvity(root)
    cfg = get_cfg()
    add_iaunet_config(cfg)
    cfg.merge_from_file(os.path.join(ROOT, "configs", "revvity25", config))
    cfg.merge_from_list(
        [
            "MODEL.DEVICE",
            "cpu",
            "SOLVER.AMP.ENABLED",
            False,
            "SOLVER.IMS_PER_BATCH",
            1,
            "INPUT.IMAGE_SIZE",
            64,
            "DATALOADER.NUM_WORKERS",
            0,
            "OUTPUT_DIR",
            str(root / "out"),
        ]
    )
    trainer = Trainer(cfg)
    before = {k: v.clone() for k, v in trainer.model.query_decoder.state_dict().items()}
    with EventStorage(0):
        trainer._trainer.iter = 0
        trainer._trainer.run_step()
    after = trainer.model.query_decoder.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the optimizer stepped


# COCO json datasets through register_coco_dataset / DatasetCatalog (rows of docs/robustness.md);
# `_coco_tree` and `_ann` (conftest.py) write the images and the json.


def test_polygons_with_fewer_than_3_points_are_dropped_with_a_warning(tmp_path):
    anns = [_ann(1, polygon=[1, 1, 9, 9]), _ann(2), _ann(3, polygon=[1, 1])]
    name, json_file = _coco_tree(tmp_path, annotations=anns)
    with captured_logs("iaunet.data.datasets.common") as logs:
        dicts = DatasetCatalog.get(name)
    assert [len(d["annotations"]) for d in dicts] == [1, 0]
    assert f"{json_file}: dropped degenerate polygons" in _messages(
        logs
    ) and "ids [1, 3]" in _messages(logs)


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        (
            dict(annotations=[_ann(1, category_id=7)]),
            ValueError,
            r"annotations\.json: annotation 1 has category_id=7",
        ),
        (
            dict(
                images=[
                    {"id": 1, "file_name": "1.png", "height": 32, "width": 32},
                    {"id": 1, "file_name": "2.png", "height": 32, "width": 32},
                ]
            ),
            ValueError,
            r"annotations\.json: duplicate image id 1",
        ),
        (
            dict(images=[{"id": 1, "file_name": "gone.png", "height": 32, "width": 32}]),
            FileNotFoundError,
            r"annotations\.json lists image .*gone\.png, which does not exist",
        ),
        (
            dict(images=[], annotations=[]),
            ValueError,
            r"robustness_\d+'?: .*annotations\.json lists no images",
        ),
    ],
    ids=["unknown_category", "duplicate_image_id", "image_file_missing", "no_images"],
)
def test_broken_dataset_json_is_rejected_naming_it(tmp_path, kwargs, error, message):
    name, _ = _coco_tree(tmp_path, **kwargs)
    with pytest.raises(error, match=message):
        DatasetCatalog.get(name)


def test_annotation_of_an_unknown_image_is_ignored_with_a_warning(tmp_path):
    name, json_file = _coco_tree(tmp_path, annotations=[_ann(1), _ann(2, image_id=99)])
    with captured_logs("iaunet.data.datasets.common") as logs:
        dicts = DatasetCatalog.get(name)
    assert [len(d["annotations"]) for d in dicts] == [1, 0]
    assert f"{json_file}: 1 annotation(s) refer to image ids not in 'images'" in _messages(logs)
    assert "annotation ids [2]" in _messages(logs)


@pytest.mark.usefixtures("one_thread")
def test_dataset_without_annotations(tmp_path):
    """Loads with a warning; training filters every image (detectron2's error names the dataset)
    unless DATALOADER.FILTER_EMPTY_ANNOTATIONS is False, which trains on zero-instance images."""
    name, json_file = _coco_tree(tmp_path, annotations=[])
    with captured_logs("iaunet.data.datasets.common") as logs:
        assert len(DatasetCatalog.get(name)) == 2
    assert f"{json_file} has no annotations at all" in _messages(logs)
    cfg = tiny_cfg(
        **{"DATASETS.TRAIN": (name,), "DATALOADER.NUM_WORKERS": 0, "SOLVER.IMS_PER_BATCH": 2}
    )
    with pytest.raises(AssertionError, match=f"No valid data found in {name}"):
        build_detection_train_loader(cfg, mapper=IAUNetDatasetMapper(cfg, is_train=True))
    cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS = False
    batch = next(
        iter(build_detection_train_loader(cfg, mapper=IAUNetDatasetMapper(cfg, is_train=True)))
    )
    assert [len(x["instances"]) for x in batch] == [0, 0]


def test_synthetic_cells_are_drawn_on_their_annotated_pixels(root):
    """The generated images and their COCO annotations agree to the pixel: each annotation's mask
    (as detectron2 gives it for training and pycocotools for evaluation) is the region the cell was
    drawn on, so the cells' intensity centroids sit on the masks' centroids. Version 1 of the
    generator drew cells with OpenCV half a pixel off (+0.45, +0.57 px) and a pixel wider."""
    from detectron2.structures import polygons_to_bitmask

    from iaunet.data.datasets.synthetic import SPLITS, render_scene

    records = DatasetCatalog.get("synthetic_cells_val")
    assert len(records) == 32
    split_seed = SPLITS["synthetic_cells_val"][0]
    offsets = []
    for i, record in enumerate(records):
        h, w = record["height"], record["width"]
        # the annotations hold the polygons render_scene drew, to the digit
        _, polygons = render_scene(split_seed * 1_000_003 + i)
        assert [a["segmentation"][0] for a in record["annotations"]] == [
            p.ravel().tolist() for p in polygons
        ]
        image = cv2.imread(record["file_name"], cv2.IMREAD_GRAYSCALE).astype(np.float32)
        masks = [polygons_to_bitmask(a["segmentation"], h, w) for a in record["annotations"]]
        grown = [cv2.dilate(m.astype(np.uint8), np.ones((9, 9), np.uint8)) > 0 for m in masks]
        yy, xx = np.mgrid[:h, :w]
        for k, m in enumerate(masks):
            near = cv2.dilate(m.astype(np.uint8), np.ones((7, 7), np.uint8)) > 0
            ys, xs = np.nonzero(near)
            isolated = not any((near & g).any() for j, g in enumerate(grown) if j != k)
            inside = ys.min() > 0 and xs.min() > 0 and ys.max() < h - 1 and xs.max() < w - 1
            if not (isolated and inside):
                continue
            ring = near & ~(cv2.dilate(m.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0)
            weight = np.clip(image - np.median(image[ring]), 0, None) * near
            gy, gx = np.nonzero(m)
            offsets.append(
                (
                    (weight * xx).sum() / weight.sum() - gx.mean(),
                    (weight * yy).sum() / weight.sum() - gy.mean(),
                )
            )
    offsets = np.array(offsets)
    assert len(offsets) >= 30
    assert np.abs(offsets.mean(0)).max() < 0.15, offsets.mean(0)


def test_synthetic_nuclei_are_packed_bright_and_vary_between_fields(root):
    """The fluorescent-nuclei fields: the annotations are the polygons the generator drew; nuclei
    touch but never share a pixel; each is brighter than the background just around it; there are
    never more than the quick model's queries can take; and size and density vary between fields
    (what the starting model should not learn as fixed). The split is generated under its own
    folder with its generator version."""
    from detectron2.structures import polygons_to_bitmask

    from iaunet.data.datasets.synthetic import MAX_NUCLEI, NUCLEI_SPLITS, render_nuclei_scene

    records = DatasetCatalog.get("synthetic_nuclei_val")
    assert len(records) == 32
    with open(root / "synthetic_nuclei" / "val" / "annotations.json") as f:
        assert json.load(f)["info"]["generator_version"] == 1
    split_seed = NUCLEI_SPLITS["synthetic_nuclei_val"][0]
    brighter, counts, median_areas = [], [], []
    for i, record in enumerate(records):
        h, w = record["height"], record["width"]
        _, polygons = render_nuclei_scene(split_seed * 1_000_003 + i)
        assert [a["segmentation"][0] for a in record["annotations"]] == [
            p.ravel().tolist() for p in polygons
        ]
        image = cv2.imread(record["file_name"], cv2.IMREAD_GRAYSCALE).astype(np.float32)
        masks = np.stack(
            [polygons_to_bitmask(a["segmentation"], h, w) for a in record["annotations"]]
        )
        assert masks.sum(0).max() == 1  # no pixel in two nuclei
        union = masks.any(0).astype(np.uint8)
        for m in masks:
            ring = (cv2.dilate(m.astype(np.uint8), np.ones((9, 9), np.uint8)) > 0) & ~(
                cv2.dilate(union, np.ones((3, 3), np.uint8)) > 0
            )
            if ring.sum() >= 10:
                brighter.append(image[m].mean() > np.median(image[ring]) + 2)
        counts.append(len(masks))
        median_areas.append(np.median(masks.sum((1, 2))))
    assert 1 <= min(counts) and max(counts) <= MAX_NUCLEI
    assert np.mean(brighter) > 0.9, np.mean(brighter)
    assert max(median_areas) > 2.5 * min(median_areas)
    assert len(set(counts)) > 3
