"""Run a notebook headless (a real Jupyter kernel) and print what each cell shows.

    python notebooks/run.py notebooks/quickstart.ipynb [--save OUT.ipynb]

This is the README's main job: the quick start notebook, executed on the
local backend, with its outputs printed as text (images as a placeholder).
"""

from __future__ import annotations

import argparse
import sys
import time

import nbformat
from nbclient import NotebookClient


def text_of(output: dict) -> str:
    """A terminal rendering of one cell output."""
    kind = output.get("output_type")
    if kind == "stream":
        return output.get("text", "")
    if kind in ("display_data", "execute_result"):
        data = output.get("data", {})
        prefix = f"Out[{output.get('execution_count')}]: " if kind == "execute_result" else ""
        if "image/png" in data:
            return f"{prefix}[image/png, {len(data['image/png']) * 3 // 4:,} bytes]\n"
        return prefix + str(data.get("text/markdown") or data.get("text/plain", "")) + "\n"
    if kind == "error":
        return f"{output.get('ename')}: {output.get('evalue')}\n"
    return ""


def main(argv: list[str] | None = None) -> int:
    """Execute the notebook, print it, return 0 when every cell ran as its tags expect."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("notebook")
    p.add_argument("--save", help="also write the executed notebook here")
    p.add_argument("--timeout", type=int, default=300, help="per-cell timeout in seconds")
    args = p.parse_args(argv)
    nb = nbformat.read(args.notebook, as_version=4)
    t0 = time.perf_counter()
    client = NotebookClient(nb, timeout=args.timeout, kernel_name="python3")
    try:
        client.execute()
        ok = True
    except Exception as exc:  # a cell failed that was not tagged raises-exception
        print(f"\n!! {type(exc).__name__}: {str(exc).splitlines()[-1] if str(exc) else ''}", file=sys.stderr)
        ok = False
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            print("\n" + "\n".join("# " + line for line in cell.source.splitlines()))
            continue
        print(f"\nIn [{cell.get('execution_count') or ' '}]: " + cell.source.replace("\n", "\n        "))
        for output in cell.get("outputs", []):
            sys.stdout.write(text_of(output))
    print(f"\n[{args.notebook} ran in {time.perf_counter() - t0:.1f} s]")
    if args.save:
        nbformat.write(nb, args.save)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
