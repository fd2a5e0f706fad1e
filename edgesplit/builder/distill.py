"""Knowledge distillation from a trained bundle: its ``full.onnx`` run with ONNX Runtime on the
student's own augmented batch (Hinton et al. 2015).

    loss = (1 - alpha) * CE(student, y) + alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))

The ``T^2`` factor keeps the soft term's gradient scale independent of ``T``. The teacher runs
in ONNX Runtime, not torch: a bundle is what the project ships (its CNN teacher's weights need
not be around as a checkpoint), and inference only needs no autograd graph. A bundle trained at
another resolution (the shipped 112-px Imagenette CNN for a 224-px ViT) sees the batch resized to
its input size: the labels it knows do not depend on the resolution it was trained at.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


class OnnxTeacher:
    """Logits of a bundle's full model for a normalised NCHW float batch."""

    def __init__(self, bundle_dir: str | Path, threads: int | None = None):
        import onnxruntime as ort

        path = Path(bundle_dir) / "full.onnx"
        if not path.is_file():
            raise FileNotFoundError(f"distillation teacher: no full.onnx in bundle {bundle_dir}")
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads or torch.get_num_threads()
        so.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        spec = self.session.get_inputs()[0]
        self.input_name = spec.name
        dims = spec.shape[-2:]
        # a fixed spatial size: the batch is resized to it (a dynamic one takes the batch as it is)
        self.size = tuple(dims) if all(isinstance(d, int) for d in dims) else None
        self.path = path

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.size is not None and tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x.float(), size=self.size, mode="bilinear", antialias=True, align_corners=False)
        arr = np.ascontiguousarray(x.detach().float().cpu().numpy())
        (logits,) = self.session.run(None, {self.input_name: arr})
        return torch.from_numpy(logits).to(x.device)


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    y: torch.Tensor,
    alpha: float,
    temperature: float,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    ce = F.cross_entropy(student_logits, y, label_smoothing=label_smoothing)
    t = temperature
    kl = F.kl_div(
        F.log_softmax(student_logits.float() / t, dim=1),
        F.log_softmax(teacher_logits.float() / t, dim=1),
        log_target=True,
        reduction="batchmean",
    )
    return (1 - alpha) * ce + alpha * t * t * kl
