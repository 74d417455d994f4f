"""`where`: which modules a rewrite touches.

Accepted forms, each matched against dotted module paths (``model.layers.0.self_attn.k_proj``):

- a glob: ``*`` matches any run of characters, dots included; ``?`` one character; ``[0-3]``
  and ``[!0]`` one character of a class; ``{k_proj,v_proj}`` alternatives (may nest);
- ``"re:<regex>"``: a Python regex that must match the whole path;
- a callable ``(path, module) -> bool``;
- a list of any of these; every entry must match something on its own.

Only adaptable modules (``surgery.site.adaptable``) become sites. A pattern that also covers
containers or non-adaptable leaves (``model.layers.0.*`` covers LayerNorms) simply skips them;
a pattern that covers nothing adaptable is an error naming what it did hit.

Embeddings and convolutions are adaptable (by LoRA) but opt-in: a pattern, or one alternative of
a brace glob, reaches them only when it reaches no linear layer. So ``"*"`` is still every linear
layer, while ``"model.embed_tokens"``, ``"*.{embed_tokens,q_proj,v_proj}"`` or ``"*conv*"`` name them.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from torch import nn

from .errors import SHOWN, NoMatchError, PatternError, UnsupportedModuleError, WhereTypeError

Where = str | Callable[[str, nn.Module], bool] | Iterable[str | Callable[[str, nn.Module], bool]]
_GLOB_CHARS = set("*?[]{}")


def _show(value: object) -> str:
    """``repr(value)``, cut short: a pattern of a million characters is not echoed whole."""
    if not isinstance(value, str):
        text = repr(value)
        return text if len(text) <= SHOWN else text[:SHOWN] + "..."
    return repr(value) if len(value) <= SHOWN else f"{value[:SHOWN]!r}... ({len(value):,} characters)"


@dataclass
class Pattern:
    label: str
    test: Callable[[str, nn.Module], bool]
    literal: bool  # a plain path with no wildcard
    alternatives: list[Callable[[str, nn.Module], bool]] | None = None  # a brace glob's expansions; None: [test]


def _expand_braces(s: str) -> list[str]:
    start = s.find("{")
    if start < 0:
        if "}" in s:
            raise PatternError(f"unbalanced '}}' in pattern {_show(s)}: braces take alternatives, e.g. '*.{{q_proj,v_proj}}'.")
        return [s]
    depth = 0
    for i in range(start, len(s)):
        if s[i] == "{":
            depth += 1
        elif s[i] == "}":
            depth -= 1
            if depth == 0:
                break
    else:
        raise PatternError(f"unbalanced '{{' in pattern {_show(s)}: close it, e.g. '*.{{q_proj,v_proj}}'.")
    body, parts, level, last = s[start + 1 : i], [], 0, 0
    for j, ch in enumerate(body):
        if ch == "{":
            level += 1
        elif ch == "}":
            level -= 1
        elif ch == "," and level == 0:
            parts.append(body[last:j])
            last = j + 1
    parts.append(body[last:])
    head, tail = s[:start], s[i + 1 :]
    return [x for p in parts for x in _expand_braces(head + p + tail)]


_MAX_BRACE_DEPTH = 32
_MAX_ALTERNATIVES = 4096


def _check_brace_size(s: str) -> None:
    """Refuse brace patterns whose expansion would recurse too deep or explode combinatorially."""
    frames = [[0, 1]]  # per open group: [sum of finished alternatives, product of the current one]
    for ch in s:
        if ch == "{":
            frames.append([0, 1])
            if len(frames) > _MAX_BRACE_DEPTH:
                raise PatternError(
                    f"`where` pattern {_show(s)} nests braces more than {_MAX_BRACE_DEPTH} deep; "
                    "write a flatter pattern or a list of patterns."
                )
        elif ch == "," and len(frames) > 1:
            frames[-1][0] += frames[-1][1]
            frames[-1][1] = 1
        elif ch == "}" and len(frames) > 1:
            done = frames.pop()
            frames[-1][1] = min(frames[-1][1] * (done[0] + done[1]), _MAX_ALTERNATIVES + 1)
    if frames[0][1] > _MAX_ALTERNATIVES:
        raise PatternError(
            f"`where` pattern {_show(s)} expands to more than {_MAX_ALTERNATIVES} alternatives; "
            "use a 're:' regex or a callable instead."
        )


_STAR = None  # the `*` token; every other token is a test of one character


def _glob_tokens(glob: str, entry: str) -> list:
    """A glob without braces as tokens: ``_STAR``, or a one-character test (literal, ``?``, class)."""
    out: list = []
    i = 0
    while i < len(glob):
        ch = glob[i]
        if ch == "*":
            if out[-1:] != [_STAR]:  # '**' is '*': consecutive stars would only cost time
                out.append(_STAR)
        elif ch == "?":
            out.append(lambda c: True)
        elif ch == "[":
            end = glob.find("]", i + 2 if glob[i + 1 : i + 2] in ("!", "]") else i + 1)
            if end < 0:
                raise PatternError(
                    f"unbalanced '[' in pattern {_show(glob)}: a class needs its ']', e.g. 'model.layers.[0-3].*'."
                )
            body = glob[i + 1 : end]
            if body.startswith("!"):
                body = "^" + body[1:]
            try:  # a class tests one character, so the regex engine cannot backtrack here
                out.append(re.compile("[" + body.replace("\\", "\\\\") + "]").fullmatch)
            except (re.error, OverflowError) as e:  # e.g. '[z-a]' or '[!]'
                raise PatternError(
                    f"bad character class in `where` pattern {_show(entry)}: {e}. Write classes like '[0-3]' or '[!0]', "
                    "or use a 're:' regex."
                ) from None
            i = end
        elif ch == "]":
            raise PatternError(f"unbalanced ']' in pattern {_show(glob)}: write '[0-3]' for a class of characters.")
        else:
            out.append(ch.__eq__)
        i += 1
    return out


def _glob_match(tokens: list, path: str) -> bool:
    """Whole-path glob match in O(len(path) * len(tokens)): on a mismatch, go back to the last star
    only (a regex of several `.*` can backtrack exponentially on a path that does not match)."""
    i = j = 0
    star, mark = -1, 0
    while i < len(path):
        if j < len(tokens) and tokens[j] is not _STAR and tokens[j](path[i]):
            i, j = i + 1, j + 1
        elif j < len(tokens) and tokens[j] is _STAR:
            star, mark, j = j, i, j + 1
        elif star >= 0:
            mark += 1
            i, j = mark, star + 1
        else:
            return False
    while j < len(tokens) and tokens[j] is _STAR:
        j += 1
    return j == len(tokens)


def _glob_matcher(glob: str, entry: str) -> Callable[[str], bool]:
    """A whole-path test for one brace-free glob. Its literal head and tail (before the first and after the
    last wildcard) are checked first: most paths of a model fail on them, and the character-by-character
    matcher costs about a hundred times more."""
    tokens = _glob_tokens(glob, entry)
    wild = [i for i, ch in enumerate(glob) if ch in "*?[]"]
    head, tail = (glob[: wild[0]], glob[wild[-1] + 1 :]) if wild else (glob, "")
    least = len(head) + len(tail)
    return lambda p: (len(p) >= least and p.startswith(head) and p.endswith(tail)
                      and _glob_match(tokens, p))


def compile_one(entry) -> Pattern:
    if callable(entry) and not isinstance(entry, str):
        name = getattr(entry, "__name__", repr(entry))
        return Pattern(f"<callable {name}>", lambda p, m, f=entry: bool(f(p, m)), literal=False)
    if not isinstance(entry, str):
        raise WhereTypeError(
            f"`where` entries must be glob strings, 're:' regexes or callables (path, module) -> bool; "
            f"got {type(entry).__name__} {_show(entry)}. Example: where='*.k_proj'."
        )
    if not entry.strip():
        raise PatternError("empty `where` pattern: name the modules to adapt, e.g. '*.k_proj'.")
    if entry.startswith("re:"):
        try:
            rx = re.compile(entry[3:])
        except (re.error, OverflowError, RecursionError) as e:
            raise PatternError(
                f"bad regex in `where` {_show(entry)}: {e}. The part after 're:' is a Python regex matched "
                r"against the whole path, e.g. 're:.*\.layers\.[0-3]\..*_proj'."
            ) from None
        return Pattern(entry, lambda p, m: rx.fullmatch(p) is not None, literal=False)
    _check_brace_size(entry)
    alternatives = [_glob_matcher(a, entry) for a in _expand_braces(entry)]
    return Pattern(entry, lambda p, m: any(f(p) for f in alternatives),
                   literal=not (_GLOB_CHARS & set(entry)),
                   alternatives=[lambda p, m, f=f: f(p) for f in alternatives])


def compile_where(where: Where) -> list[Pattern]:
    if isinstance(where, (str,)) or callable(where):
        return [compile_one(where)]
    if isinstance(where, (list, tuple, set, frozenset)):
        if not where:
            raise WhereTypeError("`where` is an empty list: give at least one pattern, e.g. ['*.q_proj', '*.v_proj'].")
        return [compile_one(w) for w in where]
    raise WhereTypeError(
        f"`where` must be a glob string, a 're:' regex, a callable (path, module) -> bool or a list of these; "
        f"got {type(where).__name__}. Example: where='*.{{q_proj,v_proj}}'."
    )


@dataclass
class Matches:
    """Result of matching: the adaptable paths each pattern hits, and what it skipped."""

    hits: dict[str, list[str]] = field(default_factory=dict)
    skipped: dict[str, list[str]] = field(default_factory=dict)

    @property
    def paths(self) -> list[str]:
        seen: dict[str, None] = {}
        for ps in self.hits.values():
            seen.update(dict.fromkeys(ps))
        return list(seen)


def match(
    candidates: dict[str, nn.Module],
    is_adaptable: Callable[[nn.Module], bool],
    where: Where,
    *,
    strict: bool = True,
    opt_in: Callable[[nn.Module], bool] | None = None,
    weight_space: Callable[[Any], bool] = lambda m: False,
) -> Matches:
    """Match `where` against ``candidates`` (path -> module, in model order).

    With ``strict``, a pattern that hits no adaptable module raises. A module for which ``opt_in`` is true
    (an embedding or a convolution) is hit only by an alternative that hits no other adaptable module: "*"
    keeps meaning every linear layer, while "*.embed_tokens" or "*conv*" reach what they name. A candidate for
    which ``weight_space`` is true (a Parameter) is reached only by an alternative that matches no module:
    "*.experts.gate_up_proj" names a Parameter, while "*.mlp.*" means the layers under mlp, not every
    Parameter there (a router's weight, a conv's kernel).
    """
    patterns = compile_where(where)
    result = Matches()
    for pat in patterns:
        hit, skip, containers = [], [], []
        modules = False
        for path, mod in candidates.items():
            if not pat.test(path, mod):
                continue
            modules = modules or not weight_space(mod)
            if is_adaptable(mod):
                hit.append(path)
            elif not isinstance(mod, nn.Module) or not any(True for _ in mod.children()):  # a leaf, or a Parameter
                skip.append(path)
            else:
                containers.append(path)
        if modules and any(weight_space(candidates[p]) for p in hit + skip):
            hit, skip = (_named_parameters(pat, ps, candidates, weight_space) for ps in (hit, skip))
        if opt_in is not None and any(opt_in(candidates[p]) for p in hit):
            hit = _opted_in(pat, hit, candidates, opt_in)
        result.hits[pat.label] = hit
        result.skipped[pat.label] = skip
        if strict and not hit and not skip and containers:
            inside = [p for p in candidates if p.startswith(containers[0] + ".") and is_adaptable(candidates[p])]
            raise UnsupportedModuleError(
                f"`where` pattern {_show(pat.label)} names {containers[0]}, a {type(candidates[containers[0]]).__name__} "
                f"that holds other modules; variants adapt its linear layers, not the container. Write "
                f"{_show(containers[0] + '.*')} for all of them"
                + (f", or name one, e.g. {_show(inside[0])}." if inside else " (it holds none).")
            )
        if strict and not hit:
            raise_no_match(pat, skip, candidates, is_adaptable)
        if strict and pat.literal and skip:
            _raise_unsupported(pat, skip, candidates, is_adaptable)
    return result


def _named_parameters(pat: Pattern, paths: list[str], candidates, weight_space) -> list[str]:
    """``paths`` without the Parameters that only alternatives matching modules too reached ("{mix,head}" names
    the Parameter mix; "*conv*" means the convolutions, not their kernels as well)."""
    plain = [alt for alt in pat.alternatives or [pat.test]
             if not any(alt(p, m) for p, m in candidates.items() if not weight_space(m))]
    return [p for p in paths if not weight_space(candidates[p]) or any(alt(p, candidates[p]) for alt in plain)]


def _opted_in(pat: Pattern, hit: list[str], candidates, opt_in) -> list[str]:
    """``hit`` without the opt-in modules that only an alternative reaching ordinary layers too matched."""
    ordinary = [p for p in hit if not opt_in(candidates[p])]
    keep = set(ordinary)
    for alt in pat.alternatives or [pat.test]:
        if any(alt(p, candidates[p]) for p in ordinary):
            continue
        keep.update(p for p in hit if p not in keep and alt(p, candidates[p]))
    return [p for p in hit if p in keep]


def _kind(obj) -> str:
    if isinstance(obj, nn.Parameter):
        packed = " (a packed quantised weight)" if getattr(obj, "quant_state", None) is not None else ""
        return f"a Parameter of shape {tuple(obj.shape)}, {str(obj.dtype).removeprefix('torch.')}{packed}"
    return type(obj).__name__


def _raise_unsupported(pat: Pattern, skip: list[str], candidates, is_adaptable) -> None:
    kinds = ", ".join(f"{p} ({_kind(candidates[p])})" for p in skip[:5])
    adaptable = [p for p, m in candidates.items() if is_adaptable(m)]
    raise UnsupportedModuleError(
        f"`where` pattern {_show(pat.label)} matches only modules no variant can adapt: {kinds}"
        f"{' ...' if len(skip) > 5 else ''}. Variants adapt linear layers (nn.Linear, GPT-2 Conv1D; LoRA also "
        f"nn.Embedding and nn.Conv1d/2d/3d), and in weight space floating-point Parameters of 2 dimensions "
        f"(d_out, d_in) or 3 (experts, d_out, d_in). "
        f"Adaptable paths look like: {', '.join(adaptable[:3]) or '(none in this model)'}."
    )


def raise_no_match(pat: Pattern, skip: list[str], candidates, is_adaptable) -> None:
    if skip:
        _raise_unsupported(pat, skip, candidates, is_adaptable)
    paths = list(candidates)
    probe = re.sub(r"[*?\[\]{}]", "", pat.label.removeprefix("re:"))[:200]  # difflib is quadratic
    close = difflib.get_close_matches(probe, paths, n=3, cutoff=0.0) if probe else paths[:3]
    leaves = sorted({p.rsplit(".", 1)[-1] for p, m in candidates.items() if is_adaptable(m)})
    tail = probe.rsplit(".", 1)[-1]
    close_leaves = difflib.get_close_matches(tail, leaves, n=3, cutoff=0.5) if tail else []
    hint = f" Did you mean {', '.join(repr('*.' + n) for n in close_leaves)}?" if close_leaves else ""
    raise NoMatchError(
        f"`where` pattern {_show(pat.label)} matches no module of this model.{hint} "
        f"Closest real paths: {', '.join(close) or '(the model has no submodules)'}. "
        "Globs match whole dotted paths and '*' spans dots, so write '*.k_proj', not 'k_proj'; "
        "surgery.plan(model, where) shows what a pattern hits without changing anything."
    )
