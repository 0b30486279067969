"""Replace a decode step's SDPA with ``polar::route_groups`` (the router and its per-sequence top-k in one op)
-> ``polar::selective_attention``.

For every router anchor (see ``ops/router_anchor.py``) the pass follows the data flow from the anchor (the
q projection's input) to the first ``scaled_dot_product_attention`` whose *query* it reaches without crossing
a second projection (o_proj, another layer's q) or another anchor, traces the key and value back through HF's
interleaved ``repeat_kv`` (getitem[:, :, None] or unsqueeze(2) -> expand(B, G, R, S, D) -> reshape(B, G * R, S,
D)) to the cache tensors ``(B, Hkv, S_max, D)``, and checks every fact the rewrite relies on: one query token,
no dropout, is_causal False, a boolean (or no) mask over the cache length, as many KV heads as the router has
groups, 1 <= k <= Hkv, K/V that are graph inputs (the static cache) with the query's batch, and one dtype for
q, k, v, SDPA's result and the router (under torch.autocast they may differ). Anything unproven leaves that
layer's SDPA untouched and records the reason.

A dense layer's anchor carries no router and k = G: its SDPA becomes the same kernel over every group
(``group_index=None``: no index is built), which reads each group's K and V once instead of SDPA's
per-query-head repeat_kv copy. A sparse layer at k = G also skips its router and top-k and passes None.

Every layer of a step attends under the same mask, so its valid span per sequence (``key_span``) is computed
once, before the first rewritten layer, and passed to every layer's kernel: the kernel's programs then start
streaming K/V at once instead of each scanning the mask row (2-6 us a program at 4-16K cache slots, H100). The
span also says whether the mask holds a hole inside it (never, for HF's masks): a row without one has its K/V
read with no mask loads at all.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node

from polar_compile.passes.context import PassContext, anchors, example_value, is_anchor, is_mlp_anchor, is_sdpa

_SEARCH_BUDGET = 512  # nodes visited from one anchor before giving up (a layer has ~60)

# GEMMs that are a layer's projections (o_proj, another layer's q/k/v, an MLP's linears, GPT-2's Conv1D addmm).
_PROJECTIONS = (
    torch._C._nn.linear,
    F.linear,
    torch.matmul,
    operator.matmul,
    torch.mm,
    torch.bmm,
    torch.addmm,
    torch.baddbmm,
)


def _is_projection(node: Node) -> bool:
    return (node.op == "call_function" and node.target in _PROJECTIONS) or (
        node.op == "call_method" and node.target in ("matmul", "mm", "bmm", "addmm", "baddbmm", "__matmul__")
    )


def _find_sdpa(anchor: Node) -> tuple[Node | None, bool]:
    """(the first SDPA reached from the anchor through its query input, whether the search stopped at a layer
    boundary). Breadth-first; a path crosses at most one projection (the q or fused q/k/v linear the anchor
    feeds): a second one (o_proj, the next layer's q projection) or another layer's anchor ends it, so a layer
    whose attention is not an SDPA never reaches a later layer's SDPA."""
    frontier, seen = [(anchor, 0)], {anchor: 0}
    stopped = False
    while frontier and len(seen) < _SEARCH_BUDGET:
        next_frontier = []
        for node, crossed in frontier:
            for user in node.users:
                through = crossed + _is_projection(user)
                if user in seen and seen[user] <= through:
                    continue
                if through > 1:
                    stopped = True
                    continue
                seen[user] = through
                if is_sdpa(user):
                    query = user.args[0] if user.args else user.kwargs.get("query")
                    if query is node:
                        return user, stopped
                    continue  # reached as key/value: not this layer's query path
                if is_anchor(user) or is_mlp_anchor(user):
                    stopped = True
                    continue
                next_frontier.append((user, through))
        frontier = next_frontier
    return None, stopped


def _is_method(node, name: str) -> bool:
    return isinstance(node, Node) and (
        (node.op == "call_method" and node.target == name)
        or (node.op == "call_function" and getattr(node.target, "__name__", None) == name)
    )


def _is_repeat_index(index) -> bool:
    """Whether a getitem index is HF repeat_kv's ``[:, :, None]`` (trailing full slices or one Ellipsis allowed)."""
    full = slice(None)
    if not isinstance(index, tuple) or len(index) < 3 or index[:3] != (full, full, None):
        return False
    rest = index[3:]
    return all(part == full for part in rest) or rest == (Ellipsis,)


def _repeat_kv_source(node: Node, value: torch.Tensor, num_groups: int) -> Node | None:
    """The (B, G, S, D) source of HF's interleaved repeat_kv under ``node`` (query head h reads KV group h // R):
    ``x[:, :, None]`` (or ``x.unsqueeze(2)``) -> ``expand(B, G, R, S, D)`` -> ``reshape(B, G * R, S, D)``; None for
    anything else (a tiled ``x[:, None].expand(B, R, G, S, D)`` maps head h to group h % G)."""
    if not _is_method(node, "reshape"):
        return None
    expanded = node.args[0]
    if not (_is_method(expanded, "expand") and expanded.args and isinstance(expanded.args[0], Node)):
        return None
    unsqueezed = expanded.args[0]
    if unsqueezed.op == "call_function" and unsqueezed.target is operator.getitem:
        if len(unsqueezed.args) != 2 or not _is_repeat_index(unsqueezed.args[1]):
            return None
    elif _is_method(unsqueezed, "unsqueeze"):
        dim = unsqueezed.args[1] if len(unsqueezed.args) > 1 else unsqueezed.kwargs.get("dim")
        if dim not in (2, -3):
            return None
    else:
        return None
    source = unsqueezed.args[0] if unsqueezed.args else None
    source_value, expanded_value = example_value(source), example_value(expanded)
    if source_value is None or expanded_value is None or source_value.dim() != 4 or expanded_value.dim() != 5:
        return None
    batch, groups, length, head_dim = source_value.shape
    repeats = expanded_value.shape[2]
    if (
        groups != num_groups
        or tuple(expanded_value.shape) != (batch, groups, repeats, length, head_dim)
        or tuple(value.shape) != (batch, groups * repeats, length, head_dim)
    ):
        return None
    return source


def _trace_cache(node: Node, num_groups: int) -> tuple[Node | None, str]:
    """The (B, Hkv, S, D) tensor under ``node``: itself, or the source of HF's repeat_kv expand+reshape."""
    value = example_value(node)
    if value is None or value.dim() != 4:
        return None, "key/value is not a 4-d tensor"
    if value.shape[1] == num_groups:
        return node, ""
    source = _repeat_kv_source(node, value, num_groups)
    if source is not None:
        return source, ""
    return None, (
        f"key/value has {value.shape[1]} heads, not the router's {num_groups} groups, and is not HF's repeat_kv"
        " (x[:, :, None].expand(B, G, R, S, D).reshape(B, G * R, S, D)) of a cache tensor with that many"
    )


def _dtype_reason(anchor: Node, sdpa: Node, query, key, value) -> str | None:
    """Why the layer's tensors do not share the one dtype the ops compute in (None: they do). Under
    ``torch.autocast`` SDPA casts q, k and v itself, so its inputs (and the caches) may differ in dtype, or all
    differ from its output; the rewritten ops would be handed them as they are."""
    dtypes = {"query": query.dtype, "key": key.dtype, "value": value.dtype}
    if len(set(dtypes.values())) > 1:
        listed = ", ".join(f"{name} {str(dtype).removeprefix('torch.')}" for name, dtype in dtypes.items())
        return f"SDPA's query, key and value differ in dtype ({listed}; torch.autocast?): the kernel takes one dtype"
    output = example_value(sdpa)
    if output is None:
        if torch.is_autocast_enabled(query.device.type):
            return "SDPA's output dtype is not recorded and torch.autocast is on: its dtype cannot be checked"
    elif output.dtype != query.dtype:
        return f"SDPA computes in {output.dtype} (torch.autocast?) but its inputs are {query.dtype}"
    hidden, weight, bias = anchor.args[:3]
    if weight is not None:
        hidden_value = example_value(hidden)
        router = [example_value(weight), *([example_value(bias)] if bias is not None else [])]
        if hidden_value is None or any(tensor is None for tensor in router):
            return "the router or its input has no recorded dtype"
        if any(tensor.dtype != hidden_value.dtype for tensor in router):
            return f"the router is {router[0].dtype} but the layer's input is {hidden_value.dtype}"
    return None


def _sdpa_argument(node: Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _match(anchor: Node) -> tuple[dict | None, str]:
    hidden, weight, bias, layer, k = anchor.args
    if not isinstance(k, int) or not isinstance(layer, int):
        return None, "k or layer index is not a constant int in the graph"
    if weight is None:  # a dense layer: all k = G groups, no router
        num_groups = k
    else:
        weight_value = example_value(weight)
        if weight_value is None or weight_value.dim() != 2:
            return None, "router weight is not a 2-d tensor"
        num_groups = int(weight_value.shape[0])
    sdpa, stopped = _find_sdpa(anchor)
    if sdpa is None:
        if stopped:
            return None, (
                "no scaled_dot_product_attention takes this layer's q projection as its query before the next "
                "projection (o_proj or another layer's): its attention is not an SDPA (attention implementation "
                "is not 'sdpa'?)"
            )
        return None, (
            "no scaled_dot_product_attention is fed by this layer's q projection (attention implementation "
            "is not 'sdpa'?)"
        )
    query, key, value = (_sdpa_argument(sdpa, i, n) for i, n in enumerate(("query", "key", "value")))
    query_value = example_value(query)
    if query_value is None or query_value.dim() != 4:
        return None, "SDPA query is not (B, Hq, T, D)"
    batch, num_heads, query_length, head_dim = query_value.shape
    if query_length != 1:
        return None, f"prefill or multi-token step (query length {query_length}): stays dense"
    if _sdpa_argument(sdpa, 4, "dropout_p", 0.0) not in (0, 0.0):
        return None, "SDPA has dropout"
    if not (1 <= k <= num_groups):
        return None, f"k={k} outside [1, {num_groups}]"
    if num_heads % num_groups:
        return None, f"{num_heads} query heads are not a multiple of {num_groups} groups"
    from polar_compile.ops.selective_attention import unsupported_reason

    why = unsupported_reason(query_value.dtype, query_value.device, head_dim, num_heads // num_groups)
    if why is not None:
        return None, why
    key_cache, why = _trace_cache(key, num_groups)
    if key_cache is None:
        return None, why
    value_cache, why = _trace_cache(value, num_groups)
    if value_cache is None:
        return None, why
    why = _dtype_reason(anchor, sdpa, query_value, example_value(key), example_value(value))
    if why is not None:
        return None, why
    if key_cache.op != "placeholder" or value_cache.op != "placeholder":
        return None, (
            "K/V are not static-cache tensors (graph inputs): they are computed in the step (a DynamicCache's "
            "torch.cat?), so the cache length is not the static cache's"
        )
    cache_length = example_value(key_cache).shape[2]
    if example_value(value_cache).shape != example_value(key_cache).shape:
        return None, "key and value caches differ in shape"
    if example_value(key_cache).shape[0] != batch:
        return None, (
            f"K/V cache batch {example_value(key_cache).shape[0]} is not the query's batch {batch} (K/V broadcast "
            "over the batch?)"
        )
    is_causal = _sdpa_argument(sdpa, 5, "is_causal", False)
    if is_causal is not False:
        return None, f"SDPA is_causal={is_causal!r} (a causal mask over the whole cache): the kernel takes a mask only"
    mask = _sdpa_argument(sdpa, 3, "attn_mask")
    if mask is not None:
        mask_value = example_value(mask)
        if mask_value is None or mask_value.dtype != torch.bool:
            return None, "attention mask is not boolean (additive float masks are not supported)"
        if mask_value.dim() != 4 or mask_value.shape[1:3] != (1, 1) or mask_value.shape[3] != cache_length:
            return None, f"attention mask shape {tuple(mask_value.shape)} is not (B, 1, 1, {cache_length})"
        if mask_value.shape[0] not in (1, batch):
            return None, f"attention mask batch {mask_value.shape[0]} is neither 1 nor {batch}"
    scale = _sdpa_argument(sdpa, 6, "scale")
    if scale is None:
        scale = float(head_dim) ** -0.5
    if not isinstance(scale, (int, float)):
        return None, "softmax scale is not a constant"
    if weight is None:
        detail = f"all {num_groups} KV groups through polar::selective_attention (no router), cache length"
        detail += f" {cache_length}"
    else:
        heads = num_heads // num_groups
        detail = f"{k} of {num_groups} KV groups per sequence ({heads} query head{'s' if heads > 1 else ''} each),"
        detail += f" cache length {cache_length}" + (" (all groups: no router call)" if k == num_groups else "")
    return {
        "sdpa": sdpa,
        "num_groups": num_groups,
        "hidden": hidden,
        "weight": weight,
        "bias": bias,
        "k": k,
        "query": query,
        "key_cache": key_cache,
        "value_cache": value_cache,
        "mask": mask,
        "scale": float(scale),
        "detail": detail,
    }, ""


def _erase_if_dead(graph, node) -> None:
    """Erase the repeat_kv chain the rewrite orphaned (only nodes without users; never placeholders)."""
    while isinstance(node, Node) and not node.users and node.op in ("call_function", "call_method"):
        parent = node.args[0] if node.args else None
        graph.erase_node(node)
        node = parent


def rewrite_attention(gm: GraphModule, ctx: PassContext) -> int:
    """Swap each matched decode SDPA for a routed ``polar::selective_attention``; returns rewrites made."""
    import polar_compile.ops.route_groups  # registers torch.ops.polar.route_groups
    import polar_compile.ops.selective_attention  # noqa: F401  (registers torch.ops.polar.selective_attention)
    from polar_compile.ops.selective_attention import key_span

    graph = gm.graph
    count = 0
    spans: dict[Node, Node] = {}  # mask -> its key_span, computed before the first layer that uses it
    for anchor in anchors(gm):
        layer = anchor.args[3]
        match, reason = _match(anchor)
        if match is None:
            ctx.left_dense(layer, "attention", reason)
            continue
        sdpa = match["sdpa"]
        mask = match["mask"]
        with graph.inserting_before(sdpa):
            if mask is not None and mask not in spans:
                spans[mask] = graph.call_function(key_span, (mask,))
            if match["k"] == match["num_groups"]:  # every group: no index (None), no router, no top-k
                group_index = None
            else:
                group_index = graph.call_function(
                    torch.ops.polar.route_groups.default,
                    (match["hidden"], match["weight"], match["bias"], match["k"]),
                )
            attention = graph.call_function(
                torch.ops.polar.selective_attention.default,
                (
                    match["query"],
                    match["key_cache"],
                    match["value_cache"],
                    group_index,
                    mask,
                    match["scale"],
                    spans.get(mask),
                ),
            )
        attention.meta.update(sdpa.meta)
        old_key, old_value = _sdpa_argument(sdpa, 1, "key"), _sdpa_argument(sdpa, 2, "value")
        sdpa.replace_all_uses_with(attention)
        graph.erase_node(sdpa)
        _erase_if_dead(graph, old_key)
        _erase_if_dead(graph, old_value)
        if match["weight"] is None:  # a dense layer on the polar kernel: not a sparse rewrite
            ctx.dense_kernel(layer, match["detail"], match["num_groups"])
            ctx.counters["attention_dense"] += 1
        else:
            ctx.rewritten(layer, "attention", match["detail"], (match["k"], match["num_groups"]))
            ctx.counters["attention"] += 1
        count += 1
    return count
