"""A transformers ``TrainerCallback`` that puts the trained model into an MMER store when training ends.

    from mmer_cl.integrations import MMERCallback

    trainer = Trainer(model, args, train_dataset=...,
                      callbacks=[MMERCallback("my-store", name="vision", modality="vision", task="vqa")])
    trainer.train()          # at the end: saved, registered, expanded (a new version is current)

The model (a full model, or a peft model whose adapter is saved as an
adapter) is written with ``save_pretrained(safe_serialization=True)`` to a
temporary directory, together with the trainer's tokenizer/processor, then
registered (the store keeps everything it needs, so the directory is removed
afterwards) and, with ``expand=True``, merged into a new version. Only the
main process does this; the others return at once.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from transformers import TrainerCallback

from mmer_cl.errors import MmerError


class MMERCallback(TrainerCallback):
    """Register the trained model as entry ``name`` at ``on_train_end`` and (optionally) expand.

    ``store`` is a :class:`~mmer_cl.store.Store` or the path of one. ``update``
    registers a new revision of an existing entry ``name``; ``params`` are the
    merge parameters of the expansion (default: the current version's);
    ``register_kwargs`` go to :meth:`Store.register` (``llm_prefix``, ``tags``,
    ``description`` ...). After training, ``registered`` and ``expanded`` hold
    the results.
    """

    def __init__(self, store, name: str, modality: str, task: str = "default", expand: bool = True, *,
                 params=None, update: bool = False, register_kwargs: dict | None = None):
        from mmer_cl.runtime.names import validate_name

        self.store = store
        self.name = validate_name(name, "entry name")
        self.modality = validate_name(modality, "modality")
        self.task = validate_name(task, "task")
        self.expand = expand
        self.params = params
        self.update = update
        self.register_kwargs = dict(register_kwargs or {})
        self.registered = None
        self.expanded = None

    def _open(self):
        from mmer_cl.store import Store

        if isinstance(self.store, Store):
            return self.store, False
        return Store.open(Path(self.store)), True

    def on_train_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if not state.is_world_process_zero:
            return control
        if model is None:
            raise MmerError("MMERCallback got no model at the end of training; pass it to Trainer(model=...)")
        model = getattr(model, "module", model)  # unwrap DistributedDataParallel and the like
        tokenizer = processing_class if processing_class is not None else kwargs.get("tokenizer")
        store, owned = self._open()
        try:
            with tempfile.TemporaryDirectory(prefix="mmer-callback-") as tmp:
                model.save_pretrained(tmp, safe_serialization=True)
                if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
                    tokenizer.save_pretrained(tmp)
                self.registered = store.register(tmp, self.name, self.modality, self.task, update=self.update,
                                                 **self.register_kwargs)
            if self.expand:
                self.expanded = store.expand(self.params)
        finally:
            if owned:
                store.close()
        return control
