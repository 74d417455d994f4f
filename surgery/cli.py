"""The ``surgery`` command.

    surgery inspect ADAPTER.safetensors
    surgery diff MODEL_DIR --variant "LoRA(r=8)" --where "*.k_proj" -o diff.html

Adding a subcommand is one function decorated with ``@command(...)``: the decorator takes the
argparse arguments (``arg(...)`` has ``add_argument``'s signature), the function's name is the
subcommand's name (``_`` becomes ``-``), its docstring's first line is the help. The function
receives the parsed arguments and returns an exit code (None means 0). Errors from
``surgery.errors`` are printed as one line and exit with code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import ast
import sys
from typing import Any, Callable

from .errors import DiffInputError, ModelDirError, OutputFormatError, OutputPathError, SurgeryError, VariantSpecError, clip

_COMMANDS: list[tuple[Callable[[argparse.Namespace], int | None], list[tuple[tuple, dict]]]] = []


def arg(*names: str, **kwargs: Any) -> tuple[tuple, dict]:
    """One argparse argument of a subcommand, spelled like ``parser.add_argument``."""
    return names, kwargs


def command(*arguments: tuple[tuple, dict]):
    """Register the decorated function as a subcommand taking ``arguments``."""

    def register(fn: Callable[[argparse.Namespace], int | None]):
        _COMMANDS.append((fn, list(arguments)))
        return fn

    return register


# ----- helpers shared by subcommands -----


def parse_variant(spec: str):
    """``"DoRA(r=8, alpha=16)"`` -> ``adapters.DoRA(r=8, alpha=16)``, without evaluating any code.

    The spec is parsed with ``ast``; the name must be a registered variant and every value a Python
    literal (``ast.literal_eval``), so nothing in the string can run.
    """
    from adapters import REGISTRY

    example = 'e.g. --variant "LoRA(r=8, alpha=16)"'
    try:
        tree = ast.parse(spec.strip(), mode="eval")
    except SyntaxError:
        raise VariantSpecError(f"cannot parse the variant spec {spec!r}: write Name(key=value, ...), {example}.") from None
    node = tree.body
    if isinstance(node, ast.Name):  # a bare name means all defaults
        node = ast.Call(func=node, args=[], keywords=[])
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
        raise VariantSpecError(f"the variant spec {spec!r} is not of the form Name(key=value, ...); {example}.")
    name = node.func.id
    if name not in REGISTRY:
        raise VariantSpecError(f"unknown variant {name!r} in {spec!r}: known variants are {', '.join(sorted(REGISTRY))}.")
    if node.args:
        raise VariantSpecError(f"the variant spec {spec!r} has positional values; name each one, {example}.")
    kwargs = {}
    for kw in node.keywords:
        if kw.arg is None:
            raise VariantSpecError(f"the variant spec {spec!r} uses **; write each key=value out, {example}.")
        try:
            kwargs[kw.arg] = ast.literal_eval(kw.value)
        except ValueError:
            raise VariantSpecError(
                f"the value of {kw.arg} in {spec!r} is not a literal ({ast.unparse(kw.value)}); only numbers, "
                f"strings, booleans, None, tuples and lists are allowed, {example}."
            ) from None
    try:
        return REGISTRY[name](**kwargs)
    except TypeError as e:  # an unknown keyword
        raise VariantSpecError(f"{spec!r}: {e}. Check the field names of adapters.{name}.") from None


def load_model(directory: str):
    """The model saved in ``directory``, as the class its config names, from local files only."""
    from pathlib import Path

    import transformers

    if not (Path(directory) / "config.json").is_file():
        raise ModelDirError(
            f"{directory!r} is not a saved Hugging Face model directory (no config.json in it); "
            "pass the folder that model.save_pretrained(...) wrote."
        )
    config = transformers.AutoConfig.from_pretrained(directory, local_files_only=True)
    names = getattr(config, "architectures", None) or []
    # the class is looked up by name among transformers' model classes, never imported from elsewhere
    cls = getattr(transformers, names[0], None) if names else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        cls = transformers.AutoModel
    model = cls.from_pretrained(directory, local_files_only=True)
    model.eval()
    return model


def _variant_text(info: dict[str, Any]) -> str:
    """A site's variant as ``LoRA(r=4)``; a variant this version does not know is shown in full."""
    from .variant import variant_from_config

    config = info.get("config", {})
    try:
        return variant_from_config(info["variant"], config).short()
    except SurgeryError:
        return clip(f"{info['variant']}({', '.join(f'{k}={v!r}' for k, v in config.items())})")


