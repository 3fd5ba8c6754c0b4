"""A small, real multimodal model family for measuring MMER honestly.

A char-level Llama base pretrained on tiny Shakespeare, and MLLMs fine-tuned
from it (full fine-tuning of the LLM plus each modality's own encoder and
projector): handwritten digit images, spoken digits, speakers, and a
sequential fine-tune. See examples/README.md.
"""
