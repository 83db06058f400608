"""Writing generated videos: mp4 through imageio-ffmpeg (which ships its own ffmpeg), else GIF."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from .io import atomic_path

FPS = {"wan": 16, "cogvideox": 8}  # the frame rates the families' model cards export at


def video_format(requested: str) -> str:
    """``mp4`` when asked for and imageio-ffmpeg is installed (``pip install selfnpo[video]``), else ``gif``."""
    if requested == "mp4" and importlib.util.find_spec("imageio_ffmpeg") is None:
        return "gif"
    return requested


def to_uint8(frames) -> np.ndarray:
    """Frames ``[F, H, W, 3]`` as floats in [0, 1] (diffusers' ``output_type="np"``) -> uint8."""
    arr = np.asarray(frames)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0.0, 1.0) * 255).round().astype(np.uint8)
    return arr


def write_video(frames, path: str | Path, fps: int, fmt: str) -> None:
    """Write ``frames`` ``[F, H, W, 3]`` to ``path`` atomically, as ``mp4`` (H.264) or ``gif``."""
    arr = to_uint8(frames)
    with atomic_path(path) as tmp:
        if fmt == "mp4":
            import imageio_ffmpeg

            h, w = arr.shape[1:3]
            writer = imageio_ffmpeg.write_frames(
                str(tmp),
                (w, h),
                fps=fps,
                codec="libx264",
                macro_block_size=2,  # tiny and odd sizes are padded to even, not rescaled
                output_params=["-f", "mp4"],  # the temporary name has no .mp4 suffix
                ffmpeg_log_level="error",
            )
            writer.send(None)
            for f in arr:
                writer.send(np.ascontiguousarray(f))
            writer.close()
        else:
            from PIL import Image

            ims = [Image.fromarray(f) for f in arr]
            ims[0].save(
                tmp, format="GIF", save_all=True, append_images=ims[1:], duration=round(1000 / fps), loop=0
            )