def _human(n: int) -> str:
    return f"{n:,}"


# ----- subcommands -----


@command(arg("adapter", help="an adapter file written by surgery.save (.safetensors)"))
def inspect(args: argparse.Namespace) -> int | None:
    """Show the sites, variant configs and parameter counts stored in an adapter file."""
    from .io import read_header, read_metadata

    header = read_header(args.adapter)  # header only: tensor data is never read, nothing is unpickled
    meta = read_metadata(args.adapter, header=header)
    counts: dict[str, int] = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        n = 1
        for d in info["shape"]:
            n *= d
        path = next((p for p in meta["sites"] if key.startswith(p + ".")), "")
        counts[path] = counts.get(path, 0) + n
    rows = []
    for path, info in meta["sites"].items():
        base = info.get("base", {})
        rows.append((clip(path), _variant_text(info), f"{base.get('d_in', '?')}x{base.get('d_out', '?')}",
                     base.get("class", "?"), _human(counts.get(path, 0))))
    head = ("site", "variant", "in x out", "base", "params")
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    print(f"{args.adapter}: model-surgery adapter, format version {meta['version']}, "
          f"base fingerprint {meta['fingerprint'] or '-'}")
    for r in [head, tuple("-" * w for w in widths), *rows]:
        print("  ".join(c.rjust(w) if i == 4 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip())
    print(f"{len(rows)} sites, {_human(sum(counts.values()))} adapter parameters")
    return 0


@command(
    arg("model_dir", help="a saved Hugging Face model directory (save_pretrained); read from local files only"),
    arg("other", nargs="?", help="a second checkpoint directory: compare the two tensor by tensor instead"),
    arg("--variant", help='the variant to apply, e.g. "DoRA(r=8)" (parsed, never evaluated)'),
    arg("--where", help='which modules, e.g. "*.k_proj" or "*.{q_proj,v_proj}"'),
    arg("-o", "--output", nargs="+", default=[], metavar="FILE",
        help="write the diff to FILE: .txt, .svg or .html by extension (several allowed); default: print the text"),
)
def diff(args: argparse.Namespace) -> int | None:
    """Show what a surgery changes (--variant, --where), or which weights differ between two checkpoints
    (A B: exit 0 when they are the same, 1 when they differ)."""
    import copy
    from pathlib import Path

    from .compare import Diff
    from .compare import diff as compute
    from .ops import rewrite

    kinds = {".txt": "text", ".svg": "svg", ".html": "html", ".htm": "html"}
    for out in args.output:
        if Path(out).suffix.lower() not in kinds:
            raise OutputFormatError(
                f"cannot tell the format of {out!r} from its extension; use one of {', '.join(kinds)} "
                "(e.g. -o diff.html)."
            )
    if args.other is not None:
        if args.variant or args.where:
            raise DiffInputError("pass either a second checkpoint (surgery diff A B) or --variant and --where, not both.")
        if any(kinds[Path(out).suffix.lower()] == "svg" for out in args.output):
            raise OutputFormatError("a checkpoint diff is a table of tensors: write it as .txt or .html, not .svg.")
        from .weights import changes, of_checkpoint

        before, after = of_checkpoint(args.model_dir), of_checkpoint(args.other)
        result = Diff("checkpoint", {}, changes(before, after, progress=_progress(len(before) + len(after))))
    else:
        if not (args.variant and args.where):
            raise DiffInputError(
                "surgery diff needs --variant and --where (what to apply to MODEL_DIR), or a second checkpoint "
                'directory to compare with, e.g. surgery diff base/ merged/ or surgery diff base/ --variant "LoRA(r=8)" '
                '--where "*.q_proj".'
            )
        variant = parse_variant(args.variant)
        model = load_model(args.model_dir)
        before = copy.deepcopy(model)
        rewrite(model, variant, args.where)
        result = compute(before, model)
    if not args.output:
        print(result)
    for out in args.output:
        kind = kinds[Path(out).suffix.lower()]
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        if kind == "text":
            Path(out).write_text(str(result) + "\n", encoding="utf-8")
        elif kind == "svg":
            result.to_svg(out)
        else:
            result.to_html(out)
        print(f"wrote {out}")
    return 1 if args.other is not None and result else 0


def _progress(n: int):
    """A progress bar on stderr for long comparisons (tqdm, which transformers brings), else none."""
    if n < 200:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return lambda items: tqdm(items, desc="comparing", unit="tensor", file=sys.stderr)


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                    "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model", "spiece.model", "chat_template.jinja")


