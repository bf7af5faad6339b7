"""Shared-prefix scoring of lm-eval loglikelihood requests: each distinct prefix runs once.

lm-eval's HFLM runs every (context, continuation) request as its own sequence: a HellaSwag item is
4 forwards of the same ~50-token context, an ARC item 4-5. Here the requests of one document
(lm-eval's (task, doc_id)) form a *tree*: their longest common token prefix (capped so that every
scored position lies after it) and one *branch* per distinct remainder. A tree is laid out as one
run of tokens [prefix | branch 1 | branch 2 | ...] with position ids restarting after the prefix
for every branch and a 4-D attention mask letting each branch see the prefix and itself only, so a
branch token computes exactly what it would at the same position of its own sequence. Trees are
packed first-fit into rows of about `row_tokens` tokens (several small trees share a row, each
blind to the others), rows of similar length are batched, and the LM head and log-softmax run on
the scored positions only (HFLM computes them over every position of the padded batch).

What it covers: BoolQ / HellaSwag / ARC / OBQA / PIQA share the context across 2-5 choices;
WinoGrande's two contexts share the sentence up to the blank; LAMBADA has one branch per tree
(no sharing, but packing and the LM head on scored positions only still apply).

Why hand-written rather than lm-eval's own: HFLM's only reuse is its one-token-continuation
logits cache (`group_by="contexts"`), which covers BoolQ but not multi-token choices, and its
batches always hold whole sequences. The LM subclass in engine.zeroshot overrides
`_loglikelihood_tokens` (lm-eval's extension point: tokenization, the task logic and the metrics
stay lm-eval's) and sends anything this module cannot take (a family off SHARED_FAMILIES, a
request longer than the model's window, which HFLM truncates from the left, or than a sliding-attention
window) to HFLM's own path.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# Families whose base model takes a ready 4-D float mask and explicit position ids (transformers'
# create_causal_mask returns a 4-D mask as it is) and whose logits are lm_head(last hidden state)
# with no scaling or soft-capping: what tests/test_zeroshot_scorer.py checks against HFLM.
SHARED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3")


def unsupported_reason(model) -> str | None:
    """None when `model` can be scored here; else why the HFLM path is used instead."""
    cfg = getattr(model, "config", None)
    mt = getattr(cfg, "model_type", None)
    if mt not in SHARED_FAMILIES:
        return f"model_type {mt!r} is not among {', '.join(SHARED_FAMILIES)}"
    for attr in ("final_logit_softcapping", "logit_scale", "attn_logit_softcapping"):
        if getattr(cfg, attr, None):
            return f"config.{attr} is set"
    if getattr(model, "get_output_embeddings", lambda: None)() is None or getattr(model, "base_model", None) is model:
        return "no separate base model and LM head"
    return None


def window(model) -> int | None:
    """The sliding-attention window when the config has one (taken as in effect, whatever
    use_sliding_window says): requests longer than it go to HFLM's path, since the tree mask is
    full causal attention, which equals the sliding mask only on inputs of at most that many tokens."""
    w = getattr(getattr(model, "config", None), "sliding_window", None)
    return int(w) if isinstance(w, int) and not isinstance(w, bool) and w > 0 else None


@dataclass
class Branch:
    suffix: list[int]  # the tokens after the tree's prefix: (context + continuation)[:-1][P:]
    n_scored: int  # the last n_scored positions predict the continuation
    target: list[int]  # the continuation tokens
    requests: list[int] = field(default_factory=list)  # indices of the requests it answers (duplicates share)


@dataclass
class Tree:
    prefix: list[int]
    branches: list[Branch]
    key: object = None  # (task, doc_id) or the context tokens

    @property
    def n_tokens(self) -> int:
        return len(self.prefix) + sum(len(b.suffix) for b in self.branches)


def _lcp(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def build_trees(requests, keys=None) -> list[Tree]:
    """One tree per document (`keys[i]`, e.g. (task, doc_id)) or, without keys, per context.

    `requests[i]` = (context_tokens, continuation_tokens). The prefix is the requests' longest
    common prefix of (context + continuation)[:-1], at most min(len(context)) - 1 tokens, so the
    positions scored (the last len(continuation) of each input) all lie in the branches.
    Identical requests (same context and continuation tokens, in any document) share one branch,
    as HFLM's logits cache shares one forward between them."""
    first_of: dict = {}  # (context, continuation) -> the first request with those tokens (duplicates reuse it)
    alias: dict[int, int] = {}
    groups: dict = {}
    for i, (ctx, cont) in enumerate(requests):
        bk = (tuple(ctx), tuple(cont))
        if bk in first_of:
            alias[i] = first_of[bk]
            continue
        first_of[bk] = i
        k = keys[i] if keys is not None else tuple(ctx)
        groups.setdefault(k, []).append(i)
    trees, branch_of = [], {}
    for k, idx in groups.items():
        inputs = {i: (list(requests[i][0]) + list(requests[i][1]))[:-1] for i in idx}
        first = inputs[idx[0]]
        p = min(len(requests[i][0]) for i in idx) - 1
        for i in idx[1:]:
            p = min(p, _lcp(first, inputs[i]))
        branches = []
        for i in idx:
            br = Branch(inputs[i][p:], len(requests[i][1]), list(requests[i][1]), [i])
            branches.append(br)
            branch_of[i] = br
        trees.append(Tree(first[:p], branches, k))
    for i, j in alias.items():
        branch_of[j].requests.append(i)
    return trees


