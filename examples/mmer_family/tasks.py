"""The family's tasks: which data, which prompt, which answer words."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from mmer_family import data


@dataclass(frozen=True)
class Task:
    name: str            # also the registry entry name
    modality: str        # vision | audio
    prompt: str          # text after the modality prefix
    labels: tuple[str, ...]
    splits: Callable[[], dict[str, data.Split]]
    feature_shape: tuple[int, ...]

    @property
    def chance(self) -> float:
        return 1.0 / len(self.labels)


TASKS: dict[str, Task] = {
    "vision_digit": Task("vision_digit", "vision", "digit: ", tuple(data.DIGIT_WORDS), data.digits_splits, (64,)),
    "audio_digit": Task("audio_digit", "audio", "said: ", tuple(data.DIGIT_WORDS),
                        lambda: data.fsdd_splits("digit"), (data.FRAMES, data.N_MELS)),
    "audio_speaker": Task("audio_speaker", "audio", "voice: ", tuple(data.SPEAKERS),
                          lambda: data.fsdd_splits("speaker"), (data.FRAMES, data.N_MELS)),
}
