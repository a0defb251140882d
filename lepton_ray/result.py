"""What :func:`lepton_ray.run` returns: history, summary, the trained model and ``predict``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class RunResult:
    history: Any  # pandas.DataFrame, one row per round
    summary: dict[str, Any]
    model: Any  # torch.nn.Module
    output_dir: Path
    classes: np.ndarray
    mean: np.ndarray
    scale: np.ndarray

    def predict_proba(self, X) -> np.ndarray:
        import torch

        X = np.asarray(X, dtype=np.float64)
        shape = np.shape(self.mean)  # the feature shape (one element per feature)
        if X.ndim != 1 + len(shape) or X.shape[1:] != shape:
            raise ValueError(f"X must have shape (n, {', '.join(map(str, shape))}), got {X.shape}")
        Z = ((X - self.mean) / self.scale).astype(np.float32)
        self.model.eval()
        with torch.no_grad():
            return torch.softmax(self.model(torch.as_tensor(Z)), dim=1).numpy()

    def predict(self, X) -> np.ndarray:
        """Class labels (in the data's own label values) for raw feature rows ``X``."""
        return self.classes[self.predict_proba(X).argmax(axis=1)]


def load_result(out_dir, *, key: bytes | None = None) -> RunResult:
    """Rebuild a :class:`RunResult` from a finished job's output directory. An encrypted
    model (``model.pt.enc``) needs its ``key`` (see ``lepton_ray.crypto.at_rest.load_key``)."""
    import io
    import json

    import torch

    from lepton_ray.config import load_spec
    from lepton_ray.errors import LeptonError
    from lepton_ray.learning.models import build_model
    from lepton_ray.outputs import MODEL, SUMMARY, output_path, read_history, read_output

    out = Path(out_dir)
    sealed = output_path(out, MODEL, encrypted=True)
    if key is None and sealed.exists():
        raise LeptonError(f"{sealed} is encrypted: pass key=load_key(...)")
    saved = torch.load(io.BytesIO(read_output(out, MODEL, key)), weights_only=False)
    spec = load_spec(saved["spec"])
    model = build_model(spec.model, saved["n_features"], len(saved["classes"]))
    model.load_state_dict(saved["state_dict"])
    return RunResult(
        history=read_history(out),
        summary=json.loads((out / SUMMARY).read_text()),
        model=model,
        output_dir=out,
        classes=np.asarray(saved["classes"]),
        mean=np.asarray(saved["mean"]),
        scale=np.asarray(saved["scale"]),
    )