def pack_rows(trees: list[Tree], row_tokens: int) -> list[list[Tree]]:
    """First-fit decreasing: trees into rows of at most max(row_tokens, longest tree) tokens."""
    order = sorted(trees, key=lambda t: -t.n_tokens)
    cap = max([row_tokens] + [t.n_tokens for t in order[:1]])
    rows: list[list[Tree]] = []
    used: list[int] = []
    for t in order:
        for j, u in enumerate(used):
            if u + t.n_tokens <= cap:
                rows[j].append(t)
                used[j] += t.n_tokens
                break
        else:
            rows.append([t])
            used.append(t.n_tokens)
    return rows


def batch_rows(rows: list[list[Tree]], batch_tokens: int) -> list[list[list[Tree]]]:
    """Rows longest first, grouped while rows x longest row <= batch_tokens (one row at least)."""
    lens = [sum(t.n_tokens for t in r) for r in rows]
    order = sorted(range(len(rows)), key=lambda j: -lens[j])
    batches, cur, width = [], [], 0
    for j in order:
        w = max(width, lens[j])
        if cur and (len(cur) + 1) * w > batch_tokens:
            batches.append(cur)
            cur, w = [], lens[j]
        cur.append(rows[j])
        width = w
    if cur:
        batches.append(cur)
    return batches


@dataclass
class Layout:
    """One batch as tensors, and where each branch's scored positions are."""

    input_ids: torch.Tensor  # (B, L) long
    position_ids: torch.Tensor  # (B, L) long
    mask: torch.Tensor  # (B, 1, L, L) float: 0 where attended, dtype min elsewhere
    rows: torch.Tensor  # (N,) long: batch row of each scored position
    cols: torch.Tensor  # (N,) long: column of each scored position
    targets: torch.Tensor  # (N,) long: the token each scored position should predict
    spans: list  # per branch (Branch, start, end) into the N scored positions
    n_real: int  # tokens that are not padding


def layout(batch: list[list[Tree]], dtype, device) -> Layout:
    width = max(sum(t.n_tokens for t in row) for row in batch)
    B = len(batch)
    ids = torch.zeros(B, width, dtype=torch.long)
    pos = torch.zeros(B, width, dtype=torch.long)
    tree = -1 - torch.arange(width).repeat(B, 1)  # (B, L): padding tokens each alone (attend to themselves)
    branch = torch.zeros(B, width, dtype=torch.long)  # 0: prefix (or padding), j >= 1: branch j
    rows, cols, targets, spans = [], [], [], []
    n_real = 0
    for b, row in enumerate(batch):
        c = 0
        for ti, t in enumerate(row):
            P = len(t.prefix)
            ids[b, c:c + P] = torch.tensor(t.prefix, dtype=torch.long)
            pos[b, c:c + P] = torch.arange(P)
            tree[b, c:c + t.n_tokens] = ti
            c += P
            for j, br in enumerate(t.branches, start=1):
                S = len(br.suffix)
                ids[b, c:c + S] = torch.tensor(br.suffix, dtype=torch.long)
                pos[b, c:c + S] = P + torch.arange(S)
                branch[b, c:c + S] = j
                start = len(targets)
                first = c + S - br.n_scored
                rows.extend([b] * br.n_scored)
                cols.extend(range(first, c + S))
                targets.extend(br.target)
                spans.append((br, start, len(targets)))
                c += S
            n_real += t.n_tokens
    # allowed[b, q, k]: same tree, k not after q (positions), k in the prefix or in q's own branch
    same_tree = tree[:, :, None] == tree[:, None, :]  # (B, L, L)
    causal = pos[:, None, :] <= pos[:, :, None]
    visible = (branch[:, None, :] == 0) | (branch[:, None, :] == branch[:, :, None])
    allowed = same_tree & causal & visible
    mask = torch.zeros(B, 1, width, width, dtype=dtype)
    mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
    as_long = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
    return Layout(ids.to(device), pos.to(device), mask.to(device), as_long(rows), as_long(cols), as_long(targets),
                  spans, n_real)


@torch.no_grad()
def score_batch(model, lay: Layout, softmax_dtype=None) -> list[tuple[Branch, float, bool]]:
    """(branch, sum of log p(continuation), every continuation token the argmax) per branch."""
    hidden = model.base_model(input_ids=lay.input_ids, attention_mask=lay.mask, position_ids=lay.position_ids,
                              use_cache=False).last_hidden_state  # (B, L, H)
    h = hidden[lay.rows, lay.cols]  # (N, H): the scored positions only
    logits = model.get_output_embeddings()(h)  # (N, V)
    logp = torch.log_softmax(logits, dim=-1, dtype=softmax_dtype)  # (N, V)
    tok = logp.gather(1, lay.targets[:, None])[:, 0]  # (N,)
    greedy = logp.argmax(dim=-1) == lay.targets  # (N,)
    out = []
    for br, s, e in lay.spans:
        out.append((br, float(tok[s:e].sum()), bool(greedy[s:e].all())))
    return out
