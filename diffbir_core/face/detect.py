"""Face detection backends (boxes + 5 landmarks) and the optional face-parsing model.

Two backends, one interface (``backend.detect(img_hwc01) -> list[DetectedFace]``):

- ``dlib`` (offline default; works on a fresh machine): dlib's HOG frontal-face detector
  (``dlib.get_frontal_face_detector``, from the ``dlib-bin`` wheel) plus the 5-point landmark model
  ``shape_predictor_5_face_landmarks.dat`` shipped in the ``face-recognition-models`` wheel, loaded by
  path (the package is located, never imported). dlib's 5 points are: 0/1 outer/inner corner of the
  image-right eye, 2/3 outer/inner corner of the image-left eye, 4 bottom of the nose (subnasale);
  no mouth corners. They are aligned with all 5 points onto the matching FFHQ-512 ``dlib5`` template
  (see `align.FFHQ_512_DLIB5_TEMPLATE`), which lands the crop in the same frame as RetinaFace's.
  HOG finds roughly frontal faces of >= ~80 px; images are scaled up (only up) so the short side is at
  least 640 px before detecting, as the official helper does for RetinaFace (``resize=640``).
- ``facexlib`` (as official DiffBIR): RetinaFace-ResNet50 gives boxes and 5 points (eye centres, nose
  tip, mouth corners: the ``retinaface5`` template). Its weights are downloaded from GitHub releases at
  run time; we look for them, download only when online, and load them through
  `diffbir_core.weights.load_into` (strict, shape-checked).

`FaceParser` wraps facexlib's ParseNet (19 CelebAMask-HQ classes) and turns a 512 face into the
official soft paste mask (face classes kept; background, neck, cloth, hair, hat dropped; blurred).

`load_backend("auto")` uses facexlib when its weights are present (or downloadable) and otherwise
falls back to dlib, saying so in a notice. Every failure raises `FaceBackendError` naming what is
missing and how to get it.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..atomic import atomic_path
from ..weights import offline

__all__ = [
    "FaceBackendError",
    "DetectedFace",
    "DlibBackend",
    "FacexlibBackend",
    "FaceParser",
    "load_backend",
    "FACEXLIB_FILES",
    "facexlib_model_dir",
    "find_facexlib_file",
    "dlib_landmark_model_path",
    "BACKENDS",
]

BACKENDS = ("auto", "dlib", "facexlib")


class FaceBackendError(RuntimeError):
    """A face backend cannot be used: package missing, model file missing, or download impossible."""


@dataclass(frozen=True)
class DetectedFace:
    """One face in IMAGE pixels (pixel centres at integers): box (x1, y1, x2, y2), score, Kx2 points."""

    box: tuple[float, float, float, float]
    score: float
    landmarks: np.ndarray
    kind: str  # template name in align.TEMPLATES: "dlib5" | "retinaface5"

    @property
    def eye_distance(self) -> float:
        """Distance between the two eye centres (pixels)."""
        p = self.landmarks
        if self.kind == "dlib5":
            left, right = (p[2] + p[3]) / 2, (p[0] + p[1]) / 2
        else:
            left, right = p[0], p[1]
        return float(np.linalg.norm(right - left))

    def scaled(self, sx: float, sy: float) -> DetectedFace:
        """The same face in an image resized by (sx, sy) (half-pixel-centre convention)."""
        f = np.array([sx, sy])
        pts = (self.landmarks + 0.5) * f - 0.5
        x1, y1, x2, y2 = self.box
        box = ((x1 + 0.5) * sx - 0.5, (y1 + 0.5) * sy - 0.5, (x2 + 0.5) * sx - 0.5, (y2 + 0.5) * sy - 0.5)
        return DetectedFace(box=tuple(float(v) for v in box), score=self.score, landmarks=pts, kind=self.kind)


def _check_image(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"face detection needs an HxWx3 RGB image, got shape {img.shape}")
    return img


def _to_uint8(img: np.ndarray) -> np.ndarray:
    if img.dtype == np.uint8:
        return np.ascontiguousarray(img)
    return np.ascontiguousarray((np.clip(img, 0, 1) * 255.0).round().astype(np.uint8))


def _upscale_for_detection(img: np.ndarray, min_side: int, max_factor: float = 4.0) -> tuple[np.ndarray, float]:
    """Scale up (never down) so the short side is >= ``min_side``; returns (image, factor)."""
    import cv2

    h, w = img.shape[:2]
    f = min(max_factor, max(1.0, min_side / min(h, w)))
    if f == 1.0:
        return img, 1.0
    size = (int(round(w * f)), int(round(h * f)))
    return cv2.resize(img, size, interpolation=cv2.INTER_LINEAR), f


# ---------------------------------------------------------------------------------------------------
# dlib (offline)


def dlib_landmark_model_path(path: str | os.PathLike | None = None) -> Path:
    """Locate ``shape_predictor_5_face_landmarks.dat``: ``path``, ``$DIFFBIR_DLIB_LANDMARKS``, or the
    ``face-recognition-models`` wheel (found with importlib, not imported: it pulls in pkg_resources)."""
    name = "shape_predictor_5_face_landmarks.dat"
    looked: list[str] = []
    for cand in (path, os.environ.get("DIFFBIR_DLIB_LANDMARKS")):
        if cand:
            p = Path(cand).expanduser()
            if p.is_file():
                return p
            looked.append(str(p))
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            p = Path(loc) / "models" / name
            if p.is_file():
                return p
            looked.append(str(p))
    raise FaceBackendError(
        f"dlib face backend: landmark model {name} not found (looked in: {', '.join(looked) or 'nothing'}).\n"
        "  It ships in the 'face-recognition-models' package: pip install face-recognition-models\n"
        "  (or point $DIFFBIR_DLIB_LANDMARKS at a copy of the file)."
    )


class DlibBackend:
    """Offline detector: dlib HOG boxes + dlib 5-point landmarks (``dlib5`` template)."""

    name = "dlib"
    kind = "dlib5"

    def __init__(self, landmark_model: str | os.PathLike | None = None, *, min_side: int = 640, threshold: float = 0.0):
        try:
            import dlib
        except ImportError as e:
            raise FaceBackendError(
                "dlib face backend: the 'dlib' module is not installed. Install the prebuilt wheel: "
                "pip install dlib-bin face-recognition-models"
            ) from e
        self.model_path = dlib_landmark_model_path(landmark_model)
        self._detector = dlib.get_frontal_face_detector()
        try:
            self._predictor = dlib.shape_predictor(str(self.model_path))
        except RuntimeError as e:
            raise FaceBackendError(f"dlib face backend: could not read {self.model_path}: {e}") from e
        self.min_side = int(min_side)
        self.threshold = float(threshold)

    def detect(self, img: np.ndarray) -> list[DetectedFace]:
        """Faces in ``img`` (HxWx3 RGB, float [0,1] or uint8), coordinates in ``img`` pixels."""
        u8 = _to_uint8(_check_image(img))
        big, f = _upscale_for_detection(u8, self.min_side)
        rects, scores, _ = self._detector.run(big, 0, self.threshold)
        faces = []
        for rect, score in zip(rects, scores):
            shape = self._predictor(big, rect)
            pts = np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float64)  # 5 x 2, in `big`
            box = (rect.left(), rect.top(), rect.right(), rect.bottom())
            face = DetectedFace(box=tuple(float(v) for v in box), score=float(score), landmarks=pts, kind=self.kind)
            faces.append(face.scaled(1.0 / f, 1.0 / f) if f != 1.0 else face)
        return faces


# ---------------------------------------------------------------------------------------------------
# facexlib (RetinaFace + ParseNet; weights from GitHub releases)

_GH = "https://github.com/xinntao/facexlib/releases/download"
_MB = 1024 * 1024
# name -> (file name, URL, approximate size in bytes) as facexlib's own init_*_model functions use them.
FACEXLIB_FILES: dict[str, tuple[str, str, int]] = {
    "retinaface_resnet50": ("detection_Resnet50_Final.pth", f"{_GH}/v0.1.0/detection_Resnet50_Final.pth", 104 * _MB),
    "retinaface_mobile0.25": (
        "detection_mobilenet0.25_Final.pth",
        f"{_GH}/v0.1.0/detection_mobilenet0.25_Final.pth",
        2 * _MB,
    ),
    "parsenet": ("parsing_parsenet.pth", f"{_GH}/v0.2.2/parsing_parsenet.pth", 81 * _MB),
}


def facexlib_model_dir() -> Path:
    """The folder facexlib itself downloads to (``<site-packages>/facexlib/weights``)."""
    spec = importlib.util.find_spec("facexlib")
    if spec is None or not spec.submodule_search_locations:
        raise FaceBackendError("facexlib face backend: the 'facexlib' package is not installed (pip install facexlib)")
    return Path(list(spec.submodule_search_locations)[0]) / "weights"


def find_facexlib_file(name: str, model_dir: str | os.PathLike | None = None, *, download: bool | None = None) -> Path:
    """Path of facexlib weight ``name`` (a key of `FACEXLIB_FILES`), downloading it when allowed.

    Looks in ``model_dir``, ``$DIFFBIR_WEIGHTS_DIR`` and facexlib's own weights folder. Downloads (into
    ``model_dir`` or facexlib's folder) only when ``download`` is not False and neither HF_HUB_OFFLINE
    (``weights.offline()``) is set. Raises `FaceBackendError` naming the file, the URL and where to put it.
    """
    if name not in FACEXLIB_FILES:
        raise FaceBackendError(f"unknown facexlib model {name!r}; known: {', '.join(FACEXLIB_FILES)}")
    fname, url, approx = FACEXLIB_FILES[name]
    home = facexlib_model_dir()
    dirs = [Path(d).expanduser() for d in (model_dir, os.environ.get("DIFFBIR_WEIGHTS_DIR")) if d] + [home]
    for d in dirs:
        p = d / fname
        if p.is_file():
            if p.stat().st_size < 0.5 * approx:
                raise FaceBackendError(
                    f"facexlib face backend: {p} is {p.stat().st_size} bytes, but {fname} is about "
                    f"{approx // _MB or 1} MiB: a truncated download? Delete it and fetch it again from {url}"
                )
            return p
    target = Path(model_dir).expanduser() if model_dir else home
    how = (
        f"  Download {url}\n  and put it in {target} (facexlib's model folder), or in $DIFFBIR_WEIGHTS_DIR.\n"
        "  Or use the offline backend: --face-backend dlib."
    )
    looked = ", ".join(str(d) for d in dirs)
    if download is False or offline():
        why = "downloads are disabled (HF_HUB_OFFLINE=1)" if download is not False else "download not allowed"
        raise FaceBackendError(
            f"facexlib face backend: weight file {fname} not found (looked in: {looked}); {why}.\n{how}"
        )
    import torch

    try:
        with atomic_path(target / fname) as tmp:  # complete or absent, fsync'ed (`diffbir_core.atomic`)
            torch.hub.download_url_to_file(url, str(tmp), progress=True)
    except Exception as e:  # no internet, read-only folder, HTTP error: say which and how to fix it
        raise FaceBackendError(
            f"facexlib face backend: weight file {fname} not found (looked in: {looked}) and "
            f"the download failed ({type(e).__name__}: {e}).\n{how}"
        ) from e
    return target / fname


def _torch_device(device):
    import torch

    return torch.device(device) if not isinstance(device, torch.device) else device


class FacexlibBackend:
    """RetinaFace (facexlib) boxes + 5 points (``retinaface5`` template), as the official DiffBIR helper."""

    name = "facexlib"
    kind = "retinaface5"

    def __init__(
        self,
        model_dir: str | os.PathLike | None = None,
        *,
        det_model: str = "retinaface_resnet50",
        device="cpu",
        conf_threshold: float = 0.8,
        min_side: int = 640,
        download: bool | None = None,
    ):
        if det_model not in ("retinaface_resnet50", "retinaface_mobile0.25"):
            raise FaceBackendError(
                f"unknown RetinaFace model {det_model!r}: use retinaface_resnet50 or retinaface_mobile0.25"
            )
        path = find_facexlib_file(det_model, model_dir, download=download)
        try:
            from facexlib.detection.retinaface import RetinaFace
        except ImportError as e:
            raise FaceBackendError(f"facexlib face backend: cannot import facexlib ({e}); pip install facexlib") from e
        from ..weights import load_into, load_state_dict

        self.device = _torch_device(device)
        with warnings.catch_warnings():  # torchvision's "pretrained is deprecated" inside facexlib
            warnings.simplefilter("ignore", UserWarning)
            net = RetinaFace(network_name=det_model.split("_", 1)[1], half=False, device=self.device)
        self.report = load_into(net, load_state_dict(path), what=f"facexlib {det_model} ({path.name})")
        self.net = net.eval().to(self.device)
        self.model_path = path
        self.conf_threshold = float(conf_threshold)
        self.min_side = int(min_side)

    def detect(self, img: np.ndarray) -> list[DetectedFace]:
        import torch

        u8 = _to_uint8(_check_image(img))
        big, f = _upscale_for_detection(u8, self.min_side)
        bgr = np.ascontiguousarray(big[..., ::-1]).astype(np.float32)  # RetinaFace takes BGR 0..255
        with torch.no_grad():
            rows = self.net.detect_faces(bgr, conf_threshold=self.conf_threshold)  # N x 15
        faces = []
        for r in np.asarray(rows, dtype=np.float64).reshape(-1, 15):
            face = DetectedFace(
                box=tuple(float(v) for v in r[:4]),
                score=float(r[4]),
                landmarks=r[5:15].reshape(5, 2).copy(),
                kind=self.kind,
            )
            faces.append(face.scaled(1.0 / f, 1.0 / f) if f != 1.0 else face)
        return faces


class FaceParser:
    """facexlib ParseNet face parsing -> soft paste mask (official helper's ``use_parse`` branch)."""

    # CelebAMask-HQ labels kept in the mask (1) or dropped (0): background 0, neck 14, cloth 16,
    # hair 17, hat 18 are dropped, as in the official MASK_COLORMAP.
    KEEP = np.array([0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 1, 0, 0, 0], dtype=np.float32)

    def __init__(self, model_dir: str | os.PathLike | None = None, *, device="cpu", download: bool | None = None):
        path = find_facexlib_file("parsenet", model_dir, download=download)
        try:
            from facexlib.parsing.parsenet import ParseNet
        except ImportError as e:
            raise FaceBackendError(f"face parsing: cannot import facexlib ({e}); pip install facexlib") from e
        from ..weights import load_into, load_state_dict

        self.device = _torch_device(device)
        net = ParseNet(in_size=512, out_size=512, parsing_ch=19)
        self.report = load_into(net, load_state_dict(path), what=f"facexlib ParseNet ({path.name})")
        self.net = net.eval().to(self.device)
        self.model_path = path

    def labels(self, face: np.ndarray) -> np.ndarray:
        """512x512 int label map of a face (HxWx3 RGB [0,1]; resized to 512 if needed)."""
        import cv2
        import torch

        face = np.asarray(face, dtype=np.float32)
        if face.shape[:2] != (512, 512):
            face = cv2.resize(face, (512, 512), interpolation=cv2.INTER_LINEAR)
        x = torch.from_numpy(np.ascontiguousarray(face)).permute(2, 0, 1)[None].to(self.device)  # 1x3x512x512
        x = (x - 0.5) / 0.5  # normalise to [-1, 1] as the official helper
        with torch.no_grad():
            logits = self.net(x)[0]  # 1 x 19 x 512 x 512
        return logits.argmax(dim=1)[0].cpu().numpy()

    def mask(self, face: np.ndarray) -> np.ndarray:
        """Soft mask in [0, 1] (512x512): face classes, blurred twice (101 px, sigma 11), 10 px border zeroed."""
        import cv2

        m = self.KEEP[self.labels(face)]
        m = cv2.GaussianBlur(m, (101, 101), 11)
        m = cv2.GaussianBlur(m, (101, 101), 11)
        t = 10
        m[:t, :] = 0
        m[-t:, :] = 0
        m[:, :t] = 0
        m[:, -t:] = 0
        return np.clip(m, 0.0, 1.0)


# ---------------------------------------------------------------------------------------------------


def load_backend(
    name: str = "auto", *, model_dir: str | os.PathLike | None = None, device="cpu", download: bool | None = None
) -> tuple[DlibBackend | FacexlibBackend, list[str]]:
    """Build face backend ``name`` ("auto" | "dlib" | "facexlib"); returns (backend, notices).

    "auto": facexlib when its RetinaFace weights are present or downloadable, else dlib with a notice
    saying why. An explicit name never falls back: its failure raises `FaceBackendError`.
    """
    if name not in BACKENDS:
        raise FaceBackendError(f"unknown face backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name == "dlib":
        return DlibBackend(), []
    if name == "facexlib":
        return FacexlibBackend(model_dir, device=device, download=download), []
    try:
        return FacexlibBackend(model_dir, device=device, download=download), []
    except FaceBackendError as e_fx:
        why = str(e_fx).splitlines()[0].removeprefix("facexlib face backend: ")
        try:
            backend = DlibBackend()
        except FaceBackendError as e_dl:
            raise FaceBackendError(f"no face backend works.\n  facexlib: {e_fx}\n  dlib: {e_dl}") from e_dl
        note = (
            f"face backend: facexlib unavailable ({why}); using the offline dlib backend "
            "(HOG detector + 5-point landmarks)"
        )
        return backend, [note]
