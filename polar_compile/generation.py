"""``generate`` without a host sync every step, for models set up by :func:`polar_compile.optimize`.

transformers' decoding loop reads ``unfinished_sequences.max() == 0`` on the host after every step: the host
waits for the step to finish, then spends its per-step Python (input preparation, the compiled call's guards,
the CUDA-graph launch) while the GPU idles. On a 7-8B model at batch 64 that is ~3.5 ms of a ~21 ms step.

transformers already has the cure, ``DeferredStopCheck``: it copies the stop flag to pinned memory without
waiting and reads it one step later, so the host queues step N+1 while step N runs. When a sequence's stop
criterion fires, one extra forward has run; transformers drops its token (and, when the cache is returned,
crops the cache: it defers only where the cache can be cropped or is not returned). The tokens ``generate``
returns are the same. transformers enables it only on "mps" for now ("we should enable it for cuda if we observe
perf gains"). We measured that gain on CUDA (``benchmarks/probe_host.py --defer``), so inside the ``generate`` of a
model that :func:`~polar_compile.optimize` set up with ``SparsityConfig.defer_stop_check`` (default on), we
let it run on CUDA too. Everywhere else transformers decides as before: other models, other devices (CPU has no
events to defer with, and there the host is the device anyway), assisted generation.

How: one wrapper around ``DeferredStopCheck.is_supported``, installed once per process, answers "cuda" as it
would answer "mps" while a polar model's ``generate`` runs (a context variable set by a wrapper on that model
instance's ``generate``). If this transformers has no such class, or it no longer behaves as the wrapper
expects, nothing is installed and a log line says why; if it already defers on CUDA, nothing is needed.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import logging

import torch

from polar_compile.backend import graphs_compiled
from polar_compile.packing import needs_packing, pack_projections

log = logging.getLogger(__name__)

CUDA = torch.device("cuda")
_ACTIVE: contextvars.ContextVar[bool] = contextvars.ContextVar("polar_defer_stop_check", default=False)
_ATTRIBUTE = "_polar_generate_previous"  # on the model: the instance's own ``generate`` before ours, if any
_EXPECTED_PARAMETERS = ["device", "cache", "cache_is_returned", "is_assistant"]
_NATIVE = "native"  # transformers defers on CUDA by itself: nothing to install, nothing to wrap
_install_result: list[str | None] = []  # [None (installed), _NATIVE, or why it could not be]: computed once


def _deferred_stop_check_class():
    try:
        from transformers.generation import utils
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return getattr(utils, "DeferredStopCheck", None)


def install() -> str | None:
    """Wrap ``DeferredStopCheck.is_supported`` (once per process). Returns None, or why it cannot be done."""
    if _install_result:
        return None if _install_result[0] == _NATIVE else _install_result[0]
    cls = _deferred_stop_check_class()
    reason = None
    if cls is None or not hasattr(cls, "is_supported"):
        reason = "this transformers has no DeferredStopCheck.is_supported"
    else:
        original = cls.is_supported
        original = getattr(original, "_polar_original", original)
        try:
            parameters = list(inspect.signature(original).parameters)
        except (TypeError, ValueError):
            parameters = []
        if parameters != _EXPECTED_PARAMETERS:
            reason = f"DeferredStopCheck.is_supported takes {parameters}, expected {_EXPECTED_PARAMETERS}"
        elif original(CUDA, None, False, False):
            log.info("polar_compile: transformers already defers its stop check on CUDA; nothing to enable")
            _install_result.append(_NATIVE)
            return None
        elif not original(torch.device("mps"), None, False, False):
            # The wrapper hands CUDA the answer transformers gives "mps": only sound while that is the one difference.
            reason = "DeferredStopCheck.is_supported no longer defers on 'mps' as expected"
        else:

            def is_supported(device, cache, cache_is_returned, is_assistant):
                if _ACTIVE.get() and torch.device(device).type == "cuda":
                    device = torch.device("mps")  # transformers' own rules for caches and assistants still apply
                return original(device, cache, cache_is_returned, is_assistant)

            is_supported._polar_original = original
            cls.is_supported = staticmethod(is_supported)
    if reason is not None:
        log.warning("polar_compile: generate keeps its per-step stop check on CUDA: %s", reason)
    _install_result.append(reason)
    return reason


def wrap_generate(model: torch.nn.Module) -> bool:
    """Make ``model.generate`` defer its stop check on CUDA. Returns whether deferral is available."""
    if install() is not None:
        return False
    if _install_result[0] == _NATIVE or hasattr(model, _ATTRIBUTE):
        return True  # transformers defers by itself, or this model is wrapped already
    previous, inner = _instance_or_class(model, "generate")  # previous: an instance-level generate set before us

    @functools.wraps(inner)
    def generate(*args, **kwargs):
        token = _ACTIVE.set(True)
        try:
            return inner(*args, **kwargs)
        finally:
            _ACTIVE.reset(token)

    object.__setattr__(model, _ATTRIBUTE, previous)
    object.__setattr__(model, "generate", generate)
    return True


def unwrap_generate(model: torch.nn.Module) -> None:
    """Undo :func:`wrap_generate` (no-op when not wrapped)."""
    _put_back(model, "generate", _ATTRIBUTE)


def _put_back(model: torch.nn.Module, name: str, saved: str) -> None:
    """Give ``model`` back the instance attribute ``name`` it had before a wrapper saved it under ``saved`` (none:
    the class's method shows through again)."""
    if not hasattr(model, saved):
        return
    previous = model.__dict__.pop(saved)
    if previous is None:
        model.__dict__.pop(name, None)
    else:
        object.__setattr__(model, name, previous)


# --------------------------------------------------------------------------------------------------
# Only decode steps go through the compiled forward
# --------------------------------------------------------------------------------------------------
#
# transformers' generate calls ``get_compiled_call`` for its decode steps, and also for every chunk of a chunked
# prefill (``prefill_chunk_size``). With the polar compile config (dynamic=False) each chunk length compiled the
# whole model once more (minutes for a 7-8B model on a GPU; the last chunk's length changes with the prompt, so a
# server would recompile per request until Dynamo's recompile limit sends the model's forward, decode steps
# included, to eager), and under CUDA graphs kept a second memory pool for the chunk's activations. The polar
# passes leave such graphs dense anyway. So for a polar compile config ``get_compiled_call`` hands generate a call
# that runs the compiled forward for one token per sequence and the model's own eager forward for anything else
# (prefill chunks, several tokens a step as in assisted decoding): prefill stays eager and dense, chunked or not.
# A last chunk of one token a sequence looks like a decode step; generate's _prefill marks the model while it runs
# (_IN_PREFILL, set by the wrapper of _DENSE_PATHS below), so that chunk runs eager and dense too.

_CALL_ATTRIBUTE = "_polar_get_compiled_call_previous"  # the instance's own get_compiled_call before ours, if any
_DISPATCH_ATTRIBUTE = "_polar_decode_dispatch"  # (compiled call, its dispatcher): one dispatcher per compile
_CRITERIA = "_valid_auto_compile_criteria"  # transformers' test for compiling a generate call's forward
_CRITERIA_ATTRIBUTE = "_polar_compile_criteria_previous"
_UNCOMPILED_ATTRIBUTE = "_polar_generate_uncompiled"  # why generate handed back the eager forward, once it has


def _step_inputs(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """input_ids (or else inputs_embeds) as a causal LM's forward takes them; None if neither is a tensor."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    ids = ids if isinstance(ids, torch.Tensor) else kwargs.get("inputs_embeds")
    return ids if isinstance(ids, torch.Tensor) else None


def tokens_per_sequence(args: tuple, kwargs: dict) -> int | None:
    """The step's tokens per sequence, from input_ids (or inputs_embeds) as a causal LM's forward takes them."""
    ids = _step_inputs(args, kwargs)
    return ids.shape[1] if ids is not None and ids.dim() >= 2 else None


# Dynamo compiles a code object at most recompile_limit (8) times, and with fullgraph=True a ninth shape raises
# instead of running: a server whose batches come in more than 8 sizes would crash there. A step that hits it is
# compiled again under SparsityConfig.max_decode_graphs; past that, it runs the eager dense forward, with a warning.
_LIMIT_HIT = tuple(
    cls for cls in (getattr(torch._dynamo.exc, "FailOnRecompileLimitHit", None),) if isinstance(cls, type)
)


class _LimitWarningFilter(logging.Filter):
    """Drops Dynamo's "hit config.recompile_limit" warning while a polar decode step runs: that step compiles again
    under SparsityConfig.max_decode_graphs, or runs eagerly with polar_compile's own warning naming the shape, so
    Dynamo's advice (raise the limit, look for the recompile) would only mislead."""

    in_step = False

    def filter(self, record: logging.LogRecord) -> bool:
        return not (self.in_step and "hit config." in str(record.msg))


_LIMIT_WARNING = _LimitWarningFilter()


def _step_shape(args: tuple, kwargs: dict) -> str:
    ids = _step_inputs(args, kwargs)
    mask = kwargs.get("attention_mask")
    if isinstance(mask, dict):  # one mask per attention type (hybrid sliding-window models): all span the cache
        mask = next((value for value in mask.values() if isinstance(value, torch.Tensor)), None)
    batch = ids.shape[0] if ids is not None else "?"
    length = mask.shape[-1] if isinstance(mask, torch.Tensor) else "?"
    return f"batch {batch}, cache length {length}"


# A decode graph is compiled once per (batch size, cache length). A step that compiles again at a shape it already
# has graphs for failed a guard on something else: a strides or dtype change does that once, but Python state that
# changes every step does it at every step (transformers' sliding-window cache layers count their fill level in a
# Python int, which Dynamo specialises on: huggingface/transformers#44609). Each such compile is a whole-model
# compile (~45 s for a 7-8B model on an H200), so at this many graphs for one shape its steps run eagerly instead.
GRAPHS_PER_SHAPE = 3
SLIDING_WINDOW_REMEDY = (
    "If prompts plus new tokens stay within the window, load the model with the window off in its config (e.g. "
    "sliding_window=None): the results are the same and the step compiles once"
)


def _recompile_cause(kwargs: dict) -> str:
    cache = next((kwargs[k] for k in ("cache", "past_key_values") if k in kwargs), None)
    sliding = [type(layer).__name__ for layer in getattr(cache, "layers", ()) if "Sliding" in type(layer).__name__]
    if sliding:
        return (
            f"its cache has sliding-window layers ({sliding[0]}), whose fill level transformers keeps in a Python "
            "int that torch.compile specialises on, so the step recompiles at every token "
            f"(huggingface/transformers#44609). {SLIDING_WINDOW_REMEDY}"
        )
    return ("something other than the shape changes from one step to the next (run with TORCH_LOGS=recompiles to see "
            "the guard)")  # fmt: skip


def eager_decode_steps(model: torch.nn.Module) -> tuple[str, ...]:
    """One line per decode shape whose steps now run the model's eager, dense forward, with why (for explain)."""
    methods = tuple(
        f"every shape are dense in generate calls that use {label}: {why}"
        for label, why in model.__dict__.get(_DENSE_USED, {}).items()
    )
    uncompiled = model.__dict__.get(_UNCOMPILED_ATTRIBUTE)
    if uncompiled:
        return (f"every shape run the eager, dense forward: {uncompiled}", *methods)
    dispatch = model.__dict__.get(_DISPATCH_ATTRIBUTE)
    shapes = (
        tuple(f"{shape} run the eager, dense forward: {why}" for shape, why in dispatch[1].eager.items())
        if dispatch
        else ()
    )
    return (*shapes, *methods)


def _uncompiled_reason(model: torch.nn.Module) -> str:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    which = f" (model_type {model_type!r})" if model_type else ""
    return (
        f"transformers' generate does not compile {type(model).__name__}{which}: its get_compiled_call returned the "
        "eager forward, so generate never reaches the polar decode step and decodes with the dense model"
    )


_ATTENTIONS = "every shape with output_attentions=True"


def _follow_the_device(model: torch.nn.Module, plan, generation_config) -> None:
    """A model optimized on one device and moved to another (``optimize`` on the CPU, then ``.cuda()``) is compiled
    as if optimized there: CUDA graphs and inductor on CUDA, not the CPU's passes-only graph (and the reverse),
    unless the caller chose mode or options."""
    configs = getattr(plan, "device_compile_configs", None)
    config = getattr(generation_config, "compile_config", None)
    if not configs or getattr(config, "backend", None) != "polar":
        return
    wanted = configs["cuda" if model.device.type == "cuda" else "cpu"]
    for other in configs.values():
        if other is not wanted and _same_compile_config(config, other):
            generation_config.compile_config = wanted
            if _same_compile_config(model.generation_config.compile_config, other):
                model.generation_config.compile_config = wanted
            log.info("polar_compile: %s moved to %s since optimize: its decode step compiles for it",
                     type(model).__name__, model.device)  # fmt: skip


def _same_compile_config(a, b) -> bool:
    fields = ("backend", "mode", "options", "fullgraph", "dynamic", "_compile_all_devices")
    return a is b or all(getattr(a, name, None) == getattr(b, name, None) for name in fields)


def _keep_packed(model: torch.nn.Module) -> None:
    """Pack the projections again if ``model.to()`` (a dtype or device change) gave each weight its own storage, or
    the caller replaced some (``w.data = ...``, a new Parameter, ``load_state_dict(..., assign=True)`` of a few
    layers): the compiled steps were fused over packed weights (packing.py), and would otherwise fail their layout
    check. Every group is checked (a few microseconds each), once a generate call."""
    plan = model.__dict__.get("_polar_plan")
    if plan is not None and plan.packed_groups and needs_packing(plan.info):
        packed, _ = pack_projections(plan.info)
        log.info("polar_compile: %s: %d projection groups packed again after their weights moved",
                 type(model).__name__, packed)  # fmt: skip


def _max_decode_graphs(model: torch.nn.Module) -> int:
    plan = getattr(model, "_polar_plan", None)
    return getattr(getattr(plan, "config", None), "max_decode_graphs", None) or torch._dynamo.config.recompile_limit


def _decode_only(model: torch.nn.Module, compiled):
    graphs: dict[str, int] = {}  # shape -> graphs compiled for it within the current generate call
    shapes: set[str] = set()  # the shapes this model's steps compiled a graph for, over all its generate calls
    eager: dict[str, str] = {}  # shape -> why its steps run the eager, dense forward

    def past_the_limit(args, kwargs, limit: int, counted: str):
        shape = _step_shape(args, kwargs)
        eager[shape] = f"past SparsityConfig.max_decode_graphs ({limit} graphs)"
        log.warning(
            "polar_compile: %s has compiled %d decode graphs (%s; one per batch size and cache length, "
            "SparsityConfig.max_decode_graphs): steps at %s run the eager, dense forward. Use a few fixed batch "
            "sizes and a fixed max_cache_len, or raise max_decode_graphs (each graph is a whole-model compile).",
            type(model).__name__, limit, counted, shape,
        )  # fmt: skip
        return model(*args, **kwargs)

    @functools.wraps(compiled, updated=())  # not its __dict__: Dynamo marks compiled functions there
    def polar_decode_call(*args, **kwargs):
        if tokens_per_sequence(args, kwargs) != 1 or _IN_PREFILL in model.__dict__:
            return model(*args, **kwargs)
        if kwargs.get("output_attentions"):  # the compiled step would fail in transformers' warning about it
            if _ATTENTIONS not in eager:
                eager[_ATTENTIONS] = "the polar step computes no attention weights; the model's own forward runs"
                log.warning("polar_compile: %s asked for attention weights (output_attentions=True): its decode "
                            "steps run the eager, dense forward", type(model).__name__)  # fmt: skip
            return model(*args, **kwargs)
        if eager and _step_shape(args, kwargs) in eager:
            return model(*args, **kwargs)
        limit = _max_decode_graphs(model)
        if len(shapes) >= limit and _step_shape(args, kwargs) not in shapes:  # a new shape would compile one more
            return past_the_limit(args, kwargs, limit, "this model's own")
        before = graphs_compiled()
        out = _compiled_step(args, kwargs)
        if graphs_compiled() > before:  # this step compiled (rare): only then is its shape worth a string
            shape = _step_shape(args, kwargs)
            shapes.add(shape)
            graphs[shape] = graphs.get(shape, 0) + 1
            if graphs[shape] >= GRAPHS_PER_SHAPE:
                cause = _recompile_cause(kwargs)
                eager[shape] = f"{graphs[shape]} graphs compiled at this shape; {cause}"
                log.warning(
                    "polar_compile: %s compiled %d decode graphs at one shape (%s) within one generate call: %s. "
                    "Its steps now run the eager, dense forward.", type(model).__name__, graphs[shape], shape, cause,
                )  # fmt: skip
        return out

    def _compiled_step(args, kwargs):
        _LIMIT_WARNING.in_step = True
        try:
            try:
                return compiled(*args, **kwargs)
            except _LIMIT_HIT:
                pass  # a new shape past Dynamo's recompile_limit: nothing ran yet, try again under ours
            limit = max(_max_decode_graphs(model), torch._dynamo.config.recompile_limit)
            try:
                with torch._dynamo.config.patch(recompile_limit=limit):
                    return compiled(*args, **kwargs)
            except _LIMIT_HIT:  # Dynamo counts the graphs of every instance of the model's class together
                return past_the_limit(args, kwargs, limit, f"with the other {type(model).__name__} instances")
        finally:
            _LIMIT_WARNING.in_step = False

    polar_decode_call.compiled = compiled
    polar_decode_call.eager = eager
    # Graphs count per generate call: a step that recompiles at every token does so within one call, whereas a
    # graph compiled once between calls (grad mode, requires_grad_, a dtype change) must not add up towards demoting
    # a shape that then compiles no more.
    polar_decode_call.new_call = graphs.clear
    return polar_decode_call


def wrap_compiled_call(model: torch.nn.Module) -> None:
    """Make ``model.get_compiled_call`` route only decode steps through the polar-compiled forward (see above), and
    say why when transformers decides not to compile a generate call at all (it then decodes with the dense model,
    and its own warning names no reason)."""
    if hasattr(model, _CALL_ATTRIBUTE):
        return
    logging.getLogger("torch._dynamo.convert_frame").addFilter(_LIMIT_WARNING)  # once: addFilter keeps one copy
    get_compiled_call_before, inner = _instance_or_class(model, "get_compiled_call")

    @functools.wraps(inner)
    def get_compiled_call(compile_config, *args, **kwargs):
        compiled = inner(compile_config, *args, **kwargs)
        if getattr(compile_config, "backend", None) != "polar" or not callable(compiled):
            return compiled  # another compile config (the caller's own): transformers' behaviour, unchanged
        if not hasattr(compiled, "_torchdynamo_orig_callable"):  # not torch.compile's: transformers opted out
            reason = _uncompiled_reason(model)
            if model.__dict__.get(_UNCOMPILED_ATTRIBUTE) != reason:
                log.warning("polar_compile: %s", reason)
            object.__setattr__(model, _UNCOMPILED_ATTRIBUTE, reason)
            return compiled
        model.__dict__.pop(_UNCOMPILED_ATTRIBUTE, None)
        how = compiled_in_place(model)
        if how is not None:
            _note_dense(model, "a model compiled in place", f"{how} after optimize: its decode steps run through that "
                        "graph, dense. Undo it (model._compiled_call_impl = None, or del model.forward) to decode "
                        "sparsely")  # fmt: skip
        cached = model.__dict__.get(_DISPATCH_ATTRIBUTE)
        if cached is None or cached[0] is not compiled:
            cached = (compiled, _decode_only(model, compiled))
            object.__setattr__(model, _DISPATCH_ATTRIBUTE, cached)
        cached[1].new_call()  # generate asks for its compiled call once a call
        _keep_packed(model)  # once a call too: weights move between calls (model.to), never within one
        return cached[1]

    object.__setattr__(model, _CALL_ATTRIBUTE, get_compiled_call_before)
    object.__setattr__(model, "get_compiled_call", get_compiled_call)
    _wrap_dense_paths(model)
    if not hasattr(type(model), _CRITERIA):
        return  # a transformers without this method: nothing to explain through
    criteria_before, criteria = _instance_or_class(model, _CRITERIA)
    said: set[str] = set()

    @functools.wraps(criteria)
    def valid_auto_compile_criteria(model_kwargs, generation_config, *args, **kwargs):
        # transformers asks this before the prefill: an empty batch would otherwise fail inside the first layer's
        # attention with a reshape error that names neither the batch nor generate
        for name in ("attention_mask", "position_ids", "input_ids", "inputs_embeds"):  # (batch, tokens, ...)
            value = model_kwargs.get(name)
            if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[0] == 0:
                raise ValueError(f"generate got an empty batch: 0 sequences ({name} {tuple(value.shape)})")
        plan = model.__dict__.get("_polar_plan")
        if plan is not None and getattr(generation_config, "compile_config", False) is None:
            # model.generation_config was replaced after optimize (a chat model's sampling settings, say), which
            # dropped the polar compile config: this call's copy of the config gets it back
            generation_config.compile_config = plan.compile_config
        _follow_the_device(model, plan, generation_config)
        can_compile = criteria(model_kwargs, generation_config, *args, **kwargs)
        backend = getattr(getattr(generation_config, "compile_config", None), "backend", None)
        polar = backend == "polar"
        if plan is not None and backend is not None and not polar and not generation_config.disable_compile:
            _note_dense(model, f"a compile_config of its own (backend {backend!r})", "generate runs the model's own "
                        "forward with it (compiled or not), so it decodes with the dense model (pass no "
                        "compile_config, or polar_compile's: model.generation_config.compile_config right after "
                        "optimize)")  # fmt: skip
        if not can_compile and polar and not getattr(generation_config, "disable_compile", False):
            reason = _why_not_compiled(model, model_kwargs)
            if reason not in said:
                said.add(reason)
                log.warning("polar_compile: this generate decodes with the dense model, uncompiled: %s", reason)
        return can_compile

    object.__setattr__(model, _CRITERIA_ATTRIBUTE, criteria_before)
    object.__setattr__(model, _CRITERIA, valid_auto_compile_criteria)


# Ways transformers' generate decodes that never reach the polar decode step: said once per model and way when a
# generate call takes one, and listed by explain. generate looks its decoding method up on the class, so the way is
# read where generate hands its decoding mode to an instance method (_get_deprecated_gen_repo), and continuous
# batching where it calls generate_batch. The prefill (_prefill) is wrapped too, silently: it only marks the model
# while it runs, so that a last chunk of one token a sequence stays off the compiled call.
_COMPILED_MODES = ("greedy_search", "sample")  # _sample: the decode step transformers compiles
_ASSISTED = "the model verifies several candidate tokens a step, and such steps run its dense forward"
_PAGED = (
    "continuous batching (generate_batch)",
    "transformers decodes through its own paged attention there, which polar_compile does not rewrite",
)
_DENSE_USED = "_polar_dense_methods_used"  # on the model: {label: why} of the ways generate calls took
_DENSE_PATHS = ("_get_deprecated_gen_repo", "generate_batch", "_prefill")
_IN_PREFILL = "_polar_in_prefill"  # on the model while generate's _prefill runs


def compiled_in_place(model: torch.nn.Module) -> str | None:
    """How the caller compiled ``model`` in place (``model.compile()``, or ``model.forward = torch.compile(...)``),
    or None. Its forward then runs through that compiled graph, inside which polar's decode step cannot be
    rewritten: the model decodes dense."""
    if getattr(model, "_compiled_call_impl", None) is not None:
        return "model.compile() was called on it"
    forward = model.__dict__.get("forward")
    if forward is not None and hasattr(forward, "_torchdynamo_orig_callable"):
        return "its forward was replaced by torch.compile(model.forward)"
    return None


def dense_now(model: torch.nn.Module) -> str | None:
    """Why no decode step of ``model`` can run a polar graph as the model stands now (compiled in place, a
    compile_config of another backend in its generation_config, generate declining to compile it), or None. Per-call
    choices (beam search, a compile_config passed to generate) are not states of the model: they are not counted."""
    how = compiled_in_place(model)
    if how is not None:
        return f"{how} after optimize"
    backend = getattr(getattr(model.generation_config, "compile_config", None), "backend", None)
    if backend is not None and backend != "polar":
        return f"its generation_config.compile_config has backend {backend!r}"
    if model.__dict__.get(_UNCOMPILED_ATTRIBUTE):
        return "transformers' generate does not compile it"
    return None


def _note_dense(model: torch.nn.Module, label: str, why: str) -> None:
    used = model.__dict__.setdefault(_DENSE_USED, {})
    if label not in used:
        used[label] = why
        log.warning("polar_compile: this generate uses %s: %s", label, why)


def _wrap_dense_paths(model: torch.nn.Module) -> None:
    def decoding_mode(inner):
        def wrapper(*args, **kwargs):
            mode = args[0] if args else kwargs.get("generation_mode")
            name = str(getattr(mode, "value", mode))
            if mode is not None and name not in _COMPILED_MODES:
                label = name.replace("_", " ")
                why = _ASSISTED if name.startswith("assisted") else (
                    f"transformers runs {label} without its compiled decode step, so it decodes with the dense model"
                )  # fmt: skip
                _note_dense(model, label, why)
            return inner(*args, **kwargs)

        return wrapper

    def generate_batch(inner):
        def wrapper(*args, **kwargs):
            _note_dense(model, *_PAGED)
            return inner(*args, **kwargs)

        return wrapper

    def prefill(inner):
        def wrapper(*args, **kwargs):
            model.__dict__[_IN_PREFILL] = True
            try:
                return inner(*args, **kwargs)
            finally:
                model.__dict__.pop(_IN_PREFILL, None)

        return wrapper

    for name, make in zip(_DENSE_PATHS, (decoding_mode, generate_batch, prefill), strict=True):
        saved = f"_polar_{name}_previous"
        if not hasattr(type(model), name) or hasattr(model, saved):
            continue
        before, inner = _instance_or_class(model, name)
        object.__setattr__(model, saved, before)
        object.__setattr__(model, name, functools.wraps(inner)(make(inner)))


def _unwrap_dense_paths(model: torch.nn.Module) -> None:
    model.__dict__.pop(_DENSE_USED, None)
    for name in _DENSE_PATHS:
        _put_back(model, name, f"_polar_{name}_previous")


def _instance_or_class(model: torch.nn.Module, name: str):
    """(the instance's own attribute ``name`` or None, the callable that answers ``model.name`` now)."""
    own = model.__dict__.get(name)
    return own, own if own is not None else getattr(type(model), name).__get__(model)


def _why_not_compiled(model: torch.nn.Module, model_kwargs: dict) -> str:
    cache = next((model_kwargs[k] for k in ("cache", "past_key_values", "cache_params") if k in model_kwargs), None)
    if cache is None and model_kwargs.get("use_cache") is False:
        return "use_cache=False: transformers decodes without a cache then, and compiles only with a static one"
    if cache is None or not getattr(cache, "is_compileable", False) or type(cache).__name__ == "DynamicCache":
        kind = "no cache" if cache is None else f"a {type(cache).__name__}"
        return (
            f"transformers compiles only with a static cache, and this call has {kind}: "
            "pass cache_implementation='static'"
        )
    devices = set(getattr(model, "hf_device_map", {}).values())
    if "disk" in devices or ("cpu" in devices and len(devices) > 1):
        return f"the model is offloaded (device_map: {sorted(map(str, devices))}), which transformers does not compile"
    if getattr(getattr(model, "hf_quantizer", None), "is_compileable", True) is False:
        return "the model's quantization method does not compile"
    return "transformers' criteria for compiling were not met (device, cache or model)"


def unwrap_compiled_call(model: torch.nn.Module) -> None:
    """Undo :func:`wrap_compiled_call` (no-op when not wrapped)."""
    model.__dict__.pop(_DISPATCH_ATTRIBUTE, None)
    model.__dict__.pop(_UNCOMPILED_ATTRIBUTE, None)
    _unwrap_dense_paths(model)
    _put_back(model, "get_compiled_call", _CALL_ATTRIBUTE)
    _put_back(model, _CRITERIA, _CRITERIA_ATTRIBUTE)
