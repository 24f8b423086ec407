"""The slmkit plugin contract: every hook a plugin may implement.

A plugin is a module (or any object) with functions decorated ``@slmkit.hookimpl`` whose
names match the specifications below. Built-in plugins (``slmkit_builtin.*``) are written
against exactly this contract; third-party distributions register through the ``slmkit``
entry-point group. After loading, every hook implementation is checked against these
specs, so a misspelt hook name is an error that names the plugin.

Implementations may accept any subset of a spec's arguments, by name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from pathlib import Path

    from slmkit.components import Register
    from slmkit.run import Run

PROJECT_NAME = "slmkit"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)

# ---------------------------------------------------------------------------------------
# Registration hooks: called once per plugin when the component registry is built.
# Each receives ``register(name, factory, options=OptionsClass)`` (:class:`slmkit.Register`):
# ``options`` is an attrs class (default: no options); the kernel structures the
# component's TOML table into it and passes the instance to ``factory`` as its first
# argument. The factory types (``slmkit.BlockFactory``...) say what each must return; the
# kinds table (``slmkit/kinds.py``) says which experiment table picks each kind.
# ---------------------------------------------------------------------------------------


@hookspec
def register_tokenizers(register: Register) -> None:
    """Register tokenizer components.

    Called once at start-up. ``factory(options)`` returns a :class:`slmkit.Tokenizer`.
    The experiment picks one with ``[tokenizer] name = "..."``.
    """


@hookspec
def register_blocks(register: Register) -> None:
    """Register transformer block components.

    Called once at start-up. ``factory(options, dims, layer)`` returns an ``nn.Module``
    following :class:`slmkit.Block` (see :class:`slmkit.BlockFactory`): ``options`` is
    the block's options instance, ``dims`` the model's :class:`slmkit.ModelDims`,
    ``layer`` the block's depth from 0 to ``n_layers - 1`` (the module becomes
    ``blocks.<layer>``). The block initialises its own weights in its constructor (the
    kernel only initialises the embeddings and the head; see
    :func:`slmkit.init_gpt2_weights`), unless ``[model] init = "torch"``: then every module
    with a ``reset_parameters`` gets PyTorch's default once the model is built. A factory
    with the attribute ``learned_positions = False`` (e.g. a block using rotary embeddings,
    which reads ``ctx.positions``) gets a model without the learned position table.
    The experiment picks one with ``[model] block = "..."``.
    """


@hookspec
def register_optimizers(register: Register) -> None:
    """Register optimizer components.

    Called once at start-up. ``factory(options, param_groups)`` returns a
    ``torch.optim.Optimizer`` (see :class:`slmkit.OptimizerFactory`). ``param_groups`` is a
    list of dicts, each with ``params``, ``names`` (their names in the model, in the same
    order), ``lr`` (the experiment's ``optimizer.learning_rate``) and ``decay`` (True for
    weight matrices, False for biases, norms and embeddings); the optimizer decides what
    ``decay`` means for it (:func:`slmkit.weight_decay_groups` maps it to torch's
    ``weight_decay``). The experiment picks one with ``[optimizer] name = "..."``.
    """


@hookspec
def register_schedules(register: Register) -> None:
    """Register learning-rate schedule components.

    Called once at start-up. ``factory(options, max_steps)`` returns a
    :class:`slmkit.Schedule`: a multiplier of the base learning rate per step.
    The experiment picks one with ``[schedule] name = "..."``.
    """


@hookspec
def register_corpora(register: Register) -> None:
    """Register corpus components (where the training text comes from).

    Called once at start-up. ``factory(options)`` returns a
    :class:`slmkit.Corpus`. The experiment picks one with
    ``[data] corpus = "..."``; the other keys of ``[data]`` are the corpus's options.
    """


@hookspec
def register_forward_hooks(register: Register) -> None:
    """Register forward-hook components (observers of activations at named hook points).

    Called once at start-up. The experiment enables them in ``[[forward_hooks]]`` tables.
    A forward hook can never change a model's outputs: the kernel discards what it returns.
    """


@hookspec
def register_update_hooks(register: Register) -> None:
    """Register update-hook components (gradient transforms before the optimizer step).

    Called once at start-up. The experiment enables them in ``[[update_hooks]]`` tables,
    applied in the listed order after backward and before ``optimizer.step()``.
    """


@hookspec
def register_probes(register: Register) -> None:
    """Register probe components (measurements of the model on inputs of their own).

    Called once at start-up. ``factory(options)`` returns a :class:`slmkit.Probe`: its
    ``points`` (globs of the hook points it reads), ``inputs(setup)`` making its fixed
    batch of token ids once, with ``setup.generator`` (seeded by the table's ``seed``,
    never torch's global RNG), and ``measure(probe)`` returning its metrics at an
    evaluation: numbers, per-layer lists or ``[layer][head]`` lists, logged as a
    ``probe`` event. ``probe`` is a :class:`slmkit.ProbeContext`: the model in eval mode
    without gradients, the batch, and ``forward(tokens)`` returning the logits and the
    activations at the probe's points. The experiment enables probes in ``[[probes]]``
    tables; ``every`` counts evaluations. A probe cannot change the run: the kernel puts
    back torch's RNG state and the model's mode after it, and a probe that changes a
    parameter fails naming it; a run with probes trains bit for bit as one without.
    """


@hookspec
def register_trackers(register: Register) -> None:
    """Register tracker components (experiment trackers a run streams to: TensorBoard...).

    Called once at start-up. ``factory(options)`` returns a :class:`slmkit.Tracker`,
    opened on rank 0 when the run starts with the :class:`slmkit.TrackedRun` (``open``),
    then given each event the run logs, the dicts ``log.jsonl`` holds (``record``;
    :func:`slmkit.tracked_values` says what to record of one), and closed at the end;
    ``slmkit export`` feeds a finished run's log the same way. A resumed or exported run
    feeds events the tracker's store may hold already: it records only what it lacks. The
    experiment enables trackers in ``[[trackers]]`` tables. A tracker that raises is
    dropped, reported once (stderr and a ``tracker_failed`` event); the run goes on.
    """


# ---------------------------------------------------------------------------------------
# Run events: observers, like Lightning callbacks. Called only on the plugins that take
# part in the run; return values are ignored. ``run`` is the live :class:`slmkit.Run`
# (run_id, run_dir as a pathlib.Path, experiment, model, tokenizer and
# ``run.log(event, **fields)``). A resumed run trains again the steps after its newest
# checkpoint, so on_step_end, on_eval and on_checkpoint may see a step number twice.
# ---------------------------------------------------------------------------------------


@hookspec
def on_run_start(run: Run) -> None:
    """Called once per process before its first training step (so again on resume)."""


@hookspec
def on_step_end(run: Run, step: int, metrics: dict[str, Any]) -> None:
    """Called after every optimizer step.

    ``step`` counts optimizer steps from 1; after a resume, the steps trained since the
    checkpoint it resumes from are trained, and reported, again. ``metrics`` holds ``lr``
    always and ``train_loss``/``tokens_per_s`` on logging steps only (reading the loss
    every step would synchronise the device).
    """


@hookspec
def on_eval(run: Run, step: int, metrics: dict[str, Any]) -> None:
    """Called after each validation pass with ``val_loss`` and ``val_bpc``."""


@hookspec
def on_checkpoint(run: Run, step: int, path: Path) -> None:
    """Called after a checkpoint was written (atomically) to ``path``."""


@hookspec
def on_run_end(run: Run, summary: dict[str, Any]) -> None:
    """Called once when the run reached ``max_steps``, with the summary logged in ``run_end``.

    Not called when the run stops on a signal or fails; the resumed run that finishes calls it.
    """
