"""The lifelong family's new datasets, all shipped with scikit-learn or generated here; fixed splits.

* Breast-cancer measurements: scikit-learn's bundled Wisconsin set (569 cases,
  30 features), a fixed 60/20/20 split (permutation seed 0), standardised with
  the training split's mean and standard deviation.
* Waveforms: sine, square, sawtooth, chirp; 128 samples each, random
  frequency, phase, amplitude and noise; generated per split from a fixed seed.
* Point clouds: 64 points sampled uniformly on the surface of a sphere, cube,
  cylinder or cone, turned about the vertical axis and scaled at random, with
  jitter; generated per
  split from a fixed seed.
* Short videos: 6 frames, each an 8x8 digit image from the digits set's own
  split (so no test image is seen in training); one digit appears 3 times, 3
  other digits once each, in random order; the answer is the most frequent
  digit.
* Digit parity: the 8x8 digit images of ``vision_digit`` (same split), labelled
  even or odd.
"""

from __future__ import annotations

import math

import torch

from mmer_family.data import Split, digits_splits

SIZES = {"train": 1500, "val": 300, "test": 300}  # generated sets
SPLIT_SEED = {"train": 11, "val": 12, "test": 13}  # fixed: the splits never depend on the fine-tune seed

WAVES = ("sine", "square", "sawtooth", "chirp")
SHAPES = ("sphere", "cube", "cylinder", "cone")
WAVE_LENGTH = 128
POINTS = 64
FRAMES = 6


def cancer_splits() -> dict[str, Split]:
    from sklearn.datasets import load_breast_cancer

    d = load_breast_cancer()
    x = torch.tensor(d.data, dtype=torch.float32)
    y = torch.tensor(d.target, dtype=torch.long)  # 0 malignant, 1 benign
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    n_train, n_val = int(0.6 * len(y)), int(0.2 * len(y))
    idx = {"train": perm[:n_train], "val": perm[n_train:n_train + n_val], "test": perm[n_train + n_val:]}
    mean, std = x[idx["train"]].mean(0), x[idx["train"]].std(0)
    x = ((x - mean) / std).clamp(-5, 5)
    return {k: Split(x[i], y[i]) for k, i in idx.items()}


def _waveform(kind: int, gen: torch.Generator) -> torch.Tensor:
    t = torch.arange(WAVE_LENGTH, dtype=torch.float32) / WAVE_LENGTH

    def u(lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=gen))

    freq, phase, amp = u(2.0, 8.0), u(0.0, 1.0), u(0.5, 1.5)
    cycles = freq * t + phase
    if WAVES[kind] == "sine":
        w = torch.sin(2 * math.pi * cycles)
    elif WAVES[kind] == "square":
        w = torch.sign(torch.sin(2 * math.pi * cycles))
    elif WAVES[kind] == "sawtooth":
        w = 2 * (cycles - torch.floor(cycles)) - 1
    else:  # chirp: frequency sweeps from f0 to f1 over the window
        f0, f1 = u(1.0, 3.0), u(8.0, 14.0)
        w = torch.sin(2 * math.pi * (f0 * t + 0.5 * (f1 - f0) * t * t + phase))
    noise = u(0.1, 0.5)
    return amp * w + noise * torch.randn(WAVE_LENGTH, generator=gen)


def waveform_splits() -> dict[str, Split]:
    out = {}
    for split, n in SIZES.items():
        gen = torch.Generator().manual_seed(SPLIT_SEED[split])
        y = torch.randint(len(WAVES), (n,), generator=gen)
        x = torch.stack([_waveform(int(k), gen) for k in y]) / 2.0
        out[split] = Split(x.unsqueeze(-1), y)  # (n, 128, 1): one channel over time
    return out


def _surface(kind: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """n points uniformly distributed on the surface of a unit-sized shape."""
    rand = torch.rand(n, 3, generator=gen)
    if SHAPES[kind] == "sphere":
        p = torch.randn(n, 3, generator=gen)
        return p / p.norm(dim=1, keepdim=True)
    if SHAPES[kind] == "cube":  # a random face, a uniform point on it
        p = 2 * rand - 1
        axis = torch.randint(3, (n,), generator=gen)
        side = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
        p[torch.arange(n), axis] = side
        return p
    angle = 2 * math.pi * rand[:, 0]
    if SHAPES[kind] == "cylinder":  # radius 1, height 2; lateral area 4 pi, caps 2 pi
        lateral = rand[:, 1] < 2 / 3
        r = torch.where(lateral, torch.ones(n), torch.sqrt(rand[:, 2]))
        z = torch.where(lateral, 2 * rand[:, 2] - 1, torch.where(rand[:, 2] < 0.5, -1.0, 1.0))
        return torch.stack([r * torch.cos(angle), r * torch.sin(angle), z], dim=1)
    # cone: base radius 1 at z = -1, apex at z = 1; lateral area pi * sqrt(5), base pi
    lateral = rand[:, 1] < math.sqrt(5) / (1 + math.sqrt(5))
    v = torch.sqrt(torch.rand(n, generator=gen))  # distance from the apex, area-uniform
    r = torch.where(lateral, v, torch.sqrt(rand[:, 2]))
    z = torch.where(lateral, 1 - 2 * v, -torch.ones(n))
    return torch.stack([r * torch.cos(angle), r * torch.sin(angle), z], dim=1)


def pointcloud_splits() -> dict[str, Split]:
    out = {}
    for split, n in SIZES.items():
        gen = torch.Generator().manual_seed(100 + SPLIT_SEED[split])
        y = torch.randint(len(SHAPES), (n,), generator=gen)
        clouds = []
        for k in y:
            p = _surface(int(k), POINTS, gen)
            angle = 2 * math.pi * float(torch.rand((), generator=gen))  # a random turn about the z axis
            c, s = math.cos(angle), math.sin(angle)
            turn = torch.tensor([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
            scale = 0.7 + 0.6 * float(torch.rand((), generator=gen))
            p = scale * p @ turn + 0.03 * torch.randn(POINTS, 3, generator=gen)
            clouds.append(p - p.mean(0))
        out[split] = Split(torch.stack(clouds), y)
    return out


def video_splits() -> dict[str, Split]:
    images = digits_splits()
    out = {}
    for split, n in SIZES.items():
        gen = torch.Generator().manual_seed(200 + SPLIT_SEED[split])
        pool = images[split]
        by_digit = [(pool.y == d).nonzero().squeeze(1) for d in range(10)]
        videos, labels = [], []
        for _ in range(n):
            digits = torch.randperm(10, generator=gen)[:4].tolist()  # the first is the frequent one
            frames = [digits[0]] * 3 + digits[1:]
            order = torch.randperm(FRAMES, generator=gen).tolist()
            idx = [int(by_digit[frames[i]][torch.randint(len(by_digit[frames[i]]), (1,), generator=gen)])
                   for i in order]
            videos.append(pool.x[idx])
            labels.append(digits[0])
        out[split] = Split(torch.stack(videos), torch.tensor(labels))
    return out


def parity_splits() -> dict[str, Split]:
    return {k: Split(s.x, s.y % 2) for k, s in digits_splits().items()}
