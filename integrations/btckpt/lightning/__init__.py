"""Lightning integration: a ``CheckpointIO`` plugin writing btckpt folders, a ``ModelCheckpoint`` with the
platform's defaults, and ``resume_path()``.

Mapping (Lightning's checkpoint dict -> ``<dirpath>/checkpoint-<global_step>/``): ``state_dict`` is the
``model`` group (``model.safetensors``, the LightningModule's own keys), ``optimizer_states`` the
``optimizer`` group, ``lr_schedulers`` the ``scheduler`` group, every other key (``loops``, ``callbacks``,
``hyper_parameters``, ``epoch``, ``global_step``, user keys) a group of its own: tensors to safetensors,
the rest JSON in the manifest. Nothing is pickled, on saving or loading.

The path ModelCheckpoint asks for (``<dirpath>/<filename>.ckpt``, e.g. ``epoch=0-step=100.ckpt`` or
``last.ckpt``) becomes a *link file*: a few bytes of JSON naming the folder, written atomically after the
folder committed. Several names at one step (a top-k name and ``last.ckpt``) share one folder; the folder
goes away when the last name pointing at it is removed (``save_top_k``). A path already named
``checkpoint-<N>`` is the folder itself.

Async: the write, checksums, commit and link run on btckpt's background writer. The dict holds live
parameters and optimizer moments, so they are copied into btckpt's reusable staging arena first. With
:class:`ModelCheckpoint` (this module's), a save made at a training batch end registers the trainer's
optimizers with btckpt's step gate: parameters and moments then copy in the background while the next
forward/backward runs, and the next ``optimizer.step()`` waits for that copy (``background_copy=False``
turns this off). Saves at an epoch's last batch, the final step, or from validation copy everything
before returning (epoch-end callbacks such as SWA write parameters in place). A callback that writes
parameters in place in ``on_train_batch_start``/``on_before_optimizer_step`` must call
:meth:`SafetensorsCheckpointIO.fence` first. Otherwise ``save_checkpoint`` returns after one memcpy.

Several processes (``strategy="ddp"``): Lightning calls ``save_checkpoint`` on rank 0 only. With
:class:`ModelCheckpoint` (this module's) every rank's RNG state is still saved: each rank hands its state to
rank 0 through the c10d store while Lightning builds the dict, and the one commit holds
``rng_state_<rank>.json`` for every rank; on resume each rank restores its own.

Where checkpoints go: with ``$BT_CHECKPOINT_DIR`` set (a local folder), every checkpoint this plugin writes is
stored directly in it, whichever ``ModelCheckpoint`` chose the path (this module's, Lightning's own, the
default one Lightning adds, a subclass), so the platform backs it up and ``resume_path()``,
``ckpt_path="last"`` and ``ckpt_path="best"`` find it after a restart. Lightning's folder choice
(``ModelCheckpoint``'s ``dirpath``, resolved in its ``setup`` and for ``ckpt_path="last"``) is routed through
:meth:`SafetensorsCheckpointIO.placement` for trainers that use this plugin, so Lightning's names
(``last.ckpt``, ``epoch=0-step=5.ckpt``) and its records (``best_model_path``) name the real place; any other
path handed to ``save_checkpoint`` (``trainer.save_checkpoint("x.ckpt")``) is stored under its file name in
``$BT_CHECKPOINT_DIR`` too, and loading or removing that path finds it there. An explicit ``dirpath`` (or a
saved path) in another folder is still redirected, with one warning naming both folders: checkpoints
outside ``$BT_CHECKPOINT_DIR`` would be neither backed up nor found on a restart. Several callbacks then
share the folder, so give them distinct ``filename=`` patterns. Unset, paths are used as given.

Sharded models (FSDP2 ``fully_shard`` / tensor parallel in ``configure_model``): use
:class:`ModelParallelStrategy` (Lightning's, same arguments; Lightning's own saves and loads around the
plugin); FSDP1: :class:`FSDPStrategy` (Lightning's ``FSDPStrategy``, same arguments). Every rank then writes
its own shards in one commit and a resume reshards to any world size; see
:mod:`btckpt.lightning.strategies`. Lightning's ``ModelParallelStrategy``/``FSDPStrategy``/``DeepSpeedStrategy``
with this plugin are refused when :class:`ModelCheckpoint` sets up.

HF models: with :class:`ModelCheckpoint` (this module's; it hands the LightningModule to the plugin) and a
``transformers.PreTrainedModel`` inside the LightningModule (e.g. ``self.model``), each folder is also
servable: ``model.safetensors`` keys that model's weights as HF does (``model.`` stripped; other keys kept)
and ``config.json`` (+ ``generation_config.json`` when it generates) join the commit, so
``AutoModelForCausalLM.from_pretrained(folder)`` loads it; the manifest's ``meta`` records the mapping and
loading gives Lightning its original keys. ``SafetensorsCheckpointIO(hf_model=...)``: True (default) finds
the one PreTrainedModel (several: none, one warning), ``"backbone.lm"`` names it, False turns it off. A
key collision from the stripping is refused with an error.

Package: this module (the public names), ``plugin`` (:class:`SafetensorsCheckpointIO`), ``callback``
(:class:`ModelCheckpoint`, Lightning's folder choice routed through the plugin), ``placement`` (where
checkpoints go), ``dict_io`` (the Lightning dict written as groups and read back), ``state`` (the Lightning
dict <-> groups, link files, ``resume_path``), ``rng`` (every rank's RNG through the c10d store), ``servable``
(HF model folders), ``strategies`` (FSDP / ModelParallel / DeepSpeed). An adapter: of btckpt it imports only
``btckpt.adapters`` (the Checkpointer and everything else of the core it uses come through it),
``btckpt.errors``, ``btckpt.config`` and its own modules; never ``btckpt.hf`` or ``btckpt.cli``
(``tests/test_imports.py`` checks it). Its retention (link files counted per folder, removal markers) is
``ModelCheckpoint``'s, carried out by :class:`btckpt.adapters.LinkRefcount` (a framework's delete waits for
the commit of the save that replaces it).
"""

from __future__ import annotations

from .callback import ModelCheckpoint
from .plugin import SafetensorsCheckpointIO
from .state import LINK_FORMAT, resume_path, run_identity
from .state import read_link as read_link  # importable from here, outside __all__
from .strategies import FSDPStrategy, ModelParallelStrategy
from .strategies import check_strategy as check_strategy  # importable from here, outside __all__

__all__ = ["SafetensorsCheckpointIO", "ModelCheckpoint", "ModelParallelStrategy", "resume_path", "run_identity",
           "LINK_FORMAT", "FSDPStrategy"]