def _output_dir(out: str, model_dir: str, what: str):
    """The output directory of merge / export-peft, checked before any work is done."""
    from pathlib import Path

    path = Path(out)
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"-o {out!r} is a file; {what} is a directory. Name a new or existing directory.")
    if path.resolve() == Path(model_dir).resolve():
        raise OutputPathError(
            f"-o {out!r} is the base model's own directory; writing there would overwrite the base. Name another directory."
        )
    return path


def _apply_adapter(model, adapter: str) -> None:
    """A PEFT adapter directory goes through import_peft, a model-surgery file through load."""
    from pathlib import Path

    from .io import load
    from .peft_format import import_peft

    (import_peft if Path(adapter).is_dir() else load)(model, adapter)


@command(
    arg("model_dir", help="the base model's directory (save_pretrained); read from local files only"),
    arg("adapter", help="a model-surgery adapter file (.safetensors) or a PEFT adapter directory"),
    arg("-o", "--output", required=True, metavar="OUT_DIR", help="where to write the merged checkpoint"),
)
def merge(args: argparse.Namespace) -> int | None:
    """Apply an adapter to a saved model, fold it into the weights and save a plain checkpoint."""
    import shutil
    from pathlib import Path

    from tqdm import tqdm

    from .ops import merge as fold

    out = _output_dir(args.output, args.model_dir, "a merged checkpoint")
    model = load_model(args.model_dir)
    _apply_adapter(model, args.adapter)
    fold(model, progress=lambda pairs: tqdm(pairs, desc="folding", unit="site", file=sys.stderr))
    model.save_pretrained(out)
    copied = [n for n in _TOKENIZER_FILES if (Path(args.model_dir) / n).is_file()]
    for name in copied:  # the merged model keeps the base's tokenizer, so the folder loads as one unit
        shutil.copy2(Path(args.model_dir) / name, out / name)
    print(f"wrote a merged checkpoint to {out}" + (f" (with {len(copied)} tokenizer files)" if copied else ""))
    return 0


@command(
    arg("model_dir", help="the base model's directory (save_pretrained); read from local files only"),
    arg("adapter", help="a model-surgery adapter file (.safetensors), as written by surgery.save"),
    arg("-o", "--output", required=True, metavar="PEFT_DIR", help="where to write the PEFT adapter directory"),
)
def export_peft(args: argparse.Namespace) -> int | None:
    """Convert a model-surgery adapter to PEFT's format (adapter_config.json + adapter_model.safetensors)."""
    from .io import load
    from .peft_format import export_peft as export

    out = _output_dir(args.output, args.model_dir, "a PEFT adapter")
    model = load_model(args.model_dir)
    load(model, args.adapter)
    print(f"wrote a PEFT adapter to {export(model, out)}")
    return 0


# ----- entry point -----


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="surgery", description="Inspect, diff and fold model-surgery adapters.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for fn, arguments in _COMMANDS:
        doc = (fn.__doc__ or "").strip().splitlines()
        p = sub.add_parser(fn.__name__.replace("_", "-"), help=doc[0] if doc else None,
                           description=(fn.__doc__ or "").strip() or None)
        for names, kwargs in arguments:
            p.add_argument(*names, **kwargs)
        p.set_defaults(_run=fn)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args._run(args) or 0
    except SurgeryError as e:
        print(f"surgery {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
