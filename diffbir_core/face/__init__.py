"""Face mode (blind face restoration, paper section 4 "BFR"): aligned 512 crops and whole photos.

- `align`   FFHQ-512 templates, similarity estimate, warp / inverse warp, soft paste-back.
- `detect`  face backends: offline dlib (HOG + 5 points from the face-recognition-models wheel) and
            facexlib (RetinaFace + ParseNet, as official DiffBIR), chosen explicitly or automatically.
- `restore` `FaceParams`, `FaceRestorer`, `restore_faces(img, face_fn, background_fn, params)`.

Importing this package loads nothing (dlib, facexlib, torch models are imported on first use).
"""
from .detect import DetectedFace, FaceBackendError, load_backend
from .restore import FaceInfo, FaceParams, FaceRestorer, FaceResult, restore_faces

__all__ = ["FaceParams", "FaceRestorer", "FaceResult", "FaceInfo", "restore_faces", "load_backend",
           "DetectedFace", "FaceBackendError"]
