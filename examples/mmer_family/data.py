"""The datasets, their fixed splits, and the derived files the demo ships.

* Shakespeare (tiny shakespeare, public domain): the first 90% trains the
  base; the last 10% is held out for perplexity (shipped as
  ``data/shakespeare_heldout.txt``).
* Handwritten digits: scikit-learn's 8x8 set; a fixed 60/20/20 split.
* Spoken digits (FSDD, CC BY-SA 4.0): log-mel features computed with torch
  (no torchaudio), shipped quantised as ``data/fsdd_logmel.npz``; the
  dataset's own convention, takes 0-4, is the test split, takes 5-9 are
  validation, 10-49 training.
"""

from __future__ import annotations

import math
import os
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
DATA = HERE.parent / "data"
SHARED_DATA = Path(os.environ.get("MMER_SHARED_DATA", HERE.parents[2] / "shared" / "data"))
FEATURES = DATA / "fsdd_logmel.npz"
HELDOUT = DATA / "shakespeare_heldout.txt"

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
SPEAKERS = ["george", "jackson", "lucas", "nicolas", "theo", "yweweler"]

SAMPLE_RATE = 8000
N_FFT = 256
HOP = 128
N_MELS = 24
FRAMES = 48


@dataclass
class Split:
    """Features and integer labels of one split."""

    x: torch.Tensor
    y: torch.Tensor


# ---- Shakespeare ----------------------------------------------------------------------------
def shakespeare_full() -> str:
    path = SHARED_DATA / "tinyshakespeare" / "input.txt"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: retraining the base needs ../shared/data "
                                "(or MMER_SHARED_DATA); the ready-made checkpoints do not")
    return path.read_text()


def shakespeare_split() -> tuple[str, str]:
    text = shakespeare_full()
    cut = int(0.9 * len(text))
    return text[:cut], text[cut:]


def shakespeare_heldout() -> str:
    if HELDOUT.exists():
        return HELDOUT.read_text()
    return shakespeare_split()[1]


# ---- Handwritten digits ---------------------------------------------------------------------
def digits_splits(seed: int = 0) -> dict[str, Split]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_train, n_val = int(0.6 * len(y)), int(0.2 * len(y))
    idx = {"train": perm[:n_train], "val": perm[n_train:n_train + n_val], "test": perm[n_train + n_val:]}
    return {k: Split(x[i], y[i]) for k, i in idx.items()}


# ---- Spoken digits --------------------------------------------------------------------------
def mel_filterbank(n_mels: int = N_MELS, n_fft: int = N_FFT, sr: int = SAMPLE_RATE) -> torch.Tensor:
    """Triangular filters on the HTK mel scale, shape (n_mels, n_fft // 2 + 1)."""
    def hz_to_mel(f):
        return 2595.0 * math.log10(1.0 + f / 700.0)

    mels = torch.linspace(hz_to_mel(0.0), hz_to_mel(sr / 2), n_mels + 2)
    hz = 700.0 * (10 ** (mels / 2595.0) - 1.0)
    bins = torch.linspace(0, sr / 2, n_fft // 2 + 1)
    fb = torch.zeros(n_mels, len(bins))
    for m in range(1, n_mels + 1):
        lo, mid, hi = hz[m - 1], hz[m], hz[m + 1]
        up = (bins - lo) / (mid - lo)
        down = (hi - bins) / (hi - mid)
        fb[m - 1] = torch.clamp(torch.minimum(up, down), min=0.0)
    return fb


def log_mel(samples: torch.Tensor) -> torch.Tensor:
    """(FRAMES, N_MELS) log-mel energies of a waveform cropped or padded to FRAMES hops."""
    length = (FRAMES - 1) * HOP
    samples = samples[:length]
    samples = torch.nn.functional.pad(samples, (0, length - len(samples)))
    spec = torch.stft(samples, n_fft=N_FFT, hop_length=HOP, window=torch.hann_window(N_FFT), center=True,
                      return_complex=True).abs() ** 2
    return torch.log(mel_filterbank() @ spec + 1e-6).T


def read_wav(path: Path) -> torch.Tensor:
    with wave.open(str(path)) as w:
        if w.getframerate() != SAMPLE_RATE or w.getsampwidth() != 2 or w.getnchannels() != 1:
            raise ValueError(f"{path}: expected 8 kHz 16-bit mono")
        raw = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    return torch.tensor(raw.astype(np.float32) / 32768.0)


def build_fsdd_features(out: Path = FEATURES) -> Path:
    """Compute log-mel features of all FSDD recordings and save them quantised to uint8."""
    files = sorted((SHARED_DATA / "fsdd" / "recordings").glob("*.wav"))
    if len(files) != 3000:
        raise FileNotFoundError(f"expected 3000 FSDD recordings under {SHARED_DATA / 'fsdd'}, found {len(files)}")
    feats, digit, speaker, take = [], [], [], []
    for f in files:
        d, s, t = f.stem.split("_")
        feats.append(log_mel(read_wav(f)))
        digit.append(int(d))
        speaker.append(SPEAKERS.index(s))
        take.append(int(t))
    x = torch.stack(feats)
    lo, hi = float(x.min()), float(x.max())
    q = torch.round((x - lo) / (hi - lo) * 255).to(torch.uint8).numpy()
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, features=q, digit=np.array(digit, np.int8), speaker=np.array(speaker, np.int8),
                        take=np.array(take, np.int8), lo=lo, hi=hi)
    return out


def fsdd_splits(label: str) -> dict[str, Split]:
    """``label`` is 'digit' or 'speaker'. Features are scaled to [0, 1]."""
    if not FEATURES.exists():
        build_fsdd_features()
    z = np.load(FEATURES)
    x = torch.tensor(z["features"], dtype=torch.float32) / 255.0
    y = torch.tensor(z[label], dtype=torch.long)
    take = torch.tensor(z["take"], dtype=torch.long)
    masks = {"test": take < 5, "val": (take >= 5) & (take < 10), "train": take >= 10}
    return {k: Split(x[m], y[m]) for k, m in masks.items()}
