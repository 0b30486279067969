"""Replace a decode step's SDPA with ``polar::route_groups`` (the router and its per-sequence top-k in one op)
-> ``polar::selective_attention``.

For every router anchor (see ``ops/router_anchor.py``) the pass follows the data flow from the anchor (the
q projection's input) to the first ``scaled_dot_product_attention`` whose *query* it reaches, traces the
key and value back through HF's ``repeat_kv`` (getitem[:, :, None] -> expand -> reshape) to the cache
tensors ``(B, Hkv, S_max, D)``, and checks every fact the rewrite relies on: one query token, no dropout,
a boolean (or no) mask over the cache length, as many KV heads as the router has groups, 1 <= k <= Hkv.
Anything unproven leaves that layer's SDPA untouched and records the reason.

A dense layer's anchor carries no router and k = G: its SDPA becomes the same kernel over every group (a
constant index), which reads each group's K and V once instead of SDPA's per-query-head repeat_kv copy. A
sparse layer at k = G also skips its router and top-k.

Every layer of a step attends under the same mask, so its valid span per sequence (``key_span``) is computed
once, before the first rewritten layer, and passed to every layer's kernel: the kernel's programs then start
streaming K/V at once instead of each scanning the mask row (2-6 us a program at 4-16K cache slots, H100).
"""

from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node

from polar_compile.passes.context import PassContext, anchors, example_value, is_anchor, is_sdpa

_SEARCH_BUDGET = 512  # nodes visited from one anchor before giving up (a layer has ~60)


def _find_sdpa(anchor: Node) -> Node | None:
    """First SDPA reached from the anchor through its query input (breadth-first, not past other anchors)."""
    frontier, seen = [anchor], {anchor}
    while frontier and len(seen) < _SEARCH_BUDGET:
        next_frontier = []
        for node in frontier:
            for user in node.users:
                if user in seen:
                    continue
                seen.add(user)
                if is_sdpa(user):
                    query = user.args[0] if user.args else user.kwargs.get("query")
                    if query is node:
                        return user
                    continue  # reached as key/value: not this layer's query path
                if is_anchor(user):
                    continue
                next_frontier.append(user)
        frontier = next_frontier
    return None


def _is_method(node, name: str) -> bool:
    return isinstance(node, Node) and (
        (node.op == "call_method" and node.target == name)
        or (node.op == "call_function" and getattr(node.target, "__name__", None) == name)
    )


def _trace_cache(node: Node, num_groups: int) -> tuple[Node | None, str]:
    """The (B, Hkv, S, D) tensor under ``node``: itself, or the source of a repeat_kv expand+reshape."""
    value = example_value(node)
    if value is None or value.dim() != 4:
        return None, "key/value is not a 4-d tensor"
    if value.shape[1] == num_groups:
        return node, ""
    if _is_method(node, "reshape"):
        expanded = node.args[0]
        if _is_method(expanded, "expand") and isinstance(expanded.args[0], Node):
            unsqueezed = expanded.args[0]
            source = unsqueezed.args[0] if unsqueezed.op == "call_function" and unsqueezed.args else None
            indexed = unsqueezed.op == "call_function" and unsqueezed.target is operator.getitem
            if _is_method(unsqueezed, "unsqueeze"):
                source, indexed = unsqueezed.args[0], True
            source_value = example_value(source)
            if (
                indexed
                and source_value is not None
                and source_value.dim() == 4
                and source_value.shape[1] == num_groups
                and source_value.shape[0] == value.shape[0]
                and source_value.shape[2:] == value.shape[2:]
            ):
                return source, ""
    return None, (
        f"key/value has {value.shape[1]} heads, not the router's {num_groups} groups, and is not a repeat_kv of a"
        " cache tensor with that many"
    )


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
    sdpa = _find_sdpa(anchor)
    if sdpa is None:
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
    cache_length = example_value(key_cache).shape[2]
    if example_value(value_cache).shape != example_value(key_cache).shape:
        return None, "key and value caches differ in shape"
    mask = _sdpa_argument(sdpa, 3, "attn_mask")
    if mask is not None:
        mask_value = example_value(mask)
        if mask_value is None or mask_value.dtype != torch.bool:
            return None, "attention mask is not boolean (additive float masks are not supported)"
        if mask_value.dim() != 4 or mask_value.shape[1:3] != (1, 1) or mask_value.shape[3] != cache_length:
            return None, f"attention mask shape {tuple(mask_value.shape)} is not (B, 1, 1, {cache_length})"
        if mask_value.shape[0] not in (1, batch):
            return None, f"attention mask batch {mask_value.shape[0]} is neither 1 nor {batch}"
    elif _sdpa_argument(sdpa, 5, "is_causal", False):
        return None, "causal SDPA without a mask"
    scale = _sdpa_argument(sdpa, 6, "scale")
    if scale is None:
        scale = float(head_dim) ** -0.5
    if not isinstance(scale, (int, float)):
        return None, "softmax scale is not a constant"
    if k == num_groups and not isinstance(batch, int):
        return None, "batch size is symbolic: the all-groups index needs a static batch"
    if weight is None:
        detail = f"all {num_groups} KV groups through polar::selective_attention (no router), cache length"
        detail += f" {cache_length}"
    else:
        heads = num_heads // num_groups
        detail = f"{k} of {num_groups} KV groups per sequence ({heads} query head{'s' if heads > 1 else ''} each),"
        detail += f" cache length {cache_length}" + (" (all groups: no router call)" if k == num_groups else "")
    return {
        "sdpa": sdpa,
        "batch": batch,
        "num_groups": num_groups,
        "device": query_value.device,
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
            if match["k"] == match["num_groups"]:  # every group: a constant index, no router, no top-k
                groups = graph.call_function(
                    torch.arange, (match["num_groups"],), {"dtype": torch.int32, "device": match["device"]}
                )
                group_index = graph.call_method("expand", (groups, match["batch"], match["num_groups"]))
                group_index = graph.call_method("contiguous", (group_index,))
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
