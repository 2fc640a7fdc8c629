"""`moa base-path`: print the local directory of a base model (converting the default once)."""

from __future__ import annotations

from moa.base import DEFAULT_BASE


def register(sub) -> None:
    p = sub.add_parser("base-path", help="print the local checkpoint directory of a base model")
    p.add_argument("--base", default=DEFAULT_BASE,
                   help=f"'{DEFAULT_BASE}' (embedded default), a local transformers checkpoint dir or a hub id "
                        "(org/name: from the Hugging Face cache, downloaded when online)")
    p.set_defaults(func=run)


def run(args) -> int:
    from moa.base import resolve_base

    print(resolve_base(args.base))
    return 0
